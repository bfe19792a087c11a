"""cffi build script: compiles csrc/ into the API-mode module virtio_py._core."""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "cdef.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "virtio_py._core",
    '#include "vp.h"\n#include "mem.h"\n#include "guest.h"\n#include "blkdev.h"\n'
    '#include <linux/virtio_config.h>\n#include "crashpoint.h"\n',
    sources=sorted(os.path.relpath(p) for p in glob.glob(os.path.join(HERE, "*.c"))),
    include_dirs=[HERE],
    # -Wshadow: a local once hid the function of the same name.
    extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wshadow", "-Werror"],
    libraries=["pthread", "rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
