"""run_manifest.json: what a run was, written at launch and completed at the end.

It never holds a secret: any environment variable whose name contains TOKEN, KEY, SECRET or
PASSWORD has its value replaced wherever it appears, and so does the value of any argument
whose name does (`--hf_hub_token ...`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sftkit import hardware
from sftkit.files import KIT_DIR, atomic_write

# Environment variables named *TOKEN*, *KEY*, *SECRET*, *PASSWORD* hold secrets (HF_TOKEN, WANDB_API_KEY...);
# their values are hidden wherever they appear. Values under 8 characters ("true", "1") are not
# secrets and hiding them would garble the record; TOKENIZERS_PARALLELISM is the tokenizers' switch.
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
NOT_SECRET = {"TOKENIZERS_PARALLELISM"}
# Argument names: a whole word of the name (--hf_hub_token, --api-key), not --tokenized_path.
SECRET_ARG = re.compile(r"(^|[_-])(token|key|secret|password)s?($|[_-])", re.IGNORECASE)
REDACTED = "<redacted>"
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "llamafactory", "accelerate", "datasets", "liger-kernel")


def secret_values() -> list[str]:
    """Values of environment variables that look like secrets (long enough to be worth hiding)."""
    return [value for name, value in os.environ.items()
            if SECRET_NAME.search(name) and name.upper() not in NOT_SECRET and len(value) >= 8]


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in sorted(secrets if secrets is not None else secret_values(), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def redact_args(args: list[str]) -> list[str]:
    """Arguments with secret-looking values replaced: `--hf_hub_token x`, `hf_hub_token=x` (an override after
    a YAML path) and any planted env value."""
    secrets = secret_values()
    out: list[str] = []
    hide_next = False
    for arg in args:
        key, sep, _ = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif (arg.startswith("--") or sep) and SECRET_ARG.search(key.lstrip("-")):
            out.append(f"{key}={REDACTED}" if sep else arg)
            hide_next = not sep  # `--hf_hub_token x`: the value is the next argument
        else:
            out.append(redact_text(arg, secrets))
    return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Python and the stack's package versions, and the CUDA version torch was built for (`cuda`)."""
    return {"python": platform.python_version(), **{name: hardware.package_version(name) for name in PACKAGES},
            "cuda": hardware.torch_cuda_build()}


def gpus() -> dict:
    """The GPUs this job was given (nvidia-smi, CUDA_VISIBLE_DEVICES applied) and the NVIDIA driver."""
    found = hardware.visible_gpus()
    return {"count": len(found), "models": sorted({gpu.name for gpu in found}),
            "memory_mib": sorted({gpu.memory_total_mib for gpu in found}),
            "compute_capability": sorted({gpu.compute_capability for gpu in found}),
            "uuids": [gpu.uuid for gpu in found],
            "driver": found[0].driver if found else None}


def kit_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(KIT_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(KIT_DIR), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def write(path: Path, manifest: dict) -> None:
    """Atomically write the manifest (a reader never sees half a file), secrets redacted."""
    atomic_write(path, redact_text(json.dumps(manifest, indent=2, sort_keys=False, default=str)) + "\n")
