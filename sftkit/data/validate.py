"""Validate every row of one dataset file, streaming, before LLaMA-Factory reads it.

`validate_file(source, max_problems)` reads the file once (memory: the largest row, plus 8 bytes per
row for duplicate detection), checks each row with `data_formats.check_row` and returns a
`FileCheck`: rows read, invalid rows with the first problems (line or row, field, kind, message
with the fix), counts per kind, duplicates (rows of the same text), the top-level columns present
(the registration names only those), and rows whose answers carry reasoning.
`FileCheck.write_without_invalid(dest)` writes the copy LLaMA-Factory reads under --skip-invalid,
atomically. No LLaMA-Factory import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.data import data_formats as formats
from sftkit.data import records
from sftkit.data.data_formats import FormatSpec, detect_format, registration_entry
from sftkit.data.records import DataFileError, RecordReader
from sftkit.files import KIT_DATA_DIR, UsageError


class SourceError(UsageError):
    """A dataset that cannot be found or is not a .json/.jsonl file: one line that names the fix."""


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
            raise SourceError(f"dataset {str(value)!r} is not a .json or .jsonl file: convert it to one of those")
        return DataSource(path)
    known = _registered(data_dir)
    if str(value) in known:
        entry = known[str(value)]
        if "file_name" not in entry:
            raise SourceError(f"dataset {value!r} in {data_dir / 'dataset_info.json'} is not a local file: check-data "
                             "reads local .json/.jsonl files")
        target = data_dir / entry["file_name"]
        if not target.is_file():
            raise SourceError(f"dataset {value!r} names {target}, which is not a file: fix its file_name in "
                             f"{data_dir / 'dataset_info.json'}")
        return DataSource(target, str(value), entry)
    if path.is_dir():
        raise SourceError(f"dataset {str(value)!r} is a folder, not a .json or .jsonl file: pass one file")
    names = ", ".join(sorted(known)) or "none"
    raise SourceError(f"dataset {str(value)!r} not found: pass an existing .json/.jsonl file or a registered name "
                     f"({names})")


def resolve_datasets(data: str | Path | Sequence[str | Path], data_dir: Path = KIT_DATA_DIR) -> list[DataSource]:
    """`a.jsonl,b.json,name` (or a list) as sources; a file whose own name holds a comma is taken whole."""
    if isinstance(data, (str, Path)):
        data = [data] if Path(data).is_file() else [part.strip() for part in str(data).split(",") if part.strip()]
    sources = [resolve_dataset(item, data_dir) for item in data]
    if not sources:
        raise SourceError("no dataset given: pass a .json/.jsonl file or a registered name")
    return sources


def _registered(data_dir: Path) -> dict[str, Any]:
    info = data_dir / "dataset_info.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"{info} is not valid JSON ({err}): fix it") from None


@dataclass
class FileCheck:
    """What validating one file found."""

    source: DataSource
    layout: str  # "jsonl" or "array"
    spec: FormatSpec
    max_problems: int
    rows_read: int = 0
    invalid: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    bad: set[int] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    types: dict[str, tuple[str, str]] = field(default_factory=dict)  # extra field -> (JSON type, first place)
    reasoning: int = 0
    duplicates: int = 0
    fatal: dict[str, Any] | None = None  # the place past which the file cannot be read

    @property
    def unit(self) -> str:
        return "line" if self.layout == "jsonl" else "row"

    @property
    def rows(self) -> int:
        return self.rows_read - self.invalid

    def reject(self, index: int, items: list[tuple[str, str, str]]) -> None:
        self.invalid += 1
        self.bad.add(index)
        for field_name, kind, message in items:
            self.kinds[kind] += 1
            if len(self.problems) < self.max_problems:
                self.problems.append({"file": str(self.source.path),
                                      **records.problem(self.unit, index, field_name, kind, message)})

    def registration(self, path: Path) -> dict[str, Any]:
        """The dataset_info.json entry that makes LLaMA-Factory read `path` (the checked file or its copy)."""
        target = path.resolve()
        if self.source.entry is not None:
            return dict(self.source.entry, file_name=str(target))
        return registration_entry(target, self.spec.name, fields=self.fields)

    def write_without_invalid(self, dest: Path) -> Path:
        """A copy of the file without the invalid rows (same layout), written whole or not at all."""
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        # two nodes on a shared folder may share a pid (containers): a random part keeps their copies apart
        partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
        with open(partial, "wb") as out:
            reader = RecordReader(self.source.path, self.layout)
            kept = (record.raw for record in reader if record.index not in self.bad)
            if self.layout == "jsonl":  # bytes, each line as read
                out.writelines(line if line.endswith(b"\n") else line + b"\n" for line in kept)
            else:  # str, streamed element by element
                out.write(b"[\n")
                for number, raw in enumerate(kept):
                    out.write((b",\n" if number else b"") + str(raw).encode("utf-8"))
                out.write(b"\n]\n")
        os.replace(partial, dest)
        return dest

    def summary(self) -> dict[str, Any]:
        """This file's part of the report (`--json` lists one per dataset)."""
        head = self.fatal  # listed first: why the file cannot be read, or that it holds no rows
        if head is None and self.rows_read == 0:
            head = records.problem(self.unit, 1 if self.layout == "jsonl" else 0, "", "empty_file",
                                   "the file holds no rows: give at least one example")
        problems, kinds = list(self.problems), Counter(self.kinds)
        if head is not None:
            problems.insert(0, {"file": str(self.source.path), **head})
            kinds[head["kind"]] += 1
        return {
            "file": str(self.source.path), "dataset": self.source.name,
            "layout": "jsonl" if self.layout == "jsonl" else "json-array",
            "places": "line (1-based)" if self.layout == "jsonl" else "row (0-based index)",
            "format": self.spec.name, "rows_read": self.rows_read, "rows": self.rows, "invalid_rows": self.invalid,
            "duplicate_rows": self.duplicates, "reasoning_rows": self.reasoning, "problems": problems,
            "problem_counts": {records.KINDS.get(kind, kind): count for kind, count in sorted(kinds.items())},
            "fatal": self.fatal is not None or self.rows == 0,  # no --skip-invalid helps
            "unreadable": self.fatal is not None,
        }


def trainable(checks: list[FileCheck], skip_invalid: bool) -> bool:
    """Whether the files can train: nothing fatal, and no invalid row (or --skip-invalid drops them)."""
    return not any(check.summary()["fatal"] or (check.invalid and not skip_invalid) for check in checks)


def register(checks: list[FileCheck], names: list[str], digests: list[str], skip_invalid: bool,
              copies: Path | None) -> dict[str, dict] | None:
    """{name: dataset_info.json entry} for LLaMA-Factory, or None when the data cannot train as it is."""
    if not trainable(checks, skip_invalid):
        return None
    entries = {}
    for name, digest, check in zip(names, digests, checks, strict=True):
        path = check.source.path
        if check.invalid:  # --skip-invalid: LLaMA-Factory reads a copy without those rows
            if copies is None:
                return None  # nothing it could read without them (hub id only, no --cache-dir)
            path = check.write_without_invalid(copies / f"data-{digest[:16]}{path.suffix}")
        entries[name] = check.registration(path)
    return entries


def validate_file(source: DataSource, max_problems: int = 10, progress: bool = False) -> FileCheck:
    """Read and check every row of `source` (see the module docstring); raises OSError if it cannot be read."""
    try:
        layout = records.file_layout(source.path)
    except DataFileError as err:
        check = FileCheck(source, "jsonl", FormatSpec(), max_problems)
        check.fatal = err.problem
        return check
    spec, detected = _choose_spec(source, layout)
    check = FileCheck(source, layout, spec, max_problems)
    reader = RecordReader(source.path, layout)
    digests = array("Q")
    with _progress_bar(source.path, progress) as bar:
        try:
            for record in reader:
                check.rows_read += 1
                _add(check, record, formats.check_row(record.raw, spec, detected), digests)
                if check.rows_read % 1000 == 0:
                    bar.update(reader.bytes_read - bar.n)
        except DataFileError as err:
            check.fatal = err.problem
    if detected:  # register the columns the rows have (LLaMA-Factory indexes every named column)
        check.spec = formats.spec_for(spec.name, check.fields)
    check.duplicates = _duplicates(digests)
    return check


def _add(check: FileCheck, record: records.Record, row: formats.RowCheck, digests: array) -> None:
    if row.problems:
        check.reject(record.index, row.problems)
        return
    place = f"{check.unit} {record.index}"
    clashes = []
    for path, kind in row.extras:
        first = check.types.setdefault(path, (kind, place))
        if first[0] != kind:
            message = (f"{path!r} is {formats.article(kind)} here but {formats.article(first[0])} at {first[1]}: "
                       "LLaMA-Factory's loader needs one type per field")
            clashes.append((path, "inconsistent_type", message))
    if clashes:
        check.reject(record.index, clashes)
        return
    check.fields.update(key for key in row.row if key in formats.KNOWN_COLUMNS)
    check.reasoning += row.reasoning
    raw = record.raw.strip() if isinstance(record.raw, bytes) else record.raw.encode("utf-8", "surrogatepass")
    digests.append(int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest()))  # the same text: a duplicate


def _duplicates(digests: array) -> int:
    """Rows whose content repeats an earlier row: the digests sorted in place, equal neighbours counted."""
    import numpy as np

    if len(digests) < 2:
        return 0
    ordered = np.frombuffer(digests, dtype=np.uint64)
    ordered.sort()
    return int(np.count_nonzero(ordered[1:] == ordered[:-1]))


def _choose_spec(source: DataSource, layout: str) -> tuple[FormatSpec, bool]:
    """The format to check rows against: the registered entry's, or the one of the first readable row."""
    if source.entry is not None:
        return FormatSpec.from_entry(source.entry), False
    first: dict[str, Any] = {}
    with contextlib.suppress(DataFileError):
        for record in RecordReader(source.path, layout):
            row = formats.parse_row(record.raw)[0]  # None when it cannot be parsed
            if detect_format(row):
                first = row
                break
    fmt = detect_format(first) or "alpaca"  # else each row names what it lacks
    return formats.spec_for(fmt, set(first) | {"input", "system", "tools", "history"}), True


def _progress_bar(path: Path, wanted: bool) -> Any:
    """tqdm's bar of the bytes read, on a terminal when wanted (else a disabled one, which shows nothing)."""
    from tqdm import tqdm

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"checking {path.name}", file=sys.stderr,
                leave=False, disable=not wanted or not sys.stderr.isatty())
