"""The experiment's setup: the RFC's defaults, the row language that changes
one thing of them, and the checks that refuse a setup before anything starts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import limits
from ..cpus import split_for_device
from ..errors import ConfigError
from ..units import parse_size

STRATEGY_ORDER = limits.STRATEGY.names  # hold first: the others are compared with it

# The RFC's setup, as close as this machine allows (see docs/COMPARE.md).
BASE: dict[str, Any] = {
    "workers": 4, "rw": "read", "bs": 4096, "iodepth": 1, "queues": 1,
    "exit": "sync", "exit_cost_us": 0.0, "mode": "notify", "event_idx": False,
    "lock": limits.LOCK_DEFAULT, "store": "disk", "stripes": 12, "chunk": 64 << 10,
    "size": 1 << 30, "area": 32 << 20, "prewrite": True, "queue_size": 128,
    "io_threads": None, "engine": "c", "notification_data": None, "placed": False,
    "halt_poll_us": 0.0,
}  # fmt: skip

# Row tokens: each changes one thing of BASE.
ROW_TOKENS: dict[str, dict[str, Any]] = {
    "event-idx": {"event_idx": True}, "no-event-idx": {"event_idx": False},
    "async": {"exit": "async"}, "sync": {"exit": "sync"},
    "poll": {"mode": "poll"}, "notify": {"mode": "notify"},
    "shm": {"store": "shm"}, "disk": {"store": "disk"},
    "mq": {"queues": None},  # one queue per worker
    "placed": {"placed": True},  # the daemon on a CPU of its own, the workers on the rest
}  # fmt: skip
ROW_KEYS: dict[str, Callable[[str], Any]] = {"iodepth": int, "queues": int, "workers": int, "lock": str, "exit-cost": float,
            "bs": parse_size, "rw": str, "nd": str, "halt-poll": float}  # fmt: skip
# A row key's name in the configuration, where the two differ.
ROW_KEY_FIELDS = {"exit-cost": "exit_cost_us", "nd": "notification_data",
                  "halt-poll": "halt_poll_us"}  # fmt: skip

# compare --notification-data: each row runs once per device behaviour, and
# the trusting device's rows also with each driver remedy (the reread device
# is the device's own remedy).  (name, kick strategy, driver remedy).
ND_DEVICES = ("trust", "reread")
ND_REMEDY_VARIANTS = ("lock", "monotonic")


def variants(strategies: Sequence[str], nd: str | None) -> list[tuple[str, str, str]]:
    """The runs of a row: every strategy, and with a trusting device every
    strategy that notifies outside the lock once more with each remedy."""
    out = [(s, s, "none") for s in strategies]
    if nd == "trust":
        for remedy in ND_REMEDY_VARIANTS:
            out += [(f"{s}+{remedy}", s, remedy) for s in strategies if s != "hold"]
    return out


def parse_row(text: str) -> tuple[str, dict[str, Any]]:
    """'shm+event-idx+iodepth=16' -> (label, overrides)."""
    over: dict[str, Any] = {}
    for tok in filter(None, text.split("+")):
        key, eq, val = tok.partition("=")
        if not eq and tok in ROW_TOKENS:
            over.update(ROW_TOKENS[tok])
        elif eq and key in ROW_KEYS:
            try:
                v = ROW_KEYS[key](val)
            except ValueError:
                raise ConfigError(f"bad value in row {text!r}: {tok!r}") from None
            over[ROW_KEY_FIELDS.get(key, key)] = v
        else:
            raise ConfigError(
                f"unknown row token {tok!r} in {text!r}: use {', '.join(ROW_TOKENS)} or "
                f"{', '.join(k + '=N' for k in ROW_KEYS)}, joined by '+'"
            )
    return text, over


# Devices the experiment can run on: its own daemon (native), a
# qemu-storage-daemon it starts on a raw file (qsd), or any vhost-user-blk
# back-end already listening (vhost-user:PATH).
DEVICE_KINDS = ("native", "qsd", "vhost-user:PATH")
# What a vhost-user device changes in BASE: its kick is an eventfd write.
VHOST_USER_BASE: dict[str, Any] = {"exit": "async"}


def parse_device(text: str) -> tuple[str, str | None]:
    """'native', 'qsd' or 'vhost-user:PATH' -> (kind, path or None)."""
    if text in ("native", "qsd"):
        return text, None
    kind, colon, path = text.partition(":")
    if kind == "vhost-user" and colon and path:
        return kind, path
    raise ConfigError(f"device must be one of {', '.join(DEVICE_KINDS)}, not {text!r}")


def check_vhost_user_row(label: str, over: Mapping[str, Any], kind: str) -> None:
    """Refuse a row a vhost-user device cannot run, in one line."""
    from ..vhost_front import SYNC_EXIT_REFUSED

    what = f"row {label!r}" if label else "the base row"
    if over.get("exit") == "sync":
        raise ConfigError(f"{what}: {SYNC_EXIT_REFUSED}")
    if over.get("mode") == "poll":
        raise ConfigError(f"{what}: poll mode is the native daemon's; a vhost-user back-end "
                          "serves its queues its own way")  # fmt: skip
    if over.get("placed"):
        raise ConfigError(f"{what}: placed puts the native daemon on a CPU of its own; a "
                          "vhost-user back-end runs where it was started")  # fmt: skip
    if kind == "vhost-user" and "store" in over:
        raise ConfigError(f"{what}: a running vhost-user back-end has its own store")


def resolve(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A row's configuration: base with the row's changes, checked against
    virtio_py.limits as the daemon would check it."""
    cfg = dict(base)
    cfg.update(over)
    if cfg["queues"] is None:
        cfg["queues"] = cfg["workers"]
    limits.QUEUES.check(cfg["queues"])
    limits.EXIT_COST_US.check(cfg["exit_cost_us"])
    limits.HALT_POLL_US.check(cfg["halt_poll_us"])
    limits.LOCK.check(cfg["lock"])
    limits.EXIT.check(cfg["exit"])
    limits.MODE.check(cfg["mode"])
    limits.check_notification_data(cfg["notification_data"], cfg["mode"])
    limits.check_geometry(cfg["stripes"], cfg["chunk"], cfg["size"])
    if cfg["store"] not in ("disk", "shm"):
        raise ConfigError(f"store must be one of disk, shm, not {cfg['store']!r}")
    cfg["queue_size"] = limits.queue_size_for(
        cfg["workers"], cfg["iodepth"], cfg["queues"], start=cfg["queue_size"]
    )
    limits.BLK_QUEUE_SIZE.check(cfg["queue_size"])
    # cpus: the daemon's (DaemonProcess passes it on); worker_cpus: the jobs'.
    cfg["cpus"] = cfg["worker_cpus"] = None
    if cfg["placed"]:
        split = split_for_device()
        if split is None:
            raise ConfigError("row placed: this process may use one CPU, none to spare")
        cfg["cpus"], cfg["worker_cpus"] = split
    return cfg
