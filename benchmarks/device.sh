#!/usr/bin/env bash
# The GPU checks of one session on the lent H100/H200, in one command (see benchmarks/README.md), most wanted
# first, so that a call cut short by its time limit still leaves whole figures. The targets still open come first:
# gpu_pipeline for SD 1.5 (it also fills the compile cache); where a compiled SD 1.5 request's time goes
# (request_phases) with the VAE experiments that could bring it under 0.3 s; the fast path's first call in a fresh
# process with that cache warm; the CUDA tests (fast path, step pacing, noise copy); an experiment for the cold
# first call (SD 1.5's blocks compiled ahead by worker processes: precompile); request_phases with PNDM; then SDXL,
# whose targets were met on 2026-11-26: gpu_pipeline (plain diffusers, the default engine, the compiled fast path),
# request_phases of the default engine, the warm first call.
# The whole script takes far longer than one call: on 2026-11-27 (an H100 with a slow host) gpu_pipeline for SD 1.5
# took 4.7 min, the warm first call 1.0 min, the CUDA tests 2.2 min, precompile more than 2.7 min. Run it unpiped:
# a pipe (grep, tail) holds back the last lines, and the reply's tail then hides which steps finished.
# Arguments go to the benchmarks: --runs N, --compile-backend B, --small. The outputs are written to $WORK and
# packed into $OUT/results.tar.gz after every step (the device tool brings back at most 8 files from $OUT).
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

# plain diffusers, the default engine (on CUDA the fast path without compilation since 2026-11-27: what earlier
# runs called dreamsketch_graphs) and the compiled fast path, with torch's compile steps and their times (tracing,
# inductor), to split the cold first call's compilation up (145.6 s of 155.4 s on 2026-11-27)
step gpu_pipeline_sd15 env TORCH_LOGS=dynamo,inductor python3 -m benchmarks.gpu_pipeline --only sd15 "$@"
# the compile cache is warm now: where the compiled request's time goes (device_busy_ms against request_ms: the
# GPU's idle time, 36 ms on 2026-11-26), then the VAE decode, the only part left that can bring the request under
# 0.3 s (313 ms on 2026-11-27, 63 ms of it outside the UNet): out of channels_last (eager GroupNorm copies
# channels_last tensors: 10.7 ms of its 38.9 ms on 2026-11-26), then also compiled (21 ms on 2026-11-26, 32 s more
# cold compilation; cuDNN's timed convolution algorithms and attention gained nothing then: see RESULTS.md)
step request_phases_sd15 python3 -m benchmarks.request_phases --only sd15 --variant compile --profile 30 \
    --contiguous-vae --compile-vae "$@"
# with torch's compile log: what the warm restart spends its time on (16.6 s on 2026-11-26, 19.5 s on 2026-11-27
# with a slow host; target 15 s)
step first_call_warm_sd15 env TORCH_LOGS=dynamo,inductor python3 -m benchmarks.gpu_pipeline --only sd15 \
    --first-call "$@"
if wanted cuda_tests; then
    echo "== cuda_tests $(date -u +%T)" | tee -a "$WORK/log.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_engine.py -k cuda 2>&1 | tail -30 \
        | tee "$WORK/cuda_tests.txt"
    pack
fi
# an experiment for the cold first call (99 s on 2026-11-26, target under 60 s): the UNet's distinct blocks compiled
# by 4 worker processes at once into an empty cache, then the fast path's first call from it
small=()
[[ " $* " == *" --small "* ]] && small=(--small)
step precompile_sd15 python3 -m benchmarks.precompile --workers 4 "${small[@]}"
# SD 1.5's own scheduler, PNDM, read each step's timestep back from the GPU until its steps got it from a host
# copy of the schedule: the GPU's idle time in its request (device_busy_ms against request_ms)
step request_phases_sd15_pndm python3 -m benchmarks.request_phases --only sd15 --variant compile --profile 5 \
    --scheduler PNDM "$@"
step gpu_pipeline_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl "$@"
# SDXL's request outside the UNet (0.32 s of 1.65 s with CUDA graphs on 2026-11-26: the VAE decoding in fp32 at
# 1024x1024 0.2 s of it, 86 ms of that copies between memory formats), then the VAE out of channels_last
step request_phases_sdxl python3 -m benchmarks.request_phases --only sdxl --variant default --profile 30 \
    --contiguous-vae "$@"
step first_call_warm_sdxl python3 -m benchmarks.gpu_pipeline --only sdxl --first-call "$@"
