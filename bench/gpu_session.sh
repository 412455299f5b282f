#!/usr/bin/env bash
# The GPU measurements of bench/ and the GPU tests, batched for a lent GPU machine that has PyTorch and
# transformers but cannot reach PyPI: the packages it lacks (megatron-core, zarr and its codecs, torchtitan 0.3.0
# and its dependencies, and glassbox itself from `pip wheel --no-deps -w .whl .`) come as py3.12 wheels in
# WHEELS (default .whl/). Results land in bench/results/ and, when OUT is set, the files each part wrote are
# copied there as it finishes.
#
#     bash bench/gpu_session.sh tests        # tests/gpu, and the inference bench on the second GPU meanwhile
#     bash bench/gpu_session.sh inference    # tests/inference GPU tests, then the inference bench (one GPU)
#     bash bench/gpu_session.sh train        # bench/train_mfu.py: 4 systems x 3 sizes, then 1B on 2 GPUs
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/glassbox-site}
OUT=${OUT:-}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH=$SITE
export NCCL_NVLS_ENABLE=0          # no NVLink multicast on the lent machines
# Run from outside the checkout, so its top-level glassbox/ folder does not shadow the installed package.
ROOT=$PWD
gpus=$(nvidia-smi -L | wc -l)

save() {    # save STEM: bench/results/STEM.* to OUT (only what the part wrote: the machine returns few files)
    [ -n "$OUT" ] && cp -f "$ROOT"/bench/results/"$1".* "$OUT"/ 2>/dev/null
    return 0
}

inference_bench() {    # inference_bench: bench/inference_throughput.py on CUDA, its log in OUT (or /tmp)
    (cd /tmp && python3 "$ROOT/bench/inference_throughput.py" --device cuda --out-name inference_throughput_h100 \
        > "${OUT:-/tmp}/inference.log" 2>&1; echo "inference bench rc=$?")
}

case "${1:-}" in
tests)
    if [ "$gpus" -ge 2 ]; then
        CUDA_VISIBLE_DEVICES=1 inference_bench &
        (cd /tmp && CUDA_VISIBLE_DEVICES=0 python3 -m pytest "$ROOT/tests/gpu" -m gpu -p no:cacheprovider \
            -q -s -k "not two_gpus" --rootdir "$ROOT" 2>&1 | tail -40)
        wait
        (cd /tmp && python3 -m pytest "$ROOT/tests/gpu" -m gpu -p no:cacheprovider -q -s -k two_gpus \
            --rootdir "$ROOT" 2>&1 | tail -20)
    else
        (cd /tmp && python3 -m pytest "$ROOT/tests/gpu" -m gpu -p no:cacheprovider -q -s --rootdir "$ROOT" 2>&1 | tail -40)
        inference_bench
    fi
    tail -25 "${OUT:-/tmp}/inference.log"
    save inference_throughput_h100
    ;;
inference)
    (cd /tmp && python3 -m pytest "$ROOT/tests/inference/test_gpu.py" -m gpu -p no:cacheprovider -q -s \
        --rootdir "$ROOT" 2>&1 | tail -20)
    [ "${TESTS_ONLY:-0}" = 1 ] && exit 0
    inference_bench
    grep -v "it/s\]$" "${OUT:-/tmp}/inference.log" | tail -25
    save inference_throughput_h100
    ;;
train)
    concurrent=$(( gpus >= 2 ? 2 : 1 ))
    # SYSTEMS / SIZES narrow a rerun; --append keeps the other rows of the table.
    (cd /tmp && python3 "$ROOT/bench/train_mfu.py" --concurrent "$concurrent" --budget "${BUDGET:-330}" \
        --systems "${SYSTEMS:-glassbox,glassbox-core,torchtitan,transformers}" --sizes "${SIZES:-125M,350M,1B}" \
        --append --log-dir "${OUT:-/tmp}/train_logs" 2>&1 | tail -30)
    save train_mfu
    if [ "$gpus" -ge 2 ] && [ "${TWO_GPU:-1}" = 1 ]; then
        (cd /tmp && python3 "$ROOT/bench/train_mfu.py" --gpus 2 --sizes 1B --systems glassbox,torchtitan --append \
            --log-dir "${OUT:-/tmp}/train_logs" 2>&1 | tail -25)
        save train_mfu
    fi
    ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|inference|train" >&2
    exit 2
    ;;
esac
