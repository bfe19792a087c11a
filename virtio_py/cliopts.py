"""The device options both command lines take: each declared once, with
its value's type (checked against virtio_py.limits), metavar and usual
help.  virtio-hostd start and assemble, virtio-emu run and compare add
them with their own default, and their own help where the option means
something more to them (``--lock`` of a running device, say)."""

from __future__ import annotations

from typing import Any

from . import limits
from .cliutil import choice_arg, cpus_arg, limit_arg, name_arg, parse_float
from .units import parse_size

OPTIONS: dict[str, dict[str, Any]] = {
    # the device and its store
    "--name": {"type": name_arg, "help": "device name"},
    "--store": {"metavar": "DIR", "help": "directory of the stripe files"},
    "--size": {"type": limit_arg(limits.CAPACITY, parse_size)},
    "--stripes": {"type": limit_arg(limits.STRIPES)},
    "--chunk": {"type": limit_arg(limits.CHUNK, parse_size)},
    # its queues, their lock and the kick
    "--queues": {"type": limit_arg(limits.QUEUES)},
    "--queue-size": {"type": limit_arg(limits.BLK_QUEUE_SIZE)},
    "--lock": choice_arg(limits.LOCK),
    "--mode": choice_arg(limits.MODE),
    "--exit": choice_arg(limits.EXIT),
    "--exit-cost": {
        "type": limit_arg(limits.EXIT_COST_US, parse_float),
        "metavar": "US",
        "help": "extra microseconds spent inside every kick (default 0)",
    },
    "--vhost-user": {"metavar": "PATH"},
    # where its processes run
    "--cpus": {"type": cpus_arg, "metavar": "LIST", "default": None},
    # the guests' workload
    "--workers": {"type": limit_arg(limits.WORKERS)},
    "--bs": {"type": limit_arg(limits.BS, parse_size)},
    "--iodepth": {"type": limit_arg(limits.IODEPTH)},
    "--rw": choice_arg(limits.RW),
    "--engine": choice_arg(limits.ENGINE),
}


def add_option(parser: Any, flag: str, **over: Any) -> Any:
    """Add flag (a key of OPTIONS) to parser, an argparse parser or group;
    over: this command's default, help or other keywords, which win."""
    return parser.add_argument(flag, **{**OPTIONS[flag], **over})


def add_event_idx(parser: Any, default: bool | None, on: str, off: str) -> None:
    """--event-idx / --no-event-idx into event_idx (default: default);
    on, off: their help."""
    for flag, const, text in (("--event-idx", True, on), ("--no-event-idx", False, off)):
        parser.add_argument(
            flag, dest="event_idx", action="store_const", const=const, default=default, help=text
        )


__all__ = ["OPTIONS", "add_event_idx", "add_option"]
