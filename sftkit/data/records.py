"""Dataset files read row by row in bounded memory, and the places (line or row) problems are reported at.

Layout from the first character (LLaMA-Factory's JSON loader takes both whatever the extension):
JSON lines (`{`: places are lines, 1-based) or a JSON array (`[`: places are row indexes, 0-based,
parsed element by element from a bounded buffer). A syntax error inside an array cannot be skipped:
the file must be fixed or sent as JSON lines.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_CHUNK = 1 << 20
BLANKS = re.compile("[ \t\r\n\ufeff]*")  # JSON whitespace, and a byte order mark
# problem kind -> what it is called in reports
KINDS: dict[str, str] = {
    "empty_file": "empty file",
    "invalid_json": "invalid JSON",
    "invalid_utf8": "invalid UTF-8",
    "not_object": "not an object",
    "mixed_formats": "mixed formats",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "wrong_type": "wrong type",
    "invalid_value": "invalid value",
    "unknown_role": "unknown role",
    "role_order": "roles out of order",
    "last_turn": "last turn not from the assistant",
    "unsupported": "unsupported field",
    "inconsistent_type": "type differs from earlier rows",
    "lf_error": "rejected by LLaMA-Factory",
}


class DataFileError(Exception):
    """The file cannot be read as a dataset at all (empty, not JSON, broken array)."""

    def __init__(self, problem: dict[str, Any]):
        super().__init__(problem["message"])
        self.problem = problem


@dataclass
class Record:
    """One row as read: its place and its raw text (bytes for JSON lines, str for arrays)."""

    index: int  # JSONL: the line number (1-based); array: the row index (0-based)
    line: int  # the line the row starts on (1-based)
    raw: bytes | str


def file_layout(path: Path) -> str:
    """`jsonl` or `array`, from the first character; raises DataFileError for an empty or non-JSON file."""
    head = b""
    with open(path, "rb") as handle:
        for head in iter(lambda: handle.read(1 << 16), b""):  # the first chunk that is not all blank, else the last
            if head.strip(b" \t\r\n\xef\xbb\xbf"):
                break
    text = head.lstrip(b" \t\r\n")
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:].lstrip(b" \t\r\n")
    if not text:
        raise DataFileError(problem("line", 1, "", "empty_file", "the file is empty: give at least one example"))
    layout = {b"[": "array", b"{": "jsonl"}.get(text[:1])
    if layout is not None:
        return layout
    raise DataFileError(problem(
        "line", 1, "", "invalid_json",
        "not JSON data: a dataset is a JSON array of objects ([{...}, ...]) or JSON lines (one {...} per line)",
    ))


class RecordReader:
    """Iterates the records of a file in order, streaming; `bytes_read` follows the progress."""

    def __init__(self, path: Path, layout: str | None = None):
        self.path = path
        self.layout = layout or file_layout(path)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Record]:
        return self._lines() if self.layout == "jsonl" else self._array()

    def _lines(self) -> Iterator[Record]:
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                self.bytes_read += len(line)
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():
                    yield Record(number, number, line)

    def _array(self) -> Iterator[Record]:
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        decode = json.JSONDecoder().raw_decode
        with open(self.path, "rb") as handle:
            buf, pos, line, eof = "", 0, 1, False

            def fill() -> bool:
                nonlocal buf, pos, eof
                if eof:
                    return False
                chunk = handle.read(READ_CHUNK)
                self.bytes_read += len(chunk)
                eof = not chunk
                buf = buf[pos:] + decoder.decode(chunk, final=eof)
                pos = 0
                return True

            def skip_ws() -> str:
                """The next non-blank character ('' at the end), counting lines on the way."""
                nonlocal pos, line
                while True:
                    end = BLANKS.match(buf, pos).end()
                    line += buf.count("\n", pos, end)
                    pos = end
                    if pos < len(buf) or not fill():
                        return buf[pos:pos + 1]

            def fatal(row: int, message: str, at: int | None = None) -> DataFileError:
                where = line + (buf.count("\n", pos, at) if at is not None else 0)
                return DataFileError(problem("row", row, "", "invalid_json", f"{message} (line {where})"))

            if skip_ws() != "[":
                raise fatal(0, "a JSON array must start with '['")
            pos += 1
            row = 0
            if skip_ws() == "]":
                pos += 1
            else:
                while True:
                    if skip_ws() == "":
                        raise fatal(row, f"the file ends inside the array, before row {row}: it is cut short")
                    try:
                        _, end = decode(buf, pos)
                        if end >= len(buf) and not eof:  # a number may go on in the next chunk
                            raise json.JSONDecodeError("incomplete", buf, end)
                    except json.JSONDecodeError as err:
                        cut = err.pos >= len(buf) - 1 or err.msg.startswith("Unterminated string")
                        if cut and not eof:
                            fill()
                            continue
                        if cut:
                            raise fatal(row, f"the file ends inside row {row}: it is cut short") from None
                        raise fatal(row, f"invalid JSON: {err.msg}", err.pos) from None
                    yield Record(row, line, buf[pos:end])
                    line += buf.count("\n", pos, end)
                    pos = end
                    row += 1
                    after = skip_ws()
                    if after not in (",", "]"):
                        raise fatal(row - 1, f"expected ',' or ']' after row {row - 1}" if after else
                                    "the file ends inside the array")
                    pos += 1
                    if after == "]":
                        break
            if skip_ws() != "":
                raise fatal(row, "extra data after the closing ']' of the array")


def iter_records(path: Path) -> Iterator[Record]:
    """The records of a `.json` array or JSON-lines file, streaming."""
    return iter(RecordReader(path))


def problem(unit: str, index: int, field_name: str, kind: str, message: str) -> dict[str, Any]:
    """A problem as reported: {line|row, field, kind, message}."""
    return {unit: index, "field": field_name, "kind": kind, "message": message}


def place_text(path: Path | str, item: dict[str, Any]) -> str:
    """`file:LINE` for JSON lines, `file row N` for an array row, as shown to the user."""
    if "line" in item:
        return f"{path}:{item['line']}"
    if "row" in item:
        return f"{path} row {item['row']}"
    return str(path)
