"""Stage 3: encoder states [T/2, 1280] -> one audio embedding per text token [T/8, 3072].

Four consecutive 50 Hz frames are concatenated (a plain row-major reshape, frame 4i first), so one
embedding covers 80 ms, then projected by Linear(5120 -> 3072), exact GELU, Linear(3072 -> 3072).
"""

from ..runtime import kernels


def downsample(x, factor):
    """[T, C] -> [T // factor, factor * C]. If T is not a multiple of `factor` the OLDEST frames are
    dropped (vLLM's left truncation), so the newest frames always form whole groups. Our padding always
    yields whole groups; the rule matters only to callers passing arbitrary lengths."""
    t, c = x.shape
    x = x[t % factor:]                                                      # [T', C], T' % factor == 0
    return x.reshape(-1, factor * c)                                        # [T' / 4, 4C]


def adapter(x, w_in, w_out):
    """[N, 5120] -> [N, 3072]."""
    return kernels.linear(kernels.gelu(kernels.linear(x, w_in)), w_out)     # [N, 3072] -> [N, 3072]
