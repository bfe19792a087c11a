"""virtio-emu: guest workloads and the RFC comparison.

virtio-emu run --name NAME ...   workers on a device whose daemon runs
virtio-emu run --vhost-user PATH workers on any vhost-user-blk back-end
virtio-emu compare ...           the RFC benchmark with its own daemon
"""

import argparse
import os
import sys

from . import limits
from .cliopts import add_event_idx, add_option
from .cliutil import (
    CliError,
    OneLineParser,
    check_output,
    choice_arg,
    limit_arg,
    parse_float,
    run_main,
    size_arg,
)
from .units import parse_size

PROG = "virtio-emu"


def build_parser():
    from .compare.config import BASE  # numpy comes with it: after main() set OpenBLAS up

    p = OneLineParser(
        prog=PROG,
        description="Guest workloads on the virtio_py block device, and the RFC "
        "'virtio: Support releasing lock during kick' comparison.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    sub.add_parser(
        "include-dir",
        help="print the directory of region.h, the region's public C header",
        description="Print the directory holding region.h, for cc -I.",
    )

    r = sub.add_parser(
        "run",
        help="run guest worker processes on a running device",
        description="Start --workers separate processes attached to device "
        "NAME (its daemon must be running); each behaves like dd "
        "bs=BS iflag=direct at iodepth 1, or like an fio job at a "
        "higher iodepth.  All share one virtqueue and its lock "
        "(worker i uses queue i mod queues on a multi-queue device).",
    )
    add_option(
        r, "--name", help="device name (with --vhost-user: the name of the queues' shared memory)"
    )
    add_option(r, "--workers", default=4, help="processes (default 4)")
    add_option(r, "--rw", default="read", help="default read")
    add_option(r, "--bs", default=4096, help="request size (default 4k)")
    add_option(r, "--iodepth", default=1, help="requests in flight per worker (default 1)")
    r.add_argument(
        "--runtime",
        type=limit_arg(limits.RUNTIME, parse_float),
        default=None,
        metavar="S",
        help="seconds to run; the workers go round their area (fio time_based)",
    )
    r.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help="bytes of each worker's area; without --runtime each worker goes "
        "through it once (default: capacity / workers)",
    )
    r.add_argument(
        "--offset",
        type=limit_arg(limits.OFFSET, parse_size),
        default=0,
        help="start of worker 0's area",
    )
    r.add_argument(
        "--verify",
        action="store_true",
        help="writes stamp every sector with its LBA, a seed and a checksum; reads check them",
    )
    r.add_argument(
        "--verify-seed", type=limit_arg(limits.VERIFY_SEED), default=0x5EED, help=argparse.SUPPRESS
    )
    r.add_argument(
        "--rwmixread",
        type=limit_arg(limits.RWMIX_READ),
        default=50,
        help="randrw: percent of reads (default 50)",
    )
    r.add_argument(
        "--strategy",
        **choice_arg(limits.STRATEGY),
        default="hold",
        help="kick path: hold the lock across the kick (2.6.35), release it "
        "around the notify (the RFC), or prepare under it and notify after "
        "(3.16). Default hold",
    )
    r.add_argument(
        "--nd-remedy",
        **choice_arg(limits.ND_REMEDY),
        default="none",
        help="with VIRTIO_F_NOTIFICATION_DATA negotiated: notify under the lock whatever "
        "the strategy (lock), or never move the doorbell backwards (monotonic, emulation "
        "only). Default none",
    )
    add_option(r, "--engine", default="c", help="the per-request loop in C (default) or in Python")
    add_option(
        r,
        "--cpus",
        help="run the workers on these CPUs only (taskset's list: 1, 0-1, 0,2-3), e.g. CPUs "
        "the device's threads do not use (virtio-hostd start --cpus); default: any",
    )
    r.add_argument(
        "--halt-poll-us",
        type=limit_arg(limits.HALT_POLL_US, parse_float),
        default=0.0,
        metavar="US",
        help="a worker waiting for a completion polls for it up to US microseconds "
        "(yielding the CPU) before it sleeps, adapting as cpuidle-haltpoll does: pays "
        "when completions come sooner than a sleep and its wake-up cost; default 0, "
        "sleep at once",
    )
    r.add_argument("--seed", type=int, default=1, help="random offsets (default 1)")
    r.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    v = r.add_argument_group(
        "a vhost-user device (this command is the front-end and lays out the queues)"
    )
    add_option(
        v,
        "--vhost-user",
        help="the socket of a vhost-user-blk back-end (qemu-storage-daemon, "
        "virtio-hostd start --vhost-user) instead of a named device",
    )
    # No defaults: given, they shape the queues, which only --vhost-user may.
    add_option(v, "--queues", default=None, help="default 1")
    add_option(
        v,
        "--queue-size",
        default=None,
        help="entries per queue (default: room for every request in flight, at least 128)",
    )
    add_option(v, "--lock", default=None, help=f"default {limits.LOCK_DEFAULT}")
    add_event_idx(
        v,
        None,
        on="VIRTIO_RING_F_EVENT_IDX (default)",
        off="the NO_NOTIFY / NO_INTERRUPT flags instead",
    )
    add_option(v, "--exit", default=None, help="async only: a vhost-user kick is an eventfd write")
    add_option(
        v,
        "--exit-cost",
        default=None,
        help="extra microseconds spent inside every kick, to model the trap (default 0)",
    )

    c = sub.add_parser(
        "compare",
        help="the RFC benchmark: one run per kick strategy",
        description="Start a daemon on a 12-stripe, 64 KiB-chunk store in a "
        "temporary directory, run the RFC's benchmark (4 workers, "
        "sequential 4 KiB direct reads, one queue, sync exit) once per "
        "strategy (--repeat times, interleaved) and print the RFC's lockstat tables with the % "
        "change against hold, then throughput, kicks and CPU.  "
        "Everything is stopped and removed at the end.",
    )
    c.add_argument(
        "--runtime",
        type=limit_arg(limits.RUNTIME, parse_float),
        default=3.0,
        metavar="S",
        help="seconds per run (default 3)",
    )
    c.add_argument(
        "--repeat",
        type=limit_arg(limits.REPEAT),
        default=3,
        metavar="N",
        help="runs per strategy, interleaved; the tables show medians (default 3)",
    )
    c.add_argument(
        "--strategies",
        default=",".join(limits.STRATEGY.names),
        help="comma-separated, hold first (default hold,release,prepare)",
    )
    g = c.add_argument_group("extra rows (each runs every strategy once more)")
    g.add_argument(
        "--event-idx",
        dest="rows",
        action="append_const",
        const="event-idx",
        help="with VIRTIO_RING_F_EVENT_IDX (the RFC's 2.6.35 had none)",
    )
    g.add_argument(
        "--async-exit",
        dest="rows",
        action="append_const",
        const="async",
        help="async exit (ioeventfd: the kick only posts)",
    )
    g.add_argument(
        "--poll",
        dest="rows",
        action="append_const",
        const="poll",
        help="the daemon polls the ring instead of sleeping on kicks",
    )
    g.add_argument(
        "--shm",
        dest="rows",
        action="append_const",
        const="shm",
        help="a memory-speed store in /dev/shm",
    )
    g.add_argument(
        "--mq",
        dest="rows",
        action="append_const",
        const="mq",
        help="multi-queue: one queue (and lock) per worker",
    )
    g.add_argument(
        "--all",
        dest="all_rows",
        action="store_true",
        help="all five rows above (on a vhost-user device, those it can run)",
    )
    g.add_argument(
        "--row",
        dest="rows",
        action="append",
        metavar="SPEC",
        help="any row: tokens joined by '+', e.g. shm+event-idx+iodepth=16 "
        "(event-idx, no-event-idx, async, sync, poll, notify, shm, disk, mq, placed, "
        "iodepth=N, queues=N, workers=N, lock=K, exit-cost=US, bs=N, rw=M, nd=D, "
        "halt-poll=US: the workers halt poll, as run --halt-poll-us)",
    )
    g.add_argument(
        "--no-rfc-row", action="store_true", help="skip the RFC setup row (only the extra rows)"
    )
    g.add_argument(
        "--notification-data",
        action="store_true",
        help="VIRTIO_F_NOTIFICATION_DATA: every row once with a device that trusts the "
        "doorbell's index and once with one that re-reads avail->idx; the trusting "
        "device's rows also with each driver remedy (notify under the lock, a monotonic "
        "doorbell); a table of reordered doorbells, stalls and the remedies' cost "
        "(not with --poll)",
    )
    b = c.add_argument_group("the RFC setup (every row starts from it)")
    for flag in ("--workers", "--bs", "--iodepth", "--rw"):
        add_option(b, flag, default=BASE[flag[2:]])
    add_option(
        b,
        "--lock",
        default=BASE["lock"],
        help=f"the queue lock's kind (default {BASE['lock']}; see docs/COMPARE.md)",
    )
    add_option(b, "--exit-cost", default=BASE["exit_cost_us"])
    add_option(b, "--size", default=BASE["size"], help="store capacity, sparse (default 1G)")
    b.add_argument(
        "--area",
        type=size_arg,
        default=BASE["area"],
        help="bytes each worker reads round (default 32M), written once before the runs",
    )
    b.add_argument(
        "--no-prewrite",
        action="store_true",
        help="do not write the read area first (reads of holes never touch the disk)",
    )
    for flag in ("--stripes", "--chunk", "--engine"):
        add_option(b, flag, default=BASE[flag[2:]])
    c.add_argument(
        "--device",
        default="native",
        metavar="DEVICE",
        help="what serves the runs: native (our daemon, default), qsd (a "
        "qemu-storage-daemon started on a raw file of --size, QEMU's own virtio-blk "
        "device, over vhost-user) or vhost-user:PATH (any vhost-user-blk back-end "
        "listening at PATH).  A vhost-user device exits async in every row",
    )
    c.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="where the temporary store goes (default: the system's temp dir)",
    )
    c.add_argument("--json", metavar="FILE", help="write every run as JSON")
    c.add_argument("--plot", metavar="FILE.png", help="draw hold/wait times and throughput")
    c.add_argument("--name-prefix", default="vpc", help=argparse.SUPPRESS)
    c.add_argument("--quiet", action="store_true", help="no progress, only the tables")
    return p


VHOST_USER_OPTIONS = ("queues", "queue_size", "lock", "event_idx", "exit", "exit_cost")


def _check_device_args(a):
    """The device's name; one line for options that do not go together."""
    given = [o for o in VHOST_USER_OPTIONS if getattr(a, o) is not None]
    if a.vhost_user:
        from .vhost_front import SYNC_EXIT_REFUSED, default_name

        if a.exit == "sync":
            raise CliError(f"--exit sync: {SYNC_EXIT_REFUSED}")
        return a.name or default_name()
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise CliError(f"{flag} shapes the queues of a --vhost-user device; a named "
                       "device has them from its daemon")  # fmt: skip
    if not a.name:
        raise CliError("give --name NAME (a device whose daemon runs) or --vhost-user PATH")
    return a.name


def _open_vhost_user(a, name):
    """The front-end of `run --vhost-user`: connected, its queues laid out and running."""
    from .vhost_front import VhostUserDisk

    queues = a.queues or 1
    return VhostUserDisk.open(
        a.vhost_user,
        name=name,
        queues=queues,
        queue_size=a.queue_size or limits.queue_size_for(a.workers, a.iodepth, queues),
        lock=a.lock or limits.LOCK_DEFAULT,
        event_idx=True if a.event_idx is None else a.event_idx,
        exit_cost_us=a.exit_cost or 0.0,
    )


def cmd_run(a):
    import contextlib

    from .console import Progress, sigterm_as_interrupt
    from .workload import JobSpec, format_result, run_job, write_json

    if a.json:
        check_output(a.json, "--json")
    spec = JobSpec(
        _check_device_args(a),
        workers=a.workers,
        rw=a.rw,
        bs=a.bs,
        iodepth=a.iodepth,
        runtime=a.runtime,
        size=a.size,
        offset=a.offset,
        verify=a.verify,
        verify_seed=a.verify_seed,
        rwmix_read=a.rwmixread,
        strategy=a.strategy,
        engine=a.engine,
        seed=a.seed,
        nd_remedy=a.nd_remedy,
        cpus=a.cpus,
        halt_poll_us=a.halt_poll_us,
    ).check()
    prog = Progress(sys.stderr)
    # SIGTERM must stop the workers cleanly too: one killed holding the
    # queue lock would hang the device for every later guest.
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())
        stack.callback(prog.clear)
        device = stack.enter_context(_open_vhost_user(a, spec.name)) if a.vhost_user else None
        res = run_job(spec, progress=None if a.quiet else prog, label=a.strategy, device=device)
    if a.json:
        write_json(res, a.json)
    if not a.quiet:
        print(format_result(res))
    v = res["verify"]
    if v and v["failures"]:
        f = v["first"]
        print(
            f"{PROG}: verify failed: {v['failures']} blocks; first at byte {f['offset']} "
            f"(sector {f['sector']}): {f['kind']}",
            file=sys.stderr,
        )
        return 3
    if res["errors"]:
        print(f"{PROG}: {res['errors']} requests failed", file=sys.stderr)
        return 3
    # A death the run did not arm (VIRTIO_PY_CRASH_AT) fails it; the
    # figures are still the survivors'.
    for k in res.get("killed", []):
        if not k.get("armed"):
            print(
                f"{PROG}: worker {k['worker']} killed by {k['signal']}; "
                "the figures are the other workers'",
                file=sys.stderr,
            )
            return 3
    return 0


def cmd_compare(a):
    from .compare import compare, format_tables, write_json

    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    if not strategies:
        raise CliError("--strategies names none of hold, release, prepare")
    rows = [] if a.no_rfc_row else [""]
    extra = list(a.rows or [])
    if a.all_rows:
        every = ["event-idx", "async", "poll", "shm", "mq"]
        if a.device != "native":
            # Async exit is a vhost-user device's base row; poll mode and
            # (for a running back-end) the store are not ours to change.
            every = ["event-idx", "mq"] + (["shm"] if a.device == "qsd" else [])
        extra += [r for r in every if r not in extra]
    rows += extra
    if not rows:
        print(f"{PROG}: error: no rows to run", file=sys.stderr)
        return 2
    # Fail now, not after the runs.
    from .compare.config import parse_device

    parse_device(a.device)
    if a.workdir and not os.path.isdir(a.workdir):
        raise CliError(f"--workdir {a.workdir}: not a directory")
    if a.json:
        check_output(a.json, "--json")
    if a.plot:
        check_output(a.plot, "--plot")
        from .plot import _pyplot

        _pyplot()
    base = {
        "workers": a.workers,
        "bs": a.bs,
        "iodepth": a.iodepth,
        "rw": a.rw,
        "lock": a.lock,
        "exit_cost_us": a.exit_cost,
        "size": a.size,
        "area": a.area,
        "prewrite": not a.no_prewrite,
        "stripes": a.stripes,
        "chunk": a.chunk,
        "engine": a.engine,
    }
    result = compare(
        rows=rows,
        runtime=a.runtime,
        strategies=strategies,
        base=base,
        name_prefix=a.name_prefix,
        workdir=a.workdir,
        verbose=not a.quiet,
        repeat=a.repeat,
        device=a.device,
        notification_data=a.notification_data,
    )
    print(format_tables(result))
    if a.json:
        write_json(result, a.json)
        print(f"{PROG}: wrote {a.json}")
    if a.plot:
        from .plot import plot_compare

        plot_compare(result, a.plot)
        print(f"{PROG}: wrote {a.plot}")
    return 0


def cmd_include_dir(a):
    from . import get_include

    print(get_include())
    return 0


def main(argv=None):
    # numpy comes in with the workloads: its OpenBLAS helper threads would
    # take CPU from the guests and the daemon on a small machine.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return run_main(
        PROG,
        build_parser(),
        {"run": cmd_run, "compare": cmd_compare, "include-dir": cmd_include_dir},
        argv,
        interrupted="interrupted; everything it started was stopped and removed",
    )


if __name__ == "__main__":
    sys.exit(main())
