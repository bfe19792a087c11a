"""Guest workload processes: dd- and fio-like jobs on a running device.

``run_job(JobSpec(...))`` forks ``workers`` separate OS processes that
attach to the device by name and keep ``iodepth`` requests in flight each,
and returns one dict of everything the run measured.

  spec.py     JobSpec (checked against virtio_py.limits) and the workers' areas
  engine.py   the per-request loop: C (vp_guest_run) or the same loop in Python
  worker.py   a worker process: attach, get ready, run, report
  runner.py   the parent: fork, start together, watch, stop, gather (run_job)
  report.py   the result dict, its text and JSON, the one-line configuration
"""

from .engine import python_loop, run_engine
from .report import describe, format_result, percentiles, summarise, write_json
from .runner import JobError, queue_counters, run_job
from .spec import ENGINES, LAT_SAMPLES, RW_MODES, JobSpec, plan_areas

__all__ = [
    "ENGINES",
    "LAT_SAMPLES",
    "RW_MODES",
    "JobError",
    "JobSpec",
    "describe",
    "format_result",
    "percentiles",
    "plan_areas",
    "python_loop",
    "queue_counters",
    "run_engine",
    "run_job",
    "summarise",
    "write_json",
]
