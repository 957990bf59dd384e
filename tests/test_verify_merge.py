"""verify-merge: passes on a good merge, and names the problem on each way a merge goes wrong.

The real exports come from tests/test_merge.py's `shared_merges` (made once per session): the kit's
float32 merge of a qwen3 run, and a bf16 run exported the original way with the template edited to
llama3. The other broken variants are copies of the good merge (or of its adapter) with one thing broken.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_sftkit
from safetensors.torch import load_file, save_file
from test_merge import shared_merges

from sftkit.merge import merge_behaviour, verify_merge

REQUIRED_KEYS = {"ok", "max_abs_logit_diff", "tolerance", "greedy_match", "differs_from_base", "eos_ok", "problems",
                 "weights_proof", "behaviour"}


@pytest.fixture(scope="module")
def run(tiny_qwen3, tiny_llama3, tmp_path_factory):
    return shared_merges(tiny_qwen3, tiny_llama3, tmp_path_factory)


def verify(run, adapter=None, merged=None, behaviour="auto") -> dict:
    report = verify_merge.verify(run.base, adapter or run.adapter, merged or run.merged, device="cpu",
                                 behaviour=behaviour)
    assert REQUIRED_KEYS <= set(report)
    return report


def names(report: dict) -> set[str]:
    return {p["name"] for p in report["problems"]}


def copy_adapter(run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.adapter, tmp_path / "tiny-qwen3-lora"))


def copy_merged(run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.merged, tmp_path / "tiny-qwen3-merged"))


# ---------------------------------------------------------------- a good merge


def test_a_good_merge_passes_and_json_is_one_object_on_stdout(run, capfd):
    capfd.readouterr()
    code = verify_merge.main(["--base", str(run.base), "--adapter", str(run.adapter), "--merged", str(run.merged),
                              "--device", "cpu", "--json"])
    out = capfd.readouterr().out
    report = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert out.strip().startswith("{") and out.count("\n") == 1
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert REQUIRED_KEYS <= set(report)
    proof = report["weights_proof"]  # 7 linears x 2 layers; 4 norms x 2 layers + final norm + embed + lm_head
    assert proof["ok"] and proof["lora_targets"] == 14 and proof["identical"] == 11 and proof["tensors"] == 25
    assert proof["max_error_over_tolerance"] <= 1.0
    assert report["behaviour"]["ran"] and report["behaviour"]["device"] == "cpu"
    assert report["behaviour"]["dtype"] == "float32"
    assert report["merged_dtype"] == "float32" and report["tolerance"] == pytest.approx(
        merge_behaviour.tolerance_for("float32", report["max_abs_logit"]))
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["greedy_match"] is True and report["differs_from_base"] is True
    assert report["adapter_effect_in_merged"] == pytest.approx(1.0, abs=1e-3)
    assert report["eos_ok"] is True and report["eos_token"] == "<|im_end|>"
    assert report["thinking_ok"] is True and report["enable_thinking"] is False
    assert report["served_prompt_ok"] is True  # the merged template gives training's token ids
    assert report["adapter_tensors"] == 2 * 7 * 2 and report["lora_rank"] == 8  # A and B, 7 linears, 2 layers
    print(f"\nfp32 merge: max |logit diff| {report['max_abs_logit_diff']:.4g}, tolerance {report['tolerance']:.4g}, "
          f"max |logit| {report['max_abs_logit']:.4g}, adapter effect {report['adapter_effect']:.4g} "
          f"({report['adapter_effect_in_merged']:.5f} of it in the merged model)")


def test_the_merged_chat_template_defaults_to_the_runs_thinking_setting(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.merged)
    ask = [{"role": "user", "content": "hi"}]
    default = tokenizer.apply_chat_template(ask, add_generation_prompt=True, tokenize=False)
    assert default.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the run trained thinking off
    asked_on = tokenizer.apply_chat_template(ask, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert asked_on.endswith("<|im_start|>assistant\n")  # a request can still ask for thinking


def test_a_checkpoint_verifies_with_its_runs_record(run, tmp_path):
    checkpoint = Path(shutil.copytree(run.adapter, run.adapter / "checkpoint-7",
                                      ignore=shutil.ignore_patterns("merge_model.yaml", "checkpoint-*")))
    try:
        report = verify(run, adapter=checkpoint)
        assert report["ok"], report["problems"]
        assert report["template_source"] == str(run.adapter / "merge_model.yaml")
    finally:
        shutil.rmtree(checkpoint)


# ---------------------------------------------------------------- each way a merge goes wrong


def test_an_adapter_whose_lora_b_was_emptied_to_zero(run, tmp_path):
    adapter = copy_adapter(run, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()},
              adapter / "adapter_model.safetensors")
    report = verify(run, adapter=adapter)
    assert not report["ok"] and "adapter-untrained" in names(report)
    # the merge on disk is not base + this (empty) adapter: both the weights and the logits say so
    assert {"weights-mismatch", "logits-differ"} <= names(report)


def test_an_adapter_saved_with_missing_or_empty_tensors(run, tmp_path):
    """TRL #4416: under ZeRO-3 an adapter saved without gathering holds empty or missing tensors."""
    adapter = copy_adapter(run, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    keys = sorted(tensors)
    kept = {k: (torch.empty(0) if i % 2 else tensors[k]) for i, k in enumerate(keys[2:])}  # drop two, empty half
    save_file(kept, adapter / "adapter_model.safetensors")
    report = verify(run, adapter=adapter)
    assert not report["ok"]
    assert {"adapter-tensor-missing", "adapter-tensor-empty"} <= names(report)
    assert report["max_abs_logit_diff"] is None and report["weights_proof"] is None  # not loadable: no comparison


def test_a_merged_folder_holding_the_base_weights(run, tmp_path):
    """LLaMA-Factory #9051: the export wrote the base model's weights."""
    merged = copy_merged(run, tmp_path)
    shutil.copy(run.base / "model.safetensors", merged / "model.safetensors")
    report = verify(run, merged=merged)
    assert not report["ok"]
    assert {"weights-mismatch", "weights-same-as-base", "logits-differ", "same-as-base"} <= names(report)
    assert all(p["kind"] == "defect" for p in report["problems"])
    message = next(p["message"] for p in report["problems"] if p["name"] == "weights-mismatch")
    assert "14 LoRA targets differ" in message and "it holds the base's values" in message
    assert report["differs_from_base"] is False and report["max_abs_logit_diff_vs_base"] == 0.0
    assert report["adapter_effect_in_merged"] == 0.0 and report["adapter_effect"] > report["tolerance"]


def test_a_merge_made_with_the_wrong_template(run):
    """Llama 3 in bf16, exported the original way with template qwen3: its turns now 'end' with <|im_end|>, and
    it keeps Meta's template, whose "Cutting Knowledge Date" block training (llama3) never saw."""
    report = verify_merge.verify(run.bf16_base, run.bf16_adapter, run.wrong, device="cpu")
    assert not report["ok"] and names(report) == {"eos-mismatch", "served-prompt-mismatch"}
    assert report["eos_ok"] is False and report["served_prompt"]["first_difference"]["position"] == 5
    message = next(p["message"] for p in report["problems"] if p["name"] == "eos-mismatch")
    assert "training ended every turn with <|eot_id|> (template llama3)" in message and "'<|im_end|>'" in message
    # the weights are right: in bf16 the merge is base + adapter within the bf16 tolerance, greedy agrees;
    # LLaMA-Factory's export of a tied-embedding model is proven tensor by tensor
    assert report["merged_dtype"] == "bfloat16"
    assert report["weights_proof"]["ok"] and report["weights_proof"]["lora_targets"] == 14
    assert 0 < report["weights_proof"]["max_error_over_tolerance"] <= 1.0
    assert report["max_abs_logit_diff"] <= report["tolerance"] and report["differs_from_base"] is True
    assert report["adapter_effect_in_merged"] == pytest.approx(1.0, abs=0.05)
    print(f"\nbf16 merge (llama3): weights within {report['weights_proof']['max_error_over_tolerance']:.2f}x the "
          f"tolerance; max |logit diff| {report['max_abs_logit_diff']:.4g}, tolerance "
          f"{report['tolerance']:.4g}, max |logit| {report['max_abs_logit']:.4g}, greedy match "
          f"{report['greedy_match']}, adapter effect {report['adapter_effect']:.4g} "
          f"({report['adapter_effect_in_merged']:.3f} of it in the merged model)")


def test_a_plain_export_of_a_thinking_off_run_keeps_qwen3s_thinking_default(run, tmp_path):
    """`llamafactory-cli export` keeps Qwen3's template, which thinks unless told not to, and drops the empty
    think block that training kept in earlier answers."""
    from transformers import AutoTokenizer

    merged = copy_merged(run, tmp_path)
    (merged / "chat_template.jinja").write_text(AutoTokenizer.from_pretrained(run.base).chat_template)
    (merged / "sftkit_merge.json").unlink()
    report = verify(run, merged=merged)
    assert names(report) == {"thinking-mismatch", "served-prompt-mismatch"}
    assert report["thinking_ok"] is False and report["eos_ok"] is True and report["served_prompt_ok"] is False
    found = {p["name"]: p["message"] for p in report["problems"]}
    assert "defaults to enable_thinking true, but the run trained with false" in found["thinking-mismatch"]
    assert "differs at token 26" in found["served-prompt-mismatch"]
    assert "merged template id 6727 'Run', training id 151667 '<think>'" in found["served-prompt-mismatch"]


def test_a_merge_recorded_with_another_template(run, tmp_path):
    merged = copy_merged(run, tmp_path)
    record = json.loads((merged / "sftkit_merge.json").read_text())
    (merged / "sftkit_merge.json").write_text(json.dumps(dict(record, template="qwen3_nothink")))
    assert "template-mismatch" in names(verify(run, merged=merged))


@pytest.mark.parametrize("which", ["merged", "adapter"])
def test_a_truncated_safetensors_file(run, tmp_path, which):
    folder = copy_merged(run, tmp_path) if which == "merged" else copy_adapter(run, tmp_path)
    weights = folder / ("model.safetensors" if which == "merged" else "adapter_model.safetensors")
    os.truncate(weights, weights.stat().st_size // 2)
    report = verify(run, **{which: folder})
    assert not report["ok"] and "truncated-safetensors" in names(report)
    assert str(weights) in next(p["message"] for p in report["problems"] if p["name"] == "truncated-safetensors")


def test_user_errors_are_named_problems_never_a_traceback(run, tmp_path):
    missing = tmp_path / "nowhere"
    result = run_sftkit("verify-merge", "--base", str(run.base), "--adapter", str(missing), "--merged",
                        str(run.merged), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert not report["ok"] and names(report) == {"missing-folder"} and str(missing) in result.stdout
    result = run_sftkit("verify-merge", "--base", str(run.base), "--adapter", str(missing), "--merged",
                        str(run.merged))
    assert result.returncode == 1 and "problem missing-folder: --adapter" in result.stdout
    assert "Traceback" not in result.stderr

    no_config = tmp_path / "not-an-adapter"
    no_config.mkdir()
    report = verify(run, adapter=no_config)
    assert "no-adapter-config" in names(report)


# ---------------------------------------------------------------- the weights proof, one defect at a time


def rewrite_merged(run, tmp_path: Path, change) -> Path:
    """A copy of the good merge whose weights file `change(tensors)` edits."""
    merged = copy_merged(run, tmp_path)
    tensors = load_file(merged / "model.safetensors")
    change(tensors)
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    return merged


def raise_entries(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][3, :4] += 0.25


def nudge_norm(tensors):
    tensors["model.norm.weight"][0] += 1.0


def drop_tensor(tensors):
    del tensors["model.layers.0.self_attn.k_norm.weight"]


def to_bf16(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)


def add_tensor(tensors):
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].clone()


@pytest.mark.parametrize(("change", "name", "named"), [
    (raise_entries, "weights-mismatch", "model.layers.1.mlp.down_proj.weight (4 of {numel:,} entries over"),
    (nudge_norm, "weights-changed", "model.norm.weight (1 of {numel:,} entries differ from the base"),
    (drop_tensor, "weights-missing", "model.layers.0.self_attn.k_norm.weight"),
    (to_bf16, "weights-dtype", "model.layers.0.mlp.up_proj.weight is bfloat16, the base's float32"),
    (add_tensor, "weights-extra", "model.layers.2.mlp.down_proj.weight"),
])
def test_the_weights_proof_names_the_tensor(run, tmp_path, change, name, named):
    report = verify(run, merged=rewrite_merged(run, tmp_path, change), behaviour="never")
    assert not report["ok"] and names(report) == {name}
    tensor = load_file(run.merged / "model.safetensors").get(named.split(" ")[0])
    named = named.format(numel=tensor.numel() if tensor is not None else 0)
    assert named in report["problems"][0]["message"] and report["problems"][0]["kind"] == "defect"
    if change is raise_entries:
        assert "largest |error| 0.25" in report["problems"][0]["message"]
        assert report["weights_proof"]["worst_tensor"] == "model.layers.1.mlp.down_proj.weight"


def test_behaviour_never_leaves_the_proof_alone(run, capfd):
    capfd.readouterr()
    code = verify_merge.main(["--base", str(run.base), "--adapter", str(run.adapter), "--merged", str(run.merged),
                              "--behaviour", "never"])
    out = capfd.readouterr().out
    assert code == 0 and "weights: proven: 14 LoRA targets" in out
    assert "note: behaviour check not run (--behaviour never)" in out and "logits vs base" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_for_the_behaviour_check_is_a_resource_problem_not_a_finding(run):
    report = verify_merge.verify(run.base, run.adapter, run.merged, device="cuda")
    assert names(report) == {"behaviour-no-gpu"} and report["problems"][0]["kind"] == "unverified"
    assert verify_merge.proven_defects(report) == [] and report["weights_proof"]["ok"]
    assert "torch sees no GPU" in report["problems"][0]["message"]


def test_the_behaviour_check_runs_only_where_it_fits():
    """merge_behaviour.plan against this machine's real free memory."""
    free = merge_behaviour.available_bytes("cpu")
    small = merge_behaviour.plan(10_000_000, 1_000_000, "cpu", "auto")[0]
    assert small.ran and small.dtype == "float32"
    assert small.needed_gb == pytest.approx((10_000_000 * 4 * merge_behaviour.LOAD_OVERHEAD + 1_000_000) / 1e9)
    huge = merge_behaviour.plan(free, 0, "cpu", "auto")[0]  # 4 bytes per parameter: never fits
    assert not huge.ran and "skipped" in huge.reason and "--behaviour always" in huge.reason
    forced = merge_behaviour.plan(free, 0, "cpu", "always")[0]
    assert forced.ran and "forced" in forced.reason
    mid = merge_behaviour.plan(750_000_000, 0, "cpu", "auto")[0]  # over 4 GiB in float32: too slow on CPU by default
    assert not mid.ran and mid.needed_gb * 1e9 > merge_behaviour.CPU_AUTO_LIMIT
    fits = mid.needed_gb * 1e9 <= merge_behaviour.MEMORY_SHARE * free
    assert ("4 GiB a default CPU run" if fits else "of the free memory") in mid.reason
    assert not merge_behaviour.plan(1000, 0, "cpu", "never")[0].ran
