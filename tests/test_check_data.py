"""check-data: formats, problems with their places, the skip policy, the tokenized cache, several datasets,
the validation split, the thinking setting, and agreement with LLaMA-Factory.

The tokenized dataset the check saves (what training loads) is compared token by token with
LLaMA-Factory's own `get_dataset` on the same file, tokenizer, template and cutoff (the tiny models
carry the real special tokens and templates).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REFERENCE_DATA, kit_env, run_sftkit

from sftkit import models
from sftkit.data import check_data, data_formats, data_report, records, tokenized, validate
from sftkit.data.check_data import check_dataset, run_check

TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}])
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})

# ../shared/reference-data is real data written by others; a user's clone does not have it, so the
# tests that read it run only where it is (this machine, CI) and skip elsewhere.
needs_reference = pytest.mark.skipif(not REFERENCE_DATA.is_dir(), reason="no ../shared/reference-data here")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca(number: int) -> dict:
    return {"instruction": f"Question number {number}?", "input": "", "output": f"Answer {number}."}


def lf_dataset(dataset_dir: Path, name: str, model_dir: Path, template: str, cutoff: int, tmp: Path, **extra):
    """LLaMA-Factory's own get_dataset: its train split."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(stage="sft", do_train=True, model_name_or_path=str(model_dir), template=template,
                dataset=name, dataset_dir=str(dataset_dir), cutoff_len=cutoff, output_dir=str(tmp / "lf-out"),
                overwrite_cache=True, cache_dir=str(tmp / "hf-cache"), report_to="none", **extra)
    if template == "qwen3":
        args["enable_thinking"] = False
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    return get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tokenizer_module)[
        "train_dataset"]


def lf_encode(dataset_dir: Path, name: str, model_dir: Path, template: str, cutoff: int, tmp: Path,
              **extra) -> tuple[list[int], list[int]]:
    """Per-row (sequence lengths, trainable label counts) from LLaMA-Factory's own get_dataset."""
    from llamafactory.extras.constants import IGNORE_INDEX

    train = lf_dataset(dataset_dir, name, model_dir, template, cutoff, tmp, **extra)
    labels = [len(row) - row.count(IGNORE_INDEX) for row in train["labels"]]
    return [len(row) for row in train["input_ids"]], labels


def saved(report: dict, split: str = "train"):
    """The tokenized dataset the check saved (what training loads with --tokenized_path)."""
    from datasets import load_from_disk

    return load_from_disk(report["tokenized_path"])[split]


def register(tmp: Path, entry: dict) -> Path:
    """A dataset_info.json holding `entry` as 'mine' (how the launcher registers a file for a run)."""
    folder = tmp / "registered"
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps({"mine": entry}), encoding="utf-8")
    return folder


# ---------------------------------------------------------------- formats and registration


def test_detect_format_and_registration(tmp_path):
    assert data_formats.detect_format(alpaca(1)) == "alpaca"
    assert data_formats.detect_format({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert data_formats.detect_format({"messages": [{"role": "user", "content": "x"}]}) == "openai"
    assert data_formats.detect_format({"text": "x"}) is None

    path = tmp_path / "a.jsonl"
    entry = data_formats.registration_entry(path, "alpaca", fields=["instruction", "output", "history"])
    assert entry == {"file_name": str(path.resolve()),
                     "columns": {"prompt": "instruction", "response": "output", "history": "history"}}
    entry = data_formats.registration_entry(path, "sharegpt", fields=["conversations", "tools"])
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "conversations", "tools": "tools"}
    entry = data_formats.registration_entry(path, "openai", fields=["messages", "system"])
    assert entry["columns"] == {"messages": "messages", "system": "system"}
    assert entry["tags"]["role_tag"] == "role" and entry["tags"]["observation_tag"] == "tool"
    assert data_formats.registration_entry(path, "openai", fields=["messages", "tools", "x"])["columns"] == {
        "messages": "messages", "tools": "tools"}


@needs_reference
def test_json_array_is_read_in_small_pieces(monkeypatch):
    path = REFERENCE_DATA / "identity.json"
    whole = [record.raw for record in records.iter_records(path)]
    monkeypatch.setattr(records, "READ_CHUNK", 7)  # rows, strings and numbers split across reads
    pieces = list(records.iter_records(path))
    assert [record.raw for record in pieces] == whole
    assert [json.loads(raw) for raw in whole] == json.loads(path.read_text(encoding="utf-8"))
    assert [record.index for record in pieces[:3]] == [0, 1, 2]
    text = path.read_text(encoding="utf-8")
    for record in pieces[:5]:
        assert record.line == text.count("\n", 0, text.index(record.raw)) + 1


# ---------------------------------------------------------------- agreement with LLaMA-Factory


def _format_rows() -> dict[str, list]:
    long_text = " ".join(f"word{number}" for number in range(60))
    return {
        "alpaca": [
            alpaca(1),
            {"instruction": "Summarise", "input": long_text, "output": "Words.", "system": "Be brief."},
            {"instruction": "And then?", "input": "", "output": long_text,
             "history": [["First?", "One."], ["Second?", "Two."]]},
        ],
        "sharegpt": [
            {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": CALL},
                               {"from": "observation", "value": "{\"temp\": 20}"},
                               {"from": "gpt", "value": "It is 20 degrees."}], "tools": TOOLS},
            {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": long_text},
                               {"from": "gpt", "value": long_text}], "tools": ""},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
        ],
        "openai": [
            {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": CALL}, {"role": "tool", "content": "{\"temp\": 20}"},
                          {"role": "assistant", "content": "20 degrees."}], "tools": TOOLS},
            {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": long_text}]},
        ],
    }


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "openai"])
def test_each_format_agrees_with_llamafactory(fmt, tmp_path, tiny_qwen3):
    """The dataset the check saves for training is LLaMA-Factory's get_dataset of the file, token for token."""
    rows = _format_rows()[fmt]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    result = run_check(path, str(tiny_qwen3), cutoff_len=64, cache_dir=tmp_path / "cache")
    report = result.report
    assert report["ok"], report["problems"]
    assert report["format"] == fmt and report["rows"] == len(rows) and report["problems"] == []
    assert report["over_cutoff"] >= 1 and report["tokens"]["max"] == 64
    reference = lf_dataset(register(tmp_path, report["registration"]), "mine", tiny_qwen3, "qwen3", 64, tmp_path)
    ours = saved(report)
    assert ours["input_ids"] == reference["input_ids"] and ours["labels"] == reference["labels"]
    assert result.arrays["tokens"].tolist() == [len(ids) for ids in reference["input_ids"]]
    assert result.arrays["trainable"].tolist() == [sum(label != -100 for label in labels)
                                                   for labels in reference["labels"]]


def test_options_llama3_and_packing_agree_with_llamafactory(tmp_path, tiny_llama3):
    rows = _format_rows()["sharegpt"] * 3
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run_check(path, str(tiny_llama3), cutoff_len=48, lf_options={"mask_history": True})
    assert result.report["template"] == "llama3"
    folder = register(tmp_path, result.report["registration"])
    lengths, labels = lf_encode(folder, "mine", tiny_llama3, "llama3", 48, tmp_path, mask_history=True)
    assert (result.arrays["tokens"].tolist(), result.arrays["trainable"].tolist()) == (lengths, labels)

    # one process packs as LLaMA-Factory without preprocessing_num_workers (each process packs its shard)
    packed = run_check(path, str(tiny_llama3), cutoff_len=300, lf_options={"packing": True}, gpus=1, batch=1,
                       grad_accum=1, workers=1).report
    lf_packed, _ = lf_encode(folder, "mine", tiny_llama3, "llama3", 300, tmp_path, packing=True)
    assert packed["packed_sequences"] == len(lf_packed) == packed["steps_per_epoch"]

    # neat packing in 2 processes: the saved rows are LLaMA-Factory's own, column for column
    neat = run_check(path, str(tiny_llama3), cutoff_len=300, lf_options={"neat_packing": True}, workers=2,
                     cache_dir=tmp_path / "neat")
    theirs = lf_dataset(folder, "mine", tiny_llama3, "llama3", 300, tmp_path, neat_packing=True,
                        preprocessing_num_workers=2)
    ours = saved(neat.report)
    assert ours.column_names == theirs.column_names and len(ours) == len(theirs) == neat.report["packed_sequences"]
    assert all(ours[name] == theirs[name] for name in theirs.column_names)
    assert neat.arrays["tokens"].sum() == sum(len(mask) - mask.count(0) for mask in theirs["attention_mask"])


def test_text_model_tokenizer_is_llamafactorys(tiny_qwen3, tiny_llama3):
    """The check loads a text model's tokenizer through LLaMA-Factory's own load_tokenizer: the same one."""
    from llamafactory.model import load_tokenizer

    text = "<|im_start|>user\nHello <think>x</think> world<|im_end|><|eot_id|>"
    for folder in (tiny_qwen3, tiny_llama3):
        model_args, _, _ = tokenized.parse_arguments(str(folder), {"dataset": "x"})
        ours, theirs = tokenized.load_tokenizer(model_args), load_tokenizer(model_args)
        assert ours["processor"] is None and theirs["processor"] is None
        assert type(ours["tokenizer"]) is type(theirs["tokenizer"])
        assert ours["tokenizer"].get_vocab() == theirs["tokenizer"].get_vocab()
        assert ours["tokenizer"].encode(text) == theirs["tokenizer"].encode(text)
        assert ours["tokenizer"].padding_side == theirs["tokenizer"].padding_side == "right"


@needs_reference
@pytest.mark.parametrize("name,rows", [("alpaca_en_demo", 999), ("alpaca_zh_demo", 1000),
                                       ("glaive_toolcall_en_demo", 300), ("identity", 91)])
def test_reference_files_acceptance(name, rows, tmp_path, tiny_qwen3):
    """--model demo (its template and cutoff_len 256) on the four reference files: LF's numbers exactly."""
    result = run_check(REFERENCE_DATA / f"{name}.json", "demo", model_path=tiny_qwen3)
    report = result.report
    assert report["ok"] and report["rows"] == rows and report["invalid_rows"] == 0
    assert (report["template"], report["enable_thinking"], report["cutoff_len"]) == ("qwen3", False, 256)
    lengths, labels = lf_encode(REFERENCE_DATA, name, tiny_qwen3, "qwen3", 256, tmp_path)
    assert result.arrays["tokens"].tolist() == lengths
    assert result.arrays["trainable"].tolist() == labels
    assert report["tokens"]["max"] == max(lengths)
    assert report["total_tokens"] == sum(lengths) and report["trainable_tokens"] == sum(labels)


# ---------------------------------------------------------------- problems and their places


def test_each_problem_kind_names_its_line(tmp_path, tiny_qwen3):
    good = alpaca(0)
    lines = [
        json.dumps(good),                                                         # 1 ok
        '{"instruction": "a", "output": "b"',                                     # 2 invalid JSON
        "[1, 2]",                                                                 # 3 not an object
        json.dumps({"instruction": "a"}),                                         # 4 missing field
        json.dumps({"instruction": "a", "output": "  "}),                         # 5 empty field
        json.dumps({"instruction": "a", "output": 5}),                            # 6 wrong type
        json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}),  # 7 mixed
        json.dumps(dict(good, id=1)),                                             # 8 ok
        json.dumps(dict(good, id="x")),                                           # 9 type differs
        json.dumps(good),                                                         # 10 duplicate of 1
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "b"}\n')  # 11 UTF-8
    report = check_dataset(path, str(tiny_qwen3), max_problems=20)
    assert not report["ok"]
    found = [(item["line"], item["kind"], item["field"]) for item in report["problems"]]
    assert found == [(2, "invalid_json", ""), (3, "not_object", ""), (4, "missing_field", "output"),
                     (5, "empty_field", "output"), (6, "wrong_type", "output"), (7, "mixed_formats", ""),
                     (9, "inconsistent_type", "id"), (11, "invalid_utf8", "")]
    assert report["invalid_rows"] == 8 and report["rows"] == 3 and report["duplicate_rows"] == 1
    assert report["problem_counts"]["invalid JSON"] == 1


def test_conversation_problems(tmp_path, tiny_qwen3):
    def chat(*turns):
        return {"conversations": [{"from": role, "value": text} for role, text in turns]}

    rows = [
        chat(("human", "a"), ("gpt", "b")),                                       # line 1 ok
        chat(("human", "a"), ("human", "b"), ("gpt", "c")),                       # 2 roles out of order
        chat(("human", "a"), ("gpt", "b"), ("human", "c")),                       # 3 last turn
        chat(("human", "a"), ("bot", "b")),                                       # 4 unknown role
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},    # 5 missing value
        chat(("human", "a"), ("function_call", "not json"), ("observation", "x"), ("gpt", "y")),  # 6 bad call
        {"conversations": "hello"},                                               # 7 wrong type
        dict(chat(("human", "a"), ("gpt", "b")), tools=[{"name": "x"}]),          # 8 tools not a string
        chat(("human", "a"), ("gpt", "b"), ("system", "late")),                   # 9 system not first
    ]
    report = check_dataset(write_jsonl(tmp_path / "chat.jsonl", rows), str(tiny_qwen3))
    found = [(item["line"], item["kind"], item["field"]) for item in report["problems"]]
    assert found == [(2, "role_order", "conversations[1].from"), (3, "last_turn", "conversations[2].from"),
                     (4, "unknown_role", "conversations[1].from"), (5, "missing_field", "conversations[0].value"),
                     (6, "invalid_value", "conversations[1].value"), (7, "wrong_type", "conversations"),
                     (8, "wrong_type", "tools"), (9, "role_order", "conversations[2].from")]

    messages = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                                                 "tool_calls": [{"function": {"name": "x"}}]}]}]
    report = check_dataset(write_jsonl(tmp_path / "calls.jsonl", messages), str(tiny_qwen3))
    assert [(item["line"], item["kind"]) for item in report["problems"]] == [(1, "unsupported")]


def test_json_array_places_are_row_indexes(tmp_path, tiny_qwen3):
    rows = [alpaca(0), "not an object", alpaca(2), {"instruction": "x", "output": ""}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    report = check_dataset(path, str(tiny_qwen3))
    assert report["places"] == "row (0-based index)"
    assert [(item["row"], item["kind"]) for item in report["problems"]] == [(1, "not_object"), (3, "empty_field")]
    assert "line" not in report["problems"][0]

    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "b"}]')
    report = check_dataset(latin, str(tiny_qwen3))
    assert [(item["row"], item["kind"]) for item in report["problems"]] == [(1, "invalid_utf8")]

    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]\n')
    report = check_dataset(broken, str(tiny_qwen3), skip_invalid=True)
    assert not report["ok"] and report["unreadable"] and report["rows_read"] == 1
    assert report["problems"][0]["row"] == 1 and "line 3" in report["problems"][0]["message"]

    for name, text in (("empty.jsonl", ""), ("blank.json", "  \n"), ("none.json", "[]")):
        (tmp_path / name).write_text(text)
        report = check_dataset(tmp_path / name, str(tiny_qwen3))
        assert not report["ok"] and report["problems"][0]["kind"] == "empty_file", name


# ---------------------------------------------------------------- skip policy, the acceptance file, the CLI


def test_one_broken_line_in_a_thousand(tmp_path, tiny_qwen3, capfd):
    lines = [json.dumps(alpaca(number)) for number in range(1000)]
    lines.insert(499, '{"instruction": "broken", "output": ')  # line 500
    path = tmp_path / "thousand.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [str(path), "--model", "demo", "--model-path", str(tiny_qwen3), "--no-progress"]

    cache = tmp_path / "run" / "sftkit"
    assert check_data.main([*common, "--cache-dir", str(cache)]) == 1
    err = capfd.readouterr().err
    assert f"{path}:500: invalid JSON" in err and "--skip-invalid" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a check that fails writes nothing

    assert check_data.main([*common, "--json", "--skip-invalid", "--cache-dir", str(cache)]) == 0
    out = capfd.readouterr().out
    report = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1
    assert report["ok"] and report["rows"] == 1000 and report["dropped_rows"] == 1 and report["invalid_rows"] == 1
    assert report["problems"][0]["line"] == 500
    assert report["steps_per_epoch"] == 125  # demo: 2 processes x batch 4 x grad-accum 1
    clean = Path(report["data_file"])
    assert clean.parent == cache and clean != path
    assert len(clean.read_text(encoding="utf-8").splitlines()) == 1000
    assert report["registration"]["file_name"] == str(clean.resolve())
    assert len(saved(report)) == 1000 and report["train_rows"] == 1000  # trained without the broken line


@needs_reference
def test_cli_json_in_a_fresh_process(tiny_qwen3, tmp_path):
    plot_dir = tmp_path / "plots"
    done = run_sftkit("check-data", str(REFERENCE_DATA / "identity.json"), "--model", "demo",
                      "--model-path", str(tiny_qwen3), "--json", "--plot-dir", str(plot_dir),
                      env=kit_env(TOKENIZERS_PARALLELISM="false"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for key in ("model", "template", "format", "rows", "invalid_rows", "dropped_rows", "duplicate_rows", "problems",
                "tokens", "over_cutoff", "no_trainable_tokens", "steps_per_epoch"):
        assert key in report, key
    assert report["rows"] == 91 and set(report["tokens"]) == {"p50", "p90", "p99", "max"}
    assert (plot_dir / "token_lengths.png").stat().st_size > 1000

    missing = run_sftkit("check-data", str(tmp_path / "nope.jsonl"), "--model", "demo")
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_a_model_folder_found_under_the_kit_is_passed_on_as_a_path_that_holds_anywhere(tiny_qwen3, tmp_path,
                                                                                        monkeypatch):
    """The one resolver looks for `saves/demo` here, then in the kit's folder: what it found is what training gets."""
    kit = tmp_path / "kit"
    shutil.copytree(tiny_qwen3, kit / "saves" / "demo")
    monkeypatch.setattr(models, "KIT_DIR", kit)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)  # no saves/ here
    for choice in (models.resolve("demo"), models.resolve("saves/demo")):
        assert Path(choice.path).is_absolute() and Path(choice.path).samefile(kit / "saves" / "demo"), choice
        assert choice.local_dir.samefile(kit / "saves" / "demo")
    shutil.copytree(tiny_qwen3, user / "saves" / "demo")  # a folder that exists as given is passed on as given
    assert models.resolve("demo").path == "saves/demo" and models.resolve("saves/demo").path == "saves/demo"


def test_hub_only_preset_checks_rows_without_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "hub_cache_dir", lambda hub_id: None)
    report = check_dataset(write_jsonl(tmp_path / "a.jsonl", [alpaca(1), alpaca(2)]), "qwen3-14b")
    assert report["ok"] and report["rows"] == 2 and report["tokens"] is None
    assert report["model"] == "Qwen/Qwen3-14B" and "token report is skipped" in report["notes"][0]
    assert report["steps_per_epoch"] == 1 and report["cutoff_len"] == 20480
    # without a tokenizer, the template is still LLaMA-Factory's and a user-set thinking switch must exist on it
    with pytest.raises(tokenized.PreprocessError, match="template 'llama3' has no thinking switch"):
        check_dataset(tmp_path / "a.jsonl", "llama3.2-3b", enable_thinking=True)
    with pytest.raises(tokenized.PreprocessError, match="'qwen4' is not a LLaMA-Factory template"):
        check_dataset(tmp_path / "a.jsonl", "qwen3-14b", template="qwen4")
    assert check_dataset(tmp_path / "a.jsonl", "qwen3-14b", enable_thinking=True)["ok"]


# ---------------------------------------------------------------- cache and workers


def test_cache_key_and_second_run_tokenizes_nothing(tmp_path, tiny_qwen3, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [alpaca(number) for number in range(50)])
    cache = tmp_path / "cache"
    first = check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache)
    assert not first["cached"] and first["tokenized_path"] == str(cache / f"tokenized-{first['cache_key']}")
    assert check_data.tokenized_path("saves/x-lora", "k") == Path("saves/x-lora/sftkit/tokenized-k")
    assert sorted(p.name for p in cache.iterdir()) == [f"tokenized-{first['cache_key']}"]  # nothing half-written

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized on a cached run")

    monkeypatch.setattr(tokenized, "tokenize", no_tokenizing)
    second = check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache, gpus=1)
    assert second["cached"] and second["cache_key"] == first["cache_key"]
    assert second["tokens"] == first["tokens"] and second["rows"] == 50
    assert second["steps_per_epoch"] == 4  # recomputed for this call: 50 rows / (1 x 2) / 8
    monkeypatch.undo()

    # every input of LLaMA-Factory's preprocessing is in the key (one tokenizing worker: a pool costs more than 50 rows)
    keys = {first["cache_key"]}
    for change in ({"cutoff_len": 128}, {"enable_thinking": True}, {"template": "qwen"},
                   {"lf_options": {"packing": True}}, {"lf_options": {"val_size": 0.1}},
                   {"lf_options": {"train_on_prompt": True}}):
        keys.add(check_dataset(path, str(tiny_qwen3), **{"cutoff_len": 256, "workers": 1, **change})["cache_key"])
    two = check_dataset(f"{path},demo", str(tiny_qwen3), cutoff_len=256, workers=1)
    interleaved = check_dataset(f"{path},demo", str(tiny_qwen3), cutoff_len=256, workers=1, lf_options={
        "mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5"})
    keys |= {two["cache_key"], interleaved["cache_key"]}
    path.write_text(path.read_text() + json.dumps(alpaca(99)) + "\n")
    changed = check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache)
    keys.add(changed["cache_key"])
    assert len(keys) == 10 and not changed["cached"]
    assert sorted(p.name for p in cache.iterdir()) == [f"tokenized-{changed['cache_key']}"]  # the older key pruned


def test_a_cut_short_cache_is_set_aside_and_rebuilt(tmp_path, tiny_qwen3):
    """LLaMA-Factory loads any non-empty tokenized_path: the kit never hands it a partial one."""
    path = write_jsonl(tmp_path / "a.jsonl", [alpaca(number) for number in range(30)])
    cache = tmp_path / "cache"
    first = check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache)
    for arrow in Path(first["tokenized_path"]).rglob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    again = check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache)
    assert not again["cached"] and again["tokenized_path"] == first["tokenized_path"]
    assert any("was not whole" in note and "set aside" in note for note in again["notes"]), again["notes"]
    assert len(saved(again)) == 30
    assert sorted(p.name for p in cache.iterdir()) == [Path(first["tokenized_path"]).name]  # set-aside one pruned
    assert check_dataset(path, str(tiny_qwen3), cutoff_len=256, cache_dir=cache)["cached"]


def test_workers_give_the_same_report(tmp_path, tiny_qwen3):
    rows = [alpaca(number % 300) for number in range(700)]
    rows[10] = {"instruction": "x"}
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    serial = run_check(path, str(tiny_qwen3), cutoff_len=32, workers=1, skip_invalid=True, cache_dir=tmp_path / "one")
    parallel = run_check(path, str(tiny_qwen3), cutoff_len=32, workers=2, skip_invalid=True,
                         cache_dir=tmp_path / "two")
    assert saved(parallel.report)["input_ids"] == saved(serial.report)["input_ids"]
    for report in (serial.report, parallel.report):
        for key in ("tokenized_path", "data_file", "registration", "datasets"):
            report.pop(key)
    assert parallel.report == serial.report
    assert serial.report["problems"][0]["line"] == 11 and serial.report["duplicate_rows"] == 399


def test_several_datasets_validation_split_and_thinking(tmp_path, tiny_qwen3):
    chat = [{"messages": [{"role": "user", "content": f"Why {number}?"},
                          {"role": "assistant", "content": f"<think>Because {number}.</think>It is so."}]}
            for number in range(10)]
    first = write_jsonl(tmp_path / "a.jsonl", [alpaca(number) for number in range(12)])
    second = tmp_path / "b.json"
    second.write_text(json.dumps(chat), encoding="utf-8")
    report = check_dataset(f"{first},{second},demo", "demo", model_path=tiny_qwen3, lf_options={"val_size": 0.25},
                           cache_dir=tmp_path / "cache")
    assert report["ok"] and [part["rows"] for part in report["datasets"]] == [12, 10, 40] and report["rows"] == 62
    assert [part["format"] for part in report["datasets"]] == ["alpaca", "openai", "alpaca"]
    assert report["eval_rows"] == 16 and report["train_rows"] == 46  # LLaMA-Factory's split: ceil(62 x 0.25)
    assert len(saved(report, "validation")) == 16 and len(saved(report)) == 46
    assert report["steps_per_epoch"] == 6  # the demo: 2 processes x batch 4
    # the answers carry reasoning and enable_thinking was not set: Qwen3 trains it
    assert report["enable_thinking"] is True and report["thinking"] == "from the data"
    assert any("<think>" in note for note in report["notes"])
    kept = check_dataset(second, "demo", model_path=tiny_qwen3, enable_thinking=False)
    assert kept["enable_thinking"] is False and "drops" in " ".join(kept["notes"])

    field = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]}])
    report = check_dataset(field, "demo", model_path=tiny_qwen3)
    assert not report["ok"] and report["problems"][0]["kind"] == "unsupported"
    assert "<think>" in report["problems"][0]["message"]


def test_registered_name_and_steps(tiny_qwen3):
    report = check_dataset("demo", "demo", model_path=tiny_qwen3)  # data/dataset_info.json's 'demo'
    assert report["ok"] and report["dataset"] == "demo" and report["rows"] == 40 and report["format"] == "alpaca"
    assert report["steps_per_epoch"] == 5  # the demo preset: 2 processes x batch 4 x grad-accum 1
    assert data_report.steps(40, batch=4, world=2, grad_accum=1) == 5
    assert data_report.steps(1000, batch=2, world=4, grad_accum=8) == 16  # 125 batches per rank / 8, rounded up
    assert data_report.steps(1, batch=2, world=4, grad_accum=8) == 1
    with pytest.raises(validate.SourceError, match="not found"):
        check_dataset("no-such-dataset", "demo")
    with pytest.raises(models.ModelError, match="neither a preset"):
        check_dataset("demo", "no-such-model")
