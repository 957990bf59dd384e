"""The one GPU probe: what `nvidia-smi` reports, narrowed to the GPUs this job was given.

Every GPU fact the kit uses (count, names, free memory, compute capability, driver) comes from
`nvidia-smi`, never from initialising CUDA, so a login node, a test with a stand-in `nvidia-smi`
on PATH and the GPU node agree. `CUDA_VISIBLE_DEVICES` is applied as CUDA applies it: a list of
indices or (prefixes of) UUIDs, read up to the first entry that names no GPU; empty or `-1`
hides every GPU. MIG instances (`MIG-...` UUIDs) are found in `nvidia-smi -L`, each one device on
its parent GPU: name, compute capability and driver are the parent's; `-L` gives no memory, so a
slice's memory is the nominal size in its profile name (`1g.10gb`: 10 GB), taken as free.

Only where there is no `nvidia-smi` at all is the count asked of torch, in a subprocess
(`TORCH_COUNT`; CUDA applies CUDA_VISIBLE_DEVICES itself; skipped without /dev/nvidia* device
files): such a node trains, but its GPUs' memory and driver are not checked. SFTKIT_VISIBLE_GPUS=N
overrides the count. The CUDA version the installed torch was built for is read from torch's own
`version.py`, without importing torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

QUERY = "index,uuid,name,memory.total,memory.free,compute_cap,driver_version"
# The oldest driver each CUDA major version runs on (NVIDIA's CUDA compatibility table): 13.x needs
# branch 580; 12.x runs on 525.60.13 and newer through minor-version compatibility.
MIN_DRIVER = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
CU128_INDEX = "https://download.pytorch.org/whl/cu128"
# the count where there is no nvidia-smi: CUDA's own, in a process of its own (it initialises CUDA)
TORCH_COUNT = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
DEVICE_FILES = "/dev/nvidia[0-9]*"  # none: no NVIDIA GPU, and torch need not be asked
GPU_LINE = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[^)\s]+)\)")
MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)\s]+)\)")


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: float
    driver: str

    @property
    def label(self) -> str:
        """How the kit names a GPU in its messages: index and UUID, as CUDA_VISIBLE_DEVICES takes them."""
        return f"GPU {self.index} ({self.uuid})"


def _number(text: str, kind: type, default):
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        return default


def _output(command: list[str], timeout: float) -> str:
    """The command's stdout; '' when it cannot start, fails or times out."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def all_gpus() -> list[Gpu]:
    """Every GPU nvidia-smi lists ([] without nvidia-smi, or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = _output(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"], 30)
    rows = [[part.strip() for part in line.split(",")] for line in out.splitlines()]
    return [Gpu(int(p[0]), p[1], p[2], _number(p[3], int, 0), _number(p[4], int, 0), _number(p[5], float, 0.0), p[6])
            for p in rows if len(p) >= 7 and p[0].isdigit()]


def visible(gpus: list[Gpu], mask: str | None) -> list[Gpu]:
    """The GPUs a process with CUDA_VISIBLE_DEVICES=`mask` sees (None: all), in the order the mask gives."""
    if mask is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for entry in (part.strip() for part in mask.split(",")):
        if re.fullmatch(r"\d+", entry):  # the first with that index (a MIG instance shares its GPU's)
            found = [gpu for gpu in gpus if gpu.index == int(entry)][:1]
        else:  # a UUID prefix names a device only when it matches exactly one
            found = [gpu for gpu in gpus if entry.startswith(("GPU-", "MIG-")) and gpu.uuid.startswith(entry)]
        if len(found) != 1 or found[0] in chosen:
            break  # CUDA stops at the first entry that names no (new) device
        chosen.append(found[0])
    return chosen


def mig_instances(gpus: list[Gpu]) -> list[Gpu]:
    """Each MIG instance `nvidia-smi -L` lists under one of `gpus`, as a device of that GPU (see above)."""
    by_uuid, parent, found = {gpu.uuid: gpu for gpu in gpus}, None, []
    for line in _output(["nvidia-smi", "-L"], 30).splitlines():
        if match := GPU_LINE.match(line):
            parent = by_uuid.get(match.group(2))
        elif (match := MIG_LINE.match(line)) and parent is not None:
            size = re.search(r"\.(\d+)gb", match.group(1))
            mib = int(size.group(1)) * 1000 if size else parent.memory_total_mib
            found.append(Gpu(parent.index, match.group(2), f"{parent.name} MIG {match.group(1)}", mib, mib,
                             parent.compute_capability, parent.driver))
    return found


def visible_gpus() -> list[Gpu]:
    """The GPUs this job was given: nvidia-smi's list narrowed by CUDA_VISIBLE_DEVICES (MIG instances too)."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = all_gpus()
    if mask and "MIG-" in mask and gpus:
        gpus += mig_instances(gpus)
    return visible(gpus, mask)


def torch_gpu_count() -> int:
    """How many GPUs CUDA shows torch, asked in a subprocess (0 when it fails or takes over 120 s)."""
    last = _output(TORCH_COUNT, 120).strip().splitlines()[-1:]
    return int(last[0]) if last and last[0].isdigit() else 0


def visible_gpu_count() -> int:
    """The GPUs this job was given: SFTKIT_VISIBLE_GPUS, else nvidia-smi's, else (no nvidia-smi) torch's count."""
    forced = os.environ.get("SFTKIT_VISIBLE_GPUS")  # tests, and drivers nvidia-smi cannot read
    if forced is not None and forced.isdigit():
        return int(forced)
    if shutil.which("nvidia-smi") is None:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = mask is not None and mask.strip() in ("", "-1")
        return 0 if hidden or not glob.glob(DEVICE_FILES) else torch_gpu_count()
    return len(visible_gpus())


def describe(gpus: list[Gpu]) -> str:
    """'GPU 0 (GPU-...), GPU 1 (GPU-...)' for messages."""
    return ", ".join(gpu.label for gpu in gpus)


# ---------------------------------------------------------------- driver and torch's CUDA build


def torch_cuda_build() -> str | None:
    """The CUDA version the installed torch was built for ('13.0'), read from torch/version.py; None for CPU."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "version.py"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([\d.]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def package_version(name: str) -> str | None:
    """The installed version of the distribution `name`, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_version() -> str | None:
    return package_version("torch")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def driver_problem(driver: str, cuda: str | None) -> str | None:
    """Why `driver` cannot run torch built for `cuda`, in one line with both ways out; None when it can."""
    if not cuda or not driver:
        return None
    major = _version_tuple(cuda)[0]
    minimum = MIN_DRIVER.get(major)
    if minimum is None or _version_tuple(driver) >= _version_tuple(minimum):
        return None
    version = (torch_version() or "?").split("+")[0]
    return (f"NVIDIA driver {driver} is too old for torch {version} built for CUDA {cuda}, which needs driver "
            f"{minimum} or newer (branch {minimum.split('.')[0]}): update the node's driver, or install the same "
            f"versions built for CUDA 12.8: pip install {cu128_pins()} --index-url {CU128_INDEX} (README, 'Install')")


def cu128_pins() -> str:
    """'torch==2.11.0+cu128 torchaudio==... torchvision==...': the pinned trio, built for CUDA 12.8."""
    found = {name: package_version(name) for name in ("torch", "torchaudio", "torchvision")}
    return " ".join(f"{name}=={version.split('+')[0]}+cu128" for name, version in found.items() if version)
