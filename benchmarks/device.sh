#!/usr/bin/env bash
# The GPU checks of one session on the lent H100/H200, in one command (see benchmarks/README.md), most wanted
# first, so that a call cut short by its time limit still leaves whole figures: gpu_pipeline for SD 1.5 (it also
# fills the compile cache), the fast path's first call in a fresh process with that cache warm, the CUDA tests,
# SDXL's gpu_pipeline, where a compiled SD 1.5 request's time goes (request_phases), SDXL's warm first call and
# its default engine's phases.
# On 2026-11-27 (fifth run, an H100) SD 1.5's gpu_pipeline took 3.0 min, the warm first call 0.7, the CUDA tests
# 1.8, SDXL's gpu_pipeline 3.2 (--runs 3), the rest 1.9 in all. Run it unpiped: a pipe (grep, tail) holds back the
# last lines, and the reply's tail then hides which steps finished.
# Arguments go to the benchmarks: --runs N, --compile-backend B, --small. The outputs are written to $WORK and
# packed into $OUT/results.tar.gz after every step and every 30 s (the device tool brings back at most 8 files).
# FROM=NAME starts at the step of that name (a second call picks up where a call cut short stopped).
# The machine has torch but not diffusers: `make gpu-wheels` here, carry .whl.
set -uo pipefail
OUT=${OUT:-/tmp/dreamsketch-gpu}
WORK=${WORK:-/tmp/dreamsketch-gpu-work}
mkdir -p "$OUT" "$WORK"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$WORK/gpu.txt"

pack() {  # everything measured so far, in one file that replaces the last one whole (tar's status 1: a file changed)
    local part="$OUT/results.tar.gz.$BASHPID"
    tar --warning=no-file-changed -czf "$part" -C "$WORK" .
    (($? <= 1)) && mv "$part" "$OUT/results.tar.gz"
}
# also every 30 s, so that a step cut short by the call's time limit still leaves its log so far
(while sleep 30; do pack; done) &
packer=$!
trap 'kill "$packer"' EXIT

FROM=${FROM:-}
wanted() {  # wanted NAME: whether step NAME runs (FROM is empty, or names this step or one before it)
    [[ "$1" == "$FROM" ]] && FROM=""
    [[ -z "$FROM" ]]
}

step() {  # step NAME COMMAND...: stdout to $WORK/NAME.json, stderr to $WORK/log.txt
    wanted "$1" || return 0
    echo "== $1 $(date -u +%T)" | tee -a "$WORK/log.txt"
    "${@:2}" > "$WORK/$1.json" 2>> "$WORK/log.txt"
    echo "$1 exit $?"
    cat "$WORK/$1.json"
    pack
}

# plain diffusers, the default engine (the fast path without compilation) and the compiled fast path, with torch's
# compile steps and their times (tracing, inductor); the fast path now compiles in the background while the eager
# UNet's CUDA graphs serve: the first picture's time, and when the compiled UNet takes over (cold, 2026-11-27: 3.4 s
# and 116.5 s; 107.8 s to the first picture before compilation moved to the background)
step gpu_pipeline_sd15 env TORCH_LOGS=dynamo,inductor python3 -m benchmarks.gpu_pipeline --only sd15 "$@"
# the same in a fresh process with the compile cache warm (2026-11-27: 4.5 s and 18.2 s)
step first_call_warm_sd15 env TORCH_LOGS=dynamo,inductor python3 -m benchmarks.gpu_pipeline --only sd15 \
    --first-call "$@"
if wanted cuda_tests; then
    echo "== cuda_tests $(date -u +%T)" | tee -a "$WORK/log.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_engine.py -k cuda 2>&1 | tail -30 \
        | tee "$WORK/cuda_tests.txt"
    pack
fi
step gpu_pipeline_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl --runs 3 "$@"
# where the compiled SD 1.5 request's time goes, the VAE now in torch's default memory format
step request_phases_sd15 python3 -m benchmarks.request_phases --only sd15 --variant compile --profile 30 "$@"
step first_call_warm_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl --first-call "$@"
# SDXL's request outside the UNet (0.32 s of 1.65 s with CUDA graphs on 2026-11-26, the VAE then in channels_last)
step request_phases_sdxl python3 -m benchmarks.request_phases --only sdxl --variant default --profile 30 "$@"
