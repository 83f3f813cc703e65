from setuptools import setup

# The C kernels: cffi compiles csrc/ into voxtral_ref._kernels (see csrc/build_kernels.py).
setup(cffi_modules=["csrc/build_kernels.py:ffibuilder"])
