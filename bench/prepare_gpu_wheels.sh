#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored) with what bench/gpu_check.sh installs on a bare GPU box
# that has Python 3.12, CUDA torch, transformers, numpy, ninja, psutil, py-cpuinfo, tqdm,
# msgpack, einops, packaging and pytest, but no DeepSpeed and no network.
#
#   bash bench/prepare_gpu_wheels.sh          # needs PyPI here; ~30 s; ~5 MB
#
# Versions are the ones this repo's venv runs (so the CPU dry-run and the GPU run use the
# same DeepSpeed). DeepSpeed ships only an sdist: it is built here into a pure
# py3-none-any wheel with DS_BUILD_OPS=0 (no CUDA ops precompiled; wr-train uses torch's
# AdamW, `torch_adam`, so none is JIT-built on the box either). The build needs no network
# once the sdist is here (--no-index --no-build-isolation, torch and setuptools from the venv).
# The other wheels are DeepSpeed's dependencies that the box lacks: hjson, pydantic and its
# own (pydantic-core is compiled: cp312 manylinux x86_64), plus typing-extensions in case the
# box's is older than pydantic needs. gpu_check.sh installs a wheel only where the box
# lacks the package or has a version the requirements exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=bench/wheels
LIMIT_MB=60   # the device machine takes 64 MiB of working tree in all

ver() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ds=$(ver deepspeed)
echo "deepspeed $ds: sdist from PyPI, wheel built offline with DS_BUILD_OPS=0"
"$PY" -m pip download -q --no-deps --no-binary=:all: "deepspeed==$ds" -d "$tmp"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index \
    -w "$DEST" "$tmp/deepspeed-$ds.tar.gz"

platform=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64)
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    v=$(ver "$name")
    echo "$name $v"
    "$PY" -m pip download -q --no-deps "${platform[@]}" -d "$DEST" "$name==$v"
done

ls -l "$DEST"
size_kb=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $((size_kb / 1024)) MiB ($size_kb KiB)"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "too big for the device machine's 64 MiB working tree" >&2
    exit 1
fi
