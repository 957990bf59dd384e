#!/usr/bin/env bash
# The benchmark on a bare GPU machine: torch is there, the kit's other packages are not, no network.
#
#   bash bench/gpu_run.sh                                          # headline: Qwen3-8B, 16,384 tokens, seed/kit/liger
#   bash bench/gpu_run.sh --preset llama3.2-3b --seq-len 20480     # the quick one
#   bash bench/gpu_run.sh --variants seed,kit,liger,packing --budget 480 -- --steps 3
#
# 1. Installs the wheels carried in bench/wheels/ (list: bench/wheels.txt; fetch: bench/README.md) with
#    pip --no-index --no-deps into a folder of their own that goes first on PYTHONPATH: the machine's torch,
#    CUDA libraries and triton are never replaced, and its newer transformers is only shadowed.
# 2. Checks that the stack imports and that torch sees the GPU; prints the versions.
# 3. The one-step check of each GPU preset (--check-presets; none: skip): a 2-layer model of the preset's
#    architecture (real vocabulary) at 1,024 tokens, one optimizer step through sft_train.sh (ZeRO-3),
#    `kit` (the preset's settings: Liger's fused loss) against `seed` (no Liger) on the same weights and
#    batch; step 1's loss and gradient norm must agree (bench.benchmark.first_step_check). Any failure:
#    exit status 1 after the benchmark. --check-only stops after the check.
# 4. Runs bench/run.sh (model config + tokenizer, synthetic data, one sft_train.sh run per variant) with a
#    time budget: a variant that would end past it is reported as skipped. Results go to
#    runs/bench/PRESET-SEQ/, and to $OUT when that is set (the device tool brings $OUT back):
#    bench-PRESET-SEQ.json (the JSON list), bench-PRESET-SEQ.txt (summaries), bench-PRESET-SEQ-logs.tar.gz.
# Everything after `--` goes to bench/run.sh as it is.
set -euo pipefail

KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET="qwen3-8b" SEQ_LEN="16384" VARIANTS="seed,kit,liger" BUDGET="420" GPUS=""
CHECK_PRESETS="qwen3-8b,qwen3-14b,llama3.2-3b" CHECK_ONLY=0
WHEELS="${SFTKIT_WHEELS:-$KIT_DIR/bench/wheels}"
SITE="${SFTKIT_SITE:-/tmp/sftkit-site}"
PASS=()

die() {
    echo "bench/gpu_run.sh: error: $*" >&2
    exit 2
}

while (($# > 0)); do
    case "$1" in
        --preset | --seq-len | --variants | --budget | --gpus | --wheels | --check-presets)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --preset) PRESET="$2" ;;
                --seq-len) SEQ_LEN="$2" ;;
                --variants) VARIANTS="$2" ;;
                --budget) BUDGET="$2" ;;
                --gpus) GPUS="$2" ;;
                --wheels) WHEELS="$2" ;;
                --check-presets) CHECK_PRESETS="$2" ;;
            esac
            shift 2
            ;;
        --check-only) CHECK_ONLY=1 && shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            echo "options: --preset P (qwen3-8b) --seq-len N (16384) --variants a,b (seed,kit,liger) --budget S (420)"
            echo "         --gpus N (visible GPUs) --wheels DIR (bench/wheels) [-- bench/run.sh options]"
            echo "         --check-presets a,b (qwen3-8b,qwen3-14b,llama3.2-3b; none: skip) --check-only"
            exit 0
            ;;
        --) shift && PASS=("$@") && break ;;
        *) die "unknown option '$1' (bench/run.sh options go after '--'; see --help)" ;;
    esac
done

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PYTHON" ]] || die "no python3 on PATH"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
((${#wheels[@]} > 0)) || die "no wheels in $WHEELS: fetch them on a machine with network (bench/README.md, 'Wheels')"

start=$SECONDS
echo "== installing ${#wheels[@]} wheels from $WHEELS into $SITE (no index, no dependencies: torch stays)"
rm -rf "$SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export SFTKIT_SITE="$SITE" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PATH="$(dirname "$PYTHON"):$PATH"
if ! command -v torchrun >/dev/null; then  # the launcher calls torchrun by name
    mkdir -p "$SITE/bin"
    printf '#!/usr/bin/env bash\nexec "%s" -m torch.distributed.run "$@"\n' "$PYTHON" >"$SITE/bin/torchrun"
    chmod +x "$SITE/bin/torchrun"
    PATH="$SITE/bin:$PATH"
fi
export PATH PYTHON

echo "== checking the stack ($((SECONDS - start)) s)"
BENCH_PRESET="$PRESET" "$PYTHON" - <<'EOF'
import os
from importlib import metadata

import torch

site = os.environ["SFTKIT_SITE"]
if torch.__file__.startswith(site):
    raise SystemExit(f"torch was installed into {site}: the wheels must not carry torch")
import llamafactory.train.tuner  # noqa: F401,E402 - the whole training import path, compiled once here

names = ("torch", "transformers", "peft", "accelerate", "deepspeed", "llamafactory", "trl", "datasets",
         "liger-kernel", "tokenizers", "triton")
print("versions: " + ", ".join(f"{n} {metadata.version(n)}" for n in names))
if not torch.cuda.is_available():
    if os.environ["BENCH_PRESET"] != "demo":  # the demo preset (CPU) checks this script without a GPU
        raise SystemExit("torch sees no GPU here")
    raise SystemExit(0)
print(f"GPUs: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch CUDA {torch.version.cuda}")
EOF

check_status=0
if [[ "$CHECK_PRESETS" != "none" ]]; then
    IFS=, read -r -a checks <<<"$CHECK_PRESETS"
    for preset in "${checks[@]}"; do
        dir="$KIT_DIR/runs/bench/check-$preset"
        mkdir -p "$dir"
        echo "== one-step check of preset $preset: kit vs seed, 2 layers, 1,024 tokens ($((SECONDS - start)) s)"
        CHECK_ARGS=(--preset "$preset" --seq-len 1024 --layers 2 --steps 1 --warmup 0 --variants "seed,kit"
            --variant-timeout 300 --workdir "$dir" --out "$dir/results.json")
        [[ -n "$GPUS" ]] && CHECK_ARGS+=(--gpus "$GPUS")
        bash "$KIT_DIR/bench/run.sh" "${CHECK_ARGS[@]}" >"$dir/stdout.txt" 2>"$dir/stderr.txt" || true
        line="$(CHECK_FILE="$dir/results.json" PYTHONPATH="$KIT_DIR:$PYTHONPATH" "$PYTHON" -c '
import json, os, sys
from bench.benchmark import first_step_check
try:
    results = json.load(open(os.environ["CHECK_FILE"], encoding="utf-8"))
except (OSError, ValueError) as err:
    results = [{"variant": "seed", "status": "error", "reason": f"no results: {err}"}, {"variant": "kit"}]
ok, line = first_step_check(results)
print(line)
sys.exit(0 if ok else 1)
' 2>&1)" || check_status=1
        echo "check $preset: $line" | tee -a "$KIT_DIR/runs/bench/check-summary.txt"
        if [[ -n "${OUT:-}" ]]; then
            cp "$dir/results.json" "$OUT/check-$preset.json" 2>/dev/null || true
            (cd "$dir" && shopt -s nullglob && logs=(./*.log stdout.txt stderr.txt) &&
                tar -czf "$OUT/check-$preset-logs.tar.gz" "${logs[@]}") || true
        fi
    done
    [[ -n "${OUT:-}" ]] && cp "$KIT_DIR/runs/bench/check-summary.txt" "$OUT/" 2>/dev/null
    if ((CHECK_ONLY)); then
        echo "== done in $((SECONDS - start)) s (one-step checks: exit status $check_status)"
        exit "$check_status"
    fi
fi

TAG="bench-$PRESET-$SEQ_LEN"
WORKDIR="$KIT_DIR/runs/bench/$PRESET-$SEQ_LEN"
mkdir -p "$WORKDIR"
setup=$((SECONDS - start))  # with the one-step checks
left=$((BUDGET > setup ? BUDGET - setup : 60))
echo "== benchmark: $PRESET at $SEQ_LEN tokens, variants $VARIANTS; setup took ${setup} s, ${left} s left of the budget"
ARGS=(--preset "$PRESET" --seq-len "$SEQ_LEN" --variants "$VARIANTS" --time-budget "$left"
    --variant-timeout 360 --workdir "$WORKDIR" --out "$WORKDIR/results.json")
[[ -n "$GPUS" ]] && ARGS+=(--gpus "$GPUS")
set +e
bash "$KIT_DIR/bench/run.sh" "${ARGS[@]}" "${PASS[@]}" | tee "$WORKDIR/stdout.txt"
status=${PIPESTATUS[0]}
set -e
grep '^bench ' "$WORKDIR/stdout.txt" >"$WORKDIR/summary.txt" || true
if [[ -n "${OUT:-}" ]]; then
    cp "$WORKDIR/results.json" "$OUT/$TAG.json" 2>/dev/null || true
    cp "$WORKDIR/summary.txt" "$OUT/$TAG.txt"
    (cd "$WORKDIR" && shopt -s nullglob && logs=(./*.log ./*.figures.json stdout.txt) &&
        tar -czf "$OUT/$TAG-logs.tar.gz" "${logs[@]}") || true
fi
echo "== done in $((SECONDS - start)) s (exit status $status; one-step checks $check_status)"
((status != 0)) || status=$check_status
exit "$status"
