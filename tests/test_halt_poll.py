"""Halt polling (GuestSlot.halt_poll_us, virtio-emu run --halt-poll-us): a
guest thread about to sleep for its completion first polls for it, as
cpuidle-haltpoll polls before a vCPU halts.  A completion within the budget
ends the wait with no sleep and no interrupt taken; a longer wait polls the
whole budget, then sleeps and takes the interrupt; the budget adapts as
haltpoll's poll limit does.  Off by default.

Devices here are served by hand (serve_by_hand), so the test decides when a
completion comes."""

import json
import threading

import pytest

from hostd_util import emu
from test_guest_irq import Waiter, queue  # noqa: F401  (the fixture)
from test_guest_slots import serve_by_hand
from virtio_py import ConfigError
from virtio_py._lowlevel import lib
from virtio_py.blk import T_IN, GuestSlot
from virtio_py.workload import JobSpec, run_job

US = 1000


@pytest.mark.parametrize(
    "budget,block,cap,after",
    [
        (40 * US, 10 * US, 50 * US, 40 * US),  # covered: unchanged
        (10 * US, 20 * US, 50 * US, 20 * US),  # outlasted it, within the cap: doubled
        (0, 20 * US, 40 * US, 10 * US),  # from nothing: a quarter of the cap
        (40 * US, 45 * US, 50 * US, 50 * US),  # never past the cap
        (40 * US, 60 * US, 50 * US, 20 * US),  # longer than the cap: halved
        (1, 60 * US, 50 * US, 0),  # halved down to nothing
    ],
)
def test_the_budget_adapts_as_haltpoll_adjusts_its_poll_limit(budget, block, cap, after):
    assert lib.vp_halt_poll_adjust(budget, block, cap) == after


def test_the_budget_settles_at_zero_for_waits_always_longer_than_the_cap():
    b = 50 * US
    for _ in range(64):
        b = lib.vp_halt_poll_adjust(b, 80 * US, 50 * US)
    assert b == 0


def test_halt_polling_is_off_by_default_and_refuses_a_bad_cap(queue):  # noqa: F811
    _, _, vq = queue
    slot = GuestSlot(vq, depth=1)
    try:
        assert slot.halt_poll_us == 0
        slot.halt_poll_us = 12.5
        assert slot.halt_poll_us == slot.halt_poll_budget_us == 12.5
        with pytest.raises(ConfigError, match="halt poll"):
            slot.halt_poll_us = -1
        assert slot.halt_poll_us == 12.5
    finally:
        slot.close()


def _serve_later(region, dq, delay):
    """serve_by_hand one chain after delay seconds, on a thread."""
    t = threading.Timer(delay, serve_by_hand, (region, dq, 1))
    t.start()
    return t


def test_a_completion_within_the_budget_ends_the_wait_unslept(queue):  # noqa: F811
    region, dq, vq = queue
    slot = GuestSlot(vq, depth=1)
    try:
        slot.halt_poll_us = 10_000  # a 10 ms budget: the completion comes in 1 ms
        # Each try can miss only by timing (the completion before the wait
        # began, or the serving thread held up past 10 ms); broken polling
        # misses every time.
        for _ in range(5):
            slot.submit(0, T_IN, 0, 512)
            w = Waiter(slot)
            server = _serve_later(region, dq, 0.001)
            out = w.join()
            server.join()
            if out["acct"]["polled"]:
                break
        assert out["status"] == lib.VIRTIO_BLK_S_OK
        assert out["acct"]["polled"] == 1
        # Found by looking, not by sleeping for an interrupt.
        assert out["acct"]["irqs"] == 0
        assert 0 < out["acct"]["poll_ns"] < 10_000 * US
    finally:
        slot.close()


def test_a_wait_longer_than_the_budget_polls_it_whole_then_sleeps_and_halves_it(
    queue,  # noqa: F811
):
    region, dq, vq = queue
    slot = GuestSlot(vq, depth=1)
    try:
        if not slot.direct_irq:
            pytest.skip("no futex_waitv, or a semaphore not on glibc's layout")
        slot.halt_poll_us = 1000
        assert slot.halt_poll_budget_us == 1000
        for budget in (1000, 500):
            slot.submit(0, T_IN, 0, 512)
            w = Waiter(slot)
            server = _serve_later(region, dq, 0.2)  # 200 ms: far past the 1 ms cap
            out = w.join()
            server.join()
            assert out["status"] == lib.VIRTIO_BLK_S_OK
            assert out["acct"]["polled"] == 0 and out["acct"]["irqs"] == 1
            # It polled the whole budget; a wait past the cap halves it.
            assert out["acct"]["poll_ns"] >= budget * US
            assert slot.halt_poll_budget_us == budget / 2
    finally:
        slot.close()


def test_a_job_reports_the_waits_halt_polling_ended(device):
    d = device()
    spec = dict(workers=2, rw="randread", iodepth=1, size=1 << 20, runtime=0.5)
    off = run_job(JobSpec(d.name, **spec))
    on = run_job(JobSpec(d.name, halt_poll_us=10_000, **spec))
    for res in (off, on):
        assert res["errors"] == 0 and res["ios"] > 0
    assert off["config"]["halt_poll_us"] == 0
    assert off["wakeups"]["halt_polled"] == 0
    assert all(w["halt_polled"] == 0 and w["halt_poll_ms"] == 0 for w in off["workers"])
    assert on["config"]["halt_poll_us"] == 10_000
    assert on["wakeups"]["halt_polled"] == sum(w["halt_polled"] for w in on["workers"]) > 0
    assert on["wakeups"]["halt_polled_per_request"] == round(
        on["wakeups"]["halt_polled"] / on["ios"], 3
    )


def test_run_takes_halt_poll_us_and_says_so(device, tmp_path):
    d = device()
    out = tmp_path / "run.json"
    p = emu("run", "--name", d.name, "--size", "1M", "--halt-poll-us", "200", "--json", out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "halt polling up to 200 us" in p.stdout
    assert "waits ended by halt polling" in p.stdout
    res = json.loads(out.read_text())
    assert res["config"]["halt_poll_us"] == 200
