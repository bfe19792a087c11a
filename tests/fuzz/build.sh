#!/bin/sh
# Build the device-side fuzz target (fuzz_devq.c) over the C core.
#
#   build.sh fuzzer OUT   libFuzzer with ASan and UBSan (clang)
#   build.sh replay OUT   replay_main.c instead of libFuzzer: runs files and
#                         directories through the target once, with ASan and
#                         UBSan where the compiler has them, else without
#
# CSRC overrides the core's directory (default: the tree's csrc/).  The
# replay build prints the flavour it got ("asan+ubsan" or "plain") on stdout.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
csrc=${CSRC:-$here/../../csrc}
mode=${1:?usage: build.sh fuzzer|replay OUT}
out=${2:?usage: build.sh fuzzer|replay OUT}
# The device side and what it calls: nothing of the driver or the daemon.
srcs=""
for f in vringh.c mem.c blkreq.c store.c region.c lock.c notify.c error.c; do
	srcs="$srcs $csrc/$f"
done
common="-g -O1 -I$csrc -fno-strict-aliasing -pthread"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

case $mode in
fuzzer)
	${FUZZ_CC:-clang} $common $san -fsanitize=fuzzer \
		-o "$out" "$here/fuzz_devq.c" $srcs -lrt
	;;
replay)
	# The first compiler here whose sanitizer runtime links.
	probe=$(mktemp -d)
	trap 'rm -rf "$probe"' EXIT
	echo 'int main(void){return 0;}' > "$probe/p.c"
	for cc in ${CC:-} clang gcc cc; do
		command -v "$cc" >/dev/null 2>&1 || continue
		if "$cc" $san -o "$probe/p" "$probe/p.c" 2>/dev/null &&
		   "$probe/p" 2>/dev/null; then
			"$cc" $common $san -o "$out" "$here/fuzz_devq.c" \
				"$here/replay_main.c" $srcs -lrt
			echo asan+ubsan
			exit 0
		fi
	done
	for cc in ${CC:-} cc gcc clang; do
		command -v "$cc" >/dev/null 2>&1 || continue
		"$cc" $common -o "$out" "$here/fuzz_devq.c" "$here/replay_main.c" \
			$srcs -lrt
		echo plain
		exit 0
	done
	echo "build.sh: no C compiler" >&2
	exit 1
	;;
*)
	echo "usage: build.sh fuzzer|replay OUT" >&2
	exit 2
	;;
esac
