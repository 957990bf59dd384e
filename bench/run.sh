#!/usr/bin/env bash
# The benchmark of the kit's own training path (not part of `make test`): see bench/README.md.
#
#   bash bench/run.sh --preset qwen3-8b --seq-len 16384 --gpus 1 [--steps 4] [--variants seed,kit,liger]
#   bash bench/run.sh --preset demo          # CPU, tiny model: proves the harness in under 2 minutes
#
# For each variant it runs `bash sft_train.sh` (torchrun -> LLaMA-Factory -> DeepSpeed ZeRO-3, LoRA r64)
# on a random-weight model of the preset's architecture and synthetic data at --seq-len, then prints
# one JSON list (stdout) and a one-line summary per variant. All options: bash bench/run.sh --help
set -euo pipefail

KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null; then
    if [[ -x "$KIT_DIR/.venv/bin/python" ]]; then
        PYTHON="$KIT_DIR/.venv/bin/python"
    else
        echo "bench/run.sh: error: no '$PYTHON' on PATH: activate the kit's environment (see README, 'Install')" >&2
        exit 2
    fi
fi
# torchrun and the launcher's own python must be this interpreter's
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH PYTHON
export PYTHONPATH="$KIT_DIR${PYTHONPATH:+:$PYTHONPATH}"
cd "$KIT_DIR"
exec "$PYTHON" -m bench.benchmark "$@"
