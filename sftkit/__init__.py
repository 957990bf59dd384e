"""sftkit: the helpers behind sft_train.sh (presets, checks, demo models, merge)."""

__version__ = "0.1.0"
