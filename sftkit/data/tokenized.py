"""The tokenized dataset a run trains on: LLaMA-Factory's own `get_dataset`, run once, saved whole or not at all.

Only LLaMA-Factory's public API: the run's arguments are parsed by its dataclasses (`parse_arguments`);
`llamafactory.model.load_tokenizer` and `get_template_and_fix_tokenizer` build the tokenizer and
template; `llamafactory.data.get_dataset` loads, aligns, mixes, splits and tokenizes the registered
datasets (`preprocessing_num_workers` = the check's workers) and saves the DatasetDict at its
`tokenized_path`, the folder the training run loads: the data that trains is the data LLaMA-Factory
produces, packed rows included (it packs each worker's contiguous shard on its own).

`get_dataset` writes `tokenized-<key>.partial-<host>.<pid>-<random>`; `save` adds `sftkit_check.json`
(the report, each file's size) and renames it into place when whole (LLaMA-Factory loads any non-empty
`tokenized_path`); `sftkit.data.build_lock` has one node build at a time. `load_cached` sets aside a folder
whose files are missing, cut short or unreadable (rebuilt, never loaded); `prune` removes the run
folder's older keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sftkit.files import UsageError

REPORT_NAME = "sftkit_check.json"
PREFIX = "tokenized-"  # a saved dataset is PREFIX + its cache key
# DataArguments fields that do not change the tokenized dataset (all others are in the cache key)
NOT_IN_KEY = {"tokenized_path", "overwrite_cache", "preprocessing_num_workers", "dataset_dir", "media_dir",
              "data_shared_file_system", "buffer_size", "eval_num_beams", "streaming", "dataset"}
# ModelArguments fields that change the tokenizer (`load_tokenizer`, `patch_tokenizer`)
TOKENIZER_FIELDS = ("use_fast_tokenizer", "split_special_tokens", "add_tokens", "add_special_tokens",
                    "model_revision", "trust_remote_code")


class PreprocessError(UsageError):
    """LLaMA-Factory refused the arguments or the data: one line that names the fix."""


def parse_arguments(model_dir: str, options: Mapping[str, Any]) -> tuple[Any, Any, int]:
    """(ModelArguments, DataArguments, seed) from the run's `--key value` LLaMA-Factory arguments."""
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import HfArgumentParser

    argv = ["--model_name_or_path", str(model_dir)]
    for key, value in options.items():
        if value is not None and key != "model_name_or_path":
            argv += [f"--{key}", str(value)]
    parser = HfArgumentParser((ModelArguments, DataArguments), exit_on_error=False)
    try:
        model_args, data_args, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except Exception as err:  # noqa: BLE001 - argparse.ArgumentError (a bad value), LLaMA-Factory's ValueErrors
        raise PreprocessError(f"LLaMA-Factory refuses these data arguments: {err}") from None
    if data_args.eval_dataset:
        raise PreprocessError("--eval_dataset is not read into the kit's tokenized dataset: hold out rows with "
                              "--val-size F instead")
    if data_args.streaming:
        raise PreprocessError("--streaming cannot save a tokenized dataset (LLaMA-Factory refuses it with "
                              "tokenized_path): drop --streaming")
    data_args.overwrite_cache = False  # a fresh datasets cache every time (see tokenize)
    return model_args, data_args, int(options.get("seed") or 42)  # 42: the HF Trainer's default seed


def key_fields(model_args: Any, data_args: Any, workers: int) -> dict[str, Any]:
    """Everything among the parsed arguments that LLaMA-Factory's preprocessing reads."""
    from dataclasses import asdict

    fields = {key: value for key, value in asdict(data_args).items() if key not in NOT_IN_KEY}
    if data_args.packing:  # each preprocessing worker's shard (and batch) is packed on its own
        fields["workers"] = workers
    fields.update({key: getattr(model_args, key, None) for key in TOKENIZER_FIELDS})
    return fields


def load_tokenizer(model_args: Any) -> dict[str, Any]:
    """LLaMA-Factory's tokenizer module (tokenizer and processor), as training loads it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the preprocessing workers are forked after it
    from llamafactory.model import load_tokenizer as lf_load_tokenizer

    try:
        module = lf_load_tokenizer(model_args)
    except (OSError, ValueError) as err:
        raise PreprocessError(f"cannot load the tokenizer of {model_args.model_name_or_path}: "
                              f"{err.__cause__ or err}") from None
    # A BPE tokenizer of transformers 5 (Qwen3's Qwen2Tokenizer) keeps the vocabulary and merges it was built
    # from, 151k entries each, beside the Rust tokenizer that holds them. `datasets` hashes the tokenizer for
    # every map's fingerprint and pickles it to every preprocessing worker: 1.1 s a hash for Qwen3. This
    # tokenizer only tokenizes, so the two copies go (the same tokens: tests/test_check_data.py).
    tokenizer = module["tokenizer"]
    if all(name in vars(tokenizer) for name in ("_tokenizer", "_vocab", "_merges")):
        del tokenizer._vocab, tokenizer._merges
    return module


def tokenize(entries: Mapping[str, dict], model_args: Any, data_args: Any, seed: int, tokenizer_module: dict,
             template: Any, workers: int, work: Path, out: Path) -> Any:
    """LLaMA-Factory's `get_dataset` on the registered datasets, saved at `out` (its tokenized_path).

    Returns the DatasetDict as saved ("train", and "validation" with a val_size): what training loads.
    """
    from datasets import load_from_disk
    from llamafactory.data import get_dataset
    from llamafactory.data.parser import get_dataset_list

    (work / "dataset_info.json").write_text(json.dumps(dict(entries)), encoding="utf-8")
    for name, attr in zip(entries, get_dataset_list(list(entries), str(work)), strict=True):
        if attr.ranking:
            raise PreprocessError(f"dataset {name!r} is registered as a ranking (preference) dataset: SFT reads "
                                  "conversations; drop \"ranking\" from its dataset_info.json entry")
    data_args.dataset_dir, data_args.tokenized_path = str(work), str(out)
    data_args.preprocessing_num_workers = workers if workers > 1 else None
    model_args.cache_dir = str(work / "datasets-cache")  # fresh: nothing read from an older run's cache
    try:
        get_dataset(template, model_args, data_args, _training_args(seed), stage="sft", **tokenizer_module)
    except StopIteration:  # get_dataset reads the first row of each split
        raise PreprocessError("no example left to tokenize: check the data") from None
    except ValueError as err:  # e.g. interleave_probs that do not match the datasets, val_size too large
        raise PreprocessError(f"LLaMA-Factory cannot load, mix or split these datasets: {err}") from None
    dataset = load_from_disk(str(out))
    for name, split in dataset.items():
        if len(split) == 0:
            raise PreprocessError(f"LLaMA-Factory's preprocessing left no {name} example: check the data format")
    return dataset


def _training_args(seed: int) -> Any:
    """What `get_dataset` reads of the training arguments, for the one process that builds and saves
    (Seq2SeqTrainingArguments would set up torch's devices in this process)."""
    return SimpleNamespace(seed=seed, main_process_first=lambda **_: contextlib.nullcontext(), should_save=True,
                           should_log=False, local_process_index=0, predict_with_generate=False,
                           dataloader_num_workers=0)


def row_figures(dataset: Any, packing: bool) -> tuple[Any, Any]:
    """Per trained row of every split of a DatasetDict: (tokens, trainable tokens) as numpy int64 arrays, from the
    saved columns.

    Packed rows are split back into their examples at each position_ids 0 (padding positions are
    0 one by one, so runs of length 1 are padding).
    """
    import numpy as np
    import pyarrow.compute as pc
    from llamafactory.extras.constants import IGNORE_INDEX

    tokens, trained = [], []
    tables = (table for split in dataset.values() for table in split.with_format("arrow").iter(batch_size=4096))
    for table in tables:
        labels = table.column("labels").combine_chunks()
        if not packing:
            flat, parents = pc.list_flatten(labels).to_numpy(), pc.list_parent_indices(labels).to_numpy()
            tokens.append(pc.list_value_length(table.column("input_ids").combine_chunks()).to_numpy())
            trained.append(np.bincount(parents[flat != IGNORE_INDEX], minlength=len(table)))
            continue
        positions = pc.list_flatten(table.column("position_ids").combine_chunks()).to_numpy()
        starts = np.flatnonzero(positions == 0)
        lengths = np.diff(np.append(starts, len(positions)))
        per_example = np.add.reduceat((pc.list_flatten(labels).to_numpy() != IGNORE_INDEX).astype(np.int64), starts)
        tokens.append(lengths[lengths > 1])
        trained.append(per_example[lengths > 1])
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(tokens).astype(np.int64), np.concatenate(trained).astype(np.int64)


def check_template(name: str, enable_thinking: bool | None = None) -> None:
    """A LLaMA-Factory template; with `enable_thinking` set by the user, one that has the switch."""
    from llamafactory.data.template import TEMPLATES, ReasoningTemplate

    if name not in TEMPLATES:
        raise PreprocessError(f"template {name!r} is not a LLaMA-Factory template: pass --template with one of "
                              "its names (e.g. qwen3, llama3)")
    if enable_thinking is not None and not isinstance(TEMPLATES[name], ReasoningTemplate):
        raise PreprocessError(f"enable_thinking {enable_thinking} is set, but template {name!r} has no thinking "
                              "switch: LLaMA-Factory would ignore it and the merge would refuse the run's template; "
                              "drop enable_thinking")


def template(module: dict, data_args: Any) -> Any:
    from llamafactory.data.template import get_template_and_fix_tokenizer

    try:
        return get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    except ValueError as err:
        raise PreprocessError(f"template {data_args.template!r} does not fit this tokenizer: {err}") from None


class QuietLibraries:
    """LLaMA-Factory's and datasets' loggers at ERROR, datasets' progress bars off (unless asked) while the kit
    reports."""

    def __init__(self, progress: bool) -> None:
        import logging

        import datasets
        from llamafactory.extras.logging import get_logger

        get_logger()  # configures LLaMA-Factory's root logger, which would reset a level set before
        self.logger = logging.getLogger("llamafactory")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        self.verbosity = datasets.logging.get_verbosity()  # e.g. "Setting num_proc from 2 back to 1"
        datasets.logging.set_verbosity_error()
        self.bars = datasets.is_progress_bar_enabled()
        if not (progress and sys.stderr.isatty()):
            datasets.disable_progress_bars()

    def restore(self) -> None:
        import datasets

        self.logger.setLevel(self.level)
        datasets.logging.set_verbosity(self.verbosity)
        if self.bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- the cache in the run folder


def folder(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{PREFIX}{key}"


def _owner_tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def work_dir(cache_dir: Path | None) -> Path:
    """A fresh folder for the datasets cache: in the run folder (same filesystem), else in /tmp."""
    import tempfile

    parent = Path(cache_dir) if cache_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tokenize-{_owner_tag()}-", dir=parent))


def partial(cache_dir: Path, key: str) -> Path:
    """Where this writer builds tokenized-<key>: unique even where two nodes' containers share a hostname and pid."""
    dest = folder(cache_dir, key)
    return dest.with_name(f"{dest.name}.partial-{_owner_tag()}-{os.urandom(4).hex()}")


def save(built: Path, cache_dir: Path, key: str, report: dict[str, Any]) -> Path:
    """The report beside the saved DatasetDict in `built` (a `partial`), renamed to tokenized-<key> when whole."""
    dest = folder(cache_dir, key)
    sizes = {str(path.relative_to(built)): path.stat().st_size for path in sorted(built.rglob("*")) if path.is_file()}
    (built / REPORT_NAME).write_text(json.dumps({"report": report, "files": sizes}), encoding="utf-8")
    try:
        os.replace(built, dest)
    except OSError:  # another node of this run saved it first: keep theirs if it is whole
        shutil.rmtree(built, ignore_errors=True)
        if not dest.is_dir() or _why_not_whole(dest) is not None:
            raise
    return dest


def load_cached(cache_dir: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the stored report, None) for a whole tokenized-<key>; (None, a note) when one was set aside."""
    path = folder(cache_dir, key)
    if not path.exists():
        return None, None
    why = _why_not_whole(path)
    if why is None:
        return json.loads((path / REPORT_NAME).read_text(encoding="utf-8"))["report"], None
    aside, number = path.with_name(f"{path.name}.broken"), 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.broken-{number}")
    path.rename(aside)
    return None, f"the tokenized dataset {path} was not whole ({why}): set aside as {aside.name}, rebuilt"


def _why_not_whole(path: Path) -> str | None:
    try:
        record = json.loads((path / REPORT_NAME).read_text(encoding="utf-8"))
        for name, size in record["files"].items():
            actual = (path / name).stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, {size} were written"
        from datasets import load_from_disk

        loaded = load_from_disk(str(path))
        rows = {name: len(split) for name, split in loaded.items()}
        if rows != record["report"]["split_rows"]:
            return f"it holds {rows} rows, {record['report']['split_rows']} were written"
    except FileNotFoundError as err:
        return f"{Path(err.filename or '?').name} is missing"
    except Exception as err:  # noqa: BLE001 - any unreadable file: the folder is not used
        return f"unreadable: {type(err).__name__}: {str(err)[:200]}"
    return None


def prune(cache_dir: Path, key: str, keep: set[str]) -> None:
    """Remove other keys' tokenized datasets, set-aside ones, the kit's older caches, and unused cleaned copies.

    Folders another live process is writing (partial saves, work folders) are left alone.
    """
    current = folder(cache_dir, key).name
    for entry in Path(cache_dir).iterdir():
        name = entry.name
        if name == current or name in keep or name.endswith(".building"):  # a build lock: sftkit.data.build_lock's
            continue
        if ".partial-" in name or name.startswith(".tokenize-"):
            if _writer_alive(name):
                continue
        elif not (name.startswith(PREFIX) or (name.startswith("check-") and name.endswith((".json", ".npz")))
                  or (name.startswith("data-") and name.endswith((".json", ".jsonl")))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _writer_alive(name: str) -> bool:
    """Whether the process named in a partial or work folder's name (host.pid) may still be writing it."""
    tag = (name.split(".partial-", 1)[1] if ".partial-" in name else name.removeprefix(".tokenize-")).rsplit("-", 1)[0]
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another node's: only it knows
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
