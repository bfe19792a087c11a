from setuptools import setup

setup(
    name="virtio_py",
    version="0.1.0",
    description="Multiprocess shared-memory emulator of a virtio block device",
    packages=["virtio_py", "host_daemon"],
    python_requires=">=3.9",
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build_core.py:ffibuilder"],
    install_requires=["cffi>=1.15", "posix_ipc>=1.1", "numpy>=1.21"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "virtio-emu=virtio_py.cli:main",
            "virtio-hostd=host_daemon.cli:main",
        ]
    },
)
