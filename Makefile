# virtio_py: every target installs what it needs first (idempotent, quick when done).
PY      ?= python3
PIP     := $(PY) -m pip install -q --disable-pip-version-check --root-user-action=ignore
STAMP   := .stamp-install
SOURCES := $(wildcard csrc/*.c csrc/*.h csrc/*.py) setup.py pyproject.toml

.PHONY: all install run test soak bench lint fuzz clean

all: install

# The daemon's io_uring engine makes raw system calls over <linux/io_uring.h> (Debian's
# linux-libc-dev, which gcc's libc6-dev pulls in): no liburing.  Built without that header,
# or run on a kernel that refuses io_uring, the daemon serves with its I/O threads.
$(STAMP): $(SOURCES)
	$(PIP) 'setuptools>=61' wheel 'cffi>=1.15' 'posix_ipc>=1.1' 'numpy>=1.21' \
		'pytest>=7' 'pytest-benchmark>=4' 'matplotlib>=3.5' 'hypothesis>=6'
	$(PIP) --no-build-isolation -e .
	@touch $@

install: $(STAMP)

# The RFC comparison with its defaults (about a minute).
run: $(STAMP)
	$(PY) -m virtio_py compare

# The Linux guest tests (tests/test_vm_guest.py) boot Debian's kernel under QEMU; as root
# with apt-get, what is missing is installed, else those tests skip and say why.
GUEST_PKGS := qemu-system-x86 qemu-system-common linux-image-cloud-amd64 busybox-static

test: $(STAMP)
	@[ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || dpkg -s $(GUEST_PKGS) >/dev/null 2>&1 \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends $(GUEST_PKGS); } || echo "guest packages not installed"
	$(PY) -m pytest -q tests

# The long counts of the restart tests: 100 SIGKILL/restart trials of the daemon under
# 4 writers, 1,000 start/kill/restart cycles without a leak (tests/test_daemon_restart.py;
# -s prints the restart-to-first-completion figure).
soak: $(STAMP)
	VIRTIO_PY_SOAK=1 $(PY) -m pytest -q -s tests/test_daemon_restart.py tests/test_inflight_record.py tests/test_lock_takeover.py tests/test_crash_points.py

# ruff (lint and format check) and mypy, configured in pyproject.toml; pinned, since
# a newer ruff formats differently.
lint: $(STAMP)
	@$(PIP) 'ruff==0.17.6' 'mypy==2.4.1'
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Coverage-guided fuzzing of the device side with libFuzzer (tests/fuzz/fuzz.sh installs
# clang and its runtime when missing): FUZZ_RUNS inputs, else three minutes.  New inputs
# are merged into tests/fuzz/corpus/, a crash is kept in tests/fuzz/regressions/; make
# test replays both.
FUZZ_RUNS ?=
fuzz:
	FUZZ_RUNS=$(FUZZ_RUNS) PY=$(PY) tests/fuzz/fuzz.sh

# bench/bench_hostd.py compares the host daemon with fio (Debian's package).
bench: $(STAMP)
	@command -v fio >/dev/null 2>&1 && command -v qemu-storage-daemon >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends fio $(GUEST_PKGS); }
	$(PY) -m pytest -q bench --benchmark-only --benchmark-autosave \
		--benchmark-columns=min,median,mean,ops,rounds

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .mypy_cache .ruff_cache $(STAMP)
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f virtio_py/_core*.so virtio_py/_core.c
