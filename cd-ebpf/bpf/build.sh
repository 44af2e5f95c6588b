#!/usr/bin/env bash
# Builds cd-ebpf/bpf/cdsync.bpf.o (committed; embedded by the loader with
# include_bytes_aligned!, so `cargo build` never needs clang).
#
#   build.sh              compile cdsync.bpf.c -> cdsync.bpf.o
#   build.sh --check      rebuild into a temp file and compare with the committed
#                         object byte for byte; exit 1 on any difference
#   build.sh --vmlinux    regenerate vmlinux.h from /sys/kernel/btf/vmlinux first
#
# Deterministic: the object depends only on the sources and the clang version,
# which is recorded in CLANG_VERSION (--check fails if the local clang differs,
# since another clang may legitimately produce other bytes). DWARF is stripped;
# BTF and .BTF.ext (needed for CO-RE and func_info) are kept.
set -euo pipefail
cd "$(dirname "$0")"

CHECK=0
VMLINUX=0
for a in "$@"; do
	case "$a" in
	--check) CHECK=1 ;;
	--vmlinux) VMLINUX=1 ;;
	-h | --help)
		sed -n '2,14p' "$0"
		exit 0
		;;
	*)
		echo "build.sh: unknown argument $a" >&2
		exit 2
		;;
	esac
done

need=()
command -v clang >/dev/null || need+=(clang)
command -v llvm-strip >/dev/null || need+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ "$VMLINUX" = 1 ]; then command -v bpftool >/dev/null || need+=(bpftool); fi
if [ "${#need[@]}" -gt 0 ]; then
	echo "build.sh: installing ${need[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$VMLINUX" = 1 ]; then
	bpftool btf dump file /sys/kernel/btf/vmlinux format c >vmlinux.h.tmp
	mv vmlinux.h.tmp vmlinux.h
fi

CLANG_V="$(clang --version | head -n1)"
LIBBPF_V="$(dpkg-query -W -f '${Version}' libbpf-dev 2>/dev/null || echo unknown)"
STAMP="clang: $CLANG_V
libbpf-dev: $LIBBPF_V"

build() { # $1 = output
	local tmp
	tmp="$(mktemp -d)"
	# -fdebug-prefix-map and a fixed relative source name keep absolute paths out
	# of the BTF line info; -g is required for BTF and is stripped of DWARF below.
	clang -target bpf -mcpu=v3 -g -O2 -D__TARGET_ARCH_x86 \
		-fdebug-prefix-map="$PWD"=. -ffile-prefix-map="$PWD"=. \
		-Wall -Werror -Wno-unused-function \
		-I. -idirafter /usr/include \
		-c cdsync.bpf.c -o "$tmp/cdsync.bpf.o"
	llvm-strip -g "$tmp/cdsync.bpf.o" -o "$1"
	rm -rf "$tmp"
}

if [ "$CHECK" = 1 ]; then
	if [ "$(cat CLANG_VERSION 2>/dev/null)" != "$STAMP" ]; then
		echo "build.sh --check: toolchain differs from CLANG_VERSION:" >&2
		echo "  committed: $(tr '\n' ' ' <CLANG_VERSION 2>/dev/null)" >&2
		echo "  local:     $(echo "$STAMP" | tr '\n' ' ')" >&2
		exit 1
	fi
	out="$(mktemp)"
	trap 'rm -f "$out"' EXIT
	build "$out"
	if cmp -s "$out" cdsync.bpf.o; then
		echo "build.sh --check: cdsync.bpf.o is up to date ($(wc -c <"$out") bytes)"
		exit 0
	fi
	echo "build.sh --check: cdsync.bpf.o differs from a fresh build of cdsync.bpf.c; run cd-ebpf/bpf/build.sh and commit the result" >&2
	exit 1
fi

build cdsync.bpf.o
echo "$STAMP" >CLANG_VERSION
echo "built $(pwd)/cdsync.bpf.o ($(wc -c <cdsync.bpf.o) bytes) with $CLANG_V"
