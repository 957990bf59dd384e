"""The weights proof: a merged model is its base plus (alpha/r) B A, read tensor by tensor from the files.

PEFT, built on the meta device from the configs, says what the adapter means (targets, scaling, fan_in_fan_out,
modules_to_save, saved keys; tied embeddings as one parameter). Tensors are streamed in row chunks through
safetensors' `safe_open` (peak memory a few CHUNK_ELEMENTS, no GPU). Not covered (named, never passed): DoRA,
LoRA bias, trainable tokens, conv layers.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER = "default"  # the adapter name get_peft_model gives, and PEFT strips from saved keys
CHUNK_ELEMENTS = 2**23  # entries per chunk: each float32 working array is 32 MB, a few of them live
U32 = 2.0**-24  # float32 unit roundoff: the arithmetic here and in PEFT's merge
HEADROOM = 2.0  # over the first-order bound: second-order terms, another summation order (e.g. a GPU merge)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class Target:
    """One LoRA target: the base parameter's names (two when tied), its adapter keys, PEFT's scaling."""

    names: list[str]
    a_key: str
    b_key: str
    scaling: float
    rank: int
    transposed: bool  # delta = (B @ A).T: fan_in_fan_out layers and embeddings


@dataclass
class AdapterLayout:
    expected_shapes: dict[str, tuple[int, ...]]  # every key PEFT saves for this config on this base
    targets: list[Target] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # adapter key -> the base parameter it replaces
    tied: list[list[str]] = field(default_factory=list)  # parameter names sharing one tensor
    unsupported: list[str] = field(default_factory=list)


def adapter_layout(base: Path, adapter: Path) -> AdapterLayout:
    """What the adapter in `adapter` means on `base`, as PEFT builds it (on the meta device, no weights)."""
    import torch
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    peft_config = PeftConfig.from_pretrained(str(adapter))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "base_model_name_or_path was renamed": the base is --base here
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        peft_model = get_peft_model(model, peft_config)
        saved = get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict(keep_vars=True))
    key_of = {id(param): key for key, param in saved.items()}
    layout = AdapterLayout(expected_shapes={key: tuple(param.shape) for key, param in saved.items()},
                           tied=[group for group in names.values() if len(group) > 1])
    claimed: set[str] = set()

    for module_name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            base_layer = module.get_base_layer()
            if ADAPTER in module.lora_A and isinstance(base_layer, torch.nn.Linear | Conv1D):
                a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
                transposed = bool(module.fan_in_fan_out)
            elif ADAPTER in module.lora_embedding_A and isinstance(base_layer, torch.nn.Embedding):
                a, b, transposed = module.lora_embedding_A[ADAPTER], module.lora_embedding_B[ADAPTER], True
            else:
                layout.unsupported.append(f"{module_name}: LoRA on a {type(base_layer).__name__}")
                continue
            if module.use_dora.get(ADAPTER) or module.lora_bias.get(ADAPTER) or ADAPTER in module.lora_variant:
                layout.unsupported.append(f"{module_name}: DoRA, LoRA bias or another LoRA variant")
            layout.targets.append(Target(names[id(base_layer.weight)], key_of[id(a)], key_of[id(b)],
                                         float(module.scaling[ADAPTER]), int(module.r[ADAPTER]), transposed))
            claimed |= {key_of[id(a)], key_of[id(b)]}
        elif isinstance(module, ModulesToSaveWrapper) and ADAPTER in module.modules_to_save:
            for param_name, param in module.modules_to_save[ADAPTER].named_parameters():
                layout.replaced[key_of[id(param)]] = f"{module_name}.{param_name}"  # this name, not its tied twin
                claimed.add(key_of[id(param)])
        elif isinstance(module, AuxiliaryTrainingWrapper):
            layout.unsupported.append(f"{module_name}: {type(module).__name__}")
    for key, param in saved.items():  # a base parameter saved whole (e.g. a resized embedding): it replaces it
        if key not in claimed and id(param) in names:
            layout.replaced[key] = names[id(param)][0]
            claimed.add(key)
    layout.unsupported += [f"{key}: an adapter tensor the proof cannot place" for key in saved if key not in claimed]
    return layout


# ---------------------------------------------------------------- reading


@dataclass
class Stored:
    """One tensor in a safetensors file, known from the header: nothing is read until `rows`."""

    path: Path
    key: str
    dtype: str  # safetensors' name: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return SAFETENSORS_DTYPES.get(self.dtype, self.dtype)

    def rows(self, start: int | None = None, stop: int | None = None):
        """Rows [start, stop): the file is opened for this read only, so none of its pages stays mapped."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as handle:
            part = handle.get_slice(self.key)
            return part[start:stop] if self.shape else part[:]


def weight_files(folder: Path, stem: str) -> tuple[list[Path], list[str]]:
    """(safetensors files of `folder`, problems as strings). Follows a sharded index when present."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
            return [], [f"{index}: unreadable shard index ({err})"]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            return [], [f"{index} lists {', '.join(missing)}, missing from {folder}: copy the whole folder again"]
        return [folder / name for name in names], []
    single = folder / f"{stem}.safetensors"
    return ([single], []) if single.is_file() else ([], [])


def stored_dtype(index: dict[str, Stored]) -> str:
    """The floating dtype most of the stored tensors have: float32, bfloat16 or float16."""
    from collections import Counter

    counts = Counter(stored.dtype_name for stored in index.values() if stored.dtype in ("F32", "BF16", "F16"))
    return counts.most_common(1)[0][0] if counts else "float32"


def tensor_index(files: list[Path], bad: list[str] | None = None) -> dict[str, Stored]:
    """Every tensor of these safetensors files, from their headers, read once. With `bad`, a file safetensors
    cannot open (truncated, corrupt, not safetensors) adds a message there instead of raising."""
    from safetensors import SafetensorError, safe_open

    index: dict[str, Stored] = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    index.setdefault(key, Stored(path, key, part.get_dtype(), tuple(part.get_shape())))
        except (SafetensorError, OSError, ValueError) as err:
            if bad is None:
                raise
            bad.append(f"{path}: {err} (truncated or corrupt: copy or write it again)")
    return index


def row_chunks(shape: tuple[int, ...]):
    """(start, stop) row ranges of at most CHUNK_ELEMENTS entries (one whole range for a scalar)."""
    if not shape:
        yield None, None
        return
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


# ---------------------------------------------------------------- one tensor


def tolerance_factors(merged_dtype: str, rank: int) -> tuple[float, float]:
    """(c_entry, c_bound): a correct merge stored in `merged_dtype` is within c_entry |W + s B A| + c_bound s |B||A|.

    The entry, the delta and the LoRA weights may each be rounded to the dtype's unit roundoff u, and r products
    summed in float32; |B||A| is bounded per entry by |B_i| |A_j| (Cauchy-Schwarz on the rank dimension).
    """
    u = {"bfloat16": 2.0**-8, "float16": 2.0**-11}.get(merged_dtype, U32)
    return HEADROOM * u, HEADROOM * (3 * u + (rank + 2) * U32)


def not_nan(value: float) -> float:
    return float("inf") if value != value else value


@dataclass
class Finding:
    key: str
    entries: int = 0
    bad: int = 0  # entries over the tolerance (a LoRA target) or unlike the base (any other tensor)
    max_error: float = 0.0
    worst_ratio: float = 0.0  # the largest |error| / tolerance
    where: tuple[int, ...] = ()  # of that entry
    tolerance_there: float = 0.0
    changed: bool = False  # some entry differs from the base
    updated: bool = False  # the adapter's B A is not zero here
    source: str = "the base"  # what the tensor must equal, for the message


def check_target(reference: Stored, merged: Stored, a_stored: Stored, b_stored: Stored, target: Target) -> Finding:
    """A LoRA target, chunk by chunk: merged == reference + scaling * (B @ A) within `tolerance_factors`."""
    import torch

    a, b = a_stored.rows().float(), b_stored.rows().float()
    a_norms, b_norms = a.norm(dim=0), b.norm(dim=1)  # |A_j| per column, |B_i| per row
    a.mul_(target.scaling)
    c_entry, c_bound = tolerance_factors(merged.dtype_name, target.rank)
    finding = Finding(merged.key, updated=bool(a_norms.any() and b_norms.any()))
    for start, stop in row_chunks(merged.shape):
        w, m = reference.rows(start, stop), merged.rows(start, stop)
        finding.changed = finding.changed or not torch.equal(m, w.to(m.dtype))
        if target.transposed:  # rows of W are columns of B @ A
            expected, row_norms, column_norms = a[:, start:stop].T @ b.T, a_norms[start:stop], b_norms
        else:
            expected, row_norms, column_norms = b[start:stop] @ a, b_norms[start:stop], a_norms
        expected.add_(w)  # W + s B A, in float32
        error = expected.sub(m).abs_()
        tolerance = expected.abs_().addr_(row_norms, column_norms, beta=c_entry, alpha=c_bound * abs(target.scaling))
        tolerance.add_(torch.finfo(torch.float32).tiny)
        finding.entries += error.numel()
        finding.max_error = max(finding.max_error, not_nan(float(error.max())))
        ratio = error.div_(tolerance).view(-1)
        top, worst = ratio.max(0)
        top = not_nan(float(top))
        if top > 1:  # NaN counts as over
            finding.bad += ratio.numel() - int(torch.count_nonzero(ratio <= 1))
        if top > finding.worst_ratio:
            finding.worst_ratio, finding.tolerance_there = top, float(tolerance.view(-1)[worst])
            row, column = divmod(int(worst), ratio.numel() // max(1, stop - start))
            finding.where = (start + row, column)
    return finding


def check_identical(reference: Stored, merged: Stored) -> Finding:
    """Any other tensor: the same values as the base (or as the adapter's saved copy), chunk by chunk."""
    import torch

    finding = Finding(merged.key)
    for start, stop in row_chunks(merged.shape):
        m = merged.rows(start, stop)
        w = reference.rows(start, stop).to(m.dtype)
        finding.entries += m.numel()
        if not torch.equal(w, m):
            finding.bad += int((w != m).sum())
            if w.is_floating_point():
                finding.max_error = max(finding.max_error, float((w.float() - m.float()).abs().max()))
    return finding


# ---------------------------------------------------------------- the whole model


@dataclass
class Proof:
    summary: dict = field(default_factory=dict)
    defects: list[tuple[str, str]] = field(default_factory=list)  # (name, message): the merge is wrong
    unproven: list[tuple[str, str]] = field(default_factory=list)  # (name, message): could not tell
    notes: list[str] = field(default_factory=list)


def listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def first_present(names: list[str], index: dict) -> str | None:
    return next((name for name in names if name in index), None)


def prove(base: dict[str, Stored], adapter: dict[str, Stored], merged: dict[str, Stored], layout: AdapterLayout,
          merged_dir: Path) -> Proof:
    """Check every tensor of the merged index against the base and adapter indexes (`tensor_index`); see the
    module docstring."""
    started = time.monotonic()
    proof = Proof()
    if layout.unsupported:
        proof.unproven.append(("weights-unproven", f"the weights proof does not cover {listed(layout.unsupported)}"))
        return proof
    twins = {name: group for group in layout.tied for name in group}
    files = {stored.path for index in (base, adapter, merged) for stored in index.values()}

    replacement = {name: adapter[key] for key, name in layout.replaced.items() if key in adapter}
    targets: dict[str, Target] = {}
    for target in layout.targets:
        key = first_present(target.names, base)
        if key is None:
            where = listed(sorted({str(stored.path) for stored in base.values()}))
            proof.unproven.append(("weights-unproven", f"LoRA target {target.names[0]} is under no key of {where}: "
                                   "the checkpoint names its tensors otherwise than transformers"))
            return proof
        targets[key] = target

    pairs, extra = [], []  # (merged key, base key): a tied tensor may be stored under its twin's name
    for key in merged:
        twin = key if key in base else first_present([n for n in twins.get(key, []) if n != key], base)
        if twin is None:
            extra.append(key)
            continue
        pairs.append((key, twin))
        if twin != key:
            proof.notes.append(f"{merged_dir} stores {key} apart from its tied twin {twin} (the base ties them)")
    covered = {base_key for _, base_key in pairs}
    lost = [name for name in replacement if name not in merged]
    if lost:
        proof.defects.append(("weights-missing", f"{merged_dir} does not store {listed(lost)}, which the adapter "
                              "replaces (modules_to_save): the trained copy is not in the merged model"))
    missing = [k for k in base if k not in covered and not any(n in merged for n in twins.get(k, []))]
    if missing:
        proof.defects.append(("weights-missing", f"{merged_dir}: {len(missing)} of the base's tensors missing "
                              f"({listed(missing)}): the export was cut short; merge again"))
    if extra:
        proof.defects.append(("weights-extra", f"{merged_dir}: {len(extra)} tensor(s) the base does not have "
                              f"({listed(extra)}): it is not a merge of this base"))

    shapes, dtypes, changed, lora, identical = [], [], [], [], 0
    for merged_key, base_key in sorted(pairs, key=lambda pair: (str(merged[pair[0]].path), pair[0])):
        stored = merged[merged_key]
        ref = replacement.get(merged_key) or replacement.get(base_key) or base[base_key]  # before its LoRA update
        if stored.shape != ref.shape:
            shapes.append(f"{merged_key} is {list(stored.shape)}, the base's {list(ref.shape)}")
            continue
        if stored.dtype != base[base_key].dtype:
            dtypes.append(f"{merged_key} is {stored.dtype_name}, the base's {base[base_key].dtype_name}")
        target = targets.get(base_key)
        if target is not None:
            lora.append(check_target(ref, stored, adapter[target.a_key], adapter[target.b_key], target))
            continue
        finding = check_identical(ref, stored)
        finding.source = "the base" if ref is base[base_key] else f"the adapter's saved {ref.key}"
        if finding.bad:
            changed.append(finding)
        else:
            identical += 1
    if shapes:
        proof.defects.append(("weights-shape", f"{merged_dir}: {len(shapes)} tensor(s) of another shape "
                              f"({listed(shapes)}): it is not a merge of this base"))
    if dtypes:
        proof.defects.append(("weights-dtype", f"{merged_dir}: {len(dtypes)} tensor(s) stored in another dtype than "
                              f"the base ({listed(dtypes)}): merge again in the base's dtype (--set infer_dtype=...)"))
    if changed:
        described = [f"{f.key} ({f.bad:,} of {f.entries:,} entries differ from {f.source}, largest |difference| "
                     f"{f.max_error:.3g})" for f in changed]
        proof.defects.append(("weights-changed", f"{merged_dir}: {len(changed)} tensor(s) that no LoRA target covers "
                              f"are not what the merge must leave there: {listed(described)}"))
    mismatched = sorted((f for f in lora if f.bad), key=lambda f: -f.worst_ratio)
    if mismatched:
        described = [
            f"{f.key} ({f.bad:,} of {f.entries:,} entries over the tolerance; largest |error| {f.max_error:.3g}; at "
            f"{list(f.where)} the error is {f.worst_ratio:.3g}x the tolerance {f.tolerance_there:.3g})"
            + ("" if f.changed else ": it holds the base's values")
            for f in mismatched
        ]
        count = "1 LoRA target differs" if len(mismatched) == 1 else f"{len(mismatched)} LoRA targets differ"
        proof.defects.append(("weights-mismatch", f"{merged_dir}: {count} from base + (alpha/r) B A beyond the "
                              f"rounding of its dtype: {listed(described)}"))
    if lora and not any(f.changed for f in lora) and any(f.updated for f in lora):
        proof.defects.append(("weights-same-as-base", f"{merged_dir}: every LoRA target holds exactly the base's "
                              "values: the adapter was not merged (the export wrote the base weights)"))

    worst = max(lora, key=lambda f: f.worst_ratio, default=None)
    proof.summary = {
        "ok": not proof.defects,
        "tensors": len(merged),
        "lora_targets": len(lora),
        "identical": identical,
        "replaced": len(layout.replaced),
        "max_abs_error": max((f.max_error for f in lora), default=0.0),
        "max_error_over_tolerance": worst.worst_ratio if worst else 0.0,
        "worst_tensor": worst.key if worst else None,
        "gigabytes": sum(path.stat().st_size for path in files) / 1e9,
        "seconds": time.monotonic() - started,
    }
    return proof
