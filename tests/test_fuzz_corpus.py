"""The device-side fuzz target's saved inputs, replayed once.

tests/fuzz/fuzz_devq.c serves one virtqueue the way the daemon does (pop,
vp_blk_handle, push, interrupt) against a scripted hostile guest, and checks
every step against a reference model of the device; ``make fuzz`` runs it
under libFuzzer.  Here the same target is built without libFuzzer
(tests/fuzz/build.sh replay: ASan and UBSan when the compiler has them) and
fed every saved input: the seeds and the merged corpus of past runs, and
every input a run kept because it crashed or hung.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
CORPUS = FUZZ / "corpus"
REGRESSIONS = FUZZ / "regressions"

# Regression inputs whose bug the core still has: file name -> the bug.
# Strict xfail: the entry must go once the core is fixed.
OPEN: dict[str, str] = {}

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler"
)


def _build(out: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        [str(FUZZ / "build.sh"), "replay", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "replay"
    _build(out)
    return out


def _run(binary: Path, *paths: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, paths)], capture_output=True, text=True, timeout=timeout
    )


def _inputs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def test_corpus_replays_without_breaking_an_invariant(replay: Path) -> None:
    files = _inputs(CORPUS)
    r = _run(replay, CORPUS, timeout=300)
    tail = "\n".join(r.stderr.splitlines()[-30:])
    assert r.returncode == 0, f"replay failed:\n{tail}"
    assert f"replayed {len(files)} inputs" in r.stdout


def test_corpus_holds_every_seed_as_the_generator_writes_it(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(FUZZ / "make_seeds.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    seeds = _inputs(tmp_path)
    assert len(seeds) >= 50
    for s in seeds:
        kept = CORPUS / s.name
        assert kept.is_file(), f"{s.name} missing from tests/fuzz/corpus (run make fuzz)"
        assert kept.read_bytes() == s.read_bytes(), f"{s.name} differs from make_seeds.py's"


REGRESSION_FILES = _inputs(REGRESSIONS) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=p.name, marks=pytest.mark.xfail(strict=True, reason=OPEN[p.name]))
        if p.name in OPEN
        else pytest.param(p, id=p.name)
        for p in REGRESSION_FILES
    ],
)
def test_regression_input_replays_cleanly(replay: Path, path: Path) -> None:
    # A hang counts as a failure: each input runs in milliseconds.
    try:
        r = _run(replay, path, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name} hangs the device")
    tail = "\n".join(r.stderr.splitlines()[-30:])
    assert r.returncode == 0, f"{path.name}:\n{tail}"


def test_target_notices_a_device_that_pops_a_head_in_flight(tmp_path: Path) -> None:
    """The model is not vacuous: a core without the in-flight check fails a seed."""
    core = tmp_path / "csrc"
    shutil.copytree(FUZZ.parent.parent / "csrc", core)
    vringh = core / "vringh.c"
    check = "if (q->inflight_map[head] || q->inflight >= q->num) {"
    src = vringh.read_text()
    assert src.count(check) == 1, "the in-flight check moved: update this test's mutation"
    vringh.write_text(src.replace(check, "if (q->inflight >= q->num) {"))
    binary = tmp_path / "replay"
    _build(binary, env={**os.environ, "CSRC": str(core), "FUZZ_PLAIN": "1"})
    r = _run(binary, CORPUS / "seed-broken-inflight-twice", timeout=60)
    assert r.returncode != 0
    assert "invariant broken" in r.stderr and "pop returned 1 where a rule is broken" in r.stderr


def test_racing_pop_lands_guest_writes_between_the_devices_reads(replay: Path) -> None:
    """build.sh's READ_ONCE hook is live: a scheduled write lands inside a pop."""
    r = subprocess.run(
        [str(replay), str(CORPUS / "seed-race-len-after-check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FUZZ_DEVQ_VERBOSE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "1 writes landed inside a pop" in r.stderr
