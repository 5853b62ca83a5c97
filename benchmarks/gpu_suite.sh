#!/usr/bin/env bash
# GPU run-book: the checks and figures that need a CUDA GPU, as one table, in under 8 minutes
# on one H200. Each part prints PASS, FAIL or SKIP with a reason, is bounded by `timeout`, and
# never stops the parts after it; the whole run keeps to a time budget (SUITE_BUDGET_S, 450 s).
#
#   a  tests/test_gpu.py: CUDA against CPU, bf16 against fp32 (kept tokens, features)
#   b  embed end to end from a generated SVS (20x, 0.5 um/px), bf16, token refinement on vs off:
#      convlm_vit_b16 and the CONCH architecture (conch_v1, 448 px; random weights, as speed
#      does not depend on them)
#   c  classify scoring on the GPU (classify_bench.py --device cuda, a few hundred feature files)
#   d  Ray: embed with one GPU actor (--executor ray --gpus-per-worker 1), when Ray is installed
#   e  reader scaling (read_bench.py's worker sweep) and the reader processes needed to feed the
#      model rate that b measured for convlm_vit_b16
#
# Usage:
#   bash benchmarks/gpu_suite.sh                 on the GPU machine
#   bash benchmarks/gpu_suite.sh --cpu           plumbing check without a GPU: tiny CPU runs
#                                                stand in for the CUDA parts (a couple of minutes)
#   bash benchmarks/gpu_suite.sh --fetch-wheels  where pip reaches a package index: download the
#                                                wheels the GPU machine lacks (see below), then stop
#
# Dependencies. The GPU machine reaches no package index; its image has Python 3.12 with torch,
# torchvision, numpy, h5py, scikit-image, scikit-learn, tifffile, timm, safetensors, tokenizers,
# click, pyyaml, pytest and more, but not open_clip, OpenSlide, tiffslide, zarr, imagecodecs or
# shapely. --fetch-wheels downloads those (cp312, manylinux x86-64; the versions installed in
# the environment that runs it) into benchmarks/.wheels, which git ignores (a .gitignore of '*'
# inside it); a run that carries that folder installs them with
#   pip install --no-index --no-deps --target /tmp/wsi-suite-site benchmarks/.wheels/*.whl
# when anything the pipeline imports is missing, and puts that folder and the repository on
# PYTHONPATH (the package runs from the checkout; nothing is built). Ray's wheel (~80 MB) is too
# large to carry, so d reports SKIP where Ray is not installed.
#
# Environment: PYTHON (python3), WHEELS (benchmarks/.wheels), SUITE_BUDGET_S (450),
# OUT (folder for the logs and table.txt; a new temporary folder if unset).

set -u -o pipefail

MODE=gpu
FETCH=0
BUDGET_S=${SUITE_BUDGET_S:-450}
LOGS=${OUT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) MODE=cpu ;;
        --fetch-wheels) FETCH=1 ;;
        --logs) LOGS=$2; shift ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/benchmarks/.wheels}
SITE=${TMPDIR:-/tmp}/wsi-suite-site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# What the GPU machine's image lacks, plus tifffile: tiffslide pins tifffile < 2026.5.2.
DEVICE_WHEELS=(open_clip_torch ftfy wcwidth openslide-python openslide-bin tiffslide tifffile zarr numcodecs
               donfig google-crc32c imagecodecs shapely)
DEVICE_PYTHON=3.12
# What the parts import (module names).
NEEDED=(wsi_pipeline open_clip tiffslide openslide shapely zarr imagecodecs tifffile h5py skimage sklearn click
        yaml safetensors tokenizers pytest)

fetch_wheels() {
    mkdir -p "$WHEELS" && printf '*\n' >"$WHEELS/.gitignore"
    rm -f "$WHEELS"/*.whl  # one version of each: two would stop the install
    local specs=() p v
    for p in "${DEVICE_WHEELS[@]}"; do
        if v=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$p" 2>/dev/null); then
            specs+=("$p==$v")
        else
            specs+=("$p")
        fi
    done
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}" || return 1
    ls -1 "$WHEELS"
    du -sh "$WHEELS"
}

if [ "$FETCH" = 1 ]; then
    fetch_wheels
    exit $?
fi

[ -n "$LOGS" ] || LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
mkdir -p "$LOGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TABLE=$LOGS/table.txt
: >"$WORK/rows"
T_START=$(date +%s)
DEADLINE=$((T_START + BUDGET_S))

row() {  # row PART CHECK RESULT SECONDS DETAIL
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/rows"
}

# run_part NAME CAP_S CMD...: run CMD under timeout (capped by what is left of the budget),
# output in $LOGS/NAME.log; sets RC (-1: not run, budget spent; 124: timed out) and SECS.
run_part() {
    local name=$1 cap=$2 left t0
    shift 2
    left=$((DEADLINE - $(date +%s)))
    SECS=0
    if [ "$left" -lt 20 ]; then
        RC=-1
        echo "not run: the suite's time budget (${BUDGET_S} s) is spent" >"$LOGS/$name.log"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    CAP=$cap
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >"$LOGS/$name.log" 2>&1
    RC=$?
    SECS=$(($(date +%s) - t0))
}

why_failed() {  # why_failed LOG: a one-line reason for a failed part
    if [ "$RC" = -1 ]; then
        echo "not run: suite time budget spent"
    elif [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        echo "timed out after ${CAP} s (log: $1)"
    else
        local line
        line=$(grep -E '(Error|error:|FAILED|Traceback)' "$1" | tail -n 1)
        [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1)
        echo "exit $RC: ${line:0:160}"
    fi
}

wsi() { "$PY" -c 'from wsi_pipeline.cli import main; main(prog_name="wsi-pipeline")' "$@"; }

missing_modules() {
    "$PY" - "${NEEDED[@]}" <<'EOF'
import importlib
import sys

bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import is reported
        bad.append(f"{name} ({type(e).__name__})")
print(", ".join(bad))
EOF
}

# ---------------------------------------------------------------------------------- setup
t0=$(date +%s)
note="nothing to install"
miss=$(missing_modules)
if [ -n "$miss" ]; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >"$LOGS/setup.log" 2>&1; then
            export PYTHONPATH="$SITE:$PYTHONPATH"
            note="installed $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from ${WHEELS#"$REPO"/} (missing before: $miss)"
            miss=$(missing_modules)
        else
            note="pip install from ${WHEELS#"$REPO"/} failed: $(tail -n 1 "$LOGS/setup.log")"
        fi
    else
        note="no wheels in ${WHEELS#"$REPO"/}: run 'bash benchmarks/gpu_suite.sh --fetch-wheels' where pip reaches an index, and carry that folder"
    fi
fi
if [ -z "$miss" ]; then
    row setup "imports" PASS $(($(date +%s) - t0)) "$note"
else
    row setup "imports" FAIL $(($(date +%s) - t0)) "missing: $miss; $note"
fi
MACHINE=$("$PY" -c 'import os, torch; c = torch.cuda.is_available(); print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name(0) if c else "no CUDA device") + f", {os.cpu_count()} CPUs")' 2>&1 | tail -n 1)
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$MODE" = gpu ] && [ "$HAS_CUDA" != 1 ]; then
    row setup "CUDA device" FAIL 0 "torch sees no CUDA device ($MACHINE); run with --cpu for the plumbing check"
fi
CORES=$(nproc)
READERS=$((CORES > 3 ? CORES - 2 : 1))  # reader processes for b; the main process and one core to spare

if [ "$MODE" = gpu ]; then
    DEVICE=cuda PREC=bf16
    B_MODELS=(convlm_vit_b16 conch_v1)
    B_ARGS=(--size 32768 32768 --mpp 0.5 --workers "$READERS" --batch-size 256)
    C_ARGS=(--n-files 300 --n-patches 4000 --shapes 768x512 --chunk 150)
    D_ARGS=(--model convlm_vit_b16 --gpus-per-worker 1 --workers 4 --random-init)
    mapfile -t E_WORKERS < <(printf '%s\n' 0 1 2 4 8 "$READERS" | sort -nu)
    E_ARGS=(--width 24000 --height 16000 --input-size 224)
else  # tiny CPU stand-ins: the same scripts and parsing, small inputs
    DEVICE=cpu PREC=fp32
    B_MODELS=(convlm_test conch_test)
    B_ARGS=(--size 2048 2048 --mpp 0.5 --workers 1 --batch-size 16)
    C_ARGS=(--n-files 20 --n-patches 500 --shapes 768x512)
    D_ARGS=(--model convlm_test --gpus-per-worker 0 --workers 0 --random-init)
    E_WORKERS=(0 1 2)
    E_ARGS=(--width 6000 --height 4000 --input-size 224)
fi

# ------------------------------------------------------------------ a: tests/test_gpu.py
run_part a 120 "$PY" -m pytest -q -p no:cacheprovider -o junit_family=xunit1 tests/test_gpu.py --junitxml="$WORK/a.xml"
if [ -s "$WORK/a.xml" ]; then
    "$PY" - "$WORK/a.xml" >>"$WORK/rows" <<'EOF'
import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    result, detail = "PASS", ""
    for tag, name in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "SKIP")):
        el = case.find(tag)
        if el is not None:
            result, detail = name, (el.get("message") or tag).splitlines()[0][:160]
    p = {e.get("name"): float(e.get("value")) for e in case.iter("property")}
    if "same_kept_fraction" in p:
        detail = (f"{p['same_kept_fraction']:.0%} of {p['images']:.0f} images keep the same tokens at every "
                  f"refining block, mean Jaccard {p['mean_jaccard']:.3f}; max |feature diff| "
                  f"{p['max_feature_diff']:.3g} (max |feature| {p['max_feature']:.3g}), min cos {p['min_cos']:.5f}"
                  + (f"; {detail}" if detail else ""))
    print(f"a\t{case.get('name')}\t{result}\t{float(case.get('time', 0)):.0f}\t{detail}")
EOF
else
    row a "tests/test_gpu.py" FAIL "$SECS" "$(why_failed "$LOGS/a.log")"
fi
if [ "$MODE" = cpu ]; then  # the kept-token measurement itself, CPU autocast standing in for CUDA
    t0=$(date +%s)
    if kept=$(cd tests && "$PY" -c '
import test_gpu
print("{same_kept_fraction:.0%} of {images} images keep the same tokens, mean Jaccard {mean_jaccard:.3f}; "
      "max |feature diff| {max_feature_diff:.3g}, min cos {min_cos:.5f}".format(**test_gpu.kept_token_agreement("cpu", 4)))
' 2>"$WORK/kept.err"); then
        row a "kept tokens bf16 vs fp32 (CPU autocast)" PASS $(($(date +%s) - t0)) "$kept"
    else
        row a "kept tokens bf16 vs fp32 (CPU autocast)" FAIL $(($(date +%s) - t0)) "$(tail -n 1 "$WORK/kept.err")"
    fi
fi

# ------------------------------------------------------------ b: embed end to end, refinement on/off
run_part b 170 "$PY" benchmarks/embed_bench.py --models "${B_MODELS[@]}" "${B_ARGS[@]}" --device "$DEVICE" \
    --precision "$PREC" --refine off on
MODEL_RATE=""
for model in "${B_MODELS[@]}"; do
    found=0
    while read -r -a f; do  # model mode device prec patches e2e model-only wait | model mode failed: ...
        found=1
        if [ "${f[2]}" = failed: ]; then
            row b "embed $model refine ${f[1]}" FAIL "$SECS" "${f[*]:2}"
        elif [ "${f[1]}" = refinement ]; then
            row b "embed $model refinement on vs off" PASS "$SECS" "${f[*]:5}"
        else
            row b "embed $model ${f[3]} refine ${f[1]}" PASS "$SECS" \
                "${f[5]} patches/s end to end, ${f[6]}/s model only, ${f[7]} of the time waiting for data (${f[4]} patches, ${f[2]})"
            if [ "$model" = "${B_MODELS[0]}" ] && [ "${f[1]}" = on ]; then MODEL_RATE=${f[6]}; fi
        fi
    done < <(grep -E "^$model +(on|off|refinement) " "$LOGS/b.log")
    [ "$found" = 1 ] || row b "embed $model" FAIL "$SECS" "$(why_failed "$LOGS/b.log")"
done

# --------------------------------------------------------------------- c: classify scoring
run_part c 120 "$PY" benchmarks/classify_bench.py "${C_ARGS[@]}" --device "$DEVICE"
paths=$(awk '$1 ~ /^[0-9]+x[0-9]+$/ && ($2 == "features" || $2 == "embeddings") { printf "%s%s path %s ms/file", sep, $2, $4; sep = ", " }' \
    "$LOGS/c.log")
if [ "$RC" = 0 ] && [ -n "$paths" ]; then
    faster=$(grep -m 1 'stored embeddings .* faster' "$LOGS/c.log" | sed 's/^ *//')
    factored=$(grep -m 1 'factored (torch)' "$LOGS/c.log" | sed 's/^ *//; s/  */ /g')
    row c "classify_bench --device $DEVICE" PASS "$SECS" "${C_ARGS[*]:0:6}: $paths ($faster); similarity $factored"
else
    row c "classify_bench --device $DEVICE" FAIL "$SECS" "$(why_failed "$LOGS/c.log")"
fi

# ------------------------------------------------------------------------ d: Ray, one GPU actor
D_CHECK="embed --executor ray --gpus-per-worker ${D_ARGS[3]}"
if ! "$PY" -c 'import ray' >/dev/null 2>&1; then
    row d "$D_CHECK" SKIP 0 "Ray is not installed here (its ~80 MB wheel is too large to carry to the GPU machine)"
else
    export -f wsi
    export PY WORK DEVICE PREC
    # shellcheck disable=SC2016  # expanded by the inner bash
    run_part d 100 bash -c '
        "$PY" -m wsi_pipeline.synthetic --out "$WORK/ray" --slides 3 --rois 0 --size 4096x3072 &&
        wsi tile "$WORK/ray/slides" -o "$WORK/ray/out" &&
        wsi embed "$WORK/ray/out" --executor ray "$@" --device "$DEVICE" --precision "$PREC" --batch-size 64' \
        ray_run "${D_ARGS[@]}"
    if [ "$RC" = 0 ] && line=$(grep -m 1 '^embed: ' "$LOGS/d.log"); then
        row d "$D_CHECK" PASS "$SECS" "${line%% -> *}"
    else
        row d "$D_CHECK" FAIL "$SECS" "$(why_failed "$LOGS/d.log")"
    fi
fi

# ---------------------------------------------------------------- e: reader scaling vs the model rate
rate_note="the ${B_MODELS[0]} model-only rate from b"
if [ -z "$MODEL_RATE" ]; then
    MODEL_RATE=3000
    rate_note="b gave no rate; an assumed 3000 patches/s"
fi
run_part e 110 "$PY" benchmarks/read_bench.py --sweep-only --repeats 1 "${E_ARGS[@]}" --workers "${E_WORKERS[@]}" \
    --model-rate "$MODEL_RATE"
for backend in tiffslide openslide; do
    best=$(awk -v b="$backend" '$1 == b && NF >= 7 && $2 ~ /^[0-9]+$/ { if ($4 > r) { r = $4; w = $2; p = $5 } }
        END { if (r) printf "best %d patches/s with %d workers (%d per reader)", r, w, p }' "$LOGS/e.log")
    feed=$(grep -m 1 "^feeding .* through $backend:" "$LOGS/e.log")
    if [ "$RC" = 0 ] && [ -n "$best" ]; then
        row e "reader scaling, $backend" PASS "$SECS" "$best; ${feed:-no model-rate line} ($rate_note)"
    else
        row e "reader scaling, $backend" FAIL "$SECS" "$(why_failed "$LOGS/e.log")"
    fi
done

# ------------------------------------------------------------------------------ the table
{
    echo "gpu_suite ($MODE): $MACHINE; $(($(date +%s) - T_START)) s; logs in $LOGS"
    printf '%-5s %-52s %-6s %5s  %s\n' part check result s detail
    awk -F'\t' '{ printf "%-5s %-52s %-6s %5s  %s\n", $1, $2, $3, $4, $5 }' "$WORK/rows"
} | tee "$TABLE"
! grep -q $'\tFAIL\t' "$WORK/rows"
