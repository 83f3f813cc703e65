"""The oracle's tensor names: the single table of what each traced tensor is, in pipeline order.

`STAGES` says, per name: which axis grows with the audio, how its rows sit on the padded audio's 16 kHz
clock, its shape as a formula, and the plain-language line `explain` prints. docs/tensors.md documents
the same names and a test keeps the two in step.

The clock (what makes "the earliest failing (position, stage)" well defined): row r of a stage covers
padded samples [hop * r, hop * (r + 1)) and depends on padded samples up to `reach + hop * r` (exclusive),
e.g. mel frame k is a 400-sample window centred on sample 160k, so it has heard up to 160k + 200. Every
stage is causal, so an error that enters at sample s shows in a later stage only in rows whose reach
exceeds s: ordering failures by reach, then by pipeline order, finds the stage where it entered.
"""

import fnmatch
import re
from typing import NamedTuple, Optional

from ...config import N_LEFT_PAD_TOKENS, SAMPLE_RATE, SAMPLES_PER_TOKEN
from ...errors import VoxtralError

LEFT_PAD = N_LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN          # 40960 samples: real audio starts 2560 ms in


class Stage(NamedTuple):
    pattern: str                  # a tensor name; "{i}" stands for a layer number
    time_axis: Optional[int]      # the axis that grows with the audio; None for per-utterance constants
    hop: int                      # padded samples per row along the time axis (0: constants)
    reach: int                    # padded samples row 0 has heard; row r has heard reach + hop * r
    shape: str                    # the shape as a formula (docs/tensors.md's symbols)
    what: str                     # what the stage does, in one line


_POS = (SAMPLES_PER_TOKEN, SAMPLES_PER_TOKEN + 40)         # decoder position p = adapter row p = encoder row 4p + 3
STAGES = (
    Stage("audio", 0, 1, LEFT_PAD + 1, "[N]", "the input: mono float32 samples at 16 kHz"),
    Stage("padded_audio", 0, 1, 1, "[N'], N' = 40960 + N + align + (d + 11) * 1280",
          "2.56 s (32 tokens) of silence on the left; on the right, up to a whole 80 ms "
          "token plus delay + 11 tokens, so the delayed text of the last words still comes out"),
    Stage("mel", 1, 160, 200, "[128, T], T = N' / 160",
          "log-mel spectrogram, 100 frames/s: 25 ms Hann windows every 10 ms, 128 mel bands up to "
          "8 kHz, log10 floored at -6.5, then (x + 4) / 4"),
    Stage("conv1", 0, 160, 200, "[T, C]", "causal convolution over 3 mel frames (stride 1) + GELU: 128 bands -> "
          "encoder width"),
    Stage("conv2", 0, 320, 360, "[T/2, C]", "causal convolution over 3 frames with stride 2 + GELU: halves the rate "
          "to 50 frames/s"),
    Stage("encoder.layers.{i}", 0, 320, 360, "[T/2, C]", "encoder layer: causal sliding-window self-attention with "
          "RoPE, then a SwiGLU MLP, each added to the residual stream"),
    Stage("encoder.layers.{i}.attention", 1, 320, 360, "[H, T/2, T/2]", "opt-in (dump --attention): each head's "
          "attention weights, query rows by key columns"),
    Stage("encoder_out", 0, 320, 360, "[T/2, C]", "the encoder's final RMSNorm"),
    Stage("adapter_in", 0, *_POS, "[T/8, 4C]", "4 consecutive encoder frames side by side: one vector per 80 ms, "
          "the text rate"),
    Stage("adapter_out", 0, *_POS, "[T/8, D]", "projector Linear-GELU-Linear to the decoder width: one audio "
          "embedding per text position"),
    Stage("t_cond", None, 0, -1, "[D]", "sinusoidal embedding of the delay in tokens, [cos | sin]: tells the decoder "
          "how far behind the audio it writes"),
    Stage("decoder.layers.{i}.ada_scale", None, 0, -1, "[D]", "this layer's scale from t_cond "
          "(Linear-GELU-Linear); its MLP input is RMSNorm(h) * (1 + scale)"),
    Stage("prompt_ids", None, 0, -1, "[P], P = 33 + d", "the prompt: BOS, then STREAMING_PAD over the 32 silent "
          "tokens and the delay"),
    Stage("decoder_in", 0, *_POS, "[L-1, D], L = P + len(token_ids)", "token embedding + audio embedding of each "
          "position (added; no placeholder tokens)"),
    Stage("decoder.layers.{i}", 0, *_POS, "[L-1, D]", "decoder layer: grouped-query causal self-attention with RoPE "
          "and a KV cache, then the AdaRMSNorm-scaled SwiGLU MLP"),
    Stage("decoder.layers.{i}.attention", 1, *_POS, "[H, L-1, L-1]", "opt-in (dump --attention): each query "
          "head's attention weights, query positions by key positions"),
    Stage("final_norm", 0, *_POS, "[L-1, D]", "the decoder's final RMSNorm"),
    Stage("logits", 0, *_POS, "[L-1, V]", "a score per vocabulary entry (LM head tied to the token embeddings); the "
          "argmax at position p is token p + 1"),
    Stage("token_ids", 0, *_POS, "[L-P]", "the greedy output after the prompt: text, STREAMING_PAD while waiting "
          "for words, STREAMING_WORD at word boundaries, maybe a final EOS"),
)
TOKEN_ID_NAMES = ("prompt_ids", "token_ids")
# Stages whose rows are decoder positions: they depend on the ids fed back, so they are compared only up
# to the first differing token (and HF's teacher-forced forward has one row more).
POSITION_STAGES = ("decoder_in", "decoder.layers.{i}", "decoder.layers.{i}.attention", "final_norm", "logits")
OPT_IN = ("encoder.layers.{i}.attention", "decoder.layers.{i}.attention")


def name_regex(pattern):
    """A name pattern as a regex matching whole names; "{i}" captures the layer number."""
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"\Z")


_STAGE_RES = [name_regex(s.pattern) for s in STAGES]


def stage_names(cfg, attention=False):
    """Every name in a full dump for this model config, in pipeline order (attention maps if asked)."""
    n_layers = {"encoder": cfg.encoder.n_layers, "decoder": cfg.decoder.n_layers}
    return [s.pattern.format(i=i) for s in STAGES if attention or s.pattern not in OPT_IN
            for i in (range(n_layers[s.pattern.split(".")[0]]) if "{i}" in s.pattern else [None])]


def find_stage(name):
    """(index in STAGES, layer number or -1), or None for a name outside the pipeline."""
    for k, rx in enumerate(_STAGE_RES):
        m = rx.match(name)
        if m:
            return k, int(m.group(1)) if m.groups() else -1
    return None


def stage_of(name):
    """The Stage a name belongs to, or None."""
    s = find_stage(name)
    return STAGES[s[0]] if s else None


def pipeline_order(names):
    """Names sorted as data flows through the model (layers by number); unknown names last, by name."""
    def key(name):
        s = find_stage(name)
        return (*s, name) if s else (len(STAGES), -1, name)
    return sorted(names, key=key)


def row_ms(stage, row):
    """Where row `row` of a stage starts on the padded audio's clock, in ms (real audio starts at 2560)."""
    start = stage.hop * row + (LEFT_PAD if stage.pattern == "audio" else 0)
    return 1000.0 * start / SAMPLE_RATE


def reach(stage, row):
    """Padded samples row `row` has heard; -1 for constants, which depend on no audio."""
    return stage.reach + stage.hop * row if stage.hop else -1


def select(names, patterns):
    """The names matching any pattern: a glob (`decoder.layers.*.ada_scale`) or a prefix ending at a name
    boundary (`encoder` selects encoder.layers.* and encoder_out; `decoder.layers.1` not layer 10)."""
    def hit(name, p):
        return fnmatch.fnmatchcase(name, p) or (name.startswith(p) and name[len(p):][:1] in ("", ".", "_"))
    for p in patterns:
        if not any(hit(n, p) for n in names):
            raise VoxtralError(f"--stages {p!r} matches no tensor; the names are: {', '.join(names)}")
    return [n for n in names if any(hit(n, p) for p in patterns)]

