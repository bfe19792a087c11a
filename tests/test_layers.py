"""Layers only look down: the library (virtio_py) never imports the daemon
built on it (host_daemon), and nothing outside the library reaches past its
public API into the cffi module (virtio_py._core) or its one wrapper
(virtio_py._lowlevel).

The tests themselves are exempt: they forge hostile rings and call the C
core directly on purpose.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE = {"virtio_py._core", "virtio_py._lowlevel"}


def modules(top):
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def imported(path):
    """Every module name an import statement of path names (anywhere in the
    file, lazy imports inside functions too), relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", modules("virtio_py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_daemon(path):
    bad = {n for n in imported(path) if n == "host_daemon" or n.startswith("host_daemon.")}
    assert not bad


OUTSIDE = [p for top in ("host_daemon", "bench") for p in modules(top)] + sorted(ROOT.glob("*.py"))


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_the_library_imports_its_private_layer(path):
    assert not imported(path) & PRIVATE


@pytest.mark.parametrize("path", modules("virtio_py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_wrapper_imports_the_cffi_module(path):
    if path.name == "_lowlevel.py" and path.parent.name == "virtio_py":
        return
    assert "virtio_py._core" not in imported(path)


def test_importing_every_library_module_loads_no_daemon_module():
    """The same, as Python sees it: import every module of virtio_py in a
    fresh interpreter; no host_daemon module is loaded, and the environment
    of the importing process is untouched."""
    code = (
        "import os, pkgutil, importlib, sys\n"
        "env = dict(os.environ)\n"
        "import virtio_py\n"
        "for m in pkgutil.walk_packages(virtio_py.__path__, 'virtio_py.'):\n"
        "    if m.name != 'virtio_py.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "assert dict(os.environ) == env, 'importing virtio_py changed os.environ'\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'host_daemon'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
