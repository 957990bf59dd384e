#!/usr/bin/env bash
# LoRA SFT with LLaMA-Factory under DeepSpeed ZeRO-3, one torchrun per node.
#
#   bash sft_train.sh --model qwen3-8b --model-path /models/Qwen3-8B --dataset my.jsonl
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash sft_train.sh ...   (on each node)
#
# Checks the model folder, the data and the GPUs first, prints the plan and the exact command,
# then hands over to the run's supervisor (python -m sftkit supervise), which holds the output dir,
# records the run in run_manifest.json, runs torchrun, and on SIGTERM/SIGINT/SIGHUP lets every
# worker finish its step and save a checkpoint before the run stops (no process is left behind).
set -euo pipefail

# ---- The original defaults: edit here, they apply to every model -------------------------------
# A preset changes one of these only where it cannot work for that model, and says so when it runs.
SEED_ARGS=(
    --stage sft
    --do_train True
    --finetuning_type lora
    --lora_target all
    --lora_rank 64
    --lora_alpha 128
    --lora_dropout 0.05
    --cutoff_len 20480
    --per_device_train_batch_size 2
    --gradient_accumulation_steps 8
    --learning_rate 5e-5
    --num_train_epochs 3.0
    --bf16 True
    --logging_steps 10
    --plot_loss True
    --report_to tensorboard
    --trust_remote_code False
)
# ---- The kit's own additions to them (also overridable after --) ------------------------------
# save_total_limit: checkpoints with optimizer state are kept this many at a time (oldest deleted).
# ddp_timeout: NCCL's watchdog limit (HF default 1800 s); rank 0 writing a 16-bit model at the end, or
# preparing a large dataset, while the other ranks wait in a barrier can take longer than that.
KIT_ARGS=(
    --save_total_limit 3
    --ddp_timeout 7200
)
# the other commands (check-data, estimate) read SEED_ARGS through bash, not a second parser of this file
if [[ "${1:-}" == "--print-seed-args" ]]; then
    printf '%s\0' "${SEED_ARGS[@]}"
    exit 0
fi
DEFAULT_GPUS_NOTE="processes per node: --gpus, else the visible GPU count (4 on the target node)"

KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEEPSPEED_CONFIG="$KIT_DIR/ds_z3_config.json"
[[ "$PWD" == "$KIT_DIR" ]] && DEEPSPEED_CONFIG="ds_z3_config.json"

usage() {
    cat <<EOF
usage: bash sft_train.sh --model PRESET|DIR [options] [-- extra LLaMA-Factory arguments]

  --model PRESET|DIR   qwen3-8b, qwen3-14b, llama3.2-3b, demo, or a local model folder
  --model-path DIR     where the preset's weights are (default: the preset's hub id)
  --dataset NAME|FILE  a name in data/dataset_info.json, or a .json/.jsonl file; several: a.jsonl,b.json,name
  --val-size F         hold out a share F of the rows (or F rows): validation loss during training
  --output-dir DIR     where the adapter goes (default: saves/<Model>-lora)
  --gpus N             $DEFAULT_GPUS_NOTE
  --template NAME      LLaMA-Factory template (default: the preset's, or from config.json)
  --global-batch N     derive gradient accumulation so micro-batch x GPUs x nodes x accumulation = N
  --save-every-minutes M
                       also save a checkpoint when M minutes passed since the last one (default 30, 0 off)
  --overwrite          replace an existing adapter in the output dir
  --force-resume       resume although the global batch, data or LoRA settings changed
  --skip-invalid       train without the rows the data check rejects (it says how many)
  --packing            pack rows to cutoff_len, not attending to each other (LLaMA-Factory's neat_packing)
  --gpu-type NAME      GPU for the time estimate where nvidia-smi shows none (a login node), e.g. H100
  --dry-run            check and print the plan and the command; train nothing
  -h, --help           this text

Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and run the same command on each node;
a node waits SFTKIT_RENDEZVOUS_TIMEOUT seconds (default 600) for the others, then gives up.
EOF
}

die() {
    echo "sft_train.sh: error: $*" >&2
    exit 2
}

MODEL="" MODEL_PATH="" DATASET="" OUTPUT_DIR="" GPUS="" TEMPLATE="" GLOBAL_BATCH="" SAVE_EVERY="" VAL_SIZE="" OVERWRITE=0 FORCE_RESUME=0 SKIP_INVALID=0 DRY_RUN=0
PACKING=0 GPU_TYPE=""
EXTRA_ARGS=()
while (($# > 0)); do
    case "$1" in
        --model | --model-path | --dataset | --output-dir | --gpus | --template | --global-batch | --save-every-minutes | --val-size | --gpu-type)
            (($# >= 2)) || die "$1 needs a value (see --help)"
            case "$1" in
                --model) MODEL="$2" ;;
                --model-path) MODEL_PATH="$2" ;;
                --dataset) DATASET="$2" ;;
                --output-dir) OUTPUT_DIR="$2" ;;
                --gpus) GPUS="$2" ;;
                --template) TEMPLATE="$2" ;;
                --global-batch) GLOBAL_BATCH="$2" ;;
                --val-size) VAL_SIZE="$2" ;;
                --save-every-minutes) SAVE_EVERY="$2" ;;
                --gpu-type) GPU_TYPE="$2" ;;
            esac
            shift 2
            ;;
        --overwrite) OVERWRITE=1 && shift ;;
        --force-resume) FORCE_RESUME=1 && shift ;;
        --skip-invalid) SKIP_INVALID=1 && shift ;;
        --packing) PACKING=1 && shift ;;
        --dry-run) DRY_RUN=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        --) shift && EXTRA_ARGS=("$@") && break ;;
        *) die "unknown option '$1' (LLaMA-Factory arguments go after '--'; see --help)" ;;
    esac
done
[[ -n "$MODEL" ]] || die "--model is required: one of qwen3-8b, qwen3-14b, llama3.2-3b, demo, or a model folder"
if [[ -n "$GPUS" && ! "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    die "--gpus '$GPUS' is not a positive whole number"
fi
if [[ -n "$GLOBAL_BATCH" && ! "$GLOBAL_BATCH" =~ ^[1-9][0-9]*$ ]]; then
    die "--global-batch '$GLOBAL_BATCH' is not a positive whole number"
fi
if [[ -n "$VAL_SIZE" && ! "$VAL_SIZE" =~ ^([0-9]*[.][0-9]+|[1-9][0-9]*)$ ]]; then
    die "--val-size '$VAL_SIZE' is not a share (e.g. 0.05) or a number of rows"
fi
if [[ -n "$SAVE_EVERY" && ! "$SAVE_EVERY" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]]; then
    die "--save-every-minutes '$SAVE_EVERY' is not a number of minutes (0 turns it off)"
fi

PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH: activate the environment (see README, 'Install')"

# ---- Resolve and check the run (nothing is written on --dry-run) ------------------------------
PLAN_FILE="$(mktemp)"
RECORD_FILE="$(mktemp)"
trap 'rm -f "$PLAN_FILE" "$RECORD_FILE"' EXIT
PLAN_CMD=("$PYTHON" -m sftkit plan --model "$MODEL" --deepspeed "$DEEPSPEED_CONFIG" --args-out "$PLAN_FILE"
    --plan-out "$RECORD_FILE")
[[ -n "$MODEL_PATH" ]] && PLAN_CMD+=(--model-path "$MODEL_PATH")
[[ -n "$DATASET" ]] && PLAN_CMD+=(--dataset "$DATASET")
[[ -n "$OUTPUT_DIR" ]] && PLAN_CMD+=(--output-dir "$OUTPUT_DIR")
[[ -n "$GPUS" ]] && PLAN_CMD+=(--gpus "$GPUS")
[[ -n "$TEMPLATE" ]] && PLAN_CMD+=(--template "$TEMPLATE")
[[ -n "$GLOBAL_BATCH" ]] && PLAN_CMD+=(--global-batch "$GLOBAL_BATCH")
[[ -n "$VAL_SIZE" ]] && PLAN_CMD+=(--val-size "$VAL_SIZE")
[[ -n "$SAVE_EVERY" ]] && PLAN_CMD+=(--save-every-minutes "$SAVE_EVERY")
((OVERWRITE)) && PLAN_CMD+=(--overwrite)
((FORCE_RESUME)) && PLAN_CMD+=(--force-resume)
((SKIP_INVALID)) && PLAN_CMD+=(--skip-invalid)
((PACKING)) && PLAN_CMD+=(--packing)
[[ -n "$GPU_TYPE" ]] && PLAN_CMD+=(--gpu-type "$GPU_TYPE")
((DRY_RUN)) && PLAN_CMD+=(--dry-run)
PLAN_CMD+=(-- "${SEED_ARGS[@]}" "${KIT_ARGS[@]}" --sftkit-extra "${EXTRA_ARGS[@]}")

PYTHONPATH="$KIT_DIR${PYTHONPATH:+:$PYTHONPATH}" "${PLAN_CMD[@]}" || exit 1
mapfile -d '' -t PLAN <"$PLAN_FILE"
NPROC="${PLAN[0]}" NNODES="${PLAN[1]}" NODE_RANK="${PLAN[2]}" MASTER_ADDR="${PLAN[3]}" MASTER_PORT="${PLAN[4]}"
RDZV_CONF="${PLAN[5]}"
LF_ARGS=("${PLAN[@]:6}")

# torchrun handles SIGQUIT only: a stop signal reaches the workers through the supervisor, which lets
# them finish the step and save (torchrun itself would kill them 30 s later, mid-checkpoint).
CMD=(
    torchrun
    --nnodes "$NNODES"
    --node_rank "$NODE_RANK"
    --nproc_per_node "$NPROC"
    --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT"
    --rdzv_conf "$RDZV_CONF"
    --signals_to_handle SIGQUIT
    -m sftkit.worker
    "${LF_ARGS[@]}"
    "${EXTRA_ARGS[@]}"
)

export PYTHONPATH="$KIT_DIR${PYTHONPATH:+:$PYTHONPATH}"
echo "command:"
echo "  $("$PYTHON" -m sftkit.manifest "${CMD[@]}")"
if ((DRY_RUN)); then
    echo "dry run: checks passed; nothing was trained or written"
    exit 0
fi

rm -f "$PLAN_FILE"
trap - EXIT
exec "$PYTHON" -m sftkit supervise --plan "$RECORD_FILE" -- "${CMD[@]}"
