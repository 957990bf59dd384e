#!/usr/bin/env bash
# LoRA SFT with LLaMA-Factory under DeepSpeed ZeRO-3, one torchrun per node.
#
#   bash sft_train.sh --model qwen3-8b --model-path /models/Qwen3-8B --dataset my.jsonl
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash sft_train.sh ...   (on each node)
#
# One Python process (python -m sftkit plan) checks the options, the model folder, the data and the
# GPUs, resolves every LLaMA-Factory argument into <output_dir>/sftkit/train.yaml (plain LLaMA-Factory
# YAML: `llamafactory-cli train` replays it), prints the plan and the exact command, then supervises
# the run: it holds the output dir, records the run in run_manifest.json, runs
# `torchrun ... -m sftkit.launch.worker <output_dir>/sftkit/train.yaml`, and on SIGTERM/SIGINT/SIGHUP lets
# every worker finish its step and save a checkpoint before the run stops (no process is left behind).
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
KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "sft_train.sh: error: no '$PYTHON' on PATH: activate the environment (see README, 'Install')" >&2
    exit 2
fi
# options (see --help) are checked in Python, in one place
export PYTHONPATH="$KIT_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m sftkit plan --sftkit-seed "${SEED_ARGS[@]}" "${KIT_ARGS[@]}" --sftkit-options "$@"
