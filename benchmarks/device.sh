#!/usr/bin/env bash
# The GPU checks of one session on the lent H100/H200, in one command (see benchmarks/README.md):
# the CUDA tests of the fast path, then benchmarks/gpu_pipeline.py, then its --first-call in a fresh process
# (the fast path's first call with a warm compile cache). Arguments pass through, e.g. --only sd15.
# Everything lands in $OUT. The machine has torch but not diffusers: `make gpu-wheels` here, carry .whl.
set -uo pipefail
OUT=${OUT:-/tmp/dreamsketch-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py 2>&1 | tee "$OUT/cuda-tests.log"
python3 -m benchmarks.gpu_pipeline "$@" > "$OUT/gpu_pipeline.json" 2> "$OUT/gpu_pipeline.log"
echo "gpu_pipeline exit $?"
cat "$OUT/gpu_pipeline.json"
# A restart: the fast path's first call in a fresh process, with the compile cache the run above filled.
python3 -m benchmarks.gpu_pipeline --first-call "$@" > "$OUT/first_call_warm.json" 2>> "$OUT/gpu_pipeline.log"
echo "first call (warm compile cache) exit $?"
cat "$OUT/first_call_warm.json"
