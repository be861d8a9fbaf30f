#!/usr/bin/env bash
# FlashAttention-4 (CuTe DSL) on the GPU machine, which cannot reach a package registry (issue 19).
#
#   bash benchmarks/fa4_setup.sh download DIR_A DIR_B   # here: wheels for CPython 3.12, x86-64, CUDA 13
#   bash benchmarks/fa4_setup.sh install DIR...         # there: every wheel and wheel part found in DIR... into
#                                                       # /tmp/site (SITE=... to change), then print PYTHONPATH
#
# A device call carries at most 64 MiB, and nvidia-cutlass-dsl-libs-cu13 alone is ~92 MB. `download` splits that
# wheel in two: the first half goes to DIR_A, the second half and every other wheel (~10 MB) to DIR_B. Carry DIR_A
# in one call and copy it somewhere that outlives the call (the machine stays warm ~30 s after a call, and /tmp
# with it), then carry DIR_B in the next call and run `install` over both folders in the same command as whatever
# needs the packages: /tmp/site is gone once the machine is given back.
#
# The set: flash-attn-4 4.0.0b36 and what its wheels require that the GPU image (torch 2.11.0+cu130, Python 3.12;
# the package list in the device docs' KINDS.md) lacks. The image already has torch, einops, typing-extensions,
# protobuf and cuda-bindings. cu13 libs, not the cu12 default of nvidia-cutlass-dsl, to match torch's CUDA 13.
# nvidia-cutlass-dsl's .pth file (which puts nvidia_cutlass_dsl/dsl_packages on sys.path) is not read from a
# PYTHONPATH folder, so the printed PYTHONPATH names that folder too.
set -euo pipefail

PACKAGES=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
          nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
          apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
BIG=nvidia_cutlass_dsl_libs_cu13
SITE=${SITE:-/tmp/site}

usage() { sed -n 4,7p "$0" >&2; exit 2; }

case "${1:-}" in
download)
    [ $# -eq 3 ] || usage
    a=$2 b=$3 tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$tmp" "${PACKAGES[@]}"
    mkdir -p "$a" "$b"
    rm -f "$a"/*.whl "$a"/*.part-* "$b"/*.whl "$b"/*.part-*
    big=$(ls "$tmp"/$BIG-*.whl)
    # Parts keep the wheel's name, so `install` can put it back together under that name.
    (cd "$tmp" && split -n 2 -d "$(basename "$big")" "$(basename "$big").part-")
    mv "$big".part-00 "$a"/
    mv "$big".part-01 "$b"/
    rm "$big"
    mv "$tmp"/*.whl "$b"/
    rmdir "$tmp"
    du -sh "$a" "$b"
    ;;
install)
    [ $# -ge 2 ] || usage
    shift
    wheels=$(mktemp -d)
    for dir in "$@"; do
        cp "$dir"/*.whl "$wheels"/ 2>/dev/null || true
    done
    # The parts in order of their own names (…part-00, …part-01), whichever folder each sits in.
    parts=$(for dir in "$@"; do ls "$dir"/*.part-* 2>/dev/null || true; done \
            | while read -r p; do echo "$(basename "$p") $p"; done | sort | cut -d' ' -f2)
    [ -n "$parts" ] || { echo "no wheel parts (*.part-*) in $*" >&2; exit 1; }
    whole="$wheels/$(basename "$(echo "$parts" | head -1)" | sed 's/\.part-[0-9]*$//')"
    for part in $parts; do
        cat "$part" >> "$whole"
    done
    python3 -m zipfile -t "$whole" >/dev/null || { echo "reassembled $whole is not a whole zip" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$wheels"/*.whl
    rm -rf "$wheels"
    echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
*)
    usage
    ;;
esac
