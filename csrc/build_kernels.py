"""cffi builder for voxtral_ref._kernels.

Used by `pip install .` (setup.py: cffi_modules=["csrc/build_kernels.py:ffibuilder"]) and, for
development, `python csrc/build_kernels.py`, which builds the module in place next to voxtral_ref/*.py.

Portability: the flags are baseline (-O3, no -march), so the library runs on any x86-64; the AVX2 and
AVX-512 loops are enabled per function with target attributes and chosen at run time (dispatch.c).
-ffast-math is deliberately absent and -ffp-contract=off keeps a * b + c from becoming one fused operation
unless a kernel asks for it: the kernels must round like the NumPy twins (the quantisers bit for bit).
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["dispatch.c", "pool.c", "matmul.c", "qmatmul.c", "attention.c", "norms.c", "layer.c", "isa_scalar.c", "isa_avx2.c",
           "isa_avx512.c"]


def _cdef():
    """kernels.h without its preprocessor lines is the cdef."""
    text = (HERE / "kernels.h").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def make_builder(src_dir="csrc"):
    """The FFI builder; `src_dir` as setuptools needs it (relative to the project root, where setup.py
    runs) or absolute (the in-place build below, which compiles from a temporary directory)."""
    ffi = FFI()
    ffi.cdef(_cdef())
    ffi.set_source(
        "voxtral_ref._kernels",
        '#include "kernels.h"',
        sources=[f"{src_dir}/{s}" for s in SOURCES],
        include_dirs=[src_dir],
        extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off", "-pthread"],
        extra_link_args=["-pthread"],
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # In-place development build: compile under build/cffi and copy the module into voxtral_ref/.
    import importlib.machinery
    import shutil
    import sysconfig

    root = HERE.parent
    out = make_builder(str(HERE)).compile(tmpdir=str(root / "build" / "cffi"), verbose=True)
    # the name `pip install -e .` gives it (cffi builds for the stable ABI), so either build replaces the
    # other instead of one shadowing the other
    suffix = ".abi3.so" if ".abi3.so" in importlib.machinery.EXTENSION_SUFFIXES else sysconfig.get_config_var("EXT_SUFFIX")
    dest = root / "voxtral_ref" / ("_kernels" + suffix)
    for stale in (root / "voxtral_ref").glob("_kernels.*"):
        if stale.suffix in (".so", ".pyd"):
            stale.unlink()
    shutil.copy(out, dest)
    print(f"built {dest}")
