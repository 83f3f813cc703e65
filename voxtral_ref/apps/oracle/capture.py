"""Running the reference with a trace: every intermediate tensor of one transcription, optionally with
teacher forcing (the port's ids fed back instead of ours), attention maps, or as a live stream."""

import time

import numpy as np

from ...config import SAMPLE_RATE, delay_tokens, prompt_ids
from ...errors import VoxtralError
from ...model import Transcript
from ...stages.attention import ATTENTION_PROBE
from ...stages.audio import to_mono_16k
from ...stages.generate import Decoder, encode, pad_offline
from .names import pipeline_order


class Recorder:
    """The trace callback: collects each name's tensors (one per decoder step for the decoder's) and the
    wall time since the previous traced tensor, summed per name."""

    def __init__(self, attention=False):
        self.parts, self.seconds, self.last = {}, {}, time.perf_counter()
        self.maps, self.pending = {}, None               # attention: name -> [(q_pos, k_pos, probs)]
        self.attention = attention

    def __call__(self, name, tensor):
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.last
        self.parts.setdefault(name, []).append(np.array(tensor))
        if self.pending is not None and name.startswith(("encoder.layers.", "decoder.layers.")):
            self.maps.setdefault(f"{name}.attention", []).append(self.pending)   # the layer just traced
            self.pending = None
        self.last = time.perf_counter()                  # our copies are not the pipeline's time

    def probe(self, q, k, q_pos, k_pos, window):
        """Attention weights of one call [H, Tq, S], recomputed from the roped q and k (the kernels return
        only the output). The visibility rule is the kernels': q_pos - window < k_pos <= q_pos."""
        g = q.shape[1] // k.shape[1]                                               # query heads per kv head
        kk = np.repeat(np.asarray(k, np.float32), g, axis=1)                       # [S, H, hd] (int8 caches dequantised)
        scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(np.float32(q.shape[-1]))   # [H, Tq, S]
        visible = (k_pos[None, :] > q_pos[:, None] - window) & (k_pos[None, :] <= q_pos[:, None])
        scores = np.where(visible[None], scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        self.pending = (np.array(q_pos), np.array(k_pos), p / p.sum(-1, keepdims=True))

    def tensors(self):
        out = {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in self.parts.items()}
        for name, calls in self.maps.items():                                     # [H, queries, keys]
            n = max(int(qp.max()) for qp, _, _ in calls) + 1
            m = np.zeros((calls[0][2].shape[0], n, n), np.float32)
            for qp, kp, probs in calls:
                m[:, qp[:, None], kp[None, :]] = probs
            out[name] = m
        return out


def capture(model, audio, sample_rate=SAMPLE_RATE, delay_ms=None, force_ids=None, attention=False):
    """Transcribe with a trace -> (Transcript, {name: array} in pipeline order, {name: seconds}).

    force_ids: teacher forcing, the ids fed back after the prompt are these (a port's) instead of our
    argmax; the Transcript then holds them, and `Transcript.timings["argmax"]` the ids we would have chosen.
    attention: also trace each layer's attention weights (`*.attention`, [H, T, T]; large)."""
    rec = Recorder(attention)
    probe = ATTENTION_PROBE.set(rec.probe if attention else None)
    try:
        if force_ids is None:
            r = model.transcribe(audio, sample_rate, delay_ms=delay_ms, trace=rec)
        else:
            r = _forced(model, audio, sample_rate, delay_ms, force_ids, rec)
    finally:
        ATTENTION_PROBE.reset(probe)
    tensors = rec.tensors()
    tensors["prompt_ids"] = np.asarray(prompt_ids(delay_tokens(r.delay_ms)), np.int64)
    tensors["token_ids"] = np.asarray(r.token_ids, np.int64)
    return r, {n: tensors[n] for n in pipeline_order(tensors)}, rec.seconds


def _forced(model, audio, sample_rate, delay_ms, ids, trace):
    """Model.transcribe's offline path with the decoder fed `ids` (as a port fed them)."""
    delay_ms = model.cfg.default_delay_ms if delay_ms is None else delay_ms
    n_delay = delay_tokens(delay_ms)
    x = to_mono_16k(audio, sample_rate)                                           # [N] @ 16 kHz
    with model.kernel_mode():
        trace("audio", x)
        embeds = encode(model.weights, pad_offline(x, n_delay), trace=trace)       # [n_tokens, dim]
        argmax = forced_decode(model.weights, embeds, n_delay, ids, trace)
    return Transcript(model.tokenizer.decode(list(ids)), list(ids), delay_ms, len(x), {"argmax": argmax})


def forced_decode(weights, embeds, n_delay, ids, trace=None):
    """Teacher forcing: step the decoder as greedy decoding does, but feed `ids` back instead of its own
    choices, so every position stays comparable after a token differs. -> the ids it would have chosen."""
    dec = Decoder(weights, n_delay, max_positions=len(embeds), trace=trace)
    p = len(dec.prompt)
    if len(ids) > len(embeds) - p:
        raise VoxtralError(f"--force-ids: {len(ids)} ids, but this audio has positions for {len(embeds) - p} "
                           f"generated ids at most ({len(embeds)} audio tokens, a prompt of {p})")
    vocab = weights.cfg.decoder.vocab_size
    if any(not 0 <= int(i) < vocab for i in ids):
        raise VoxtralError(f"--force-ids: every id must be in 0..{vocab - 1}")
    chose = []
    for k, forced in enumerate(ids):
        pos = p + k - 1                                           # position of the last id fed
        chose.append(dec.step(embeds[:p] if k == 0 else embeds[pos:pos + 1]))
        dec.ids[-1] = int(forced)                                 # what the port fed back
    return chose


def capture_stream(model, audio, sample_rate, delay_ms, chunk):
    """Feed `audio` to a live session `chunk` samples at a time, stepping after each feed, then close.
    -> (records, {name: array}): one record per emitted token (samples fed so far at the session's rate,
    position, id, top-two logit margin, whether it came at close()), and the decoder tensors of every
    step concatenated, comparable with an offline dump (a closed stream equals offline)."""
    if chunk <= 0:
        raise VoxtralError(f"--chunk must be a positive number of samples, got {chunk}")
    rec = Recorder()
    from ...runtime.stream import StreamSession
    # the session computes its silence prefix itself (not the saved copy), so every position is traced
    session = StreamSession(model, delay_ms, sample_rate, reuse_prefix=False)
    session._dec.trace = rec                      # per-step slices: the Decoder traces when it has a trace
    p = len(session._dec.prompt)
    records, fed = [], 0

    def emitted(emission, closing):
        parts, n = rec.parts["logits"], len(emission.token_ids)
        for j, token in enumerate(emission.token_ids):
            k = len(records)
            last = parts[len(parts) - n + j][-1]                # the row that chose it: one decoder call per token
            top2 = np.partition(last, -2)[-2:]
            records.append({"samples_fed": fed, "position": p - 1 + k, "token": k, "id": int(token),
                            "margin": float(top2[1] - top2[0]), "at_close": closing})

    for start in range(0, len(audio), chunk):
        session.feed(audio[start:start + chunk])
        fed += len(audio[start:start + chunk])
        emitted(session.step(), False)
    emitted(session.close(), True)
    tensors = rec.tensors()
    tensors["prompt_ids"] = np.asarray(session._dec.prompt, np.int64)
    tensors["token_ids"] = np.asarray(session.token_ids, np.int64)
    return records, {n: tensors[n] for n in pipeline_order(tensors)}

