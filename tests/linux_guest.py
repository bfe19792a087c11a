"""Boot a real Linux guest under QEMU whose virtio-blk disk is a vhost-user-blk
back-end on a Unix socket, run a disk test in it and parse the results.

The guest is the distribution kernel (/boot/vmlinuz-*) with a small initramfs
built here: static busybox, the virtio_blk modules resolved from modules.dep,
and tests/guest/init, which runs one test on /dev/vda and powers off.  Results
come back on the second serial port as "VPY key=value" lines.

    with StorageDaemon(image, sock, num_queues=2):
        res = run_guest(sock, mode="check", num_queues=2, offsets=(0, 1 << 20))
    assert res.ok, res.report()

Modes (tests/guest/init): "check" (driver bound, size, queues, pattern round
trip at offsets with O_DIRECT + flush, concurrent direct reads), "bench"
(concurrent dd bs=4k iflag=direct, MB/s each and total), "loop" (write and
verify the pattern for a number of seconds, reporting every I/O error).

QEMU runs in its own process group with PR_SET_PDEATHSIG, and is killed on
timeout, on any exception and on KeyboardInterrupt.  `python3
tests/linux_guest.py` checks the harness against qemu-storage-daemon.
"""

import ctypes
import gzip
import hashlib
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Debian packages the harness needs (qemu-storage-daemon is in qemu-system-common).
PACKAGES = ("qemu-system-x86", "qemu-system-common", "linux-image-cloud-amd64", "busybox-static")

GUEST_DIR = Path(__file__).resolve().with_name("guest")
INIT_SCRIPT = GUEST_DIR / "init"
CACHE_DIR = Path(os.environ.get("VIRTIO_PY_GUEST_CACHE", "/var/tmp/virtio_py-guest"))
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
BUSYBOX = "/bin/busybox"
# Roots of the module set; their dependencies come from modules.dep.
MODULES = ("virtio_pci", "virtio_blk")
MEM_MB = 512
_FORMAT = 1  # bump when the initramfs layout changes
_VALUE = re.compile(r"^[A-Za-z0-9_.,:+-]*$")
_LINE = re.compile(r"^VPY ([A-Za-z0-9_]+)=(.*)$")


# ---------------------------------------------------------------- host setup


def find_kernel():
    """(vmlinuz path, modules dir, version) of a kernel with virtio_blk.

    VIRTIO_PY_GUEST_KERNEL may name a vmlinuz; else the newest /boot/vmlinuz-*
    whose /lib/modules/<version>/modules.dep exists.  None if there is none.
    """
    want = os.environ.get("VIRTIO_PY_GUEST_KERNEL")
    cands = [Path(want)] if want else sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)
    for vmlinuz in cands:
        version = vmlinuz.name[len("vmlinuz-") :]
        mods = Path("/lib/modules") / version
        if vmlinuz.is_file() and (mods / "modules.dep").is_file():
            return vmlinuz, mods, version
    return None


def _is_static(path):
    """True if the ELF file has no PT_INTERP (no dynamic loader)."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff = int.from_bytes(hdr[32:40], "little")
        phentsize = int.from_bytes(hdr[54:56], "little")
        phnum = int.from_bytes(hdr[56:58], "little")
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    return all(int.from_bytes(ph[i : i + 4], "little") != 3 for i in range(0, len(ph), phentsize))


def missing():
    """What the harness lacks on this host, as a list of short reasons."""
    out = []
    for exe in (QEMU, QSD):
        if not shutil.which(exe):
            out.append(f"{exe} not found")
    if not os.path.exists(BUSYBOX) or not _is_static(BUSYBOX):
        out.append(f"no static {BUSYBOX}")
    k = find_kernel()
    if k is None:
        out.append("no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep")
    elif not os.access(k[0], os.R_OK):
        out.append(f"{k[0]} not readable")
    return out


def ensure_packages():
    """Install PACKAGES with apt-get if something is missing.

    None when the harness can run; else why not (for pytest.skip).  Installs
    only as root; never asks a registry for anything else.
    """
    lack = missing()
    if not lack:
        return None
    if os.geteuid() != 0:
        return (
            "linux guest harness: "
            + "; ".join(lack)
            + " (install as root: apt-get install -y "
            + " ".join(PACKAGES)
            + ")"
        )
    if not shutil.which("apt-get"):
        return "linux guest harness: " + "; ".join(lack) + " and no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    lack = missing()
    if lack:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return "linux guest harness: " + "; ".join(lack) + f" after apt-get ({tail[0]})"
    return None


# ---------------------------------------------------------------- initramfs


def module_order(mods_dir, roots=MODULES):
    """Module files (relative to mods_dir) in load order: dependencies first.

    Modules built into the kernel (modules.builtin) are left out.
    """
    deps = {}
    for line in (Path(mods_dir) / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()

    def name(p):
        base = os.path.basename(p)
        return base[: base.index(".ko")].replace("-", "_")

    by_name = {name(p): p for p in deps}
    builtin = set()
    bfile = Path(mods_dir) / "modules.builtin"
    if bfile.is_file():
        builtin = {name(p) for p in bfile.read_text().split()}
    order = []

    def visit(p):
        if p in order:
            return
        for d in deps[p]:
            visit(d)
        order.append(p)

    for root in roots:
        if root in by_name:
            visit(by_name[root])
        elif root not in builtin:
            raise RuntimeError(f"module {root} neither in modules.dep nor built in ({mods_dir})")
    return order


def _module_bytes(path):
    """The .ko contents, decompressed if the package ships .ko.xz/.zst/.gz."""
    data = Path(path).read_bytes()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
    return data


class _Cpio:
    """A cpio "newc" archive written in memory, so no root is needed for
    /dev/console or for root-owned files."""

    def __init__(self):
        self.buf = bytearray()
        self.ino = 1

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08X" % v for v in fields) + name_b
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name):
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name, data, perm=0o644):
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def close(self):
        self.add("TRAILER!!!", 0)
        return bytes(self.buf)


def build_initramfs(kernel=None):
    """Path of the initramfs (cpio newc, gzip) for kernel, built once per
    kernel version, init script and busybox, and kept in CACHE_DIR."""
    kernel = kernel or find_kernel()
    if kernel is None:
        raise RuntimeError("no kernel: " + "; ".join(missing()))
    _, mods_dir, version = kernel
    init = INIT_SCRIPT.read_bytes()
    bb = os.stat(BUSYBOX)
    key = hashlib.sha256(
        b"%d\0%s\0%s\0%d\0%d" % (_FORMAT, version.encode(), init, bb.st_size, bb.st_mtime_ns)
    ).hexdigest()[:16]
    out = CACHE_DIR / f"initramfs-{version}-{key}.cpio.gz"
    if out.is_file():
        return out

    order = module_order(mods_dir)
    arc = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
    ):
        arc.dir(d)
    arc.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    arc.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    applets = subprocess.run(
        [BUSYBOX, "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for path in applets:
        if path != "bin/busybox":
            arc.symlink(path, "/bin/busybox")
    names = []
    for rel in order:
        base = os.path.basename(rel)
        base = base[: base.index(".ko")] + ".ko"
        arc.file(f"lib/modules/{base}", _module_bytes(str(mods_dir / rel)))
        names.append(base)
    arc.file("lib/modules/order", ("\n".join(names) + "\n").encode())
    arc.file("init", init, 0o755)

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for old in CACHE_DIR.glob(f"initramfs-{version}-*.cpio.gz"):
        if old.name != out.name:  # an older init script's
            old.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".initramfs-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(gzip.compress(arc.close(), 6))
        os.replace(tmp, out)  # atomic: concurrent builders agree
    except BaseException:
        os.unlink(tmp)
        raise
    return out


# ---------------------------------------------------------------- patterns


def pattern(offset, length, tag):
    """The bytes the guest writes at offset: "vpy:TAG:OFFSET\\n" repeated."""
    line = f"vpy:{tag}:{offset}\n".encode()
    return (line * (length // len(line) + 1))[:length]


def image_mismatches(image, offsets, length, tag):
    """Offsets at which the raw image does not hold pattern(offset, length, tag)."""
    bad = []
    with open(image, "rb") as f:
        for off in offsets:
            f.seek(off)
            if f.read(length) != pattern(off, length, tag):
                bad.append(off)
    return bad


def make_image(path, size):
    """A sparse raw image of size bytes (removing an old one)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ---------------------------------------------------------------- processes


def _pdeathsig():
    """preexec_fn: die with the parent, so no QEMU outlives a killed test run.
    The signal comes when the starting *thread* ends: start from the thread
    that lives as long as the process should."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_group(proc, grace=0.0):
    """End proc's process group: SIGTERM first if grace (seconds to wait),
    then SIGKILL; reap proc."""
    if proc is None or proc.poll() is not None:
        return
    sigs = ((signal.SIGTERM, grace),) if grace else ()
    for sig, wait in (*sigs, (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


class StorageDaemon:
    """qemu-storage-daemon exporting a raw image as vhost-user-blk on sock.

    A context manager: __enter__ returns once the export is listening (QSD
    writes its pid file after creating exports), __exit__ stops it and
    removes the socket.  direct=True opens the image with O_DIRECT, which
    tmpfs refuses before Linux 6.6: keep such images under /var/tmp.
    """

    def __init__(
        self, image, sock, *, num_queues=1, direct=True, writable=True, logical_block_size=None
    ):
        self.image, self.sock = str(image), str(sock)
        if "," in self.image + self.sock:
            raise ValueError("QEMU options cannot take paths with commas")
        self.num_queues, self.direct, self.writable = num_queues, direct, writable
        self.logical_block_size = logical_block_size
        self.proc = None
        self._dir = None
        self._log = ""

    def command(self):
        export = (
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={self.sock},"
            f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues}"
        )
        if self.logical_block_size:
            export += f",logical-block-size={self.logical_block_size}"
        blockdev = (
            f"driver=file,node-name=f,filename={self.image},"
            f"cache.direct={'on' if self.direct else 'off'}"
        )
        return [
            QSD,
            "--blockdev",
            blockdev,
            "--export",
            export,
            "--pidfile",
            os.path.join(self._dir, "qsd.pid"),
        ]

    def start(self, timeout=30):
        """Start the daemon (again, after kill()) and wait for its socket."""
        self._dir = tempfile.mkdtemp(prefix="vpy-qsd-")
        try:
            if os.path.exists(self.sock):
                os.unlink(self.sock)  # left by a killed daemon
            with open(os.path.join(self._dir, "qsd.log"), "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_pdeathsig,
                )
            deadline = time.monotonic() + timeout
            pidfile = os.path.join(self._dir, "qsd.pid")
            while not (os.path.exists(pidfile) and os.path.exists(self.sock)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qemu-storage-daemon did not start: {self.log().strip()}")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self):
        """What the daemon printed (kept after it stopped)."""
        if self._dir:
            try:
                self._log = Path(self._dir, "qsd.log").read_text(errors="replace")
            except OSError:
                pass
        return self._log

    def _cleanup(self):
        self.log()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self):
        """SIGKILL, as a crash: the socket file stays (stop() removes it)."""
        _kill_group(self.proc)
        self._cleanup()

    def stop(self):
        """SIGTERM (SIGKILL after 5 s), remove the socket.  Idempotent."""
        _kill_group(self.proc, grace=5)
        if self.sock and os.path.exists(self.sock):
            os.unlink(self.sock)
        self._cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@dataclass
class GuestResult:
    """What a guest run produced.  values: the last value of every VPY key;
    lines: all (key, value) pairs in order; console: the ttyS0 text."""

    command: list
    returncode: int
    timed_out: bool
    wall_s: float
    console: str
    qemu_log: str
    lines: list = field(default_factory=list)
    values: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.values[key]

    def get(self, key, default=None):
        return self.values.get(key, default)

    @property
    def done(self):
        return self.values.get("done") == "1"

    @property
    def ok(self):
        """The script ran to its end without an error of any kind."""
        v = self.values
        if self.timed_out or not self.done or "error" in v:
            return False
        mode = v.get("mode")
        if mode == "check":
            return v.get("pattern") == "ok" and v.get("read_failed") == "0"
        if mode == "bench":
            return v.get("bench_failed") == "0"
        if mode == "loop":
            return v.get("loop_errors") == "0" and v.get("loop_iters", "0") != "0"
        return False

    @property
    def boot_s(self):
        """Guest uptime when /init started: the kernel's boot, without firmware."""
        return int(self.values["init_cs"]) / 100

    def rates(self, name=None):
        """MB/s (10^6 bytes/s) of a parallel-read group: {"jobs": [each dd],
        "total": all bytes over the group's wall time}, timed by the
        guest clock (which follows the host clock under TCG).  name: "read" in
        check mode, "bench" in bench mode."""
        name = name or ("bench" if self.values.get("mode") == "bench" else "read")
        v = self.values
        jobs = int(v[f"{name}_jobs"])
        per_job = int(v[f"{name}_bytes"]) // jobs

        def mb_s(nbytes, cs):
            return nbytes / (cs / 100) / 1e6 if cs > 0 else float("inf")

        each = [mb_s(per_job, int(v[f"{name}{i}_cs"])) for i in range(jobs)]
        return {"jobs": each, "total": mb_s(int(v[f"{name}_bytes"]), int(v[f"{name}_cs"]))}

    def report(self, console_lines=40):
        """A failure message: the values and the console tail."""
        tail = "\n".join(self.console.splitlines()[-console_lines:])
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (
            f"guest {state} after {self.wall_s:.1f} s\nvalues: {self.values}\n"
            f"console tail:\n{tail}\nqemu: {self.qemu_log.strip()}"
        )


class Guest:
    """One QEMU run: start() boots, wait() returns the GuestResult.

    A context manager that kills QEMU on leaving, whatever happened; use it
    directly to act while the guest runs (wait_for a key, then e.g. kill and
    restart the back-end), else use run_guest().

    Parameters of the guest script: mode ("check", "bench", "loop"),
    offsets (bytes, multiples of 4096), length (bytes per offset, multiple of
    4096), tag (pattern tag), jobs and count (parallel reads: dd processes
    and 4 KiB blocks each), secs (loop mode duration).  reconnect: seconds
    between QEMU's reconnection attempts to the socket (0: never), so the
    back-end may be restarted under a running guest.  QEMU is the vhost-user
    client: the back-end listens on sock.  num_queues must not exceed what the
    back-end offers; the guest uses at most smp of them (one per vCPU).
    """

    def __init__(
        self,
        sock,
        *,
        mode="check",
        num_queues=1,
        offsets=(0,),
        length=4096,
        tag="a",
        jobs=4,
        count=256,
        secs=10,
        reconnect=0,
        smp=2,
        accel="tcg",
        cpu="max",
        device_opts=None,
        extra_args=(),
        kernel_args="",
        kernel=None,
    ):
        for off in offsets:
            if off % 4096:
                raise ValueError(f"offset {off} is not a multiple of 4096")
        if length <= 0 or length % 4096:
            raise ValueError(f"length {length} is not a positive multiple of 4096")
        ordered = sorted(offsets)
        if any(b - a < length for a, b in zip(ordered, ordered[1:])):
            raise ValueError(f"offsets {offsets} overlap with length {length}")
        params = {
            "mode": mode,
            "offsets": ",".join(str(o) for o in offsets),
            "len": length,
            "tag": tag,
            "jobs": jobs,
            "count": count,
            "secs": secs,
        }
        for k, v in params.items():
            if not _VALUE.match(str(v)):
                raise ValueError(
                    f"guest parameter {k}={v!r} has characters other than [A-Za-z0-9_.,:+-]"
                )
        self.kernel = kernel or find_kernel()
        if self.kernel is None:
            raise RuntimeError("no kernel: " + "; ".join(missing()))
        self.initrd = build_initramfs(self.kernel)
        self.sock = str(sock)
        if "," in self.sock:
            raise ValueError("QEMU options cannot take paths with commas")
        # quiet keeps the console to errors; panic=-1 with -no-reboot turns a
        # panic (or /init dying) into QEMU's exit; no PS/2 probing.
        append = " ".join(
            [
                "console=ttyS0 quiet panic=-1 oops=panic mitigations=off",
                "i8042.noaux i8042.nokbd i8042.nopnp",
                *kernel_args.split(),
                *(f"vpy_{k}={v}" for k, v in params.items()),
            ]
        )
        chardev = f"socket,id=vu,path={self.sock}" + (
            f",reconnect={reconnect}" if reconnect else ""
        )
        device = f"vhost-user-blk-pci,chardev=vu,num-queues={num_queues}"
        for k, v in (device_opts or {}).items():
            device += f",{k}={v}"
        self.command = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            str(smp),
            "-m",
            f"{MEM_MB}M",
            "-object",
            f"memory-backend-memfd,id=mem,size={MEM_MB}M,share=on",
            "-machine",
            "q35,memory-backend=mem",
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-no-reboot",
            "-serial",
            "file:@CONSOLE@",
            "-serial",
            "file:@RESULTS@",
            "-kernel",
            str(self.kernel[0]),
            "-initrd",
            str(self.initrd),
            "-append",
            append,
            "-chardev",
            chardev,
            "-device",
            device,
            *extra_args,
        ]
        self.proc = None
        self._dir = None
        self._t0 = None

    def _path(self, name):
        return os.path.join(self._dir, name)

    def start(self):
        self._dir = tempfile.mkdtemp(prefix="vpy-guest-")
        cmd = [
            a.replace("@CONSOLE@", self._path("console")).replace(
                "@RESULTS@", self._path("results")
            )
            for a in self.command
        ]
        try:
            with open(self._path("qemu.log"), "wb") as log:
                self._t0 = time.monotonic()
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_pdeathsig,
                )
        except BaseException:
            self.close()
            raise
        return self

    def _read(self, name):
        try:
            return Path(self._path(name)).read_text(errors="replace")
        except OSError:
            return ""

    def lines(self):
        """The (key, value) pairs the guest has reported so far."""
        out = []
        for line in self._read("results").replace("\r", "").splitlines():
            m = _LINE.match(line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def wait_for(self, key, timeout=120):
        """The first value of key once the guest reports it; None if QEMU
        exits or timeout passes first."""
        deadline = time.monotonic() + timeout
        while True:
            for k, v in self.lines():
                if k == key:
                    return v
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def wait(self, timeout=180):
        """Wait for QEMU to exit (killing it after timeout s) and collect."""
        timed_out = False
        try:
            self.proc.wait(max(0.0, self._t0 + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.proc)
        lines = self.lines()
        return GuestResult(
            command=self.proc.args,
            returncode=self.proc.returncode,
            timed_out=timed_out,
            wall_s=time.monotonic() - self._t0,
            console=self._read("console").replace("\r", ""),
            qemu_log=self._read("qemu.log"),
            lines=lines,
            values=dict(lines),
        )

    def close(self):
        _kill_group(self.proc)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def run_guest(sock, *, timeout=180, **params):
    """Boot a guest on the vhost-user-blk socket, run the test, return the
    GuestResult (ok is False on timeout; QEMU is never left running)."""
    with Guest(sock, **params) as g:
        return g.wait(timeout)


# ---------------------------------------------------------------- self-check


def _self_check():
    """Boot against qemu-storage-daemon: queues 1 and 2 with the pattern
    round trip checked in the image, bench MB/s, and loop mode surviving a
    restart of the daemon."""
    reason = ensure_packages()
    if reason:
        print("SKIP:", reason)
        return 0
    t = time.monotonic()
    initrd = build_initramfs()
    print(f"initramfs {initrd} ({os.path.getsize(initrd)} bytes, {time.monotonic() - t:.2f} s)")
    work = tempfile.mkdtemp(prefix="vpy-guest-check-", dir="/var/tmp")
    failures = []

    def outcome(name, good, res, detail=""):
        boot = f"{res.boot_s:.2f}" if "init_cs" in res.values else "?"
        print(
            f"{name}: {'OK' if good else 'FAIL'}  wall {res.wall_s:.1f} s, kernel to /init "
            f"{boot} s{detail}"
        )
        if not good:
            failures.append(name)
            print(res.report())

    def mb(rates):
        return (
            " ".join(f"{x:.1f}" for x in rates["jobs"]) + f" MB/s, total {rates['total']:.1f} MB/s"
        )

    try:
        image = make_image(os.path.join(work, "disk.img"), 64 << 20)
        sock = os.path.join(work, "vhost.sock")
        offsets, length = (0, 12288, 1 << 20, (64 << 20) - 8192), 8192
        for nq in (1, 2):
            tag = f"q{nq}"
            with StorageDaemon(image, sock, num_queues=nq):
                res = run_guest(
                    sock,
                    mode="check",
                    num_queues=nq,
                    offsets=offsets,
                    length=length,
                    tag=tag,
                    jobs=4,
                    count=256,
                )
            bad = image_mismatches(image, offsets, length, tag)
            good = (
                res.ok
                and res.get("num_queues") == str(nq)
                and not bad
                and res.get("size_sectors") == str((64 << 20) // 512)
                and res.get("driver") == "virtio_blk"
            )
            outcome(
                f"check num_queues={nq}",
                good,
                res,
                f", queues seen {res.get('num_queues')}, pattern {res.get('pattern')}, "
                f"image mismatches {bad}, 4 reads: {mb(res.rates()) if res.done else '-'}",
            )
        print("command:", " ".join(res.command))

        with StorageDaemon(image, sock, num_queues=2):
            res = run_guest(sock, mode="bench", num_queues=2, jobs=4, count=2048)
        outcome(
            "bench 4 x dd bs=4k iflag=direct count=2048",
            res.ok,
            res,
            f": {mb(res.rates()) if res.ok else '-'}",
        )

        qsd = StorageDaemon(image, sock).start()
        try:
            with Guest(sock, mode="loop", secs=10, offsets=(0, 1 << 20), reconnect=1) as g:
                if g.wait_for("loop_iter", 120):
                    qsd.kill()
                    time.sleep(1)
                    qsd.start()
                res = g.wait(180)
        finally:
            qsd.stop()
        bad = image_mismatches(image, (0, 1 << 20), 4096, res.get("loop_last_tag"))
        outcome(
            "loop 10 s, daemon killed and restarted",
            res.ok and not bad,
            res,
            f", iterations {res.get('loop_iters')}, errors {res.get('loop_errors')}, "
            f"image mismatches {bad}",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("FAILED: " + ", ".join(failures) if failures else "all OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_self_check())
