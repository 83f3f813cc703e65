"""End-to-end speed of voxtral_ref on the full-size model (not run by CI), next to HF transformers.

    python bench/make_full_checkpoint.py /work/fullsize_ckpt        # once: random weights, real shapes
    python bench/bench_model.py /work/fullsize_ckpt --seconds 10    # table + bench/out/model.json

Reports, for one offline transcription of a clip of --seconds (speech from golden/audio, repeated), once per
--runs configuration (f32 and bf16 matmul inputs, and bf16 with int8 weights, by default; a directory written
by `voxtral-ref quantize` runs its own format, and runs asking for another are skipped): load time (quantising
at load, unless the directory is already quantised), and once per --speculate value and --encoder way (in turn
with the decoder, or ahead of it on a thread of its own: runtime/stream.EncoderAhead): encoder ms per second of
audio (transcribe() encodes in chunks as it decodes: their total, which overlaps decoding when ahead), time to first token, decode ms per token,
the decoder passes and the tokens they kept (a pass verifies drafted tokens when the session has a backlog:
transcribe()'s speculate), the real-time factor (the probes below not counted), peak memory, and the roofline
view: a decoder pass streams every decoder weight and the LM head once (one row or drafts), so its weight GB/s
is compared with this machine's read bandwidth, probed every 8 passes during the run (each probe against the
pass right after it, since the bandwidth drifts by 2x within minutes here). Random weights decide how often
drafts are right (they repeat tokens, and never pad as the real model does), so tokens per pass here says
nothing of the real model's; the encoder is compute-bound, so its time is compared with the time its
arithmetic takes at the peaks of the instructions each part runs on (encoder_bound: FMA, bf16 dot product or
VNNI; the yardsticks are measured in the same run by bench/probes.c, as in bench_kernels.py).

If torch and transformers are importable, the same weights run through HF's
VoxtralRealtimeForConditionalGeneration in a subprocess: the Mistral checkpoint is mapped onto HF's
parameter names without copying (q/k rows permuted to HF's split-half RoPE layout, the only copies),
in bfloat16, HF's default dtype for this model (HF computes in bf16; voxtral_ref keeps float32
activations). HF's offline generate runs the encoder incrementally inside its decode loop, so the
comparable figures are the totals (RTF) and time to first token; its offline encoder (get_audio_features
on the whole padded clip) is timed separately against ours.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import voxtral_ref
from voxtral_ref import config as C
from voxtral_ref.stages.generate import pad_offline
from voxtral_ref.stages.mel import log_mel
from voxtral_ref.checkpoint.weights import canonical_names, read_safetensors
from voxtral_ref.runtime import quant

OUT = ROOT / "bench" / "out"
SPEECH = ROOT / "golden" / "audio" / "speech_en.wav"


def clip(seconds):
    """`seconds` of 16 kHz speech: the golden English sample repeated."""
    x, sr = soundfile.read(SPEECH, dtype="float32")
    assert sr == C.SAMPLE_RATE
    n = int(seconds * C.SAMPLE_RATE)
    return np.tile(x, math.ceil(n / len(x)))[:n]


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux: clear_refs 5), so the probes' buffers do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_status():
    """{VmHWM, VmRSS, RssAnon, RssFile} in GB from /proc/self/status (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0]) / 1e6
    except OSError:
        pass
    return out


# --- model arithmetic (FLOPs and bytes) --------------------------------------------------------------------
def tensor_sizes(model):
    """{canonical name: (elements, bytes as used: the file's, or the quantised panels)}, and "lm_head" for
    the output projection (the tied embedding, or its quantised copy)"""
    out = {}
    for canon, _mistral, _hf, shape in canonical_names(model.cfg):
        n = int(np.prod(shape))
        out[canon] = (n, model.weights[canon].nbytes if len(shape) == 2 else 2 * n)
    out["lm_head"] = (out["tok_embeddings"][0], model.weights.lm_head.nbytes)
    return out


def decode_bytes_per_token(sizes):
    """Every decoder matrix and the LM head are read once per generated token."""
    return sum(b for k, (n, b) in sizes.items() if k == "lm_head" or (k.startswith("dec.layers.") and n > 32 * 3072 // 2))


def linear_params(sizes, prefix):
    return sum(n for k, (n, _) in sizes.items() if k.startswith(prefix) and k.split(".")[-1].startswith("w"))


def encoder_flops(sizes, cfg, frames):
    """(linears, attention): 2 flops per weight per frame (conv1 runs at twice the frame rate); 4 * head_dim
    per visible (query, key) pair per head, half of them the scores', half the value products'."""
    e = cfg.encoder
    lin = 2 * frames * (linear_params(sizes, "enc.layers.") + 2 * sizes["enc.conv1.weight"][0] + sizes["enc.conv2.weight"][0])
    pairs = sum(min(i + 1, e.sliding_window) for i in range(frames))
    return lin, e.n_layers * e.n_heads * 4 * e.head_dim * pairs


def encoder_bound(lin, att, yard, model, isa):
    """Seconds the encoder's arithmetic takes at least, and how: each part at the peak of the instructions it
    runs on. Linears: int8 / q4 weights VPDPBUSD (the VNNI peak, where the CPU has it), bf16 precision the
    bf16 dot product (at the avx512bf16 levels), else float32 FMAs. Attention: the value products are float32
    FMAs; the scores too, except over the quantised modes' int8 caches, where they are integer dots."""
    vnni = yard["vnni_GOP/s"] if np.isfinite(yard["vnni_GOP/s"]) else None
    quantised = any(f in quant.FORMATS for n, f in model.weights.formats().items() if n.startswith("enc.layers."))
    lin_peak, lin_name = ((vnni, "VNNI") if quantised and vnni else
                          (yard["bf16dot_GFLOP/s"], "bf16 dot") if not quantised and model.precision == "bf16"
                          and isa in ("avx512bf16", "avx512amx") else (yard["fma_GFLOP/s"], "FMA"))
    int8_scores = model.kv == "int8" and vnni
    scores_peak = vnni if int8_scores else yard["fma_GFLOP/s"]
    bound = (lin / lin_peak + att / 2 / scores_peak + att / 2 / yard["fma_GFLOP/s"]) / 1e9
    return bound, f"linears at the {lin_name} peak, attention's scores at the {'VNNI' if int8_scores else 'FMA'} one, values FMA"


# --- voxtral_ref -------------------------------------------------------------------------------------------
def run_ours(args, yard, run, speculate, ahead):
    precision, _, quantize = run.partition("+")
    from voxtral_ref.model import Model
    from voxtral_ref.runtime import ckernels
    from voxtral_ref.stages import generate
    reset_peak_rss()
    t = time.perf_counter()
    model = voxtral_ref.load(args.model, backend="c", precision=precision, quantize=quantize or None)
    load_s = time.perf_counter() - t
    if args.threads:
        ckernels.set_threads(args.threads)
    print(f"voxtral_ref, {run}: {ckernels.info()}")
    print(f"  loaded {args.model} in {load_s:.2f} s ({model.weights.n_params() / 1e9:.2f} B parameters, mmap'd)")
    t = time.perf_counter()
    model.transcribe(clip(1.0))                       # faults the mmap'd weights in (a disk read the first time)
    print(f"  warm-up (1 s clip, pages every weight in) {time.perf_counter() - t:.1f} s")

    audio = clip(args.seconds)
    stamps, passes, anon, probes, paused = [], [], [0.0], [], []
    m = machine(yard["threads"])
    real_pass = generate.decoder_pass

    def timed_pass(weights, work, trace=None):
        """A decoder pass timed: (seconds, rows, tokens kept). Every 8th is preceded by a bandwidth probe
        (outside its time: this host's bandwidth drifts by 2x within minutes), compared with that pass. The
        probes' own time (a 256 MB read, some 5-10 ms, every 8 passes) is taken off the totals: `paused` holds
        (when each ended, its seconds). Not with the encoder running ahead: it would go on while the decoder
        paused, and share the read."""
        if not ahead and len(passes) % 8 == 1:
            t = time.perf_counter()
            anon[0] = max(anon[0], rss_status().get("RssAnon", 0.0))
            probes.append((len(passes), m.read_gbs_once()))
            end = time.perf_counter()
            paused.append((end, end - t))
        t = time.perf_counter()
        out = real_pass(weights, work, trace)
        passes.append((time.perf_counter() - t, sum(len(a) for _, a in work), sum(len(o or []) for o in out)))
        return out

    generate.decoder_pass = timed_pass
    default = Model.encodes_ahead
    Model.encodes_ahead = property(lambda self: ahead and default.fget(self))
    try:
        t0 = time.perf_counter()
        result = model.transcribe(audio, on_token=lambda _: stamps.append(time.perf_counter()), speculate=speculate)
        total = time.perf_counter() - t0 - sum(dt for _, dt in paused)
    finally:
        generate.decoder_pass, Model.encodes_ahead = real_pass, default
    decode = passes[1:]                                     # after the prompt's pass: one position (+ drafts) each
    one_row = np.array([s for s, rows, _ in decode if rows == 1])
    drafted = np.array([s for s, rows, _ in decode if rows > 1])
    tokens = sum(n for _, _, n in decode)
    cfg, sizes = model.cfg, tensor_sizes(model)
    n_padded = len(pad_offline(audio, C.delay_tokens(cfg.default_delay_ms)))
    frames = n_padded // C.HOP // 2
    dec_bytes = decode_bytes_per_token(sizes)
    pass_s = float(np.median(one_row)) if len(one_row) else float("nan")
    lin_flops, att_flops = encoder_flops(sizes, cfg, frames)
    enc_flops = lin_flops + att_flops
    status = rss_status()
    r = {
        "run": run, "speculate": speculate, "encoder_ahead": ahead, "clip_s": args.seconds, "padded_s": n_padded / C.SAMPLE_RATE,
        "load_s": load_s, "total_s": total, "rtf": total / args.seconds, "tokens": len(result.token_ids),
        "encoder_s": result.timings["encode_s"], "encoder_ms_per_audio_s": 1e3 * result.timings["encode_s"] / args.seconds,
        "encoder_ms_per_padded_s": 1e3 * result.timings["encode_s"] / (n_padded / C.SAMPLE_RATE),
        "encoder_GFLOP/s": enc_flops / result.timings["encode_s"] / 1e9,
        # decode: passes after the prompt's; a pass of one row reads every decoder weight for one position
        "decode_passes": len(decode), "decode_tokens": tokens, "tokens_per_pass": tokens / max(len(decode), 1),
        "decode_ms_per_token": 1e3 * sum(s for s, _, _ in decode) / max(tokens, 1),
        "one_row_passes": len(one_row), "one_row_pass_ms": 1e3 * pass_s,
        "one_row_pass_ms_p10": 1e3 * float(np.percentile(one_row, 10)) if len(one_row) else float("nan"),
        "drafted_passes": len(drafted), "drafted_pass_ms": 1e3 * float(np.median(drafted)) if len(drafted) else None,
        "decode_weight_GB_per_pass": dec_bytes / 1e9, "one_row_GB/s": dec_bytes / pass_s / 1e9,
        "time_to_first_token_s": stamps[0] - t0 - sum(dt for end, dt in paused if end <= stamps[0]),
        "probes_s": sum(dt for _, dt in paused),
        # the bandwidth probe's buffer (resident in this process, not the model's) is taken out
        "probe_buffer_GB": m.buf.nbytes / 1e9, "peak_rss_GB": status.get("VmHWM") - m.buf.nbytes / 1e9,
        "peak_anon_GB_sampled": max(anon[0], status.get("RssAnon", 0.0)) - m.buf.nbytes / 1e9,
        "file_backed_GB": status.get("RssFile"), "token_ids": list(result.token_ids),
    }
    paired = [(dec_bytes / passes[k][0] / 1e9, bw) for k, bw in probes if k < len(passes)]
    r["read_GB/s_probes"] = [bw for _, bw in probes]
    # each pass that follows a probe (one row or drafts: the weights are read once either way), against it
    r["decode_pct_of_read_bw"] = 100 * float(np.median([d / bw for d, bw in paired])) if paired else float("nan")
    r["encoder_bound_s"], r["encoder_bound"] = encoder_bound(lin_flops, att_flops, yard, model, ckernels.get_isa())
    r["encoder_pct_of_bound"] = 100 * r["encoder_bound_s"] / result.timings["encode_s"]
    return r


# --- HF transformers (subprocess) --------------------------------------------------------------------------
def hf_model(model_dir, dtype_name):
    """VoxtralRealtimeForConditionalGeneration holding the Mistral checkpoint's tensors (shared with the
    mmap, except the RoPE-permuted q/k rows)."""
    import torch
    from transformers import (
        VoxtralRealtimeConfig,
        VoxtralRealtimeForConditionalGeneration,
    )
    from transformers.initialization import no_init_weights

    ours = voxtral_ref.load(model_dir, backend="numpy")
    cfg = ours.cfg
    e, d = cfg.encoder, cfg.decoder
    hcfg = VoxtralRealtimeConfig(
        audio_config={"hidden_size": e.dim, "intermediate_size": e.hidden_dim, "num_hidden_layers": e.n_layers,
                      "num_attention_heads": e.n_heads, "head_dim": e.head_dim, "sliding_window": e.sliding_window,
                      "rms_norm_eps": e.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta}},
        text_config={"hidden_size": d.dim, "intermediate_size": d.hidden_dim, "num_hidden_layers": d.n_layers,
                     "num_attention_heads": d.n_heads, "num_key_value_heads": d.n_kv_heads, "head_dim": d.head_dim,
                     "vocab_size": d.vocab_size, "sliding_window": d.sliding_window, "rms_norm_eps": d.norm_eps,
                     "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta}})
    dtype = getattr(torch, dtype_name)
    torch.set_default_dtype(dtype)
    with no_init_weights():
        model = VoxtralRealtimeForConditionalGeneration(hcfg)
    torch.set_default_dtype(torch.float32)
    tensors = read_safetensors(Path(model_dir) / "consolidated.safetensors")

    def split_half(x, heads):                     # interleaved RoPE rows (Mistral) -> HF's split halves
        hd = x.shape[0] // heads
        return x.reshape(heads, hd // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    rope_heads = {"enc": {"wq": e.n_heads, "bq": e.n_heads, "wk": e.n_heads}, "dec": {"wq": d.n_heads, "wk": d.n_kv_heads}}
    sd = {}
    for canon, mistral, hf, _shape in canonical_names(cfg):
        a = tensors[mistral]
        part = canon.split(".")
        heads = rope_heads[part[0]].get(part[-1]) if part[1:2] == ["layers"] else None
        if heads:
            a = np.ascontiguousarray(split_half(a, heads))
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype.itemsize == 2 else torch.from_numpy(np.asarray(a))
        key = "model.language_model." + hf[len("language_model.model."):] if hf.startswith("language_model.model.") else "model." + hf
        sd[key] = t.to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval(), ours


def hf_worker(args):
    import warnings

    import torch
    from transformers.generation.streamers import BaseStreamer
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    t = time.perf_counter()
    model, ours = hf_model(args.model, args.hf_dtype)
    load_s = time.perf_counter() - t
    n_delay = C.delay_tokens(ours.cfg.default_delay_ms)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def encoder_s(seconds):
        feats = torch.from_numpy(log_mel(pad_offline(clip(seconds), n_delay)))[None].to(model.dtype)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.get_audio_features(input_features=feats, use_cache=False)
        return time.perf_counter() - t0

    def run(seconds):
        feats = log_mel(pad_offline(clip(seconds), n_delay))
        ids = torch.tensor([C.prompt_ids(n_delay)])
        streamer = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, input_features=torch.from_numpy(feats)[None].to(model.dtype),
                                 num_delay_tokens=n_delay, do_sample=False, streamer=streamer)
        return t0, time.perf_counter() - t0, streamer.t[1:], out[0, ids.shape[1]:].tolist()   # put #0: the prompt

    t = time.perf_counter()
    run(1.0)
    warm = time.perf_counter() - t
    t0, total, stamps, new_ids = run(args.seconds)
    steps = np.diff(stamps)
    encoder_s(1.0)
    enc_s = encoder_s(args.seconds)
    padded_s = len(pad_offline(clip(args.seconds), n_delay)) / C.SAMPLE_RATE
    print(json.dumps({"hf_load_s": load_s, "hf_warmup_s": warm, "total_s": total, "rtf": total / args.seconds,
                      "tokens": len(new_ids), "token_ids": new_ids, "time_to_first_token_s": stamps[0] - t0,
                      "step_ms_per_token": 1e3 * float(np.median(steps)), "dtype": args.hf_dtype,
                      "encoder_s": enc_s, "encoder_ms_per_padded_s": 1e3 * enc_s / padded_s,
                      "torch_threads": torch.get_num_threads(), "peak_rss_GB": rss_status().get("VmHWM"),
                      "peak_anon_GB": rss_status().get("RssAnon")}))


def run_hf(args):
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None
    cmd = [sys.executable, __file__, str(args.model), "--seconds", str(args.seconds), "--hf-worker",
           "--hf-dtype", args.hf_dtype] + (["--threads", str(args.threads)] if args.threads else [])
    print(f"HF transformers ({args.hf_dtype}), subprocess: {' '.join(cmd)}", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode:
        print(p.stderr[-3000:])
        return {"error": p.stderr[-500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- main --------------------------------------------------------------------------------------------------
def machine(threads, _cache={}):
    import bench_kernels
    if threads not in _cache:
        _cache[threads] = bench_kernels.Machine(bench_kernels.build_probes(), threads)
    return _cache[threads]


def yardsticks(threads):
    m = machine(threads)
    return {"read_GB/s": m.read_gbs(), "fma_GFLOP/s": m.fma_gflops(), "bf16dot_GFLOP/s": m.bf16dot_gflops(),
            "vnni_GOP/s": m.vnni_gops(), "threads": threads}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="checkpoint directory (bench/make_full_checkpoint.py writes one)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10 s)")
    ap.add_argument("--threads", type=int, default=0, help="threads for both implementations (default: all cores)")
    ap.add_argument("--runs", nargs="+", choices=["f32", "bf16", "f32+int8", "bf16+int8", "f32+q4", "bf16+q4"],
                    default=["f32", "bf16", "bf16+int8"],
                    help="voxtral_ref configurations: matmul input precision, +int8 / +q4 for quantised weights")
    ap.add_argument("--speculate", nargs="+", type=int, default=[None],
                    help="transcribe()'s speculate: drafted tokens verified a pass, at most, one run each (default: "
                         "transcribe()'s own; 0: one position a pass)")
    ap.add_argument("--encoder", nargs="+", choices=["in-turn", "ahead"], default=["in-turn", "ahead"],
                    help="transcribe()'s encoder in turn with the decoder (on demand, all threads), or ahead of it on "
                         "a thread of its own (stream.EncoderAhead, the default on 2 threads): one run each, in "
                         "this order (default both)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    ap.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="HF's dtype (float32 needs ~18 GB of RAM)")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=OUT / "model.json")
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)

    from voxtral_ref.runtime import ckernels
    if not ckernels.available():
        raise SystemExit("the C kernels are not built: pip install . (or python csrc/build_kernels.py)")
    from voxtral_ref.checkpoint import quantized
    if quantized.is_quantized(args.model):   # it runs its own format: a run asking for another would be refused
        recipe = quantized.read_metadata(args.model / quantized.QFILE)["recipe"]
        other = [r for r in args.runs if r.partition("+")[2] not in ("", recipe)]
        args.runs = [r for r in args.runs if r not in other]
        if other:
            print(f"{args.model} holds weights quantised as {recipe!r}: skipping --runs {' '.join(other)}",
                  file=sys.stderr)
        if not args.runs:
            raise SystemExit(f"no --runs left for {args.model}: its weights are quantised as {recipe!r}")
    threads = args.threads or len(os.sched_getaffinity(0))
    if threads != 2 and "ahead" in args.encoder:            # (Model.encodes_ahead)
        print(f"{threads} threads: the encoder runs in turn only (ahead needs 2)", file=sys.stderr)
        args.encoder = [e for e in args.encoder if e != "ahead"] or ["in-turn"]
    yard = yardsticks(threads)
    print(f"machine: read bandwidth {yard['read_GB/s']:.1f} GB/s, FMA peak {yard['fma_GFLOP/s']:.0f} GFLOP/s, "
          f"bf16 dot peak {yard['bf16dot_GFLOP/s']:.0f} GFLOP/s, VNNI peak {yard['vnni_GOP/s']:.0f} GOP/s ({threads} threads, "
          f"bench/probes.c)")
    runs = {}
    for run in args.runs:
        for k, encoder in ((k, e) for k in args.speculate for e in args.encoder):
            name = (run if k is None else f"{run}, speculate={k}") + f", encoder {encoder}"
            ahead = encoder == "ahead"
            ours = runs[name] = run_ours(args, yard, run, k, ahead)
            enc = (f"{ours['encoder_s']:.2f} s = {ours['encoder_ms_per_audio_s']:.0f} ms per audio second "
                   f"({ours['encoder_ms_per_padded_s']:.0f} per padded second); {ours['encoder_GFLOP/s']:.0f} GFLOP/s; "
                   + ("on its thread, alongside the decoder: its threads' share while both work" if ahead else
                      f"its arithmetic's bound {ours['encoder_bound_s']:.2f} s = {ours['encoder_pct_of_bound']:.0f}% of "
                      f"the time ({ours['encoder_bound']})"))
            bws = ours["read_GB/s_probes"] or [float("nan")]
            drafted = (f"; {ours['drafted_passes']} passes verifying drafts, {ours['drafted_pass_ms']:.1f} ms median"
                       if ours["drafted_passes"] else "")
            dec = (f"{ours['decode_ms_per_token']:.1f} ms/token: {ours['decode_tokens']} tokens in {ours['decode_passes']} "
                   f"passes ({ours['tokens_per_pass']:.2f} a pass); {ours['one_row_passes']} one-row passes "
                   f"{ours['one_row_pass_ms']:.1f} ms median ({ours['one_row_pass_ms_p10']:.1f} fastest decile){drafted}; "
                   f"{ours['decode_weight_GB_per_pass']:.2f} GB of weights a pass -> one-row {ours['one_row_GB/s']:.1f} "
                   + ("GB/s median (sharing the read with the encoder; not probed)" if ahead else
                      f"GB/s median; a pass reads them at {ours['decode_pct_of_read_bw']:.0f}% of the read bandwidth "
                      f"(median of the passes right after a probe; probes {min(bws):.1f}-{max(bws):.1f} GB/s)"))
            tot = (f"{ours['tokens']} tokens, {ours['total_s']:.2f} s, RTF {ours['rtf']:.2f} "
                   f"(first token after {ours['time_to_first_token_s']:.2f} s; the probes' {ours['probes_s']:.2f} s "
                   f"not counted)")
            mem = (f"peak RSS {ours['peak_rss_GB']:.2f} GB, of which file-backed weights {ours['file_backed_GB']:.2f} GB; "
                   f"anonymous (sampled) {ours['peak_anon_GB_sampled']:.2f} GB (the bench's {ours['probe_buffer_GB']:.2f} "
                   f"GB bandwidth-probe buffer excluded)")
            rows = [("clip / padded audio", f"{ours['clip_s']:.1f} s / {ours['padded_s']:.2f} s"),
                    ("encoder (ahead)" if ahead else "encoder (in chunks)", enc), ("decode", dec), ("tokens / total / RTF", tot), ("memory", mem)]
            print(f"voxtral_ref (C kernels, {name}; loaded in {ours['load_s']:.1f} s)")
            for key, v in rows:
                print(f"  {key:<22} {v}")
    hf = None if args.no_hf else run_hf(args)
    if hf and "error" not in hf:
        print(f"HF transformers ({hf['dtype']}, {hf['torch_threads']} threads)")
        print(f"  {'encoder (whole file)':<22} {hf['encoder_s']:.2f} s = {hf['encoder_ms_per_padded_s']:.0f} ms per padded "
              f"second (get_audio_features, oneDNN)")
        print(f"  {'tokens / total / RTF':<22} {hf['tokens']} tokens, {hf['total_s']:.2f} s, RTF {hf['rtf']:.2f} "
              f"(first token after {hf['time_to_first_token_s']:.2f} s); {hf['step_ms_per_token']:.1f} ms per step "
              f"(encoder 4 frames + decoder)")
        print(f"  {'memory':<22} peak RSS {hf['peak_rss_GB']:.2f} GB, anonymous {hf['peak_anon_GB']:.2f} GB")
        hf["ours_over_hf"] = {}
        for run, ours in runs.items():
            a, b = ours["token_ids"], hf["token_ids"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            ratios = hf["ours_over_hf"][run] = {
                "same_ids_prefix": same, "total": ours["total_s"] / hf["total_s"],
                "first_token": ours["time_to_first_token_s"] / hf["time_to_first_token_s"],
                "encoder": ours["encoder_s"] / hf["encoder_s"]}
            print(f"  ours ({run}) / HF: total time {ratios['total']:.2f}x, encoder {ratios['encoder']:.2f}x, "
                  f"time to first token {ratios['first_token']:.2f}x; the first {same} of {len(a)} token ids equal "
                  f"(HF rounds every activation to {hf['dtype']}; random weights have small logit gaps)")
    report = {"yardsticks": yard, "voxtral_ref": runs, "hf": hf, "command": " ".join(sys.argv)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    keys = ("rtf", "time_to_first_token_s", "decode_ms_per_token", "tokens_per_pass", "one_row_pass_ms",
            "encoder_ms_per_padded_s", "decode_pct_of_read_bw", "peak_rss_GB")
    summary = {p: {k: r[k] for k in keys} for p, r in runs.items()}
    if hf and "error" not in hf:
        summary["hf"] = {"rtf": hf["rtf"], "encoder_ms_per_padded_s": hf["encoder_ms_per_padded_s"]}
    print(json.dumps({"summary": summary}, indent=1))
    print(f"full report: {args.json}")


if __name__ == "__main__":
    main()
