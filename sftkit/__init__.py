"""sftkit: the runtime behind sft_train.sh (models, plan and checks, data, the supervised run, merge)."""

__version__ = "0.1.0"
