"""`voxtral-ref check-stage NAME --input PORT_DUMP`: one reference stage on the port's own input.

compare measures errors that have accumulated through every earlier stage; a bf16 port's accumulated
rounding can hide a small bug. Here the reference runs only stage NAME, in float32, on the tensor the
port fed that stage (from the port's dump), and the result is compared with the port's NAME: the error
is that stage's alone, so even a bf16 port is judged at the scale of one stage's rounding.
"""

import numpy as np

from ...config import delay_tokens, prompt_ids
from ...errors import VoxtralError
from ...runtime import kernels
from ...stages.adapter import adapter, downsample
from ...stages.decoder import ada_scale, decoder_layer, embed, lm_head, time_embedding
from ...stages.encoder import conv1d, conv_left_pad, conv_stem, encoder_layer
from ...stages.mel import log_mel
from .compare import Context, compare_tensor
from .names import STAGES, find_stage


def _take(port, name, ndim, needed_by):
    """The port's tensor `name` without a leading batch dim of 1, as float32."""
    if name not in port:
        raise VoxtralError(f"check-stage {needed_by} runs on the port's {name}: its dump has no such tensor")
    t = np.asarray(port[name])
    while t.ndim > ndim and t.shape[0] == 1:
        t = t[0]
    if t.ndim != ndim or t.dtype.kind not in "fiu":
        raise VoxtralError(f"the port's {name} has shape {list(t.shape)} ({t.dtype}): expected {ndim} dims, numeric")
    if t.dtype.kind == "f" and not np.isfinite(t).all():        # the stage would pass it on: REF NaN too
        raise VoxtralError(f"the port's {name} holds {int((~np.isfinite(t)).sum())} NaN or infinite values: "
                           f"{needed_by} can be checked only on a finite input")
    return t.astype(np.int64 if t.dtype.kind in "iu" else np.float32)


def run_stage(model, name, port, n_delay):
    """-> (what ran, stage NAME computed by the reference from the port's own input tensors)."""
    w, cfg = model.weights, model.cfg
    interleaved = cfg.format == "mistral"
    s = find_stage(name)
    pattern, layer = (STAGES[s[0]].pattern, s[1]) if s else (None, -1)
    stack = cfg.encoder if name.startswith("encoder.") else cfg.decoder
    if layer >= stack.n_layers:
        raise VoxtralError(f"{name}: the model has {stack.n_layers} layers there")

    def take(n, ndim=2):
        return _take(port, n, ndim, name)

    if pattern == "mel":
        return "log-mel of padded_audio", log_mel(take("padded_audio", 1))
    if pattern == "conv1":
        traced = {}
        conv_stem(take("mel"), w, trace=traced.setdefault)                       # conv1 is traced on the way
        return "conv1 of mel", traced["conv1"]
    if pattern == "conv2":
        x = take("conv1")                                                        # [T, C]
        pad = np.zeros((conv_left_pad(2), x.shape[1]), np.float32)               # as conv_stem: zeros, no history
        return "conv2 of conv1", kernels.gelu(conv1d(np.concatenate([pad, x]), w["enc.conv2.weight"],
                                                     w["enc.conv2.bias"], 2))
    if pattern == "encoder.layers.{i}":
        src = "conv2" if layer == 0 else f"encoder.layers.{layer - 1}"
        x = take(src)
        return f"encoder layer {layer} on {src}", encoder_layer(x, np.arange(len(x)), w.layer(f"enc.layers.{layer}"),
                                                                 cfg.encoder, interleaved)
    if pattern == "encoder_out":
        src = f"encoder.layers.{cfg.encoder.n_layers - 1}"
        return f"the final norm on {src}", kernels.rms_norm(take(src), w["enc.norm"], cfg.encoder.norm_eps)
    if pattern == "adapter_in":
        return "the 4-frame grouping of encoder_out", downsample(take("encoder_out"), cfg.downsample)
    if pattern == "adapter_out":
        return "the projector on adapter_in", adapter(take("adapter_in"), w["adapter.w_in"], w["adapter.w_out"])
    if pattern == "t_cond":
        return f"the delay embedding of {n_delay} tokens", time_embedding(n_delay, cfg.decoder.dim)
    if pattern == "decoder.layers.{i}.ada_scale":
        return f"layer {layer}'s ada MLP on t_cond", ada_scale(take("t_cond", 1), w[f"dec.layers.{layer}.ada_down"],
                                                               w[f"dec.layers.{layer}.ada_up"])
    if pattern == "decoder_in":
        ids = np.concatenate([take("prompt_ids", 1), take("token_ids", 1)])
        audio = take("adapter_out")
        n = min(len(ids) - 1, len(audio))                                        # positions 0..L-2
        return "embed(ids) + adapter_out", embed(w["tok_embeddings"], ids[:n]) + audio[:n]
    if pattern == "decoder.layers.{i}":
        src = "decoder_in" if layer == 0 else f"decoder.layers.{layer - 1}"
        h = take(src)
        ada = take(f"decoder.layers.{layer}.ada_scale", 1)
        return (f"decoder layer {layer} on {src}, all positions at once, with the port's ada_scale",
                decoder_layer(h, np.arange(len(h)), w.layer(f"dec.layers.{layer}"), cfg.decoder, ada, interleaved,
                              None))
    if pattern == "final_norm":
        src = f"decoder.layers.{cfg.decoder.n_layers - 1}"
        return f"the final norm on {src}", kernels.rms_norm(take(src), w["dec.norm"], cfg.decoder.norm_eps)
    if pattern == "logits":
        return "the LM head on final_norm", lm_head(take("final_norm"), w.lm_head)
    raise VoxtralError(f"check-stage runs one stage of the pipeline (mel .. logits, a layer by its number), "
                       f"not {name!r}")


def check_stage(model, name, port, rtol, atol, delay_ms=None, precision="f32"):
    """-> (Row comparing the reference's stage NAME on the port's input with the port's NAME, Context, what).
    precision "bf16": the same stage run in bf16 precision is the baseline (compare --baseline's rule), so
    a bf16 port is held to what one stage's bf16 rounding costs."""
    if name not in port:
        raise VoxtralError(f"the port's dump has no {name} to check")
    if "prompt_ids" in port:
        n_delay = len(np.asarray(port["prompt_ids"]).reshape(-1)) - len(prompt_ids(0))
    else:
        n_delay = delay_tokens(model.cfg.default_delay_ms if delay_ms is None else delay_ms)
    with kernels.use(model.backend, "f32"):
        what, ours = run_stage(model, name, port, n_delay)
    base = None
    if precision != "f32":
        with kernels.use(model.backend, precision):
            base = run_stage(model, name, port, n_delay)[1]
    ctx = Context(len(prompt_ids(n_delay)), None, {"encoder": model.cfg.encoder.sliding_window,
                                       "decoder": model.cfg.decoder.sliding_window})
    return compare_tensor(name, ours, port[name], rtol, atol, ctx, base), ctx, what
