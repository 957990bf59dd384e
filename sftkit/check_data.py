"""`python -m sftkit check-data FILE|NAME --model PRESET|DIR`: validate a dataset, report the tokens training sees.

The rows are read streaming (`sftkit.data_formats`), checked, and encoded one by one with
LLaMA-Factory's own code: its tokenizer loader, template (`get_template_and_fix_tokenizer`),
dataset converter (alpaca / sharegpt aligners) and `SupervisedDatasetProcessor`, so truncation at
`cutoff_len` (`infer_seqlen`), `train_on_prompt` and `mask_history` are exactly training's. Big
files are split across all cores (forked workers, bounded in-flight chunks: memory does not grow
with the file beyond 24 bytes per row for the length arrays and duplicate digests).

API for the launcher (all paths may be str or Path):

    check_dataset(data, model, *, model_path=None, template=None, enable_thinking=None, cutoff_len=None,
                  gpus=None, nodes=1, batch=None, grad_accum=None, lf_options=None, skip_invalid=False,
                  cache_dir=None, plot_dir=None, workers=None, max_problems=10, progress=False) -> dict
        The report `--json` prints. `data`: a file or a name in data/dataset_info.json; `model`: a
        preset or a model folder (with `model_path`, `template` as sft_train.sh takes them).
        Unset cutoff_len/gpus/batch/grad_accum take the preset's override, else the seed's
        (20480, 4, 2, 8). `lf_options`: the run's LLaMA-Factory data arguments, e.g.
        `data_options(lf_args)` (packing, train_on_prompt, mask_history, tool_format, val_size, ...):
        they change the tokens, so the check encodes with them and keys the cache on them.
        `report["ok"]`: training may start. `report["registration"]`: the dataset_info.json entry
        to write for the run; it points at `report["data_file"]`, the user's file or, with
        skip_invalid and dropped rows, a copy without them written in `cache_dir` (None without
        cache_dir). `report["cache_key"]`: the key of the tokenized dataset. With `cache_dir` (the
        launcher: `<output_dir>/sftkit`) a second check of the same data, tokenizer, template and
        options reads its result from there and tokenizes nothing (`report["cached"]`).
        `plot_dir`: write token_lengths.png there. Raises CheckError (one line that names the fix)
        for a missing file or model, an unknown template or a bad number.
    run_check(...) -> CheckResult      the same, plus the per-row arrays (`.report`, `.arrays`: tokens,
                                       trainable, prompt, response as numpy int32)
    detect_format(row) -> str | None   'alpaca', 'sharegpt', 'openai' (from sftkit.data_formats)
    registration_entry(path, fmt, fields=None) -> dict
    file_digest(path) -> str           sha256 of the file's bytes
    tokenizer_fingerprint(model_dir_or_hub_id) -> str
    tokenized_cache_key(data_digest, tokenizer, template, enable_thinking, cutoff_len, options=None) -> str
    data_options(lf_args) -> dict      LLaMA-Factory data arguments in a '--key value' list that change tokens
    tokenized_path(output_dir, key) -> Path    <output_dir>/sftkit/tokenized-<key>, for --tokenized_path
        LLaMA-Factory saves the tokenized dataset there on the first run and loads it on later
        runs ("Loading dataset from disk will ignore other data arguments"), hence the key covers
        every input of the tokenization.

Report keys (`--json`): ok, file, dataset, layout, places, model, template, enable_thinking, format,
cutoff_len, rows_read, rows (rows that will train), invalid_rows, dropped_rows, duplicate_rows,
problems ([{line|row, field, kind, message}], the first max_problems), problem_counts (per kind),
tokens ({p50, p90, p99, max} of the sequence length as trained, after cutoff), tokens_untruncated,
prompt_tokens and response_tokens (before truncation), total_tokens, trainable_tokens,
trainable_share, over_cutoff, over_cutoff_action, no_trainable_tokens, reasoning_rows, gpus, nodes,
batch, grad_accum, world_size, rows_per_step, packing, packed_sequences, eval_rows,
steps_per_epoch, data_file, registration, cache_key, cached, plot, notes. Token figures are None
when the preset's weights are not on this machine (hub id only): then only the rows are checked.

Places: JSON lines are named by line (1-based), JSON arrays by row index (0-based).
Exit status: 0 the data can train, 1 it cannot (problems listed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sftkit import data_formats as formats
from sftkit.data_formats import DataFileError, FormatSpec, Record, RecordReader, detect_format, registration_entry
from sftkit.presets import PRESETS, Preset, template_for_model_dir

__all__ = [
    "CheckError", "CheckResult", "check_dataset", "run_check", "detect_format", "registration_entry", "file_digest",
    "tokenizer_fingerprint", "tokenized_cache_key", "data_options", "tokenized_path", "resolve_model",
    "resolve_dataset", "main",
]

KIT_DIR = Path(__file__).resolve().parent.parent
KIT_DATA_DIR = KIT_DIR / "data"
SEED_CUTOFF, SEED_BATCH, SEED_GRAD_ACCUM, SEED_GPUS = 20480, 2, 8, 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# LLaMA-Factory data arguments that change the tokenized dataset, with their types.
DATA_OPTIONS: dict[str, type] = {
    "template": str, "enable_thinking": bool, "cutoff_len": int, "packing": bool, "neat_packing": bool,
    "train_on_prompt": bool, "mask_history": bool, "tool_format": str, "default_system": str,
    "preserve_thinking": bool, "val_size": float, "max_samples": int, "preprocessing_batch_size": int, "seed": int,
}
ENCODER_OPTIONS = ("packing", "neat_packing", "train_on_prompt", "mask_history", "tool_format", "default_system",
                   "preserve_thinking", "preprocessing_batch_size")
CHUNK_ROWS, CHUNK_BYTES = 256, 1 << 20
SERIAL_BELOW_BYTES = 2 << 20  # smaller files are checked in-process


class CheckError(Exception):
    """A usage error (missing file or model, bad option): one line that names the fix."""


# ---------------------------------------------------------------- model and data


@dataclass
class ModelChoice:
    model: str  # the resolved model folder, or the hub id when no local copy exists
    local_dir: Path | None  # where the tokenizer is read from; None: token report skipped
    template: str
    enable_thinking: bool | None
    preset: Preset | None = None
    note: str = ""


def resolve_model(model: str, model_path: str | Path | None = None, template: str | None = None,
                  enable_thinking: bool | None = None) -> ModelChoice:
    """The model folder, template and thinking setting for `--model PRESET|DIR` (as the launcher picks them)."""
    preset = PRESETS.get(model)
    if preset is not None:
        path_value = str(model_path) if model_path else preset.hub_id
        local = _existing(path_value)
        if model_path and local is None:
            raise CheckError(f"model folder {path_value!r} does not exist: pass --model-path with the folder of the "
                             "weights")
        if local is None and preset.cpu:
            raise CheckError(f"the demo model {preset.hub_id} is missing: build it with "
                             f"`python -m sftkit build-demo-model --out {preset.hub_id}`")
        chosen = template or preset.template
        thinking = preset.enable_thinking if chosen == preset.template else _thinking_for(chosen)
        note = ""
        if local is None:
            local = _hub_cache_dir(path_value)
            if local is None:
                note = (f"no local tokenizer for {path_value} (hub id only): the format and row checks ran, the token "
                        "report is skipped; pass --model-path DIR for the full report")
        return ModelChoice(str(local) if local else path_value, local, chosen,
                           thinking if enable_thinking is None else enable_thinking, preset, note)

    local = _existing(model)
    if local is None or not local.is_dir():
        raise CheckError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    if template is None:
        try:
            detected = template_for_model_dir(local) if (local / "config.json").is_file() else None
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckError(f"{local / 'config.json'} is not valid JSON ({err}): download the model again") from None
        if detected is None:
            raise CheckError(f"model folder {model!r}: no template known for its model type: pass --template NAME "
                             "(a LLaMA-Factory template, e.g. qwen3, llama3)")
        template, thinking = detected
    else:
        thinking = _thinking_for(template)
    return ModelChoice(str(local), local, template, thinking if enable_thinking is None else enable_thinking)


def _existing(value: str) -> Path | None:
    for candidate in (Path(value), KIT_DIR / value):
        if candidate.exists():
            return candidate
    return None


def _thinking_for(template: str) -> bool | None:
    return False if template == "qwen3" else None


def _hub_cache_dir(hub_id: str) -> Path | None:
    """The snapshot folder of `hub_id` in the local Hugging Face cache, when its tokenizer is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(hub_id, name) for name in ("tokenizer_config.json", "tokenizer.json")]
    if all(isinstance(item, str) for item in found):
        return Path(found[0]).parent
    return None


@dataclass
class DataSource:
    path: Path
    name: str | None = None  # the registered name, when the data was given by name
    entry: dict[str, Any] | None = None  # its dataset_info.json entry


def resolve_dataset(value: str | Path, data_dir: Path = KIT_DATA_DIR) -> DataSource:
    """A `.json`/`.jsonl` file, or a name registered in `data_dir/dataset_info.json`."""
    path = Path(value)
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise CheckError(f"dataset {str(value)!r} is not a .json or .jsonl file: convert it to one of those")
        return DataSource(path)
    known = _registered(data_dir)
    if str(value) in known:
        entry = known[str(value)]
        if "file_name" not in entry:
            raise CheckError(f"dataset {value!r} in {data_dir / 'dataset_info.json'} is not a local file: check-data "
                             "reads local .json/.jsonl files")
        target = data_dir / entry["file_name"]
        if not target.is_file():
            raise CheckError(f"dataset {value!r} names {target}, which is not a file: fix its file_name in "
                             f"{data_dir / 'dataset_info.json'}")
        return DataSource(target, str(value), entry)
    if path.is_dir():
        raise CheckError(f"dataset {str(value)!r} is a folder: pass one .json or .jsonl file")
    names = ", ".join(sorted(known)) or "none"
    raise CheckError(f"dataset {str(value)!r} not found: pass an existing .json/.jsonl file or a registered name "
                     f"({names})")


def _registered(data_dir: Path) -> dict[str, Any]:
    info = data_dir / "dataset_info.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckError(f"{info} is not valid JSON ({err}): fix it") from None


# ---------------------------------------------------------------- cache keys


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tokenizer_fingerprint(model: str | Path) -> str:
    """A hash of the tokenizer files of a local model folder; `hub:<id>` for a hub id without local files."""
    folder = Path(model)
    if not folder.is_dir():
        return f"hub:{model}"
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tokenized_cache_key(data_digest: str, tokenizer: str, template: str, enable_thinking: bool | None,
                        cutoff_len: int, options: Mapping[str, Any] | None = None) -> str:
    """16 hex characters over everything that decides the tokenized dataset (and the library versions)."""
    versions = {}
    for package in ("llamafactory", "transformers", "tokenizers", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    payload = {
        "data": data_digest, "tokenizer": tokenizer, "template": template, "enable_thinking": enable_thinking,
        "cutoff_len": int(cutoff_len), "options": {key: options[key] for key in sorted(options or {})},
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tokenized_path(output_dir: str | Path, key: str) -> Path:
    """Where the launcher lets LLaMA-Factory keep the tokenized dataset (`--tokenized_path`)."""
    return Path(output_dir) / "sftkit" / f"tokenized-{key}"


def data_options(lf_args: Sequence[str]) -> dict[str, Any]:
    """The data arguments among LLaMA-Factory's `--key value` arguments, typed; later ones win."""
    found: dict[str, Any] = {}
    for index, item in enumerate(lf_args):
        if not item.startswith("--"):
            continue
        key, _, value = item[2:].partition("=")
        if key not in DATA_OPTIONS:
            continue
        if not value:
            if index + 1 < len(lf_args) and not lf_args[index + 1].startswith("--"):
                value = lf_args[index + 1]
            elif DATA_OPTIONS[key] is bool:
                value = "true"
        found[key] = _typed(key, value)
    return found


def _typed(key: str, value: Any) -> Any:
    kind = DATA_OPTIONS[key]
    if value is None or isinstance(value, kind):
        return value
    text = str(value)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise CheckError(f"--{key} {text!r}: expected a {kind.__name__}") from None


# ---------------------------------------------------------------- LLaMA-Factory encoding


class _RecordingTemplate:
    """LLaMA-Factory's template, keeping the last untruncated (source, target) pairs it encoded."""

    def __init__(self, template: Any):
        self._template = template
        self.pairs: list[tuple[list[int], list[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._template, name)

    def encode_multiturn(self, *args: Any, **kwargs: Any) -> list[tuple[list[int], list[int]]]:
        self.pairs = self._template.encode_multiturn(*args, **kwargs)
        return self.pairs


class Encoder:
    """One row at a time through LLaMA-Factory's converter and supervised preprocessing."""

    def __init__(self, model_dir: Path, template: str, enable_thinking: bool | None, cutoff_len: int,
                 entry: dict[str, Any], options: Mapping[str, Any]):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from llamafactory.data.converter import get_dataset_converter
        from llamafactory.data.parser import DatasetAttr
        from llamafactory.data.processor import SupervisedDatasetProcessor
        from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
        from llamafactory.extras.constants import IGNORE_INDEX
        from llamafactory.hparams import DataArguments, ModelArguments
        from llamafactory.model import load_tokenizer

        if template not in TEMPLATES:
            raise CheckError(f"template {template!r} is not a LLaMA-Factory template: pass --template with one of "
                             "its names (e.g. qwen3, llama3)")
        args: dict[str, Any] = {key: options[key] for key in ENCODER_OPTIONS if options.get(key) is not None}
        if enable_thinking is not None:
            args["enable_thinking"] = enable_thinking
        try:
            self.data_args = DataArguments(template=template, cutoff_len=cutoff_len, **args)
            tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
            tokenizer = tokenizer_module["tokenizer"]
            self.template = get_template_and_fix_tokenizer(tokenizer, self.data_args)
        except (OSError, ValueError) as err:
            raise CheckError(f"cannot load the tokenizer of {model_dir} with template {template!r}: {err}") from None
        attr = DatasetAttr("file", dataset_name=str(entry.get("file_name", "")))
        attr.join(entry)
        self.converter = get_dataset_converter(attr.formatting, attr, self.data_args)
        names = (attr.prompt, attr.query, attr.response, attr.history, attr.messages, attr.system, attr.tools,
                 attr.images, attr.videos, attr.audios, attr.chosen, attr.rejected, attr.kto_tag)
        self.columns = [name for name in names if name]
        self.recorder = _RecordingTemplate(self.template)
        self.processor = SupervisedDatasetProcessor(template=self.recorder, tokenizer=tokenizer,
                                                    processor=tokenizer_module["processor"], data_args=self.data_args)
        self.cutoff_len = self.data_args.cutoff_len  # LLaMA-Factory keeps one token back when packing
        self.eos_extra = 1 if self.template.efficient_eos else 0
        self.ignore_index = IGNORE_INDEX

    def encode(self, row: dict[str, Any]) -> tuple[int, int, int, int]:
        """(sequence length, trainable labels, prompt tokens, response tokens); the last two before truncation.

        Raises ValueError when LLaMA-Factory's preprocessing drops the row.
        """
        example = {name: row.get(name) for name in self.columns}  # absent columns load as null
        aligned = self.converter(example)
        self.recorder.pairs = []
        out = self.processor.preprocess_dataset({key: [value] for key, value in aligned.items()})
        if not out.get("input_ids"):
            raise ValueError("LLaMA-Factory's preprocessing drops this row (its turns do not pair up)")
        input_ids, labels = out["input_ids"][0], out["labels"][0]
        prompt = sum(len(source) for source, _ in self.recorder.pairs)
        response = sum(len(target) for _, target in self.recorder.pairs) + self.eos_extra
        trainable = len(labels) - labels.count(self.ignore_index)
        return len(input_ids), trainable, prompt, response


class _QuietLibraries:
    """LLaMA-Factory's logger (on stdout) at ERROR while the kit reports for it; restored afterwards."""

    def __init__(self) -> None:
        import logging

        from llamafactory.extras.logging import get_logger

        get_logger()  # configures LLaMA-Factory's root logger, which would reset a level set before
        self.logger = logging.getLogger("llamafactory")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def restore(self) -> None:
        self.logger.setLevel(self.level)


# ---------------------------------------------------------------- the per-row work (runs in workers)


@dataclass
class _Job:
    spec: FormatSpec
    detected: bool  # the spec came from the content: rows of another format are "mixed formats"
    encoder: Encoder | None


_JOB: _Job | None = None  # set before the workers fork


def _check_chunk(raws: list[bytes | str]) -> list[tuple]:
    """Per row: (problems, digest, fields, extras, reasoning, tokens, trainable, prompt, response)."""
    job = _JOB
    assert job is not None
    out = []
    for raw in raws:
        checked = formats.check_row(raw, job.spec, job.detected)
        if checked.problems:
            out.append((checked.problems, 0, (), (), False, -1, -1, -1, -1))
            continue
        row = checked.row
        canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest = int.from_bytes(hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8).digest())
        fields = tuple(key for key in row if key in formats.KNOWN_COLUMNS)
        numbers = (-1, -1, -1, -1)
        if job.encoder is not None:
            try:
                numbers = job.encoder.encode(row)
            except Exception as err:  # LLaMA-Factory's own complaint about this row, as training would raise it
                message = f"LLaMA-Factory cannot encode this row: {type(err).__name__}: {err}"
                out.append(([("", "lf_error", message[:300])], 0, (), (), False, -1, -1, -1, -1))
                continue
        out.append(((), digest, fields, checked.extras, checked.reasoning, *numbers))
    return out


def _chunks(reader: RecordReader) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    try:
        for record in reader:
            chunk.append(record)
            size += len(record.raw)
            if len(chunk) >= CHUNK_ROWS or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    except DataFileError:
        if chunk:  # the rows before an unreadable place are still checked
            yield chunk
        raise
    if chunk:
        yield chunk


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends the workers


def _results(reader: RecordReader, workers: int) -> Iterator[tuple[list[Record], list[tuple]]]:
    """(chunk, per-row results) in file order; at most a few chunks per worker in flight."""
    if workers <= 1:
        for chunk in _chunks(reader):
            yield chunk, _check_chunk([record.raw for record in chunk])
        return
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start)
    try:
        pending: deque = deque()
        unreadable = None
        try:
            for chunk in _chunks(reader):
                pending.append((chunk, pool.apply_async(_check_chunk, ([record.raw for record in chunk],))))
                if len(pending) >= 3 * workers:
                    done, result = pending.popleft()
                    yield done, result.get()
        except DataFileError as err:  # report the rows read before it, then the place itself
            unreadable = err
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
        if unreadable is not None:
            raise unreadable
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------- aggregation


@dataclass
class _Tally:
    unit: str  # "line" or "row"
    max_problems: int
    rows_read: int = 0
    invalid: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    bad: set[int] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    types: dict[str, tuple[str, str]] = field(default_factory=dict)  # extra field -> (JSON type, first place)
    reasoning: int = 0
    fatal: dict[str, Any] | None = None
    digests: array = field(default_factory=lambda: array("Q"))
    tokens: array = field(default_factory=lambda: array("i"))
    trainable: array = field(default_factory=lambda: array("i"))
    prompt: array = field(default_factory=lambda: array("i"))
    response: array = field(default_factory=lambda: array("i"))

    def reject(self, index: int, items: Sequence[tuple[str, str, str]]) -> None:
        self.invalid += 1
        self.bad.add(index)
        for field_name, kind, message in items:
            self.kinds[kind] += 1
            if len(self.problems) < self.max_problems:
                self.problems.append(formats.problem(self.unit, index, field_name, kind, message))

    def add(self, record: Record, result: tuple) -> None:
        self.rows_read += 1
        problems, digest, fields, extras, reasoning, tokens, trainable, prompt, response = result
        if problems:
            self.reject(record.index, problems)
            return
        place = f"{self.unit} {record.index}"
        clashes = []
        for path, kind in extras:
            first = self.types.setdefault(path, (kind, place))
            if first[0] != kind:
                message = (f"{path!r} is {formats.article(kind)} here but {formats.article(first[0])} at "
                           f"{first[1]}: LLaMA-Factory's loader needs one type per field")
                clashes.append((path, "inconsistent_type", message))
        if clashes:
            self.reject(record.index, clashes)
            return
        self.fields.update(fields)
        self.reasoning += bool(reasoning)
        self.digests.append(digest)
        if tokens >= 0:
            self.tokens.append(tokens)
            self.trainable.append(trainable)
            self.prompt.append(prompt)
            self.response.append(response)


# ---------------------------------------------------------------- the check


@dataclass
class CheckResult:
    report: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)  # numpy int arrays per trained row: tokens, trainable, ...


def check_dataset(data: str | Path, model: str, **kwargs: Any) -> dict[str, Any]:
    """The report that `check-data --json` prints (see the module docstring for the arguments)."""
    return run_check(data, model, **kwargs).report


def run_check(data: str | Path, model: str, *, model_path: str | Path | None = None, template: str | None = None,
              enable_thinking: bool | None = None, cutoff_len: int | None = None, gpus: int | None = None,
              nodes: int = 1, batch: int | None = None, grad_accum: int | None = None,
              lf_options: Mapping[str, Any] | None = None, skip_invalid: bool = False,
              cache_dir: str | Path | None = None, plot_dir: str | Path | None = None, workers: int | None = None,
              max_problems: int = 10, progress: bool = False, data_dir: Path = KIT_DATA_DIR) -> CheckResult:
    """Validate `data`, encode it with LLaMA-Factory for `model`, and report; see the module docstring."""
    source = resolve_dataset(data, data_dir)
    choice = resolve_model(model, model_path, template, enable_thinking)
    settings = _Settings.make(choice, source, cutoff_len, gpus, nodes, batch, grad_accum, lf_options)
    try:
        layout = formats.file_layout(source.path)
    except DataFileError as err:
        return CheckResult(_failed_report(source, choice, settings.cutoff, err.problem))
    except OSError as err:
        raise CheckError(f"cannot read {source.path}: {err.strerror}") from None

    cache = Path(cache_dir) if cache_dir else None
    digest = file_digest(source.path) if cache else None
    if digest and choice.local_dir:
        cached = _load_cached(cache, settings.key(digest), skip_invalid)
        if cached is not None:
            return _finish(cached, settings, plot_dir, cached=True)

    spec, detected = _choose_spec(source, layout)
    encoder = None
    quiet = _QuietLibraries() if choice.local_dir is not None else None
    try:
        if choice.local_dir is not None:
            entry = source.entry or registration_entry(source.path, spec.name, fields=_all_columns(spec))
            encoder = Encoder(choice.local_dir, choice.template, choice.enable_thinking, settings.cutoff, entry,
                              settings.options)
        count = max(1, workers or _cores())
        if workers is None and source.path.stat().st_size < SERIAL_BELOW_BYTES:
            count = 1
        tally, scanned_digest = _scan(source.path, layout, _Job(spec, detected, encoder), count, max_problems,
                                      hashing=digest is None, progress=progress)
    finally:
        if quiet is not None:
            quiet.restore()

    key = settings.key(digest or scanned_digest)
    if detected:
        spec = formats.spec_for(spec.name, tally.fields)
    report, arrays = _report(source, choice, spec, layout, tally, encoder, settings.cutoff, key)
    report["data_file"], report["registration"] = _data_file(source, spec, layout, tally, cache, key, skip_invalid)
    if report["data_file"] is None:
        report["notes"].append("no copy without the invalid rows was written: pass --cache-dir DIR to get one "
                               "for training (sft_train.sh does)")
    result = CheckResult(report, arrays)
    if cache and encoder is not None and not report["fatal"] and (skip_invalid or not tally.invalid):
        _store_cached(cache, key, result)
    return _finish(result, settings, plot_dir, cached=False, skip_invalid=skip_invalid)


@dataclass
class _Settings:
    """What the run is planned with: cutoff, world size and batch, LLaMA-Factory data options, the cache key parts."""

    cutoff: int
    plan: dict[str, int]
    options: dict[str, Any]
    key_parts: tuple[str, str, bool | None, dict[str, Any]]  # tokenizer, template, thinking, options

    @classmethod
    def make(cls, choice: ModelChoice, source: DataSource, cutoff_len: int | None, gpus: int | None, nodes: int,
             batch: int | None, grad_accum: int | None, lf_options: Mapping[str, Any] | None) -> _Settings:
        preset = choice.preset
        overrides = preset.overrides if preset else {}
        options = {key: _typed(key, value) for key, value in (lf_options or {}).items() if key in DATA_OPTIONS}
        cutoff = int(_first_set(cutoff_len, options.get("cutoff_len"), overrides.get("cutoff_len"), SEED_CUTOFF))
        plan = {
            "gpus": int(_first_set(gpus, preset.default_gpus if preset else None, SEED_GPUS)),
            "nodes": int(_first_set(nodes, 1)),
            "batch": int(_first_set(batch, overrides.get("per_device_train_batch_size"), SEED_BATCH)),
            "grad_accum": int(_first_set(grad_accum, overrides.get("gradient_accumulation_steps"), SEED_GRAD_ACCUM)),
        }
        for name, value in {**plan, "cutoff_len": cutoff}.items():
            if value < 1:
                raise CheckError(f"--{name.replace('_', '-')} {value}: give a positive number")
        key_options = {key: value for key, value in options.items()
                       if key not in ("template", "cutoff_len", "enable_thinking")}
        if source.entry is not None:  # a registered name: its columns and tags decide the rows too
            key_options["registration"] = {k: v for k, v in source.entry.items() if k != "file_name"}
        tokenizer = tokenizer_fingerprint(choice.local_dir or choice.model)
        return cls(cutoff, plan, options, (tokenizer, choice.template, choice.enable_thinking, key_options))

    def key(self, digest: str) -> str:
        tokenizer, template, thinking, options = self.key_parts
        return tokenized_cache_key(digest, tokenizer, template, thinking, self.cutoff, options)


def _first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def _choose_spec(source: DataSource, layout: str) -> tuple[FormatSpec, bool]:
    """The format to check rows against: the registered entry's, or the one of the first readable row."""
    if source.entry is not None:
        return FormatSpec.from_entry(source.entry), False
    first = _first_row(source.path, layout)
    fmt = (detect_format(first) if first is not None else None) or "alpaca"  # else each row names what it lacks
    seen = set(first.keys()) if isinstance(first, dict) else set()
    return formats.spec_for(fmt, seen | {"input", "system", "tools", "history"}), True


def _scan(path: Path, layout: str, job: _Job, workers: int, max_problems: int, hashing: bool,
          progress: bool) -> tuple[_Tally, str]:
    """Read, check and encode every row (in `workers` processes); the tally and the file's sha256."""
    global _JOB
    reader = RecordReader(path, layout)
    hasher = hashlib.sha256()
    if hashing:
        reader.hasher = hasher
    tally = _Tally("line" if layout == "jsonl" else "row", max_problems)
    bar = _progress_bar(path, progress)
    _JOB = job  # the forked workers inherit it
    try:
        done = 0
        for chunk, results in _results(reader, workers):
            for record, result in zip(chunk, results, strict=True):
                tally.add(record, result)
            if bar is not None:
                bar.set_postfix_str(f"{tally.rows_read:,} rows", refresh=False)
                bar.update(reader.bytes_read - done)
                done = reader.bytes_read
    except DataFileError as err:
        tally.fatal = err.problem
    except OSError as err:
        raise CheckError(f"cannot read {path}: {err.strerror or err}") from None
    finally:
        _JOB = None
        if bar is not None:
            bar.close()
    return tally, hasher.hexdigest()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _first_row(path: Path, layout: str) -> Any:
    """The first row that parses as a JSON object (the format is detected from it), or None."""
    try:
        for record in RecordReader(path, layout):
            row, failure = formats.parse_row(record.raw)
            if failure is None and isinstance(row, dict) and detect_format(row):
                return row
    except DataFileError:
        pass
    return None


def _all_columns(spec: FormatSpec) -> set[str]:
    """Every column the kit may register for `spec` (missing ones load as null for the encoder)."""
    return {spec.prompt, spec.query, spec.response, spec.messages, "system", "tools", "history"} - {None}


def _progress_bar(path: Path, wanted: bool) -> Any:
    if not wanted or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"checking {path.name}", file=sys.stderr,
                leave=False)


def _percentiles(values: Any) -> dict[str, int] | None:
    import numpy as np

    if len(values) == 0:
        return None
    ordered = np.sort(np.asarray(values))
    size = len(ordered)

    def rank(q: float) -> int:  # nearest rank
        return int(ordered[max(0, math.ceil(q / 100 * size) - 1)])

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": int(ordered[-1])}


def _report(source: DataSource, choice: ModelChoice, spec: FormatSpec, layout: str, tally: _Tally,
            encoder: Encoder | None, cutoff: int, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    problems = list(tally.problems)
    kinds = dict(tally.kinds)
    if tally.fatal is not None:
        problems.insert(0, tally.fatal)
        kinds[tally.fatal["kind"]] = kinds.get(tally.fatal["kind"], 0) + 1
    valid = tally.rows_read - tally.invalid
    if tally.rows_read == 0 and tally.fatal is None:
        problems.insert(0, formats.problem("line" if layout == "jsonl" else "row", 1 if layout == "jsonl" else 0, "",
                                           "empty_file", "the file holds no rows: give at least one example"))
        kinds["empty_file"] = 1
    report: dict[str, Any] = {
        "ok": False,
        "file": str(source.path),
        "dataset": source.name,
        "layout": "jsonl" if layout == "jsonl" else "json-array",
        "places": "line (1-based)" if layout == "jsonl" else "row (0-based index)",
        "model": choice.model,
        "template": choice.template,
        "enable_thinking": choice.enable_thinking,
        "format": spec.name,
        "cutoff_len": cutoff,
        "rows_read": tally.rows_read,
        "rows": valid,
        "invalid_rows": tally.invalid,
        "dropped_rows": 0,
        "duplicate_rows": _duplicates(tally.digests),
        "problems": problems,
        "problem_counts": {formats.KINDS.get(kind, kind): count for kind, count in sorted(kinds.items())},
        "reasoning_rows": tally.reasoning,
        "fatal": tally.fatal is not None or valid == 0,  # no --skip-invalid helps
        "unreadable": tally.fatal is not None,  # the file cannot be read past problems[0]
        "cache_key": key,
        "notes": [choice.note] if choice.note else [],
    }
    arrays: dict[str, Any] = {}
    if encoder is not None:
        arrays = {name: np.frombuffer(getattr(tally, name), dtype=np.int32)  # views: no copy of the arrays
                  for name in ("tokens", "trainable", "prompt", "response")}
        report["effective_cutoff_len"] = encoder.cutoff_len
    return report, arrays


def _duplicates(digests: array) -> int:
    """Rows whose content repeats an earlier row: the digests sorted in place, equal neighbours counted."""
    import numpy as np

    if len(digests) < 2:
        return 0
    ordered = np.frombuffer(digests, dtype=np.uint64)
    ordered.sort()
    return int(np.count_nonzero(ordered[1:] == ordered[:-1]))


def _data_file(source: DataSource, spec: FormatSpec, layout: str, tally: _Tally, cache: Path | None, key: str,
               skip_invalid: bool) -> tuple[str | None, dict[str, Any] | None]:
    """The file LLaMA-Factory should read and its registration: the user's, or a copy without the bad rows."""
    path = source.path
    if skip_invalid and tally.invalid and tally.fatal is None:
        if cache is None:  # nothing LLaMA-Factory could read without the bad rows
            return None, None
        path = cache / f"data-{key}{'.jsonl' if layout == 'jsonl' else '.json'}"
        if not path.is_file():
            _write_clean_copy(source.path, layout, tally.bad, path)
    if source.entry is not None:
        entry = dict(source.entry, file_name=str(path.resolve()))
    else:
        entry = registration_entry(path, spec.name, fields=tally.fields)
    return str(path), entry


def _write_clean_copy(source: Path, layout: str, bad: set[int], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with open(partial, "wb") as out:
        if layout == "array":
            out.write(b"[\n")
        first = True
        for record in RecordReader(source, layout):
            if record.index in bad:
                continue
            if layout == "jsonl":
                line = record.raw if isinstance(record.raw, bytes) else record.raw.encode()
                out.write(line if line.endswith(b"\n") else line + b"\n")
            else:
                out.write((b"" if first else b",\n") + str(record.raw).encode("utf-8"))
            first = False
        if layout == "array":
            out.write(b"\n]\n")
    os.replace(partial, dest)


def _store_cached(cache: Path, key: str, result: CheckResult) -> None:
    import numpy as np

    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / f"check-{key}.npz", **result.arrays)
    (cache / f"check-{key}.json").write_text(json.dumps(result.report), encoding="utf-8")


def _load_cached(cache: Path, key: str, skip_invalid: bool) -> CheckResult | None:
    import numpy as np

    report_path, arrays_path = cache / f"check-{key}.json", cache / f"check-{key}.npz"
    if not (report_path.is_file() and arrays_path.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        with np.load(arrays_path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError):
        return None
    if report["invalid_rows"] and (not skip_invalid or not Path(report["data_file"] or "").is_file()):
        return None  # the fresh check lists the problems (or rewrites the cleaned copy)
    return CheckResult(report, arrays)


def _failed_report(source: DataSource, choice: ModelChoice, cutoff: int, fatal: dict[str, Any]) -> dict[str, Any]:
    return {
        "ok": False, "file": str(source.path), "dataset": source.name, "model": choice.model,
        "template": choice.template, "enable_thinking": choice.enable_thinking, "format": None, "cutoff_len": cutoff,
        "rows_read": 0, "rows": 0, "invalid_rows": 0, "dropped_rows": 0, "duplicate_rows": 0, "problems": [fatal],
        "problem_counts": {formats.KINDS[fatal["kind"]]: 1}, "tokens": None, "over_cutoff": None,
        "no_trainable_tokens": None, "steps_per_epoch": None, "fatal": True, "unreadable": True, "notes": [],
        "data_file": None, "registration": None, "cache_key": None,
    }


def _finish(result: CheckResult, settings: _Settings, plot_dir: str | Path | None, cached: bool,
            skip_invalid: bool = False) -> CheckResult:
    """Fill in what depends on this call only: the skip policy, the planned steps per epoch, the plot."""
    report, arrays, plan = result.report, result.arrays, settings.plan
    skip = skip_invalid or (cached and bool(report["invalid_rows"]))
    report["cached"] = cached
    report["skip_invalid"] = skip
    report["dropped_rows"] = report["invalid_rows"] if skip else 0
    report["ok"] = not report["fatal"] and (report["invalid_rows"] == 0 or skip)
    packing = bool(settings.options.get("packing") or settings.options.get("neat_packing"))
    limit = report.get("effective_cutoff_len", settings.cutoff)
    report.update(_token_report(arrays, limit, packing))
    report["packing"] = packing

    if "tokens" in arrays and packing:
        batch_rows = int(settings.options.get("preprocessing_batch_size") or 1000)
        sequences = report["packed_sequences"] = _packed_count(arrays["tokens"], limit, batch_rows)
    else:
        sequences, report["packed_sequences"] = (None if packing else report["rows"]), None
    val_size = float(settings.options.get("val_size") or 0)
    report["eval_rows"] = None
    if val_size > 0 and report["rows"]:  # LLaMA-Factory splits the rows before tokenizing
        report["eval_rows"] = int(val_size) if val_size >= 1 else math.ceil(report["rows"] * val_size)
        if sequences is not None and not packing:
            sequences = max(sequences - report["eval_rows"], 0)
    report.update(plan)
    world = plan["gpus"] * plan["nodes"]
    report["world_size"] = world
    report["rows_per_step"] = world * plan["batch"] * plan["grad_accum"]
    report["steps_per_epoch"] = (_steps(sequences, plan["batch"], world, plan["grad_accum"])
                                 if sequences is not None and report["ok"] else None)

    if report["enable_thinking"] is False and report.get("reasoning_rows"):
        note = (f"{report['reasoning_rows']} rows carry <think> reasoning, which the template drops with "
                "enable_thinking false: train with enable_thinking true to keep it")
        if note not in report["notes"]:
            report["notes"].append(note)
    report["plot"] = None
    if plot_dir is not None and len(arrays.get("tokens", ())):
        report["plot"] = str(_plot(arrays, report, Path(plot_dir)))
    return result


def _token_report(arrays: dict[str, Any], limit: int, packing: bool) -> dict[str, Any]:
    """Percentiles, cutoff and trainable-token figures from the per-row arrays (None without a tokenizer)."""
    import numpy as np

    tokens = arrays.get("tokens")
    if tokens is None:
        return dict.fromkeys(("tokens", "tokens_untruncated", "prompt_tokens", "response_tokens", "total_tokens",
                              "trainable_tokens", "trainable_share", "over_cutoff", "over_cutoff_action",
                              "no_trainable_tokens"))
    full = arrays["prompt"].astype(np.int64) + arrays["response"]
    total, trainable = int(tokens.sum()), int(arrays["trainable"].sum())
    action = f"truncated to cutoff_len {limit} tokens"
    if packing:
        action = (f"truncated to {limit} tokens (packing keeps one token back); LLaMA-Factory 0.9.5 truncates "
                  "before packing, so none is dropped")
    return {
        "tokens": _percentiles(tokens),
        "tokens_untruncated": _percentiles(full),
        "prompt_tokens": _percentiles(arrays["prompt"]),
        "response_tokens": _percentiles(arrays["response"]),
        "total_tokens": total,
        "trainable_tokens": trainable,
        "trainable_share": round(trainable / total, 4) if total else None,
        "over_cutoff": int((full > limit).sum()),
        "over_cutoff_action": action,
        "no_trainable_tokens": int((arrays["trainable"] == 0).sum()),
    }


def _packed_count(tokens: Any, cutoff: int, batch_rows: int) -> int:
    """Packed sequences as LLaMA-Factory's greedy knapsack makes them, per preprocessing batch."""
    from llamafactory.data.processor.processor_utils import greedy_knapsack

    lengths = [int(value) for value in tokens]
    return sum(len(greedy_knapsack(lengths[start:start + batch_rows], cutoff))
               for start in range(0, len(lengths), batch_rows))


def _steps(rows: int, batch: int, world: int, grad_accum: int) -> int:
    """Optimizer steps per epoch as the HF Trainer counts them under accelerate (even batches, no drop_last)."""
    if rows <= 0:
        return 0
    batches_per_rank = math.ceil(math.ceil(rows / batch) / world)
    return max(math.ceil(batches_per_rank / grad_accum), 1)


def _plot(arrays: dict[str, Any], report: dict[str, Any], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = arrays["prompt"].astype("int64") + arrays["response"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token_lengths.png"
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.hist([arrays["prompt"], arrays["response"], full], bins=50, label=["prompt", "response", "whole row"],
              histtype="step", linewidth=1.5)
    limit = report.get("effective_cutoff_len", report["cutoff_len"])
    axes.axvline(limit, color="red", linestyle="--", label=f"cutoff_len {limit}")
    axes.set_xlabel(f"tokens ({report['template']} template, before truncation)")
    axes.set_ylabel("rows")
    axes.set_title(f"{Path(report['file']).name}: {report['rows']} rows, {report['over_cutoff']} over cutoff")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- text output


def render(report: dict[str, Any]) -> str:
    """The report as the terminal shows it."""
    lines = []
    name = report["file"] + (f" (dataset {report['dataset']})" if report.get("dataset") else "")
    lines.append(f"data:       {name}: {report.get('layout', '?')}, format {report.get('format')}, "
                 f"{report['rows_read'] if 'rows_read' in report else 0} rows read")
    thinking = report.get("enable_thinking")
    lines.append(f"model:      {report['model']} (template {report['template']}"
                 + (f", enable_thinking {str(thinking).lower()}" if thinking is not None else "") + ")")
    verdict = "will train" if report["ok"] else "valid"
    lines.append(f"rows:       {report['rows']} {verdict}; {report['invalid_rows']} invalid, "
                 f"{report['dropped_rows']} dropped, {report['duplicate_rows']} duplicates")
    if report.get("tokens"):
        tokens = report["tokens"]
        lines.append(f"tokens:     per row as trained p50 {tokens['p50']}, p90 {tokens['p90']}, p99 {tokens['p99']}, "
                     f"max {tokens['max']} (cutoff_len {report['cutoff_len']})")
        for label, key in (("prompt", "prompt_tokens"), ("response", "response_tokens")):
            part = report[key]
            lines.append(f"  {label + ':':<10}p50 {part['p50']}, p90 {part['p90']}, p99 {part['p99']}, max "
                         f"{part['max']} (before truncation)")
        lines.append(f"cutoff:     {report['over_cutoff']} rows longer than cutoff_len: {report['over_cutoff_action']}")
        lines.append(f"trainable:  {report['trainable_share']:.1%} of {report['total_tokens']} tokens; "
                     f"{report['no_trainable_tokens']} rows with no trainable token")
    if report.get("steps_per_epoch") is not None:
        rows = report["packed_sequences"] if report.get("packing") else report["rows"]
        what = "packed sequences" if report.get("packing") else "rows"
        lines.append(f"steps:      {report['steps_per_epoch']} optimizer steps per epoch ({rows} {what}; "
                     f"{report['gpus']} GPUs x {report['nodes']} node(s) x batch {report['batch']} x grad-accum "
                     f"{report['grad_accum']} = {report['rows_per_step']} per step)")
    if report.get("plot"):
        lines.append(f"plot:       {report['plot']}")
    if report.get("cached"):
        lines.append("cache:      reused the check of identical data, tokenizer and settings (nothing tokenized)")
    for note in report.get("notes", []):
        lines.append(f"note:       {note}")
    return "\n".join(lines)


def render_problems(report: dict[str, Any]) -> str:
    lines = []
    for item in report["problems"]:
        where = formats.place_text(report["file"], item)
        field_text = f" [{item['field']}]" if item.get("field") else ""
        lines.append(f"  {where}{field_text}: {item['message']}")
    counts = ", ".join(f"{kind} {count}" for kind, count in report["problem_counts"].items())
    if counts:
        lines.append(f"  counts: {counts}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sftkit check-data",
        description="Validate a dataset and report the tokens training will see (LLaMA-Factory's own preprocessing).",
    )
    parser.add_argument("data", metavar="FILE|NAME", help="a .json/.jsonl file, or a name in data/dataset_info.json")
    parser.add_argument("--model", required=True, metavar="PRESET|DIR", help=f"{', '.join(PRESETS)}, or a model folder")
    parser.add_argument("--model-path", metavar="DIR", help="where a preset's weights are")
    parser.add_argument("--template", help="LLaMA-Factory template (default: the preset's, or from config.json)")
    parser.add_argument("--enable-thinking", choices=("true", "false"), help="override the preset's thinking setting")
    parser.add_argument("--cutoff-len", type=int, metavar="N", help=f"default: the preset's, else {SEED_CUTOFF}")
    parser.add_argument("--gpus", type=int, metavar="N", help=f"processes per node (default: the preset's, else "
                                                               f"{SEED_GPUS})")
    parser.add_argument("--nodes", type=int, default=1, metavar="N")
    parser.add_argument("--batch", type=int, metavar="N", help=f"per-device batch (default: the preset's, else "
                                                                f"{SEED_BATCH})")
    parser.add_argument("--grad-accum", type=int, metavar="N", help=f"default: the preset's, else {SEED_GRAD_ACCUM}")
    parser.add_argument("--packing", action="store_true", help="as LLaMA-Factory's --packing")
    parser.add_argument("--train-on-prompt", action="store_true", help="as LLaMA-Factory's --train_on_prompt")
    parser.add_argument("--mask-history", action="store_true", help="as LLaMA-Factory's --mask_history")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid rows instead of failing")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument("--plot-dir", metavar="DIR", help="write token_lengths.png there")
    parser.add_argument("--cache-dir", metavar="DIR", help="keep the result (and a cleaned copy) there for reruns")
    parser.add_argument("--workers", type=int, metavar="N", help="processes for tokenizing (default: all cores)")
    parser.add_argument("--max-problems", type=int, default=10, metavar="N", help="problems listed (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    options = {key: True for key in ("packing", "train_on_prompt", "mask_history") if getattr(args, key)}
    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the tokenizer comes from disk
    saved_stdout = None
    if args.json:  # libraries print to stdout (LLaMA-Factory's logger does): send all of it to stderr
        sys.stdout.flush()
        saved_stdout = os.dup(1)
        os.dup2(2, 1)
    try:
        report = check_dataset(
            args.data, args.model, model_path=args.model_path, template=args.template, enable_thinking=thinking,
            cutoff_len=args.cutoff_len, gpus=args.gpus, nodes=args.nodes, batch=args.batch,
            grad_accum=args.grad_accum, lf_options=options, skip_invalid=args.skip_invalid,
            cache_dir=args.cache_dir, plot_dir=args.plot_dir, workers=args.workers,
            max_problems=max(0, args.max_problems), progress=not args.no_progress,
        )
    except CheckError as err:
        report, error = None, str(err)
    except OSError as err:  # an unwritable --cache-dir or --plot-dir
        report, error = None, f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
    except KeyboardInterrupt:
        report, error = None, "interrupted"
    finally:
        if saved_stdout is not None:
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
    if report is None:
        if args.json:
            print(json.dumps({"ok": False, "error": error}))
        print(f"check-data: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0 if report["ok"] else 1
    if report["ok"]:
        print(render(report))
        if report["dropped_rows"]:
            where = (f"LLaMA-Factory reads {report['data_file']}" if report["data_file"]
                     else "pass --cache-dir DIR for a copy without them")
            print(f"skipped:    {report['dropped_rows']} invalid rows dropped (--skip-invalid); {where}")
            print(render_problems(report))
        print("check-data: ok")
        return 0
    if report.get("rows_read"):
        print(render(report))
    print(failure_text(report), file=sys.stderr)
    return 1


def failure_text(report: dict[str, Any]) -> str:
    """Why the data cannot train: the places, the counts per kind, and the fix."""
    shown, invalid = len(report["problems"]), report["invalid_rows"]
    if report.get("unreadable"):
        head = f"{report['file']}: cannot be read as a dataset"
        fix = ("fix the file at the place shown (a JSON array cannot be skipped row by row; JSON lines can, "
               "with --skip-invalid)")
        if report["problems"] and report["problems"][0]["kind"] == "empty_file":
            fix = "give a .json array or .jsonl file with at least one example"
    else:
        head = f"{report['file']}: {invalid} invalid rows of {report['rows_read']}"
        head += f" (first {shown} shown)" if shown < invalid else ""
        fix = ("no row is valid: is this the right file?" if report["rows"] == 0
               else "fix these rows, or pass --skip-invalid to drop them")
    return f"check-data: error: {head}:\n{render_problems(report)}\n{fix}"


if __name__ == "__main__":
    sys.exit(main())
