"""virtio-hostd: start, stop and inspect the virtio-blk host daemon."""

import json
import os
import signal
import sys
import time

from virtio_py import limits
from virtio_py.children import STOP_SIGNALS, stop_signals_blocked
from virtio_py.cliopts import add_event_idx, add_option
from virtio_py.cliutil import (
    CliError,
    OneLineParser,
    error_text,
    limit_arg,
    positive_float,
    run_main,
)
from virtio_py.errors import VirtioError
from virtio_py.pidfile import probe, remove_records, take_over_dead
from virtio_py.proc import pid_alive
from virtio_py.region import destroy, exists, ipc_paths
from virtio_py.store import assemble
from virtio_py.units import parse_size

from .daemon import HostDaemon
from .status import device_status, format_status

PROG = "virtio-hostd"


def build_parser():
    p = OneLineParser(
        prog=PROG,
        description="The host side of the virtio_py block device: a daemon that serves "
        "virtio-blk requests from a shared-memory virtqueue out of a striped, "
        "file-backed store.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser(
        "start",
        help="create the device and serve it",
        description="Create the shared region, notifiers and store of device "
        "NAME and serve it.  Detaches once ready unless --foreground.",
    )
    add_option(s, "--name", required=True, help="device name (/dev/shm/NAME)")
    add_option(
        s,
        "--store",
        required=True,
        help="directory of the stripe files (created, sparse, if missing)",
    )
    add_option(s, "--size", default="1G", help="capacity (default 1G)")
    add_option(s, "--stripes", default=12, help="stripe files (default 12)")
    add_option(s, "--chunk", default="64K", help="chunk size (default 64K)")
    add_option(s, "--queues", default=1, help="virtqueues (default 1)")
    add_option(s, "--queue-size", default=128, help="entries per queue (default 128)")
    add_option(
        s,
        "--mode",
        default="notify",
        help="sleep on kicks, or busy-poll with back-off (default notify)",
    )
    add_option(
        s,
        "--exit",
        default="async",
        help="async: a kick only posts (ioeventfd); sync: the kick returns once "
        "the daemon took it (a trapping PIO write). Default async",
    )
    add_option(s, "--exit-cost", default=0.0)
    add_option(
        s,
        "--lock",
        default=limits.LOCK_DEFAULT,
        help=f"kind of the guest's queue lock (default {limits.LOCK_DEFAULT})",
    )
    add_event_idx(
        s,
        True,
        on="offer VIRTIO_RING_F_EVENT_IDX (default)",
        off="use the NO_NOTIFY / NO_INTERRUPT flags instead",
    )
    s.add_argument(
        "--notification-data",
        choices=("trust", "reread"),
        default=None,
        help="offer VIRTIO_F_NOTIFICATION_DATA; the device trusts the doorbell's index "
        "or re-reads avail->idx (default: not offered; not with --mode poll)",
    )
    s.add_argument(
        "--nd-reread-ms",
        type=limit_arg(limits.ND_REREAD_MS),
        default=limits.ND_REREAD_MS_DEFAULT,
        metavar="MS",
        help="trust: read avail->idx after this long without a notification "
        f"(default {limits.ND_REREAD_MS_DEFAULT})",
    )
    s.add_argument(
        "--direct",
        dest="direct",
        action="store_true",
        default=True,
        help="O_DIRECT on the stripe files where supported (default)",
    )
    s.add_argument("--no-direct", dest="direct", action="store_false", help="buffered I/O")
    s.add_argument(
        "--io-threads",
        type=limit_arg(limits.IO_THREADS),
        default=None,
        help="I/O threads per queue with --io-engine threads (default 16; 0, served "
        "inline by the queue's loop, the default on a memory store such as tmpfs); the "
        "uring engine serves a queue with one thread whatever the number above 0",
    )
    s.add_argument(
        "--io-engine",
        choices=("auto", "threads", "uring"),
        default=None,
        help="how I/O threads run disk requests: uring (one thread per queue, batched "
        "io_uring submissions and completions), threads (one request per thread), or "
        "auto: uring where the kernel allows it (default: $VIRTIO_PY_IO_ENGINE, else auto)",
    )
    s.add_argument(
        "--buffers",
        type=limit_arg(limits.BUFFERS, parse_size),
        default="64M",
        help="request buffer area per queue in the region (default 64M)",
    )
    s.add_argument(
        "--serial",
        type=limit_arg(limits.SERIAL, str),
        default=None,
        help="GET_ID serial, 20 bytes at most",
    )
    add_option(
        s,
        "--vhost-user",
        help="serve the queues over vhost-user on the Unix socket PATH (QEMU's "
        "vhost-user-blk-pci) instead of the shared-memory rings",
    )
    add_option(
        s,
        "--cpus",
        help="run the daemon's threads on these CPUs only (taskset's list: 1, 0-1, 0,2-3), "
        "e.g. CPUs the guests' workers do not use (virtio-emu run --cpus); default: any",
    )
    s.add_argument("--foreground", action="store_true", help="do not detach")

    for cmd, text in (
        ("stop", "finish in-flight requests, unlink everything, exit"),
        ("status", "show configuration, queues, counters and lock statistics"),
    ):
        c = sub.add_parser(cmd, help=text, description=text)
        add_option(c, "--name", required=True)
        if cmd == "status":
            c.add_argument("--json", action="store_true", help="print JSON")
        else:
            c.add_argument(
                "--timeout",
                type=positive_float,
                default=30.0,
                help="seconds to wait for the daemon to finish (default 30)",
            )

    a = sub.add_parser(
        "assemble",
        help="write the striped store as one raw image",
        description="Write the logical disk of a store as one raw image "
        "(compare it with cmp or qemu-img compare).",
    )
    add_option(a, "--store", required=True, help="directory of the stripe files (and store.json)")
    a.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="raw image to write, sparse where the disk reads as zeros",
    )
    for flag in ("--stripes", "--chunk", "--size"):
        add_option(a, flag, default=None, help="default: from DIR/store.json")
    return p


def _daemon_from(a):
    return HostDaemon(
        a.name,
        a.store,
        a.size,
        stripes=a.stripes,
        chunk=a.chunk,
        queues=a.queues,
        queue_size=a.queue_size,
        mode=a.mode,
        exit=a.exit,
        lock=a.lock,
        event_idx=a.event_idx,
        direct=a.direct,
        io_threads=a.io_threads,
        exit_cost_us=a.exit_cost,
        buffers=a.buffers,
        serial=a.serial,
        vhost_user=a.vhost_user,
        notification_data=a.notification_data,
        nd_reread_ms=a.nd_reread_ms,
        io_engine=a.io_engine,
        cpus=a.cpus,
    )


def _serve(d, report):
    """Set up, report readiness (or the error) through report(), serve until signalled."""
    d.install_signals()
    try:
        d.setup()
    except (VirtioError, OSError) as e:
        report(f"error: {error_text(e)}")
        return 1
    try:
        for n in d.notices:
            report(f"notice: {n}")
        report(f"ready: serving {d.name} (pid {os.getpid()})")
        d.wait()
    finally:
        d.shutdown()  # also when nobody is left to hear "ready"
    return 0


def _daemon_child(d, r, w):
    """The forked daemon: its own session, no terminal, readiness through w."""
    os.close(r)
    code = 1
    try:
        os.setsid()
        d.install_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked across the fork
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        wf = os.fdopen(w, "w", buffering=1)
        code = _serve(d, lambda m: (wf.write(m + "\n"), wf.flush()) if not wf.closed else None)
    finally:
        os._exit(code)


def cmd_start(a):
    # Early and in one line; the daemon's own lock on the name decides.
    state = probe(a.name)
    if state and state.alive:
        raise CliError(f"a daemon already serves {a.name!r} (pid {state.pid})")
    d = _daemon_from(a)
    if a.foreground:
        return _serve(d, lambda m: print(f"{PROG}: {m}", flush=True))
    r, w = os.pipe()
    pid = 0
    ok = seen_error = False
    try:
        # A Ctrl-C during the fork is raised once it is over (here, so the
        # child is stopped), not dropped inside an at-fork hook.
        with stop_signals_blocked():
            pid = os.fork()
            if pid == 0:
                _daemon_child(d, r, w)
        os.close(w)
        w = -1
        with os.fdopen(r) as rf:
            for line in rf:
                line = line.rstrip("\n")
                if line.startswith("ready:"):
                    print(f"{PROG}: {line}")
                    ok = True
                    break
                seen_error |= line.startswith("error")
                print(
                    f"{PROG}: {line}", file=sys.stderr if line.startswith("error") else sys.stdout
                )
    except KeyboardInterrupt:
        # Given up on: the daemon must not come up behind the user's back.
        if pid:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        raise
    finally:
        if w >= 0:
            os.close(w)
    if not ok:
        _, status = os.waitpid(pid, 0)
        if not seen_error:
            print(
                f"{PROG}: error: the daemon exited before it was ready (wait status {status})",
                file=sys.stderr,
            )
        return 1
    return 0


def _has_objects(name):
    return exists(name) or any(os.path.lexists(p) for p in ipc_paths(name)[1:])


def _remove_leftovers(name):
    """A dead daemon's objects, removed with its name's lock taken over (so
    no daemon is starting on them); how many, or None if a daemon holds the
    name again."""
    lock = take_over_dead(name)
    if lock is None:
        return None
    try:
        remove_records(lock)
        return len(destroy(name))
    finally:
        lock.release()


def cmd_stop(a):
    # Whom to stop comes from the daemon's pidfile and its lock alone,
    # never from the region, where a guest can write any pid.
    state = probe(a.name)
    if state is None and not _has_objects(a.name):
        raise CliError(f"no device named {a.name!r}")
    if state is None or not state.alive:
        removed = _remove_leftovers(a.name)
        if removed is None:
            raise CliError(f"a daemon started on {a.name!r} meanwhile")
        pid = state.pid if state else 0
        print(
            f"{PROG}: daemon of {a.name!r} was not running (pid {pid}); "
            f"removed {removed} leftover objects"
        )
        return 0
    pid = state.pid
    if pid <= 0:
        raise CliError(f"cannot tell the pid of the daemon of {a.name!r}")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it just exited
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        now = probe(a.name)
        if now is None or not now.alive or now.pid != pid:
            # It let go of the name, last of all; what remains is what it
            # could not remove (it died on the way out).
            left = _remove_leftovers(a.name) if now is None or not now.alive else None
            # Give it a moment to exit (a daemon run in-process by a program
            # may stay).
            end = min(deadline, time.monotonic() + 2)
            while pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.01)
            print(
                f"{PROG}: stopped {a.name} (pid {pid})"
                + (f"; removed {left} leftover objects" if left else "")
            )
            return 0
        time.sleep(0.02)
    raise CliError(f"daemon of {a.name!r} (pid {pid}) did not stop within {a.timeout:g} s")


def cmd_status(a):
    state = probe(a.name)
    if not exists(a.name):
        raise CliError(f"no device named {a.name!r}")
    st = device_status(a.name, state)
    if a.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st))
    return 0


def cmd_assemble(a):
    size = assemble(a.store, a.out, a.stripes, a.chunk, a.size)
    print(f"{PROG}: wrote {size} bytes to {a.out}")
    return 0


def main(argv=None):
    return run_main(
        PROG,
        build_parser(),
        {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "assemble": cmd_assemble},
        argv,
        interrupted="interrupted",
    )


if __name__ == "__main__":
    sys.exit(main())
