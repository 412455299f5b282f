#!/usr/bin/env bash
# The GPU measurements of bench/ and the GPU tests, batched for a lent GPU machine that has PyTorch and
# transformers but cannot reach PyPI: the packages it lacks (megatron-core, zarr and its codecs, torchtitan 0.3.0
# and its dependencies, and glassbox itself from `pip wheel --no-deps -w .whl .`) come as py3.12 wheels in
# WHEELS (default .whl/). Results land in bench/results/ and, when OUT is set, the files each part wrote are
# copied there as it finishes.
#
# The carried folders are git-ignored, so a fresh checkout rebuilds them with `nice -n 19 bash bench/gpu_prepare.sh`
# (skips what exists; about 1.5 min from nothing): .whl/, build/rg312 and build/rg312b (reasoning-gym, for Dynasor
# and STUN: WHEELS=".whl build/rg312 build/rg312b"), build/whl, build/gpu-data (the Pollux and STUN data dirs),
# build/pollux-artifact (cpu16 with ARTIFACT=build/pollux-artifact) and .smol/part0, part1. It ends with each one's
# size and the carry sets: call 1 [.whl, build/rg312, build/rg312b, build/whl, build/gpu-data], then one call per
# GGUF part (64 MiB a call, the working tree counted in).
#
#     bash bench/gpu_session.sh tests        # tests/gpu, and the inference bench on the second GPU meanwhile
#     bash bench/gpu_session.sh inference    # tests/inference GPU tests, then the inference bench (one GPU)
#     bash bench/gpu_session.sh train        # bench/train_mfu.py: 4 systems x 3 sizes, then 1B on 2 GPUs
#     bash bench/gpu_session.sh spec         # tree-verification GPU tests, then bench/suffix_e2e.py (GGUF_PARTS)
#     bash bench/gpu_session.sh scar         # bench/scar_rework.py, the 125M reduced grid on the GPU
#     bash bench/gpu_session.sh pollux       # bench/pollux_adaptive.py and bench/pollux_gns.py on the GPU
#     bash bench/gpu_session.sh cpu16        # the CPU grids on the host's cores: SCAR rework, the Pollux simulator
#     bash bench/gpu_session.sh seeds        # STREAMS="FILE:CPUS ...": bench streams side by side (see the part)
#     bash bench/gpu_session.sh detach       # seeds, in a new process session that outlives this call (RUNS)
#     bash bench/gpu_session.sh collect      # wait up to WAIT s for detached streams, pack RUNS into OUT
#
# glassbox's own wheel (GLASSBOX_WHEEL, default build/whl/) carries a compiled part built for this machine's
# Python, so it is unpacked rather than installed, and the suffix trie's C file is compiled for the host's Python
# when gcc is there (without it the trie runs its Python path).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/glassbox-site}
OUT=${OUT:-}

GLASSBOX_WHEEL=${GLASSBOX_WHEEL:-build/whl}
RUNS=${RUNS:-/tmp/glassbox-runs}    # detach/collect: where detached streams write their logs and results

install_site() {    # the carried wheels and glassbox's own into SITE
    # WHEELS may name several folders; a source archive there (a package with no py3.12 wheel, e.g. pycosat) is
    # built on the host, without build isolation (no index to fetch build dependencies from).
    for dir in $WHEELS; do
        if ls "$dir"/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$dir"/*.whl
        fi
        if ls "$dir"/*.tar.gz >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" "$dir"/*.tar.gz
        fi
    done
    if ls "$GLASSBOX_WHEEL"/glassbox-*.whl >/dev/null 2>&1; then
        python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
            "$(ls "$GLASSBOX_WHEEL"/glassbox-*.whl | head -1)" "$SITE"
        ext=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
        inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
        command -v gcc >/dev/null && gcc -O2 -shared -fPIC -I"$inc" inference/speculative/_suffix_trie.c \
            -o "$SITE/glassbox/inference/speculative/_suffix_trie$ext" || echo "suffix trie: no C build, Python path"
    fi
}
# collect only reads what detached streams wrote: reinstalling SITE under running benches could break their imports.
# detach installs once, then runs seeds with SKIP_INSTALL=1.
[ "${1:-}" = collect ] || [ "${SKIP_INSTALL:-0}" = 1 ] || install_site
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
spec)
    [ "${TESTS:-1}" = 1 ] && (cd /tmp && python3 -m pytest "$ROOT/tests/inference/test_tree_verification.py" -m gpu \
        -p no:cacheprovider -q --rootdir "$ROOT" 2>&1 | tail -15)
    # GGUF_PARTS: the SmolLM2 GGUF's parts, in order (bench/suffix_e2e.py pack; two device calls carry them).
    [ -z "${GGUF_PARTS:-}" ] && { echo "GGUF_PARTS unset: no end-to-end bench"; exit 0; }
    (cd /tmp && python3 "$ROOT/bench/suffix_e2e.py" --device cuda --gguf-parts $GGUF_PARTS 2>&1 \
        | tee "${OUT:-/tmp}/suffix_e2e.log" | tail -30)
    save suffix_e2e
    # The same in fp32: the identity check without bf16's rounding (the joined GGUF is kept in /tmp).
    (cd /tmp && python3 "$ROOT/bench/suffix_e2e.py" --device cuda --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtype float32 --repeats 1 --out-name suffix_e2e_fp32 2>&1 | tee "${OUT:-/tmp}/suffix_e2e_fp32.log" | tail -30)
    save suffix_e2e_fp32
    ;;
scar)
    (cd /tmp && python3 "$ROOT/bench/scar_rework.py" --device cuda --model 125m --lost 0.125,0.25 \
        --intervals 50,100 --r 0.25 --seeds "${SEEDS:-3}" --workers 3 --out-name scar_rework_h200 2>&1 | tail -30)
    save scar_rework_h200
    ;;
pollux)
    (cd /tmp && python3 "$ROOT/bench/pollux_gns.py" --device cuda --model small 2>&1 | tail -20)
    save pollux_gns
    (cd /tmp && python3 "$ROOT/bench/pollux_adaptive.py" --device cuda --model small 2>&1 | tail -30)
    save pollux_adaptive
    ;;
cpu16)
    workers=$(nproc)
    (cd /tmp && python3 "$ROOT/bench/scar_rework.py" --workers "$workers" --out-name scar_rework_cpu16 2>&1 | tail -30)
    save scar_rework_cpu16
    # ARTIFACT: the Pollux OSDI'21 artifact's data, carried as a copy (it lives outside the checkout).
    (cd /tmp && python3 "$ROOT/bench/pollux_sim.py" --artifact "$ROOT/${ARTIFACT:-.pollux-artifact}" \
        --workloads 1 2 3 4 5 6 7 8 --loads 0.5 1.0 1.5 2.0 --workers "$workers" --out "$ROOT/bench/results/pollux_sim" \
        2>&1 | tail -30)
    save pollux_sim
    ;;
seeds)
    export PYTHONUNBUFFERED=1    # logs as they happen: a stream cut at its limit keeps what it printed
    # The seed systems' benches in one call: STREAMS lists FILE:CPUS pairs; the streams run side by side (on the
    # one GPU, each on its own CPU cores), and the lines of one stream one after another. A stream file holds
    # "SECONDS STEM COMMAND..." lines: each command gets its own time limit and its log OUT/STEM.log, and
    # bench/results/STEM.* is saved to OUT as soon as it ends, so one failure or overrun costs only itself.
    # Streams share the GPU: an engine sizes its KV pool to 0.85 of the card unless told otherwise, so two
    # engines side by side run out of memory (2026-12-02: every GPU stream but one did); give each bench a
    # memory cap, or put GPU benches in one stream.
    run_stream() {    # run_stream FILE CPUS
        local pin=""
        command -v taskset >/dev/null && pin="taskset -c $2"
        while read -r secs stem cmd; do
            { [ -z "$secs" ] || [ "${secs:0:1}" = "#" ]; } && continue
            echo "[$(date +%T)] start $stem (limit $secs s, cpus $2)"
            (cd /tmp && ROOT=$ROOT timeout "$secs" $pin bash -c "$cmd" < /dev/null > "${OUT:-/tmp}/$stem.log" 2>&1)
            echo "[$(date +%T)] end $stem rc=$?"
            # Not STEM.log: that is the stream's own log in OUT, and a results log of that name in the checkout
            # (an older run's, committed) would overwrite it (2026-12-02: pollux_adaptive's and pollux_gns's were).
            [ -n "$OUT" ] && for f in "$ROOT"/bench/results/"$stem".*; do
                [ -e "$f" ] && [ "${f##*/}" != "$stem.log" ] && cp -f "$f" "$OUT"/
            done
        done < "$1"
    }
    for stream in ${STREAMS:-}; do
        run_stream "${stream%%:*}" "${stream##*:}" &
    done
    wait
    ;;
detach)
    # The seeds streams in a new process session (setsid): a lent machine keeps such processes running after the
    # call returns, until it goes back. Later calls can then carry what the streams wait for (the GGUF's parts, in
    # calls of their own: 64 MiB a call) and collect results, while the GPU works on. RUNS gets each stream's logs
    # and results, session.log the runner's, and `done` once every stream has ended.
    # The machine goes back 30 s after a call ends, streams and all: make each next call (the parts, then collect)
    # at once, nothing in between (2026-12-02: a 540 s collect waited on a fresh machine).
    # They run from a copy of the checkout: each later call re-sends the working tree, which must not change files
    # under a running bench.
    mkdir -p "$RUNS"
    rm -rf "$RUNS/done" "$RUNS/root"
    cp -a "$ROOT" "$RUNS/root"
    STREAMS=${STREAMS:-} OUT=$RUNS SKIP_INSTALL=1 setsid nohup bash -c "bash '$RUNS/root/bench/gpu_session.sh' seeds; touch '$RUNS/done'" \
        > "$RUNS/session.log" 2>&1 < /dev/null &
    echo "detached into $RUNS (streams: ${STREAMS:-none})"
    ;;
collect)
    # WAIT seconds at most (default 0) for the detached streams to end, then RUNS packed into OUT/runs.tar.gz:
    # one file, since a call brings back 8 at most.
    # The pack is refreshed every minute meanwhile: a call cut short at the session's device-time limit still
    # brings back $OUT as it stands.
    pack() {
        [ -n "$OUT" ] && tar -czf "$OUT/runs.tmp.tar.gz" -C "$RUNS" --exclude ./root . \
            && mv -f "$OUT/runs.tmp.tar.gz" "$OUT/runs.tar.gz"
    }
    end=$(( SECONDS + ${WAIT:-0} ))
    last=$SECONDS
    pack
    while [ ! -f "$RUNS/done" ] && [ "$SECONDS" -lt "$end" ]; do
        sleep 5
        [ $(( SECONDS - last )) -ge 60 ] && { pack; last=$SECONDS; }
    done
    [ -f "$RUNS/done" ] && echo "all streams ended" || echo "streams still running"
    cat "$RUNS/session.log" 2>/dev/null
    pack
    ls -la --ignore=root "$RUNS"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|inference|train|spec|scar|pollux|cpu16|seeds|detach|collect" >&2
    exit 2
    ;;
esac
