"""The tokenized dataset a run trains on: LLaMA-Factory's own preprocessing, run once, saved whole or not at all.

The run's LLaMA-Factory arguments are parsed by LLaMA-Factory's own dataclasses (`parse_arguments`);
its `load_tokenizer` and `get_template_and_fix_tokenizer` build the tokenizer and template; its
loader functions load, align (`_load_single_dataset`), mix (`merge_dataset`) and split
(`split_dataset`) the datasets exactly as `get_dataset` does; its `SupervisedDatasetProcessor` (or
the packed one) tokenizes, through the same `Dataset.map` call `get_dataset` makes. Two things
differ, for speed, not for the result: the aligned rows are tokenized in contiguous shards by
forked workers that already hold the tokenizer, then concatenated in order (what datasets' own
`num_proc` does, minus pickling the tokenizer once per worker and hashing it per map), and the
map gets a fingerprint from the kit's cache key instead of a hash of the tokenizer.

`save` writes that DatasetDict (what `get_dataset` saves at `tokenized_path`) with `sftkit_check.json`
(the report, each file's size) as `tokenized-<key>.partial-<host>.<pid>-<random>`, renamed when whole
(LLaMA-Factory loads any non-empty `tokenized_path`); `sftkit.build_lock` has one node build at a time.
`load_cached` sets aside a folder whose files are missing, cut short or unreadable (rebuilt, never
loaded); `prune` removes the run folder's older keys.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPORT_NAME = "sftkit_check.json"
# DataArguments fields that do not change the tokenized dataset (all others are in the cache key)
NOT_IN_KEY = {"tokenized_path", "overwrite_cache", "preprocessing_num_workers", "dataset_dir", "media_dir",
              "data_shared_file_system", "buffer_size", "eval_num_beams", "streaming", "dataset"}
# ModelArguments fields that change the tokenizer (`load_tokenizer`, `patch_tokenizer`)
# a folder with one of these is multimodal: LLaMA-Factory's load_tokenizer also loads its processor
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
TOKENIZER_FIELDS = ("use_fast_tokenizer", "split_special_tokens", "add_tokens", "add_special_tokens",
                    "model_revision", "trust_remote_code")


class PreprocessError(Exception):
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
    data_args.overwrite_cache = False  # a fresh datasets cache every time (see build)
    return model_args, data_args, int(options.get("seed") or 42)  # 42: the HF Trainer's default seed


def key_fields(model_args: Any, data_args: Any, workers: int) -> dict[str, Any]:
    """Everything among the parsed arguments that LLaMA-Factory's preprocessing reads."""
    from dataclasses import asdict

    fields = {key: value for key, value in asdict(data_args).items() if key not in NOT_IN_KEY}
    if data_args.packing:  # each shard and preprocessing batch is packed on its own
        fields["workers"] = workers
    fields.update({key: getattr(model_args, key, None) for key in TOKENIZER_FIELDS})
    return fields


def load_tokenizer(model_args: Any) -> dict[str, Any]:
    """LLaMA-Factory's tokenizer module (tokenizer and processor), as training loads it.

    A text model's folder has no processor config: LLaMA-Factory's `load_tokenizer` would then load
    the tokenizer a second time through AutoProcessor and drop it (processor None), half its time.
    Here such a folder gets the first half of it only: the same AutoTokenizer call and `patch_tokenizer`.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after it is loaded
    from llamafactory.model import load_tokenizer as lf_load_tokenizer
    from llamafactory.model.loader import _get_init_kwargs
    from llamafactory.model.patcher import patch_tokenizer
    from transformers import AutoTokenizer

    folder = Path(model_args.model_name_or_path)
    try:
        if not folder.is_dir() or any((folder / name).is_file() for name in PROCESSOR_FILES) or (
                "processor_class" in _text(folder / "tokenizer_config.json")):
            return lf_load_tokenizer(model_args)
        kwargs = _get_init_kwargs(model_args)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, use_fast=model_args.use_fast_tokenizer, split_special_tokens=model_args.split_special_tokens,
                padding_side="right", **kwargs)
        except ValueError:  # as LLaMA-Factory: try the other kind
            tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=not model_args.use_fast_tokenizer,
                                                      padding_side="right", **kwargs)
        patch_tokenizer(tokenizer, model_args)
        return {"tokenizer": tokenizer, "processor": None}
    except (OSError, ValueError) as err:
        raise PreprocessError(f"cannot load the tokenizer of {model_args.model_name_or_path}: {err}") from None


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def align(entries: Mapping[str, dict], model_args: Any, data_args: Any, seed: int, work: Path) -> dict[str, str]:
    """LLaMA-Factory's loader and converter on each dataset; {name: the aligned rows' arrow file}.

    Runs in the validation process; the caller reopens the files (memory-mapped, no copy).
    """
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list

    (work / "dataset_info.json").write_text(json.dumps(dict(entries)), encoding="utf-8")
    data_args.dataset_dir = str(work)
    data_args.preprocessing_num_workers = None  # the converters are cheap: no pool in this process
    model_args.cache_dir = str(work / "datasets-cache")
    files = {}
    for name, attr in zip(entries, get_dataset_list(list(entries), str(work)), strict=True):
        if attr.ranking:
            raise PreprocessError(f"dataset {name!r} is registered as a ranking (preference) dataset: SFT reads "
                                  "conversations; drop \"ranking\" from its dataset_info.json entry")
        aligned = _load_single_dataset(attr, model_args, data_args, _training_args(seed))
        if not aligned.cache_files:  # in memory: written out for the parent to reopen
            from datasets import load_from_disk

            aligned.save_to_disk(str(work / "aligned" / name))
            aligned = load_from_disk(str(work / "aligned" / name))
        files[name] = aligned.cache_files[0]["filename"]
    return files


def _training_args(seed: int) -> Any:
    """What LLaMA-Factory's loader reads of the training arguments (building them would set up devices)."""
    return SimpleNamespace(seed=seed, dataloader_num_workers=0, local_process_index=0, should_log=False,
                           predict_with_generate=False)


_STATE: dict[str, Any] = {}  # what the forked tokenizing workers inherit


def tokenize(aligned: Mapping[str, str], data_args: Any, seed: int, tokenizer_module: dict, template: Any,
             workers: int, work: Path, fingerprint: str) -> Any:
    """The DatasetDict ("train", and "validation" with a val_size) of LLaMA-Factory's preprocessing."""
    from datasets import Dataset, DatasetDict, concatenate_datasets
    from llamafactory.data.data_utils import merge_dataset, split_dataset

    datasets = [Dataset.from_file(path) for path in aligned.values()]
    try:
        merged = merge_dataset(datasets, data_args, seed=seed)
        train, evaluation = split_dataset(merged, None, data_args, seed=seed)
    except ValueError as err:  # e.g. interleave_probs that do not match the datasets, val_size too large
        raise PreprocessError(f"LLaMA-Factory cannot mix or split these datasets: {err}") from None
    splits = {**train, **evaluation}
    _STATE.update(splits=splits, data_args=data_args, tokenizer_module=tokenizer_module, template=template,
                  work=work, fingerprint=fingerprint)
    jobs = [(name, index, workers) for name in splits for index in range(min(workers, len(splits[name])))]
    if not jobs:
        raise PreprocessError("no example left to tokenize: check the data")
    try:
        if workers <= 1:
            done = [_tokenize_shard(*job) for job in jobs]
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                done = list(pool.map(_tokenize_shard, *zip(*jobs, strict=True)))
    except BrokenProcessPool:
        raise PreprocessError("a tokenizing process died (out of memory?): pass fewer --workers") from None
    finally:
        _STATE.clear()
    result = {}
    for name in splits:
        files = [path for (split, _, _), path in zip(jobs, done, strict=True) if split == name and path]
        if not files:
            raise PreprocessError(f"LLaMA-Factory's preprocessing left no {name} example: check the data format")
        result[name] = concatenate_datasets([Dataset.from_file(path) for path in files])
    return DatasetDict(result)


def _tokenize_shard(split: str, index: int, count: int) -> str | None:
    """One contiguous shard through LLaMA-Factory's processor, as `_get_preprocessed_dataset` maps it."""
    from llamafactory.data.loader import _get_dataset_processor

    state = _STATE
    data = state["splits"][split].shard(num_shards=count, index=index, contiguous=True)
    if len(data) == 0:
        return None
    if index:  # one progress bar for all workers
        import datasets

        datasets.disable_progress_bars()
    module, data_args = state["tokenizer_module"], state["data_args"]
    processor = _get_dataset_processor(data_args, "sft", state["template"], module["tokenizer"], module["processor"])
    out = state["work"] / f"{split}-{index:05d}.arrow"
    fingerprint = hashlib.sha256(f"{state['fingerprint']}-{split}-{index}-{count}".encode()).hexdigest()[:32]
    data.map(processor.preprocess_dataset, batched=True, batch_size=data_args.preprocessing_batch_size,
             remove_columns=list(data.column_names), cache_file_name=str(out), load_from_cache_file=False,
             new_fingerprint=fingerprint, desc=f"Running tokenizer on dataset (LLaMA-Factory, {count} processes)")
    return str(out)


def row_figures(dataset: Any, packing: bool) -> tuple[Any, Any]:
    """Per trained row: (tokens, trainable tokens) as numpy int64 arrays, from the saved columns.

    Packed rows are split back into their examples at each position_ids 0 (padding positions are
    0 one by one, so runs of length 1 are padding).
    """
    import numpy as np
    import pyarrow.compute as pc
    from llamafactory.extras.constants import IGNORE_INDEX

    tokens, trained = [], []
    for table in dataset.with_format("arrow").iter(batch_size=4096):
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


def check_template(name: str) -> None:
    from llamafactory.data.template import TEMPLATES

    if name not in TEMPLATES:
        raise PreprocessError(f"template {name!r} is not a LLaMA-Factory template: pass --template with one of "
                              "its names (e.g. qwen3, llama3)")


def template(module: dict, data_args: Any) -> Any:
    from llamafactory.data.template import get_template_and_fix_tokenizer

    try:
        return get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    except ValueError as err:
        raise PreprocessError(f"template {data_args.template!r} does not fit this tokenizer: {err}") from None


class QuietLibraries:
    """LLaMA-Factory's logger at ERROR and datasets' progress bars off (unless asked) while the kit reports."""

    def __init__(self, progress: bool) -> None:
        import logging

        import datasets
        from llamafactory.extras.logging import get_logger

        get_logger()  # configures LLaMA-Factory's root logger, which would reset a level set before
        self.logger = logging.getLogger("llamafactory")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        self.bars = datasets.is_progress_bar_enabled()
        if not (progress and sys.stderr.isatty()):
            datasets.disable_progress_bars()

    def restore(self) -> None:
        import datasets

        self.logger.setLevel(self.level)
        if self.bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- the cache in the run folder


def folder(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"tokenized-{key}"


def _owner_tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def work_dir(cache_dir: Path | None) -> Path:
    """A fresh folder for the datasets cache and the shards: in the run folder (same filesystem), else in /tmp."""
    import tempfile

    parent = Path(cache_dir) if cache_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tokenize-{_owner_tag()}-", dir=parent))


def save(dataset: Any, cache_dir: Path, key: str, report: dict[str, Any]) -> Path:
    """The DatasetDict and the report into tokenized-<key>, renamed into place only when whole."""
    dest = folder(cache_dir, key)
    # unique to this writer even where two nodes' containers share a hostname and pid
    partial = dest.with_name(f"{dest.name}.partial-{_owner_tag()}-{os.urandom(4).hex()}")
    dataset.save_to_disk(str(partial))
    sizes = {str(path.relative_to(partial)): path.stat().st_size for path in sorted(partial.rglob("*"))
             if path.is_file()}
    (partial / REPORT_NAME).write_text(json.dumps({"report": report, "files": sizes}), encoding="utf-8")
    try:
        os.replace(partial, dest)
    except OSError:  # another node of this run saved it first: keep theirs if it is whole
        shutil.rmtree(partial, ignore_errors=True)
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
        if name == current or name in keep or name.endswith(".building"):  # a build lock: sftkit.build_lock's
            continue
        if ".partial-" in name or name.startswith(".tokenize-"):
            if _writer_alive(name):
                continue
        elif not (name.startswith("tokenized-") or (name.startswith("check-") and name.endswith((".json", ".npz")))
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
