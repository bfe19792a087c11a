#!/bin/sh
# make fuzz: build the device-side fuzz target with libFuzzer, run it, merge
# what it found into the corpus, keep any crash as a regression input.
#
#   FUZZ_RUNS=N   run N inputs (default: FUZZ_TIME seconds, 180)
#   FUZZ_JOBS=J   libFuzzer -jobs (default: one process, no -jobs)
#   FUZZ_OPTS     more libFuzzer flags
#
# Work files go to build/fuzz/ (make clean removes them).  The corpus in
# git (tests/fuzz/corpus/) is the seeds of make_seeds.py plus a minimal set
# of inputs covering every edge the run reached; make test replays it, and
# every file in tests/fuzz/regressions/, through the same target.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$root/build/fuzz
corpus=$here/corpus
regress=$here/regressions
bin=$work/fuzz_devq
PY=${PY:-python3}

# libFuzzer needs clang and its compiler-rt (Debian: libclang-rt-N-dev).
probe() {
	printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n)\n{ (void)d; (void)n; return 0; }\n' |
		clang -fsanitize=fuzzer,address,undefined -x c -o /dev/null - 2>/dev/null
}
if ! command -v clang >/dev/null 2>&1 || ! probe; then
	echo "fuzz: installing clang and libFuzzer's runtime" >&2
	apt-get update -qq
	command -v clang >/dev/null 2>&1 || apt-get install -y -qq clang
	v=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
	apt-get install -y -qq "libclang-rt-${v:-14}-dev"
	probe || { echo "fuzz: clang cannot link -fsanitize=fuzzer" >&2; exit 1; }
fi

mkdir -p "$work" "$corpus" "$regress"
"$here/build.sh" fuzzer "$bin"
"$PY" "$here/make_seeds.py" "$corpus" >/dev/null

new=$work/new
rm -rf "$new" && mkdir "$new"
if [ -n "${FUZZ_RUNS:-}" ]; then
	budget="-runs=$FUZZ_RUNS"
else
	budget="-max_total_time=${FUZZ_TIME:-180}"
fi
jobs=""
[ -n "${FUZZ_JOBS:-}" ] && jobs="-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS"
rm -f "$work"/crash-* "$work"/timeout-* "$work"/leak-* "$work"/oom-* "$work"/slow-unit-*
log=$work/fuzz.log
echo "fuzz: $bin $budget (log: $log)"
status=0
# New inputs go to $new (the first directory); corpus and regressions are
# read only, and start the run.
# shellcheck disable=SC2086
(cd "$work" && "$bin" $budget $jobs -max_len=2048 -timeout=10 -rss_limit_mb=4096 \
	-print_final_stats=1 -artifact_prefix="$work/" ${FUZZ_OPTS:-} \
	"$new" "$corpus" "$regress" 2>&1) >"$log" || status=$?
[ -n "$jobs" ] && cat "$work"/fuzz-*.log >>"$log" 2>/dev/null || true

# Any crash, hang or leak becomes a regression input for make test.
found=0
for a in "$work"/crash-* "$work"/timeout-* "$work"/leak-* "$work"/oom-*; do
	[ -f "$a" ] || continue
	cp "$a" "$regress/"
	echo "fuzz: $(basename "$a") -> tests/fuzz/regressions/ (replayed by make test)" >&2
	found=1
done
grep -E "^#[0-9]+[[:space:]]+(DONE|pulse)|^stat::|ERROR|invariant broken" "$log" | tail -8
if [ "$found" = 1 ] || [ "$status" != 0 ]; then
	grep -m1 -A20 -E "invariant broken|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|runtime error" "$log" >&2 || true
	echo "fuzz: FAILED (exit $status), see $log" >&2
	exit 1
fi

# Merge: the fewest inputs that reach every edge reached so far (edges,
# not hit counts: the corpus in git stays small), plus the seeds.
merged=$work/merged
rm -rf "$merged" && mkdir "$merged"
"$bin" -merge=1 -use_counters=0 -max_len=2048 -timeout=10 "$merged" "$corpus" "$new" \
	>"$work/merge.log" 2>&1
find "$corpus" -type f ! -name 'seed-*' -delete
seeds=$(cd "$corpus" && sha1sum seed-* | cut -d' ' -f1)
for f in "$merged"/*; do
	[ -f "$f" ] || continue
	echo "$seeds" | grep -qx "$(basename "$f")" || cp "$f" "$corpus/"
done
n=$(find "$corpus" -type f | wc -l)
sz=$(du -sk "$corpus" | cut -f1)
echo "fuzz: corpus $n inputs, ${sz} KiB; $(grep -o '[0-9]* new coverage edges' "$work/merge.log" | tail -1 || true)"
