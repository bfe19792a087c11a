"""Placing the device and the guests on CPUs (virtio-hostd start --cpus,
virtio-emu run --cpus): every thread of each side runs where it was put,
the run reports where its workers ran, a bad list is a one-line error, and
a successor placed elsewhere still takes the device over."""

import json
import os
import signal

import pytest

from hostd_util import emu, hostd, one_line_error
from procs import wait_for
from virtio_py.cpus import format_cpus, parse_cpus, split_for_device
from virtio_py.errors import ConfigError
from virtio_py.pidfile import probe

ALLOWED = sorted(os.sched_getaffinity(0))
LAST = ALLOWED[-1]


def _threads_cpus(pid):
    """The CPU list of every thread of pid, as the kernel allows it."""
    out = set()
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    out.add(line.split()[1])
    return out


@pytest.mark.parametrize(
    "text,cpus",
    [("0", {0}), ("0-0", {0}), (f"0,{LAST}", {0, LAST}), (f"0-{LAST}", set(ALLOWED))],
)
def test_a_cpu_list_names_the_cpus_taskset_would(text, cpus):
    assert parse_cpus(text) == cpus
    assert parse_cpus(format_cpus(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "x", "1-0", "-1", "0,,1", "0-x"])
def test_text_that_is_not_a_cpu_list_is_refused(text):
    with pytest.raises(ConfigError, match="not a CPU list"):
        parse_cpus(text)


def test_a_cpu_this_process_may_not_use_is_refused_by_number():
    with pytest.raises(ConfigError, match=f"CPU {LAST + 1} is not one"):
        parse_cpus(str(LAST + 1))


def test_format_cpus_writes_runs_as_ranges():
    assert format_cpus([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize(
    "tool,args",
    [
        (hostd, ("start", "--name", "vpt-cpus", "--store", "/nonexistent")),
        (emu, ("run", "--name", "vpt-cpus")),
    ],
)
def test_a_bad_cpus_option_is_one_line_on_stderr(tool, args):
    prog = "virtio-hostd start" if tool is hostd else "virtio-emu run"
    one_line_error(tool(*args, "--cpus", str(LAST + 1)), prog, "--cpus")


def test_every_daemon_thread_and_every_worker_runs_on_its_cpus(daemons, name, tmp_path):
    daemons.start(name, str(tmp_path / "s"), "--cpus", str(LAST))
    assert _threads_cpus(probe(name).pid) == {str(LAST)}
    out = tmp_path / "run.json"
    p = emu("run", "--name", name, "--size", "1M", "--cpus", "0", "--json", out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "workers on CPUs 0" in p.stdout
    res = json.loads(out.read_text())
    assert res["config"]["guest_cpus"] == "0"
    assert [w["cpus"] for w in res["workers"]] == ["0"] * res["config"]["workers"]
    assert res["ios"] > 0


def test_a_run_without_cpus_leaves_its_workers_where_they_may_run(daemons, name, tmp_path):
    daemons.start(name, str(tmp_path / "s"))
    out = tmp_path / "run.json"
    p = emu("run", "--name", name, "--size", "1M", "--json", out)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["config"]["guest_cpus"] is None
    assert {w["cpus"] for w in res["workers"]} == {format_cpus(ALLOWED)}


def test_a_successor_on_other_cpus_takes_the_device_over(daemons, name, tmp_path):
    store = str(tmp_path / "s")
    daemons.start(name, store, "--cpus", "0")
    pid = probe(name).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not probe(name).alive, "the killed daemon to be gone")
    p = daemons.start(name, store, "--cpus", str(LAST))
    assert "took over" in p.stdout and "replaced" not in p.stdout, p.stdout
    assert _threads_cpus(probe(name).pid) == {str(LAST)}


def test_the_device_gets_the_last_cpu_and_the_guests_the_rest():
    split = split_for_device()
    if len(ALLOWED) < 2:
        assert split is None
        return
    device, guests = split
    assert device == {LAST} and guests == set(ALLOWED[:-1])
