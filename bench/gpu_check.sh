#!/usr/bin/env bash
# One prepared GPU check (issue 14, part 4), for a bare single-GPU box in <= 8 minutes:
#
#   bash bench/gpu_check.sh [--dry-run] [OUT]      # OUT: first argument, else $OUT, else bench/out/gpu_check
#
# 1. installs DeepSpeed and the dependencies the box lacks from bench/wheels/ (made
#    beforehand by bench/prepare_gpu_wheels.sh; git-ignored, so a device run names it in
#    `carry`) into a scratch dir put on PYTHONPATH — nothing where the box has it already;
# 2. measures wr-train's worker step (DeepSpeed, bf16, ZeRO-1/2) and the plain HF loop at
#    BERT-base/tiny seq 128 and base seq 512, vocab 100k, then runs the gpu-marked tests
#    that need no Ray (bench/gpu_check.py says how);
# 3. writes OUT/gpu_check.md, OUT/gpu_check.json and OUT/gpu_check.log.
# --dry-run: the same end to end on a CPU with tiny sizes (DS_ACCELERATOR=cpu, gloo).
# Exit status: 0 when every row and the tests ran, 1 when something failed, 2 when the
# install failed, 124 when the whole check ran past WR_GPU_TIMEOUT (470 s).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=()
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=(--dry-run) ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) out="$arg" ;;
    esac
done
out=${out:-${OUT:-bench/out/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
site=${WR_GPU_SITE:-${TMPDIR:-/tmp}/wr-gpu-check-site-$$}
rm -rf "$site"
export PYTHONUNBUFFERED=1

{
    echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $("$PY" --version 2>&1) at $(command -v "$PY"), out $out"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
    "$PY" bench/gpu_check.py install --wheels bench/wheels --site "$site" || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    timeout -k 10 "${WR_GPU_TIMEOUT:-470}" "$PY" bench/gpu_check.py run "$out" "${dry[@]}"
} 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$site"
exit "$rc"
