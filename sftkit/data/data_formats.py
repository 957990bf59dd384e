"""Dataset formats as LLaMA-Factory reads them: detection, row validation, registration.

No LLaMA-Factory import here (cheap to load). Formats, detected from the first readable row:
`alpaca` (instruction/input/output, optional system, history), `sharegpt` (conversations of
{from, value}, optional system, tools) and `openai` (messages of {role, content}: registered as
LLaMA-Factory's sharegpt reader with OpenAI tags, since its own `openai` converter appends
"detailed thinking off" to every system prompt). `registration_entry` names only the columns a
file has (LLaMA-Factory's converters index every named column).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

FORMATS = ("alpaca", "sharegpt", "openai")

# Top-level keys a registration may name; the others are carried along untouched.
KNOWN_COLUMNS = ("instruction", "input", "output", "system", "history", "conversations", "messages", "tools")

# Reasoning in a field of its own: LLaMA-Factory 0.9.5's converters do not read it (it trains <think> blocks)
REASONING_FIELDS = ("reasoning_content", "reasoning")


# ---------------------------------------------------------------- formats


@dataclass(frozen=True)
class FormatSpec:
    """The columns and role tags of one format, with LLaMA-Factory's `DatasetAttr` defaults."""

    formatting: str = "alpaca"
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"
    name: str = "alpaca"  # the kit's format name: alpaca, sharegpt or openai

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> FormatSpec:
        """The spec of a `dataset_info.json` entry, read the way LLaMA-Factory's `DatasetAttr.join` reads it."""
        values: dict[str, Any] = {"formatting": entry.get("formatting", "alpaca")}
        if "columns" in entry:  # LLaMA-Factory: a named columns dict unsets every column it omits
            for column in ("prompt", "query", "response", "history", "messages", "system", "tools"):
                values[column] = entry["columns"].get(column)
        if "tags" in entry:
            for tag in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                        "system_tag"):
                values[tag] = entry["tags"].get(tag)
        name = values["formatting"]
        if name != "alpaca" and values.get("role_tag", "from") == "role":
            name = "openai"
        return cls(**values, name=name)

    @cached_property
    def roles(self) -> dict[str, str]:
        """Role tag -> LLaMA-Factory role (user, assistant, observation, function, system)."""
        pairs = [(self.user_tag, "user"), (self.assistant_tag, "assistant"), (self.observation_tag, "observation"),
                 (self.function_tag, "function"), (self.system_tag, "system")]
        return {tag: role for tag, role in pairs if tag}

    @cached_property
    def sides(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(user side, model side) role tags: the turns after a system prompt alternate between them."""
        return (tuple(tag for tag in (self.user_tag, self.observation_tag) if tag),
                tuple(tag for tag in (self.assistant_tag, self.function_tag) if tag))


def detect_format(row: Any) -> str | None:
    """`alpaca`, `sharegpt` or `openai` from the keys of one row; None when it has none of them."""
    if not isinstance(row, dict):
        return None
    for column in ("conversations", "messages"):
        if column in row:
            turns = row[column]
            first = turns[0] if isinstance(turns, list) and turns else None
            if isinstance(first, dict) and "role" in first:
                return "openai"
            if isinstance(first, dict) and "from" in first:
                return "sharegpt"
            return "sharegpt" if column == "conversations" else "openai"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def registration_entry(path: Path | str, fmt: str, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The `dataset_info.json` entry that makes LLaMA-Factory read `path` as format `fmt`.

    `fields`: the top-level keys the file's rows have (`check_dataset` collects them while checking and
    returns the entry as `report["registration"]`). Only present columns are named: LLaMA-Factory
    indexes every named column.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    present = set(fields)
    entry: dict[str, Any] = {"file_name": str(Path(path).resolve())}
    if fmt == "alpaca":
        columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                   "history": "history"}
        entry["columns"] = {key: name for key, name in columns.items() if name in present}
        return entry
    default, other = ("conversations", "messages") if fmt == "sharegpt" else ("messages", "conversations")
    messages = other if other in present and default not in present else default
    entry["formatting"] = "sharegpt"
    entry["columns"] = {"messages": messages, **{key: key for key in ("system", "tools") if key in present}}
    if fmt == "openai":
        entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "observation_tag": "tool", "system_tag": "system"}
    return entry


def spec_for(fmt: str, fields: Iterable[str]) -> FormatSpec:
    """The spec the kit registers a file of format `fmt` with `fields` under."""
    return FormatSpec.from_entry(registration_entry("-", fmt, fields=fields))


# ---------------------------------------------------------------- rows


@dataclass
class RowCheck:
    """What validation learnt about one row."""

    row: Any = None
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (field, kind, message)
    reasoning: bool = False
    extras: tuple[tuple[str, str], ...] = ()  # (path, JSON type) of fields LLaMA-Factory loads but does not read

    def add(self, field_name: str, kind: str, message: str) -> None:
        self.problems.append((field_name, kind, message))


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}


def json_type(value: Any) -> str:
    """The JSON name of a value as `json.loads` returns it (exactly these Python types, or dict)."""
    return _JSON_TYPES.get(type(value), "object")


def article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def parse_row(raw: bytes | str) -> tuple[Any, tuple[str, str, str] | None]:
    """(the parsed row, None) or (None, (field, kind, message)) for bad UTF-8 or bad JSON."""
    if isinstance(raw, bytes):
        try:
            text = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as err:
            return None, ("", "invalid_utf8",
                          f"invalid UTF-8 at byte {err.start + 1} of the line: save the file as UTF-8")
    else:
        text = raw
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return None, ("", "invalid_utf8", f"invalid UTF-8 at character {err.start + 1} of the row: save the file "
                                              "as UTF-8")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, ("", "invalid_json", f"invalid JSON: {err.msg} (column {err.colno})")


def check_row(raw: bytes | str, spec: FormatSpec, detected: bool) -> RowCheck:
    """Parse and validate one raw row against `spec` (`detected`: the spec came from the content)."""
    result = RowCheck()
    row, failure = parse_row(raw)
    if failure is not None:
        result.add(*failure)
        return result
    result.row = row
    if not isinstance(row, dict):
        result.add("", "not_object", f"a row must be a JSON object {{...}}, not {article(json_type(row))}")
        return result
    own = detect_format(row)
    if detected and own is None:
        result.add("", "missing_field", "this row has none of the fields of a known format: alpaca "
                                        "(instruction/output), sharegpt (conversations) or OpenAI (messages)")
        return result
    if detected and own != spec.name:
        result.add("", "mixed_formats", f"this row is {own} but the file is {spec.name} (from its first row): "
                                        "one format per file")
        return result
    if spec.formatting == "alpaca":
        _check_alpaca(row, spec, result)
    else:
        _check_turns(row, spec, result)
    if not result.problems:
        result.extras = _extra_types(row, spec)
    return result


def _string(row: dict, key: str | None, result: RowCheck, *, required: bool, nonempty: bool = False) -> str | None:
    """Check `row[key]` is a string (or absent/null when not required); return it."""
    if not key:
        return None
    value = row.get(key)
    if value is None:
        if required:
            result.add(key, "missing_field", f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        result.add(key, "wrong_type", f"{key!r} must be a string, not {article(json_type(value))}")
        return None
    if nonempty and not value.strip():
        result.add(key, "empty_field", f"{key!r} is empty")
    return value


def _reasoning_problem(item: dict, where: str) -> tuple[str, str, str] | None:
    """A reasoning field LLaMA-Factory would silently drop: a problem that says where it must go."""
    for key in REASONING_FIELDS:
        if item.get(key):
            return (f"{where}{key}", "unsupported", f"LLaMA-Factory 0.9.5 does not read {key!r}: put the reasoning "
                    "at the start of the answer as <think>...</think> (Qwen3 then trains with enable_thinking true)")
    return None


def _check_alpaca(row: dict, spec: FormatSpec, result: RowCheck) -> None:
    problem = _reasoning_problem(row, "")
    if problem is not None:
        result.add(*problem)
        return
    prompt = _string(row, spec.prompt, result, required=True)
    query = _string(row, spec.query, result, required=False)
    _string(row, spec.response, result, required=True, nonempty=True)
    _string(row, spec.system, result, required=False)
    if prompt is not None and not prompt.strip() and not (query or "").strip():
        result.add(spec.prompt or "", "empty_field", f"{spec.prompt!r} is empty (and there is no {spec.query!r})")
    history = row.get(spec.history) if spec.history else None
    if history is not None:
        if not isinstance(history, list):
            result.add(spec.history, "wrong_type", f"{spec.history!r} must be a list of [prompt, answer] pairs")
            return
        for number, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(item, str) for item in pair)):
                result.add(f"{spec.history}[{number}]", "wrong_type", "each history item must be a [prompt, answer] "
                                                                      "pair of two strings")
                return
    if spec.response and isinstance(row.get(spec.response), str) and "<think>" in row[spec.response]:
        result.reasoning = True


def _check_turns(row: dict, spec: FormatSpec, result: RowCheck) -> None:
    column = spec.messages or "conversations"
    _string(row, spec.system, result, required=False)
    _check_tools(row, spec, result)
    turns = row.get(column)
    if turns is None:
        result.add(column, "missing_field", f"missing field {column!r}")
        return
    if not isinstance(turns, list):
        result.add(column, "wrong_type", f"{column!r} must be a list of turns, not {article(json_type(turns))}")
        return
    if not turns:
        result.add(column, "empty_field", f"{column!r} is empty")
        return
    role_key, model_side = spec.role_tag or "from", spec.sides[1]
    start = 1 if isinstance(turns[0], dict) and spec.system_tag and turns[0].get(role_key) == spec.system_tag else 0
    for number, turn in enumerate(turns):
        problem = _turn_problem(turn, number, f"{column}[{number}]", start, spec, result)
        if problem is not None:
            result.add(*problem)
            return
    if len(turns) == start:
        result.add(column, "empty_field", f"{column!r} has no turn besides the system prompt")
    elif turns[-1].get(role_key) not in model_side:
        result.add(f"{column}[{len(turns) - 1}].{role_key}", "last_turn",
                   f"the last turn is {turns[-1].get(role_key)!r}: a conversation must end with "
                   f"{' or '.join(repr(tag) for tag in model_side)}")


def _turn_problem(turn: Any, number: int, where: str, start: int, spec: FormatSpec,
                  result: RowCheck) -> tuple[str, str, str] | None:
    """The first problem of turn `number` (`start`: 1 after a system prompt), else None; notes <think> answers."""
    role_key, content_key = spec.role_tag or "from", spec.content_tag or "value"
    if not isinstance(turn, dict):
        return where, "wrong_type", f"each turn must be an object with {role_key!r} and {content_key!r}"
    role, content = turn.get(role_key), turn.get(content_key)
    if role is None:
        return f"{where}.{role_key}", "missing_field", f"turn {number} has no {role_key!r}"
    if not isinstance(role, str):
        return f"{where}.{role_key}", "wrong_type", f"{role_key!r} must be a string"
    if role not in spec.roles:
        return (f"{where}.{role_key}", "unknown_role",
                f"unknown role {role!r}: one of {', '.join(repr(tag) for tag in spec.roles)}")
    if role == spec.assistant_tag and (problem := _reasoning_problem(turn, f"{where}.")):
        return problem
    if spec.name == "openai" and turn.get("tool_calls"):
        return (f"{where}.tool_calls", "unsupported", "LLaMA-Factory's reader ignores 'tool_calls': write the call "
                "as the content of a function_call turn in sharegpt format")
    if content is None:
        return f"{where}.{content_key}", "missing_field", f"turn {number} has no {content_key!r}"
    if not isinstance(content, str):
        return (f"{where}.{content_key}", "wrong_type",
                f"{content_key!r} must be a string, not {article(json_type(content))}")
    if role == spec.system_tag:
        return None if number == 0 else (f"{where}.{role_key}", "role_order",
                                          f"a {role!r} turn may only come first (turn {number})")
    expected = spec.sides[(number - start) % 2]
    if role not in expected:
        return (f"{where}.{role_key}", "role_order", f"turn {number} is {role!r} but must be "
                f"{' or '.join(repr(tag) for tag in expected)}: turns alternate user side / assistant side")
    if role in (spec.user_tag, spec.assistant_tag) and not content.strip():
        return f"{where}.{content_key}", "empty_field", f"turn {number} ({role!r}) is empty"
    if role == spec.function_tag and not _is_function_call(content):
        return (f"{where}.{content_key}", "invalid_value",
                f"a {role!r} turn must hold JSON {{\"name\": ..., \"arguments\": ...}}")
    if role == spec.assistant_tag and "<think>" in content:
        result.reasoning = True
    return None


def _is_function_call(content: str) -> bool:
    if "<tool_call>" in content or "<think>" in content:
        return True  # LLaMA-Factory extracts these forms itself
    try:
        calls = json.loads(content)
    except ValueError:
        return False
    calls = calls if isinstance(calls, list) else [calls]
    return all(isinstance(call, dict) and "name" in call and "arguments" in call for call in calls)


def _check_tools(row: dict, spec: FormatSpec, result: RowCheck) -> None:
    key = spec.tools
    tools = row.get(key) if key else None
    if tools is None:
        return
    if not isinstance(tools, str):
        result.add(key, "wrong_type", f"{key!r} must be a JSON string (json.dumps of the list of tools), "
                                      f"not {article(json_type(tools))}")
        return
    if tools.strip():
        try:
            json.loads(tools)
        except ValueError as err:
            result.add(key, "invalid_value", f"{key!r} is not valid JSON: {err}")


def _extra_types(row: dict, spec: FormatSpec) -> tuple[tuple[str, str], ...]:
    """JSON types of the fields the kit does not check one by one (one type per field for the loader)."""
    checked = {spec.prompt, spec.query, spec.response, spec.system, spec.history, spec.messages, spec.tools}
    extras = [(key, json_type(value)) for key, value in row.items() if key not in checked and value is not None]
    column = spec.messages
    if spec.formatting != "alpaca" and column and isinstance(row.get(column), list):
        known = {spec.role_tag, spec.content_tag}
        seen: dict[str, str] = {}
        for turn in row[column]:
            for key, value in turn.items():
                if key not in known and value is not None:
                    seen.setdefault(f"{column}[].{key}", json_type(value))
        extras.extend(seen.items())
    return tuple(extras)
