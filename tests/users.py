"""Another local user, for the tests whose attacker is not us.

The tests run as root, and root ignores file modes: the hostile side runs in
a forked child that drops to an unprivileged user (nobody) first, and works
in a directory both can reach: sticky and world-writable, like /tmp and
/var/tmp where a careless store directory would live.
"""

import os
import pwd
import shutil
import tempfile
from contextlib import contextmanager

import pytest

import procs

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:
    NOBODY = None

needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root and an unprivileged user 'nobody' to play the other local user",
)


def _as_nobody(fn, *args):
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)
    os.umask(0o022)
    return fn(*args)


def as_nobody(fn, *args, timeout=60):
    """fn(*args) in a child running as nobody; its return value."""
    return procs.run(_as_nobody, fn, *args, timeout=timeout)


@contextmanager
def shared_dir(tag):
    """A fresh sticky, world-writable directory under /tmp, removed after."""
    d = tempfile.mkdtemp(
        prefix=f"{os.environ.get('VIRTIO_PY_TEST_SESSION', 'vpt')}-{tag}-", dir="/tmp"
    )
    try:
        os.chmod(d, 0o1777)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
