#!/usr/bin/env bash
# The GPU checks, prepared to fit one call of at most 10 minutes on a lent GPU machine: the
# CUDA tests (tests/test_cuda.py), then the 7B shape at batch 1 and 8 in bfloat16, eager
# against Hugging Face transformers, then with the compiled (CUDA-graph) decode step, then
# the decode step alone (benchmarks/profile_step.py). Each step has its own time limit, so a
# slow one cannot starve the rest; logs go to $OUT (default /tmp/gpu-check). fairscale and
# fire must be importable (pip install -e ., or PYTHONPATH).
#
#   bash benchmarks/gpu_check.sh          # the checks above (~9.5 min at most)
#   bash benchmarks/gpu_check.sh quant    # quantized weights (~9 min at most): their CUDA
#       tests, 7B int8/int4 against bfloat16 with the compiled step (bench.py --quantize),
#       and a random 70B-shaped model built in int8 on the one GPU (benchmarks/quant_gpu.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/NAME.log, note a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most $limit s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
if [ "${1:-base}" = quant ]; then
    step pytest-quant 150 python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py \
        tests/test_cuda.py -k "cuda or quantized"
    step bench-7B-quant 240 python -m benchmarks.bench --shape 7B --device cuda --batch 1 8 \
        --runs 3 --compile --mixed --gen-len 64 --quantize int8 int4
    step quant-70B 150 python -m benchmarks.quant_gpu --shape 70B --mode int8 --gen-len 32
    exit $status
fi
step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench-7B-eager 180 python -m benchmarks.bench --shape 7B --device cuda --batch 1 8 \
    --runs 3 --compare hf
step bench-7B-compiled 150 python -m benchmarks.bench --shape 7B --device cuda --batch 1 8 \
    --runs 3 --compile --mixed
step profile-7B 120 python -m benchmarks.profile_step --shape 7B --batch 8 1
exit $status
