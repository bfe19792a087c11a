#!/bin/sh
# Build the device-side fuzz target (fuzz_devq.c) over the C core.
#
#   build.sh fuzzer OUT   libFuzzer with ASan and UBSan (clang)
#   build.sh replay OUT   replay_main.c instead of libFuzzer: runs files and
#                         directories through the target once, with ASan and
#                         UBSan where the compiler has them, else without
#
# CSRC overrides the core's directory (default: the tree's csrc/);
# FUZZ_PLAIN=1 makes the replay build skip the sanitizers (quicker).  The
# core is compiled from a scratch copy whose compiler.h wraps the core's
# own and sends every READ_ONCE through fuzz_guest_read() in the target
# (racing pops); csrc/ itself is never touched.  The replay build prints
# the flavour it got ("asan+ubsan" or "plain") on stdout.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
csrc=${CSRC:-$here/../../csrc}
mode=${1:?usage: build.sh fuzzer|replay OUT}
out=${2:?usage: build.sh fuzzer|replay OUT}
case $mode in fuzzer|replay) ;; *) echo "usage: build.sh fuzzer|replay OUT" >&2; exit 2;; esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
core=$tmp/core
mkdir "$core"
cp "$csrc"/*.c "$csrc"/*.h "$core"/
mv "$core/compiler.h" "$core/compiler_core.h"
cat > "$core/compiler.h" <<'HDR'
/* Fuzz build only: the core's compiler.h, with READ_ONCE reported to the
 * fuzz target before each read (tests/fuzz/build.sh). */
#ifndef FUZZ_COMPILER_H
#define FUZZ_COMPILER_H
#include "compiler_core.h"
#ifdef READ_ONCE
#undef READ_ONCE
const volatile void *fuzz_guest_read(const volatile void *p, unsigned long n);
#define READ_ONCE(x) \
	(*(const volatile __typeof__(x) *)fuzz_guest_read(&(x), sizeof(x)))
#endif
#endif
HDR

# The device side and what it calls: nothing of the driver or the daemon.
srcs=""
for f in vringh.c mem.c blkreq.c store.c region.c lock.c notify.c error.c proc.c restart.c; do
	srcs="$srcs $core/$f"
done
common="-g -O1 -I$core -fno-strict-aliasing -pthread"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

if [ "$mode" = fuzzer ]; then
	${FUZZ_CC:-clang} $common $san -fsanitize=fuzzer \
		-o "$out" "$here/fuzz_devq.c" $srcs -lrt
	exit 0
fi

# replay: the first compiler here whose sanitizer runtime links and runs.
echo 'int main(void){return 0;}' > "$tmp/p.c"
[ -n "${FUZZ_PLAIN:-}" ] && san_ccs="" || san_ccs="${CC:-} clang gcc cc"
for cc in $san_ccs; do
	command -v "$cc" >/dev/null 2>&1 || continue
	if "$cc" $san -o "$tmp/p" "$tmp/p.c" 2>/dev/null && "$tmp/p" 2>/dev/null; then
		"$cc" $common $san -o "$out" "$here/fuzz_devq.c" \
			"$here/replay_main.c" $srcs -lrt
		echo asan+ubsan
		exit 0
	fi
done
for cc in ${CC:-} cc gcc clang; do
	command -v "$cc" >/dev/null 2>&1 || continue
	"$cc" $common -o "$out" "$here/fuzz_devq.c" "$here/replay_main.c" $srcs -lrt
	echo plain
	exit 0
done
echo "build.sh: no C compiler" >&2
exit 1
