"""The RFC benchmark: one run per kick strategy, lockstat tables and more.

``compare(...)`` sets up its own host daemon (a child process, started by
its command line) on a striped store in a temporary directory, runs the
RFC's workload (4 workers, dd bs=4k iflag=direct: sequential 4 KiB reads at
iodepth 1, one queue, sync exit) once per strategy and returns every run's
result; ``format_tables`` prints the RFC's two lockstat tables with the %
change against hold, then throughput, kicks and CPU.  Extra rows change one
thing of the setup (event index, async exit, poll mode, a memory store,
multi-queue, ...).

  config.py      the RFC's defaults, the row language, the checks (resolve)
  daemon.py      the daemon as a child process (DaemonProcess)
  experiment.py  the run loop (compare) and its temporary stores
  results.py     repeats combined into medians, % change against hold
  tables.py      the text tables
"""

from ..store import prewrite
from ..workload.report import describe, write_json
from .config import BASE, ROW_KEYS, ROW_TOKENS, STRATEGY_ORDER, parse_row, resolve
from .daemon import DaemonProcess, hostd_command
from .experiment import Stores, annotate, compare
from .results import MEDIAN_KEYS, add_changes, combine, pct_change
from .tables import HOLD_COLS, WAIT_COLS, format_tables

__all__ = [
    "BASE",
    "HOLD_COLS",
    "MEDIAN_KEYS",
    "ROW_KEYS",
    "ROW_TOKENS",
    "STRATEGY_ORDER",
    "WAIT_COLS",
    "DaemonProcess",
    "Stores",
    "add_changes",
    "annotate",
    "combine",
    "compare",
    "describe",
    "format_tables",
    "hostd_command",
    "parse_row",
    "pct_change",
    "prewrite",
    "resolve",
    "write_json",
]
