"""A stand-in `nvidia-smi` on PATH: how GPU-facing logic is tested on a machine without GPUs.

`install(bin_dir, gpus)` writes an executable `nvidia-smi` that answers `-L` (with the MIG instances
of a GPU made with `mig=[(profile, uuid), ...]`, as the real one lists them under it) and
`--query-gpu=FIELDS --format=csv,noheader[,nounits]` for the GPUs given, as the real one does
(fields in the order asked, memory in MiB). The kit reads every GPU fact from nvidia-smi, so the
launcher, preflight and the manifest see these GPUs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

H100 = {"name": "NVIDIA H100 80GB HBM3", "memory.total": 81559, "compute_cap": "9.0"}

SCRIPT = r'''#!{python}
import json, sys
gpus = json.load(open({data!r}))
args = sys.argv[1:]
if args[:1] == ["-L"]:
    for gpu in gpus:
        print(f"GPU {{gpu['index']}}: {{gpu['name']}} (UUID: {{gpu['uuid']}})")
        for number, (profile, uuid) in enumerate(gpu.get("mig", [])):
            print(f"  MIG {{profile:<13}} Device {{number:>2}}: (UUID: {{uuid}})")
    sys.exit(0)
query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
if query is None:
    print("stand-in nvidia-smi: only -L and --query-gpu are answered", file=sys.stderr)
    sys.exit(2)
units = "nounits" not in " ".join(args)
for gpu in gpus:
    values = []
    for field in query.split(","):
        value = gpu[field.strip()]
        if units and field.strip().startswith("memory."):
            value = f"{{value}} MiB"
        values.append(str(value))
    print(", ".join(values))
'''


def gpu(index: int, free_mib: int | None = None, driver: str = "580.65.06", mig: tuple[str, ...] = (),
        **fields) -> dict:
    """One H100 (or other `fields`), `free_mib` free (default: all), GPU-<index>... as its UUID; `mig`: the
    profiles of its MIG instances ("3g.40gb"), each with a UUID MIG-<index><instance>..."""
    spec = dict(H100, **fields)
    return {"index": index, "uuid": f"GPU-{index:08x}-1111-2222-3333-44445555{index:04x}",
            "memory.free": spec["memory.total"] if free_mib is None else free_mib,
            "memory.used": 0, "driver_version": driver, **spec,
            "mig": [(profile, f"MIG-{index:04x}{number:04x}-aaaa-bbbb-cccc-dddddddddddd")
                    for number, profile in enumerate(mig)]}


def install(bin_dir: Path, gpus: list[dict]) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    data = bin_dir / "gpus.json"
    data.write_text(json.dumps(gpus), encoding="utf-8")
    script = bin_dir / "nvidia-smi"
    script.write_text(SCRIPT.format(python=sys.executable, data=str(data)), encoding="utf-8")
    script.chmod(0o755)
    return bin_dir


def path_with(bin_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` with bin_dir first on PATH (and no leftover CUDA_VISIBLE_DEVICES from the caller)."""
    out = dict(env)
    out["PATH"] = f"{bin_dir}{os.pathsep}{out.get('PATH', '')}"
    out.pop("CUDA_VISIBLE_DEVICES", None)
    out.pop("SFTKIT_VISIBLE_GPUS", None)
    return out
