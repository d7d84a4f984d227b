#!/usr/bin/env bash
# The GPU checks of one session on the lent H100/H200, in one command (see benchmarks/README.md), most wanted
# first, so that a call cut short by its time limit still leaves whole figures: gpu_pipeline for SD 1.5 (it also
# fills the compile cache); where a compiled SD 1.5 request's time goes (request_phases) and its experiments, the
# levers for SD 1.5's target; gpu_pipeline for SDXL (plain diffusers and the fast path: SDXL's default engine was
# measured on 2026-11-26); SD 1.5 with only the transformer blocks compiled, from an empty compile cache (the first
# call's cost against the step's speed); request_phases for SDXL with CUDA graphs; the CUDA tests (fast path, step pacing, noise copy);
# the fast path's first call in a fresh process with the compile cache warm (SD 1.5, then SDXL). About 11 minutes
# on an H100 (2026-11-26, the eighth session): one call of 600 s reaches the CUDA tests.
# Arguments go to both benchmarks: --runs N, --compile-backend B, --small. Everything lands in $OUT.
# FROM=NAME starts at the step of that name (a second call picks up where a call cut short stopped).
# The machine has torch but not diffusers: `make gpu-wheels` here, carry .whl.
set -uo pipefail
OUT=${OUT:-/tmp/dreamsketch-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

FROM=${FROM:-}
wanted() {  # wanted NAME: whether step NAME runs (FROM is empty, or names this step or one before it)
    [[ "$1" == "$FROM" ]] && FROM=""
    [[ -z "$FROM" ]]
}

step() {  # step NAME COMMAND...: stdout to $OUT/NAME.json, stderr to $OUT/log.txt
    wanted "$1" || return 0
    echo "== $1 $(date -u +%T)" | tee -a "$OUT/log.txt"
    "${@:2}" > "$OUT/$1.json" 2>> "$OUT/log.txt"
    echo "$1 exit $?"
    cat "$OUT/$1.json"
}

# torch's compile steps with their times (tracing, inductor), to split the first call's compilation up; SD 1.5
# also measures CUDA graphs without compilation (2.2x plain on 2026-11-26 with a 1.3 s first call: a candidate
# for the default on CUDA, but slower with 8 requests at once, not yet explained)
step gpu_pipeline_sd15 env TORCH_LOGS=dynamo,inductor python3 -m benchmarks.gpu_pipeline --only sd15 \
    --variants dreamsketch dreamsketch_graphs dreamsketch_compile "$@"
# the compile cache is warm now: where the compiled request's time goes; then whether cuDNN's attention kernels
# and a compiled VAE decoder are worth having (cuDNN's timed convolution algorithms gained nothing on 2026-11-26)
step request_phases_sd15 python3 -m benchmarks.request_phases --only sd15 --variant compile --profile 30 \
    --cudnn-attention --compile-vae "$@"
step gpu_pipeline_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl --variants dreamsketch_compile "$@"
# resnet blocks are 13 of SD 1.5's 16 compiled graphs and 130 of their 196 kernels (inductor on the CPU): without
# them the first call should take about a third of the time; at what cost per step?
step gpu_pipeline_sd15_transformer_blocks env XDG_CACHE_HOME="$(mktemp -d)" python3 -m benchmarks.gpu_pipeline \
    --only sd15 --variants dreamsketch_compile --regions BasicTransformerBlock --concurrency "$@"
# SDXL's request outside the UNet (0.27 s of 1.67 s with CUDA graphs on 2026-11-26: the VAE decoding in fp32 at
# 1024x1024, two text encoders): where the 1.5x target has to find its time
step request_phases_sdxl python3 -m benchmarks.request_phases --only sdxl --variant graphs --profile 30 "$@"
if wanted cuda_tests; then
    echo "== cuda_tests $(date -u +%T)" | tee -a "$OUT/log.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_engine.py -k cuda 2>&1 | tail -30 | tee "$OUT/cuda_tests.txt"
fi
step first_call_warm_sd15 python3 -m benchmarks.gpu_pipeline --only sd15 --first-call "$@"
step first_call_warm_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl --first-call "$@"
