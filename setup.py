# Metadata lives in pyproject.toml; setuptools takes the cffi-built C core only here.
from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffibuilder"])
