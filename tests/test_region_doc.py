"""docs/REGION.md is the contract for programs outside the project: its
tables must match csrc/region.h, and docs/attach_example.c (written from the
document alone) must read a live region correctly and drive a request
through it."""
import os
import re
import shutil
import subprocess
import threading

import pytest

from virtio_py import DeviceQueue, Region, SharedLock
from virtio_py._lowlevel import ffi, lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "REGION.md")
EXAMPLE = os.path.join(ROOT, "docs", "attach_example.c")
CSRC = os.path.join(ROOT, "csrc")
CC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler")

MARKER = re.compile(r"<!-- layout: struct (\w+) sizeof=(\d+) -->")
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|[^|]*\|\s*`(\w+)`\s*\|")


def doc_tables():
    """{struct: (sizeof, [(field, offset, size), ...])} from the markers."""
    tables = {}
    lines = open(DOC).read().splitlines()
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
            continue
        rows = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            r = ROW.match(row)
            if r:
                rows.append((r.group(3), int(r.group(1)), int(r.group(2))))
        tables[m.group(1)] = (int(m.group(2)), rows)
    return tables


def compile_c(src_path, out_path, *extra):
    r = subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                        "-o", str(out_path), str(src_path), *extra, "-pthread", "-lrt"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{src_path} does not compile:\n{r.stderr}"
    return str(out_path)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return compile_c(EXAMPLE, tmp_path_factory.mktemp("attach") / "attach_example")


def parse(out):
    """'key value key value ...' lines -> list of dicts (ints where possible)."""
    res = []
    for line in out.splitlines():
        words = line.split()
        d = {"_": words[0]}
        if len(words) % 2 == 0:       # "queue 0 num ..." : leading key+value
            pairs = words
        else:
            pairs = words[1:]
        for k, v in zip(pairs[::2], pairs[1::2]):
            try:
                d[k] = int(v, 0)
            except ValueError:
                d[k] = v
        res.append(d)
    return res


def test_doc_tables_match_region_h(tmp_path):
    tables = doc_tables()
    for s in ("vp_region_header", "vp_queue_info", "vp_queue_shared", "vp_lock",
              "vp_lockstat", "vp_driver_state", "vp_device_stats", "vp_guest_slot",
              "vp_completion", "virtio_blk_config"):
        assert s in tables, f"REGION.md has no layout table of struct {s}"
    body = []
    for s, (_, rows) in tables.items():
        body.append(f'printf("%s sizeof %zu\\n", "{s}", sizeof(struct {s}));')
        for f, _, _ in rows:
            body.append(f'printf("%s.%s %zu %zu\\n", "{s}", "{f}", '
                        f'offsetof(struct {s}, {f}), sizeof(((struct {s} *)0)->{f}));')
    src = tmp_path / "offsets.c"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "region.h"\n'
                   "int main(void)\n{\n\t" + "\n\t".join(body) + "\n\treturn 0;\n}\n")
    exe = compile_c(src, tmp_path / "offsets", f"-I{CSRC}")
    real = {}
    for line in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.splitlines():
        k, *v = line.split()
        real[k] = tuple(int(x) for x in v if x != "sizeof")
    for s, (size, rows) in tables.items():
        assert real[s] == (size,), f"sizeof(struct {s}) is {real[s][0]}, REGION.md says {size}"
        end = 0
        for f, off, sz in rows:
            assert real[f"{s}.{f}"] == (off, sz), \
                f"{s}.{f} is at {real[f'{s}.{f}']} (offset, size), REGION.md says {(off, sz)}"
            # Rows in order, no overlap, holes no wider than alignment padding:
            # a new field has to show up in the table.
            assert off >= end and off - end < 8, f"{s}: undocumented bytes before {f}"
            end = off + sz
        assert size - end < 64, f"{s}: undocumented bytes at the end"


def test_doc_constants_match_region_h():
    text = open(DOC).read()
    assert f"Layout version: **{lib.VP_LAYOUT_VERSION}**" in text
    assert f"{lib.VP_MAGIC:#x}" in text
    assert f"`header_size` | `sizeof(struct vp_region_header)` = " \
           f"{ffi.sizeof('struct vp_region_header')}" in text


@pytest.mark.parametrize("kw", [
    dict(),
    dict(queues=3, queue_size=256, data_size=3 << 20, lock="mutex", exit="sync",
         event_idx=False, mode="poll"),
])
def test_attach_example_reads_live_region(example, name, kw):
    with Region.create(name, **kw) as region:
        out = subprocess.run([example, name], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = parse(out.stdout)
        top = {}
        for d in lines:
            if d["_"] != "queue":
                top.update(d)
        h = region.header
        assert top["version"] == lib.VP_LAYOUT_VERSION
        assert top["header_size"] == h.header_size
        assert top["size"] == region.size
        assert top["name"] == name
        assert top["num_queues"] == region.num_queues
        assert top["data_offset"] == h.data_offset and top["data_size"] == h.data_size
        assert top["event_idx"] == int(region.event_idx)
        assert top["lock_kind"] == h.lock_kind and top["exit_mode"] == h.exit_mode
        assert top["serve_mode"] == h.serve_mode
        queues = [d for d in lines if d["_"] == "queue"]
        assert [d["queue"] for d in queues] == list(range(region.num_queues))
        for d in queues:
            info = region.queue_info(d["queue"])
            for k, v in info.items():
                assert d[k] == v, f"queue {d['queue']} {k}: example read {d[k]}, region has {v}"
            assert d["lock"] == h.lock_kind


@pytest.mark.parametrize("lock,exit,event_idx", [
    ("spin", "async", True),
    ("mutex", "sync", False),
    ("spinyield", "sync", True),
])
def test_attach_example_submits_a_request(example, name, lock, exit, event_idx):
    """The example, as a driver, gets a request through the echo device."""
    with Region.create(name, lock=lock, exit=exit, event_idx=event_idx) as region:
        region.set_daemon_pid(os.getpid())
        with DeviceQueue(region) as dq:
            stop = ffi.new("int32_t *")
            served = []
            t = threading.Thread(target=lambda: served.append(
                dq.echo_serve(1, poll=False, stop=stop)))
            t.start()
            try:
                out = subprocess.run([example, name, "--submit"], capture_output=True,
                                     text=True, timeout=30)
            finally:
                stop[0] = 1
                t.join(10)
            assert not t.is_alive()
        assert out.returncode == 0, out.stderr
        sub = [d for d in parse(out.stdout) if d["_"] == "submit"]
        assert len(sub) == 1
        sub = sub[0]
        assert sub["used_len"] == 64          # the writable buffer's length
        assert sub["first_word"] == 0         # the echo device's first sequence number
        assert sub["kicked"] == 1
        assert served == [1]
        sh = region.queue_shared(0)
        assert sh.drv.num_free == region.queue_info(0)["num"]
        assert sh.drv.added == sh.drv.completed == 1
        assert sh.drv.kicks == 1
        assert sh.dev.chains == 1 and sh.dev.broken == 0
        assert not region.header.status & lib.VP_STATUS_NEEDS_RESET
        assert SharedLock.of_queue(region, 0).raw_stats()["acquisitions"] >= 2
