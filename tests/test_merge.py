"""The kit's merge path: LLaMA-Factory's export into a temporary folder, verified, then renamed.

A "trained" adapter is made in a second without torchrun: PEFT LoRA (r=8, every linear layer but
lm_head) on the tiny model with small random lora_B, saved with save_pretrained, plus the run record
(`merge_model.yaml`) that sft_train.sh writes into every adapter folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import kit_env, run_sftkit

from sftkit.launch import run_record
from sftkit.merge import chat, verify_merge
from sftkit.merge import export as merge

LORA_B_STD = 0.05


def write_run_record(adapter: Path, base: Path, template: str, thinking: bool | None) -> Path:
    """The adapter folder's merge_model.yaml, written by sftkit.launch.run_record.merge_config as for a run."""
    run = SimpleNamespace(output_dir=adapter, model_name_or_path=str(base), template=template,
                          enable_thinking=thinking)
    path = adapter / "merge_model.yaml"
    path.write_text(run_record.merge_config(run), encoding="utf-8")
    return path


def make_adapter(base: Path, out: Path, template: str, thinking: bool | None, seed: int = 0) -> Path:
    """A LoRA adapter with non-zero lora_B on every linear layer but lm_head, and its run record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    peft_model.save_pretrained(out)
    write_run_record(out, base, template, thinking)
    return out


def bf16_copy(base: Path, out: Path) -> Path:
    """The tiny model stored in bfloat16, as Qwen3-8B ships."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.is_file() and state.read_text().split(")")[-1].split()[0] == "Z")


def kill_merge_while_exporting(adapter: Path, *args: str) -> dict:
    """Start `python -m sftkit merge`, SIGKILL it while llamafactory-cli export runs; what was left."""
    partials = f".{merge.default_destination(adapter).name}.partial-*"
    process = subprocess.Popen([sys.executable, "-m", "sftkit", "merge", "--adapter", str(adapter), *args],
                               env=kit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    exporter = None
    while exporter is None and time.monotonic() < deadline and process.poll() is None:
        if list(adapter.parent.glob(f"{partials}/merge.yaml")):
            exporter = next(iter(children(process.pid)), None)
        time.sleep(0.05)
    assert exporter is not None, "the merge never started llamafactory-cli export"
    time.sleep(1.0)  # the export is running
    process.send_signal(signal.SIGKILL)
    process.wait()
    for _ in range(100):  # the export dies with the merge (PR_SET_PDEATHSIG): it cannot keep writing
        if not alive(exporter):
            break
        time.sleep(0.05)
    return {"exporter_alive": alive(exporter), "destination_exists": merge.default_destination(adapter).exists(),
            "leftovers": sorted(adapter.parent.glob(partials))}


_SHARED: dict = {}


def shared_merges(tiny_qwen3: Path, tiny_llama3: Path, tmp_path_factory) -> SimpleNamespace:
    """The real exports, made once per session (tests/test_verify_merge.py uses them too).

    - fp32, the kit's merge of a qwen3 run (thinking off), the way the demo merges: a first
      `python -m sftkit merge` is SIGKILLed while llamafactory-cli export runs, then it is run again;
    - bf16 (the real models' dtype), Llama 3 (tied embeddings): a bf16 copy of the base and a run of it,
      exported the original way (`llamafactory-cli export` of the run's merge_model.yaml) but with the
      template edited to qwen3: the weights are right, the end-of-turn token is not. It runs alongside.
    """
    if "runs" in _SHARED:
        return _SHARED["runs"]
    root = tmp_path_factory.mktemp("merges")
    adapter = make_adapter(tiny_qwen3, root / "tiny-qwen3-lora", "qwen3", False)
    bf16_base = bf16_copy(tiny_llama3, root / "tiny-llama3-bf16")
    bf16_adapter = make_adapter(bf16_base, root / "tiny-llama3-bf16-lora", "llama3", None, seed=1)
    wrong = root / "tiny-llama3-bf16-wrong-template-merged"
    config = (bf16_adapter / "merge_model.yaml").read_text().replace("template: llama3", "template: qwen3")
    (root / "wrong-template.yaml").write_text(config.replace(str(root / "tiny-llama3-bf16-merged"), str(wrong)))
    with open(root / "wrong-template-export.log", "w") as log:
        exporter = subprocess.Popen(
            [str(Path(sys.executable).parent / "llamafactory-cli"), "export", str(root / "wrong-template.yaml")],
            env=kit_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            killed = kill_merge_while_exporting(adapter, "--set", "infer_dtype=float32")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                rerun_code = merge.main(["--adapter", str(adapter), "--set", "infer_dtype=float32"])
        finally:
            export_code = exporter.wait()
    assert export_code == 0, (root / "wrong-template-export.log").read_text()[-3000:]
    _SHARED["runs"] = SimpleNamespace(
        root=root, base=tiny_qwen3, adapter=adapter, merged=merge.default_destination(adapter), killed=killed,
        rerun_code=rerun_code, rerun_output=printed.getvalue(), bf16_base=bf16_base, bf16_adapter=bf16_adapter,
        wrong=wrong,
    )
    return _SHARED["runs"]


@pytest.fixture(scope="module")
def merges(tiny_qwen3, tiny_llama3, tmp_path_factory) -> SimpleNamespace:
    return shared_merges(tiny_qwen3, tiny_llama3, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_run(tiny_qwen3, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-run")
    return make_adapter(tiny_qwen3, root / "tiny-qwen3-lora", "qwen3", False)


# ---------------------------------------------------------------- settings (no export)


def test_settings_come_from_the_run_record(qwen3_run, tiny_qwen3):
    settings = merge.load_config(qwen3_run, None, ["infer_dtype=float32"])
    assert settings["template"] == "qwen3" and settings["enable_thinking"] is False
    assert settings["model_name_or_path"] == str(tiny_qwen3)
    assert settings["adapter_name_or_path"] == str(qwen3_run)
    assert settings["infer_dtype"] == "float32"
    assert "export_dir" not in settings  # the kit exports to a temporary folder, then renames
    assert merge.default_destination(qwen3_run) == qwen3_run.parent / "tiny-qwen3-merged"


@pytest.mark.parametrize("override", ["template=llama3", "template=qwen3_nothink", "enable_thinking=true"])
def test_a_template_or_thinking_other_than_the_runs_is_refused_unless_forced(qwen3_run, override):
    with pytest.raises(merge.MergeError, match="differs from the run's .*--force-template"):
        merge.load_config(qwen3_run, None, [override])
    key, value = override.split("=")
    assert str(merge.load_config(qwen3_run, None, [override], force_template=True)[key]).lower() == value


def test_another_config_file_cannot_change_the_template_either(qwen3_run, tmp_path):
    other = tmp_path / "merge_model.yaml"
    other.write_text("model_name_or_path: x\ntemplate: llama3\n", encoding="utf-8")
    with pytest.raises(merge.MergeError, match="template 'llama3' differs from the run's 'qwen3'"):
        merge.load_config(qwen3_run, other, [])


def test_any_checkpoint_of_a_run_merges_with_the_runs_record(qwen3_run):
    checkpoint = qwen3_run / "checkpoint-5"
    checkpoint.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(qwen3_run / name, checkpoint / name)
    settings = merge.load_config(checkpoint, None, [])
    assert settings["template"] == "qwen3" and settings["enable_thinking"] is False
    assert settings["adapter_name_or_path"] == str(checkpoint)
    assert merge.default_destination(checkpoint) == qwen3_run.parent / "tiny-qwen3-checkpoint-5-merged"


def test_an_existing_destination_is_never_overwritten_without_overwrite(qwen3_run, tmp_path):
    out = tmp_path / "tiny-qwen3-merged"
    out.mkdir()
    (out / "keep.txt").write_text("a finished model\n")
    result = run_sftkit("merge", "--adapter", str(qwen3_run), "--out", str(out))
    assert result.returncode == 1
    assert "already exists: pass --overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "a finished model\n"
    assert not list(tmp_path.glob(".*partial*"))


def test_user_errors_are_one_clear_line(tmp_path):
    result = run_sftkit("merge", "--adapter", str(tmp_path / "missing-lora"))
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "not-an-adapter").mkdir()
    result = run_sftkit("merge", "--adapter", str(tmp_path / "not-an-adapter"), "--set", "model_name_or_path=x")
    assert result.returncode == 1 and "no adapter_config.json" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- failures leave nothing


FAKE_EXPORT = """
import shutil, sys, yaml
settings = yaml.safe_load(open(sys.argv[1]))
shutil.copytree(settings["model_name_or_path"], settings["export_dir"])  # LLaMA-Factory #9051: base weights
"""


def test_a_merge_that_fails_verification_leaves_nothing_under_the_final_name(qwen3_run, tmp_path, monkeypatch):
    """An export that writes the base weights (LLaMA-Factory #9051) is caught, and never renamed into place."""
    script = tmp_path / "fake_export.py"
    script.write_text(FAKE_EXPORT, encoding="utf-8")
    monkeypatch.setattr(merge, "export_command", lambda: [sys.executable, str(script)])
    out = tmp_path / "tiny-qwen3-merged"
    settings = merge.load_config(qwen3_run, None, ["infer_dtype=float32"])
    with pytest.raises(merge.MergeError, match=r"failed verification \(.*same-as-base.*\); .* was not written"):
        merge.merge(qwen3_run, out, settings, overwrite=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".tiny-qwen3-merged.*"))


PEFT_EXPORT = """
import shutil, sys, yaml, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
settings = yaml.safe_load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(settings["model_name_or_path"], dtype=torch.float32)
merged = PeftModel.from_pretrained(model, settings["adapter_name_or_path"]).merge_and_unload()
merged.save_pretrained(settings["export_dir"])
AutoTokenizer.from_pretrained(settings["model_name_or_path"]).save_pretrained(settings["export_dir"])
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_good_merge_whose_behaviour_check_cannot_run_is_kept(qwen3_run, tmp_path, monkeypatch, capsys):
    """No GPU for --device cuda: a resource problem. The proven merge is renamed into place, and says so."""
    script = tmp_path / "peft_export.py"
    script.write_text(PEFT_EXPORT, encoding="utf-8")
    monkeypatch.setattr(merge, "export_command", lambda: [sys.executable, str(script)])
    out = tmp_path / "tiny-qwen3-merged"
    code = merge.main(["--adapter", str(qwen3_run), "--out", str(out), "--set", "infer_dtype=float32",
                       "--device", "cuda"])
    printed = capsys.readouterr()
    assert code == 3 and f"merged model: {out} (not fully verified)" in printed.out
    assert "weights: proven: 14 LoRA targets" in printed.out
    assert re.search(r"is in place, but not fully verified: --device cuda, but torch sees no GPU.*python -m sftkit "
                     "verify-merge --base", printed.err) and "Traceback" not in printed.err
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".tiny-qwen3-merged.*"))
    record = json.loads((out / chat.MERGE_RECORD).read_text())
    assert record["verified"]["weights_proof"]["ok"] and record["verified"]["behaviour"] == "not run: no GPU"
    assert record["verified"]["max_abs_logit_diff"] is None and "torch sees no GPU" in record["unverified"][0]
    # checked again where the behaviour check fits, the kept merge passes it
    assert verify_merge.verify(Path(record["model_name_or_path"]), qwen3_run, out, device="cpu")["ok"]


def test_killed_merge_leaves_no_merged_folder_and_a_rerun_finishes_it(merges, capsys):
    """SIGKILL `python -m sftkit merge` while llamafactory-cli export runs; then run the same merge again."""
    killed = merges.killed
    assert not killed["exporter_alive"], "the export outlived the killed merge"
    assert not killed["destination_exists"]
    [leftover] = killed["leftovers"]  # the temporary folder, hidden, never the final name

    assert merges.rerun_code == 0, merges.rerun_output
    assert f"removing {leftover}" in merges.rerun_output and "verify-merge: ok" in merges.rerun_output
    assert (merges.merged / "model.safetensors").is_file() and not leftover.exists()
    assert not list(merges.root.glob(f".{merges.merged.name}.*"))
    record = json.loads((merges.merged / chat.MERGE_RECORD).read_text())
    assert record["template"] == "qwen3" and record["enable_thinking"] is False
    assert record["adapter_name_or_path"] == str(merges.adapter)
    verified = record["verified"]
    assert verified["merged_dtype"] == "float32" and verified["differs_from_base"] is True
    assert verified["max_abs_logit_diff"] <= verified["tolerance"]
    assert verified["weights_proof"]["ok"] and verified["weights_proof"]["lora_targets"] == 14
    assert verified["behaviour"].startswith("on cpu in float32") and "unverified" not in record

    # the chat smoke test on the merged model: its own template, the recorded thinking setting
    capsys.readouterr()
    assert chat.main(["--model", str(merges.merged), "--prompt", "How do I run the demo?",
                      "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "enable_thinking: false" in printed and "assistant:" in printed
    served = (merges.merged / "chat_template.jinja").read_text()
    assert served.startswith("{#- " + merge.THINKING_MARK + "false")
    assert merge.served_template.TRAINED_MARK + " 'qwen3'" in served  # the training template, not Qwen3's own


def test_chat_user_errors_are_one_clear_line(qwen3_run, tmp_path):
    result = run_sftkit("chat", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    result = run_sftkit("chat", "--model", str(qwen3_run), "--prompt", "hi")
    assert result.returncode == 1 and "an adapter: merge it first" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_merge_uses_the_parent_run_record_for_a_checkpoint(qwen3_run):
    checkpoint = qwen3_run / "checkpoint-5"
    checkpoint.mkdir(exist_ok=True)
    assert verify_merge.run_record_path(checkpoint) == qwen3_run / "merge_model.yaml"
    assert verify_merge.run_record_path(qwen3_run.parent / "other") is None


def test_leftovers_of_a_killed_merge_are_tidied_and_a_running_merge_is_respected(tmp_path, capsys):
    out = tmp_path / "tiny-qwen3-merged"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that is surely dead once waited for
    dead.wait()
    partial = tmp_path / f".{out.name}.partial-{dead.pid}-abc"
    old = tmp_path / f".{out.name}.old-{dead.pid}"
    for folder in (partial, old):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    merge.clean_leftovers(out)
    assert not partial.exists() and not old.exists()
    assert (out / "config.json").is_file()  # the finished model an --overwrite merge was replacing, put back
    assert "put back" in capsys.readouterr().out

    running = tmp_path / f".{out.name}.partial-{os.getppid()}-xyz"  # a live process that is not this one
    running.mkdir()
    with pytest.raises(merge.MergeError, match="another merge into .* is running"):
        merge.clean_leftovers(out)
    assert running.is_dir()
