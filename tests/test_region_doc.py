"""docs/REGION.md and csrc/region.h are the contract for programs outside the
project: the document's tables (layouts, padding, constants, features,
request types) must match the header and the devices, and
docs/attach_example.c, written from the document and the header alone, must
read a live region correctly and drive requests through it: alone on a
queue, from a guest slot beside virtio_py's guests, and of every virtio-blk
type against the host daemon."""

import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from virtio_py import DeviceQueue, Region, SharedLock, VirtioError, Virtqueue
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, GuestSlot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "REGION.md")
EXAMPLE = os.path.join(ROOT, "docs", "attach_example.c")
CSRC = os.path.join(ROOT, "csrc")
HEADER = os.path.join(CSRC, "region.h")
CC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler")

LAYOUT = re.compile(r"<!-- layout: struct (\w+) sizeof=(\d+) -->")
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|[^|]*\|\s*`(\w+)`\s*\|")


def doc_lines():
    with open(DOC) as f:
        return f.read().splitlines()


def table_after(lines, i):
    """The cells of the table rows that follow line i (header and rule skipped)."""
    rows = []
    for row in lines[i + 1 :]:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        rows.append(cells)
    return rows[1:]


def marked_tables(marker):
    """Rows of every table right after <!-- marker -->."""
    lines = doc_lines()
    return [
        r
        for i, line in enumerate(lines)
        if line.strip() == f"<!-- {marker} -->"
        for r in table_after(lines, i)
    ]


def doc_layouts():
    """{struct: (sizeof, [(field, offset, size), ...])} from the layout markers."""
    tables = {}
    lines = doc_lines()
    for i, line in enumerate(lines):
        m = LAYOUT.search(line)
        if not m:
            continue
        rows = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            r = ROW.match(row)
            if r:
                rows.append((r.group(3), int(r.group(1)), int(r.group(2))))
        tables[m.group(1)] = (int(m.group(2)), rows)
    return tables


def unquote(cell):
    return cell.strip("`")


def compile_c(src_path, out_path, *extra):
    r = subprocess.run(
        [
            CC,
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=gnu11",
            "-o",
            str(out_path),
            str(src_path),
            *extra,
            "-pthread",
            "-lrt",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"{src_path} does not compile:\n{r.stderr}"
    return str(out_path)


def run_c(tmp_path, body):
    """Compile and run body (statements of main) against region.h; its stdout."""
    src = tmp_path / "probe.c"
    src.write_text(
        '#include <stdio.h>\n#include <stddef.h>\n#include "region.h"\n'
        "int main(void)\n{\n\t" + "\n\t".join(body) + "\n\treturn 0;\n}\n"
    )
    exe = compile_c(src, tmp_path / "probe", f"-I{CSRC}")
    return subprocess.run([exe], capture_output=True, text=True, check=True).stdout


def macro_values(tmp_path, names, strings=()):
    """{name: value} of macros as region.h (and the kernel headers it
    includes) define them; the names in strings are string macros."""
    body = [
        f'printf("%s %s\\n", "{n}", {n});'
        if n in strings
        else f'printf("%s %llu\\n", "{n}", (unsigned long long)({n}));'
        for n in names
    ]
    out = {}
    for line in run_c(tmp_path, body).splitlines():
        n, v = line.split(" ", 1)
        out[n] = v if n in strings else int(v)
    return out


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Built as REGION.md says: the example, the header's directory, -pthread."""
    return compile_c(EXAMPLE, tmp_path_factory.mktemp("attach") / "attach_example", f"-I{CSRC}")


def parse(out):
    """'key value key value ...' lines -> list of dicts (ints where possible)."""
    res = []
    for line in out.splitlines():
        words = line.split()
        d = {"_": words[0]}
        if len(words) % 2 == 0:  # "queue 0 num ..." : leading key+value
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


# ---- the tables ---------------------------------------------------------------


def test_doc_tables_match_region_h(tmp_path):
    tables = doc_layouts()
    for s in (
        "vp_region_header",
        "vp_queue_info",
        "vp_queue_shared",
        "vp_lock",
        "vp_lockstat",
        "vp_lockhist",
        "vp_driver_state",
        "vp_device_stats",
        "vp_guest_slot",
        "vp_completion",
        "vp_blk_config",
    ):
        assert s in tables, f"REGION.md has no layout table of struct {s}"
    body = []
    for s, (_, rows) in tables.items():
        body.append(f'printf("%s sizeof %zu\\n", "{s}", sizeof(struct {s}));')
        for f, _, _ in rows:
            body.append(
                f'printf("%s.%s %zu %zu\\n", "{s}", "{f}", '
                f"offsetof(struct {s}, {f}), sizeof(((struct {s} *)0)->{f}));"
            )
    real = {}
    for line in run_c(tmp_path, body).splitlines():
        k, *v = line.split()
        real[k] = tuple(int(x) for x in v if x != "sizeof")
    for s, (size, rows) in tables.items():
        assert real[s] == (size,), f"sizeof(struct {s}) is {real[s][0]}, REGION.md says {size}"
        end = 0
        for f, off, sz in rows:
            assert real[f"{s}.{f}"] == (off, sz), (
                f"{s}.{f} is at {real[f'{s}.{f}']} (offset, size), REGION.md says {(off, sz)}"
            )
            assert off >= end, f"{s}: {f} overlaps the field before it, or is out of order"
            end = off + sz


def test_every_gap_between_fields_is_in_the_padding_table():
    """A byte of a struct is either a documented field or documented padding:
    a new field, or a gap moved by a layout change, shows up here."""
    gaps = set()
    for s, (size, rows) in doc_layouts().items():
        end = 0
        for _, off, sz in rows:
            if off > end:
                gaps.add((s, end, off - end))
            end = off + sz
        if size > end:
            gaps.add((s, end, size - end))
    documented = {(unquote(r[0]), int(r[1]), int(r[2])) for r in marked_tables("padding")}
    assert documented == gaps


def test_doc_constants_match_region_h(tmp_path):
    with open(DOC) as f:
        text = f.read()
    assert f"Layout version: **{lib.VP_LAYOUT_VERSION}**" in text
    assert f"{lib.VP_MAGIC:#x}" in text
    assert (
        f"`header_size` | `sizeof(struct vp_region_header)` = "
        f"{ffi.sizeof('struct vp_region_header')}" in text
    )
    rows = marked_tables("constants")
    doc = {unquote(r[0]): r[1] for r in rows}
    strings = {n for n, v in doc.items() if v.startswith('"')}
    real = macro_values(tmp_path, list(doc), strings)
    for n, v in doc.items():
        want = v.strip('"') if n in strings else int(v, 0)
        assert real[n] == want, f"{n} is {real[n]!r} in region.h, REGION.md says {v}"
    # Every constant of the public header is documented.
    with open(HEADER) as f:
        defined = set(re.findall(r"^#define\s+(VP_\w+)(?!\()\s+\S", f.read(), re.MULTILINE))
    assert defined - set(doc) == set(), "constants of region.h missing from REGION.md"


def test_request_and_status_tables_use_the_kernel_values(tmp_path):
    req = [(int(r[0]), unquote(r[1])) for r in marked_tables("requests")]
    st = [(int(r[0]), unquote(r[1])) for r in marked_tables("statuses")]
    assert [n for _, n in req] == [
        "VIRTIO_BLK_T_IN",
        "VIRTIO_BLK_T_OUT",
        "VIRTIO_BLK_T_FLUSH",
        "VIRTIO_BLK_T_GET_ID",
        "VIRTIO_BLK_T_DISCARD",
        "VIRTIO_BLK_T_WRITE_ZEROES",
    ]
    assert [n for _, n in st] == ["VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_UNSUPP"]
    real = macro_values(tmp_path, [n for _, n in req + st])
    for v, n in req + st:
        assert real[n] == v, f"{n} is {real[n]}, REGION.md says {v}"


CONDITIONS = {
    "always": lambda queues, event_idx: True,
    "never": lambda queues, event_idx: False,
    "queues > 1": lambda queues, event_idx: queues > 1,
    "event index": lambda queues, event_idx: event_idx,
    # Offered only when asked for (--notification-data): never in the tests' setups.
    "notification data": lambda queues, event_idx: False,
}


def documented_features(tmp_path, column, queues, event_idx):
    """The feature word REGION.md's table promises for a device configured so."""
    rows = marked_tables("features")
    bits = macro_values(tmp_path, [unquote(r[1]) for r in rows])
    word = 0
    for r in rows:
        assert bits[unquote(r[1])] == int(r[0]), f"{r[1]} is bit {bits[unquote(r[1])]}"
        if CONDITIONS[r[column]](queues, event_idx):
            word |= 1 << int(r[0])
    return word


@pytest.mark.parametrize("queues,event_idx", [(1, True), (2, False), (3, True)])
def test_features_table_is_what_region_create_offers(tmp_path, name, queues, event_idx):
    with Region.create(name, queues=queues, event_idx=event_idx) as region:
        word = region.header.device_features
        assert region.header.driver_features == word
    assert word == documented_features(tmp_path, 2, queues, event_idx)


@pytest.fixture
def blk_daemon(name, tmp_path, daemons):
    """The host daemon on a 1 MiB disk with two queues; its region attached."""
    daemons.start(name, str(tmp_path / "store"), "--queues", 2, "--buffers", "1M", size="1M")
    region = Region.attach(name)
    try:
        yield region
    finally:
        region.close()


def test_features_table_is_what_the_host_daemon_offers(tmp_path, blk_daemon):
    word = blk_daemon.header.device_features
    assert blk_daemon.header.driver_features == word
    assert word == documented_features(tmp_path, 3, 2, True)


# ---- the example, as a driver ---------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "queues": 3,
            "queue_size": 256,
            "data_size": 3 << 20,
            "lock": "mutex",
            "exit": "sync",
            "event_idx": False,
            "mode": "poll",
        },
    ],
)
def test_attach_example_reads_live_region(example, name, kw):
    with Region.create(name, **kw) as region:
        out = subprocess.run(
            [example, name], capture_output=True, text=True, timeout=30, check=False
        )
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


class EchoDevice:
    """The echo device serving queue 0 from a thread until stopped."""

    def __init__(self, region, notification_data=None):
        region.set_daemon_pid(os.getpid())
        self.dq = DeviceQueue(region)
        if notification_data:
            # A re-read far beyond the test's time: only the doorbell moves it.
            self.dq.set_notification_data(notification_data, reread_ms=3_600_000)
        self.stop = ffi.new("int32_t *")
        self.served = []
        self.thread = threading.Thread(
            target=lambda: self.served.append(self.dq.echo_serve(-1, poll=False, stop=self.stop))
        )
        self.thread.start()

    def close(self):
        self.stop[0] = 1
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.dq.close()


def completion(region, slot, tag):
    """(done, len) of a slot's completion record, at the offsets REGION.md gives."""
    layouts = doc_layouts()
    at = {s: {f: off for f, off, _ in rows} for s, (_, rows) in layouts.items()}
    gpa = (
        region.queue_info(0)["shared"]
        + at["vp_queue_shared"]["slot"]
        + slot * layouts["vp_guest_slot"][0]
        + at["vp_guest_slot"]["comp"]
        + tag * layouts["vp_completion"][0]
    )
    raw = region.read(gpa, 8)
    return (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little"))


def run_example(example, name, mode):
    out = subprocess.run(
        [example, name, mode], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in parse(out.stdout) if d["_"] in ("submit", "slot", "blk")]


@pytest.mark.parametrize(
    "lock,exit,event_idx",
    [
        ("spin", "async", True),
        ("mutex", "sync", False),
        ("spinyield", "sync", True),
        ("pvspin", "sync", False),
    ],
)
def test_attach_example_submits_a_request(example, name, lock, exit, event_idx):
    """Alone on the queue, the example gets a request through the echo
    device, reaping on the call notification."""
    with Region.create(name, lock=lock, exit=exit, event_idx=event_idx) as region:
        dev = EchoDevice(region)
        try:
            sub = run_example(example, name, "--submit")
        finally:
            dev.close()
        assert dev.served == [1]
        assert len(sub) == 1
        sub = sub[0]
        assert sub["used_len"] == 64  # the writable buffer's length
        assert sub["first_word"] == 0  # the echo device's first sequence number
        assert sub["kicked"] == 1
        sh = region.queue_shared(0)
        assert sh.drv.num_free == region.queue_info(0)["num"]
        assert sh.drv.added == sh.drv.completed == 1
        assert sh.drv.kicks == 1
        assert sh.dev.chains == 1 and sh.dev.broken == 0
        assert not region.header.status & lib.VP_STATUS_NEEDS_RESET
        assert SharedLock.of_queue(region, 0).raw_stats()["acquisitions"] >= 2


@pytest.mark.parametrize("exit", ["async", "sync"])
def test_attach_example_rings_the_doorbell(example, name, exit):
    """With VIRTIO_F_NOTIFICATION_DATA negotiated the example writes the
    notification word, and a device that trusts it (never reading
    avail->idx) serves the request."""
    with Region.create(name, exit=exit, event_idx=False, notification_data=True) as region:
        dev = EchoDevice(region, notification_data="trust")
        try:
            (sub,) = run_example(example, name, "--submit")
        finally:
            dev.close()
        assert dev.served == [1] and sub["kicked"] == 1
        nd = region.queue_shared(0).nd
        assert region.queue_shared(0).bell.notify == 1 << 16
        assert nd.doorbells == 1 and nd.index == 1 and nd.rereads == 0
        assert nd.reordered == 0 and nd.waiting == 0


@pytest.mark.parametrize("lock,event_idx", [("spin", True), ("mutex", False)])
def test_attach_example_delivers_a_virtio_py_guests_completion(example, name, lock, event_idx):
    """From a slot of its own, the example reaps for the whole queue: a
    virtio_py guest without an interrupt thread finds its completion
    delivered to its slot, with the owner's wake-up counted."""
    with Region.create(name, lock=lock, event_idx=event_idx) as region:
        vq = Virtqueue(Region.attach(name), 0)
        g = GuestSlot(vq, depth=1, irq=False)
        dev = None
        try:
            g.submit(0, T_IN, 0, 512)
            slot = region.queue_shared(0).slot[g.slot]
            delivered, wake_seq = slot.delivered, slot.wake_seq
            dev = EchoDevice(region)
            (sub,) = run_example(example, name, "--slot")
            assert sub["slot"] != g.slot
            assert sub["used_len"] == 64 and sub["delivered_to_others"] == 1
            assert sub["token"] == sub["gen"] << 32 | (sub["slot"] + 1) << 16 | 0  # VP_TOKEN
            assert completion(region, g.slot, 0) == (1, 512 + 1)
            assert slot.delivered == delivered + 1 and slot.wake_seq == wake_seq + 1
            # Released on the way out.
            assert region.queue_shared(0).slot[sub["slot"]].owner_pid == 0
            assert g.wait(0, timeout=5)[1] == 512 + 1
        finally:
            if dev is not None:
                dev.close()
            g.close()
            vq.close()
            vq.region.close()
        sh = region.queue_shared(0)
        assert sh.drv.added == sh.drv.completed == 2
        assert sh.drv.num_free == region.queue_info(0)["num"]


@pytest.mark.parametrize("lock", ["mutex", "pvspin"])
def test_attach_example_shares_a_queue_with_reaping_guests(example, name, lock):
    """The example and a virtio_py guest with its interrupt thread submit on
    one queue at once: whoever takes the call reaps for both, and every
    request of both completes (with a sleeping lock, the example's unlocks
    wake the guest's threads that sleep on it).  The hold histogram still
    counts every acquisition, and every sleep on the lock was ended by a
    counted wake-up."""
    with Region.create(name, lock=lock) as region:
        vq = Virtqueue(Region.attach(name), 0)
        g = GuestSlot(vq, depth=1, irq=True)
        dev = EchoDevice(region)
        stop = threading.Event()
        guest = {"done": 0, "error": None}

        def guest_loop():
            try:
                while not stop.is_set():
                    g.submit(0, T_IN, 0, 512)
                    assert g.wait(0, timeout=10)[1] == 512 + 1
                    guest["done"] += 1
            except (AssertionError, VirtioError) as e:  # reported in the test's thread
                guest["error"] = e

        t = threading.Thread(target=guest_loop)
        t.start()
        try:
            runs = [run_example(example, name, "--slot")[0] for _ in range(5)]
        finally:
            stop.set()
            t.join(20)
            dev.close()
            g.close()
            vq.close()
            vq.region.close()
        assert not t.is_alive() and guest["error"] is None and guest["done"] >= 1
        assert all(r["used_len"] == 64 for r in runs)
        sh = region.queue_shared(0)
        assert sh.drv.added == sh.drv.completed == 5 + guest["done"]
        assert sh.dev.broken == 0
        raw = SharedLock.of_queue(region, 0).raw_stats()
        assert sum(raw["hold_hist"]) == raw["acquisitions"]
        assert raw["sleeps"] == raw["wakeups"]


def test_attach_example_drives_every_request_type(example, name, blk_daemon):
    """Alone on queue 0 of the host daemon, the example sends every request
    type of REGION.md §10 and gets the documented status and used length."""
    got = {d["blk"]: d for d in run_example(example, name, "--blk")}
    OK, IOERR, UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP
    serial = f"vpy-{name}"[:20]
    want = {
        "out": (OK, 1),
        "in": (OK, 8192 + 1),
        "flush": (OK, 1),
        "get_id": (OK, 1 + lib.VIRTIO_BLK_ID_BYTES),
        "write_zeroes": (OK, 1),
        "in_zeroed": (OK, 8192 + 1),
        "discard": (OK, 1),
        "discard_flags": (UNSUPP, 1),
        "in_past_end": (IOERR, 1),
        "out_partial_sector": (IOERR, 1),
        "unknown_type": (UNSUPP, 1),
    }
    assert {k: (d["status"], d["used"]) for k, d in got.items()} == want
    assert got["in"]["match"] == 1 and got["in_zeroed"]["zero"] == 1
    assert got["get_id"]["id"] == serial
    dev = blk_daemon.queue_shared(0).dev
    counts = {
        c: dev.req[getattr(lib, f"VP_REQ_{c}")]
        for c in ("IN", "OUT", "FLUSH", "GET_ID", "DISCARD", "WZEROES", "UNSUPP", "IOERR")
    }
    assert counts == {
        "IN": 3,
        "OUT": 2,
        "FLUSH": 1,
        "GET_ID": 1,
        "DISCARD": 2,
        "WZEROES": 1,
        "UNSUPP": 1,
        "IOERR": 2,
    }
    assert dev.broken == 0 and dev.bytes_read == 2 * 8192 and dev.bytes_written == 8192


def test_installed_header_is_the_one_the_core_is_built_with(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "virtio_py", "include-dir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(out, "region.h"), "rb") as a, open(HEADER, "rb") as b:
        assert a.read() == b.read()
    compile_c(EXAMPLE, tmp_path / "x", f"-I{out}")
