"""The store directory gets guest data: the daemon uses only a directory
that is its own.  A directory another local user made (with symlinks in it
to files they want written), one anyone may write, a symlink in place of
the directory or of a stripe file, a stripe file with a second link: each
is refused before anything is written, and the targets stay as they were.
A directory the daemon makes is 0700, store.json is replaced by rename, and
an assembled image is readable by its user alone."""

import os
import stat

import pytest

from hostd_util import hostd, one_line_error, shm_objects
from users import as_nobody, needs_root_and_nobody, shared_dir

SECRET = b"root's own file, not a disk\n" * 100


@pytest.fixture
def target(tmp_path):
    """A file of ours that a hostile store directory points at."""
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    f = d / "target"
    f.write_bytes(SECRET)
    return f


def _refused(name, store, word, *opts):
    p = hostd("start", "--name", name, "--store", store, "--size", "1M", "--stripes", 4, *opts)
    one_line_error(p, "virtio-hostd", word)
    assert shm_objects(name) == []


def _hostile_store(base, target, json_target):
    """As the other user: a store directory full of symlinks."""
    d = os.path.join(base, "store")
    os.mkdir(d, 0o777)
    os.chmod(d, 0o777)
    for i in range(4):
        os.symlink(target, os.path.join(d, f"stripe-{i:02d}.img"))
    os.symlink(json_target, os.path.join(d, "store.json"))
    return d


@needs_root_and_nobody
def test_store_directory_of_another_user_is_refused_and_its_targets_untouched(
    name, target, tmp_path
):
    json_target = tmp_path / "private" / "made-through-store-json"
    with shared_dir("trust") as base:
        store = as_nobody(_hostile_store, base, str(target), str(json_target))
        _refused(name, store, "belongs to uid")
        assert target.read_bytes() == SECRET
        assert not json_target.exists()
        assert sorted(os.listdir(store)) == sorted(
            [f"stripe-{i:02d}.img" for i in range(4)] + ["store.json"]
        )


@needs_root_and_nobody
def test_store_path_that_is_a_symlink_is_refused(name, tmp_path):
    """Another user's symlink where the store should be, pointing at a
    directory of ours: nothing is created there."""
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    with shared_dir("trust") as base:
        link = os.path.join(base, "store")
        as_nobody(os.symlink, str(ours), link)
        _refused(name, link, "symlink")
    assert os.listdir(ours) == []


def test_store_directory_writable_by_others_is_refused(name, tmp_path, target):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    _refused(name, d, "writable by others")
    assert os.listdir(d) == []


@pytest.mark.parametrize(
    "what", ["stripe symlink", "store.json symlink", "second link", "not a file"]
)
def test_our_own_store_directory_with_a_strange_entry_is_refused(what, name, tmp_path, target):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    made = tmp_path / "private" / "made"
    if what == "stripe symlink":
        os.symlink(target, d / "stripe-02.img")
        word = "symlink"
    elif what == "store.json symlink":
        os.symlink(made, d / "store.json")
        word = "symlink"
    elif what == "second link":
        os.link(target, d / "stripe-01.img")
        word = "links"
    else:
        os.mkfifo(d / "stripe-03.img")
        word = "not a regular file"
    _refused(name, d, word)
    assert target.read_bytes() == SECRET
    assert not made.exists()


def test_store_directory_the_daemon_makes_is_private(name, tmp_path, daemons):
    store = tmp_path / "new" / "s"
    daemons.start(name, store, "--stripes", 4, size="1M")
    st = os.lstat(store)
    assert stat.S_IMODE(st.st_mode) == 0o700
    entries = sorted(os.listdir(store))
    # store.json came by rename: no temporary file is left beside it.
    assert entries == sorted([f"stripe-{i:02d}.img" for i in range(4)] + ["store.json"])
    for e in entries:
        assert stat.S_IMODE(os.lstat(store / e).st_mode) == 0o600, e


def test_assembled_image_is_private(name, tmp_path, daemons):
    store = tmp_path / "s"
    daemons.start(name, store, "--stripes", 4, size="1M")
    fresh, existing = tmp_path / "fresh.raw", tmp_path / "existing.raw"
    existing.write_bytes(b"old")
    os.chmod(existing, 0o644)
    for out in (fresh, existing):
        hostd("assemble", "--store", store, "--out", out, check=True)
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o600, out
        assert os.path.getsize(out) == 1 << 20


@needs_root_and_nobody
def test_assemble_does_not_write_through_a_symlink(name, tmp_path, daemons, target):
    store = tmp_path / "s"
    daemons.start(name, store, "--stripes", 4, size="1M")
    with shared_dir("trust") as base:
        out = os.path.join(base, "disk.raw")
        as_nobody(os.symlink, str(target), out)
        p = hostd("assemble", "--store", store, "--out", out)
        one_line_error(p, "virtio-hostd", "symlink")
    assert target.read_bytes() == SECRET
