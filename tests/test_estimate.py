"""`python -m sftkit estimate`: parameter counts against PEFT, FLOPs by hand, memory trends, CLI contract."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import run_sftkit

from sftkit.launch.estimate import (
    ALWAYS,
    PHASES,
    estimate_peak_memory,
    layer_activation_bytes_per_token,
    lora_flops_per_token,
    lora_params,
    suggestions,
    total_params,
)
from sftkit.models import PRESETS, Architecture, load_architecture

MODELS = ("qwen3-8b", "qwen3-14b", "llama3.2-3b")
PUBLISHED = {"qwen3-8b": 8.19e9, "qwen3-14b": 14.77e9, "llama3.2-3b": 3.21e9}  # model cards
GB80 = 80 * 10**9


def arch(name: str) -> Architecture:
    return PRESETS[name].architecture


@pytest.mark.parametrize("name", MODELS)
def test_counts_match_peft_on_the_meta_device(name):
    torch = pytest.importorskip("torch")
    from llamafactory.model.model_utils.misc import find_all_linear_modules
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    a = arch(name)
    config = AutoConfig.for_model(
        a.model_type, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        intermediate_size=a.intermediate_size, vocab_size=a.vocab_size, tie_word_embeddings=a.tie_word_embeddings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        base_total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
        targets = find_all_linear_modules(model, freeze_vision_tower=True)  # LLaMA-Factory's `lora_target: all`
        peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets))
    assert sorted(targets) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainable, everything = peft_model.get_nb_trainable_parameters()
    assert base_total == total_params(a)
    assert trainable == lora_params(a, 64)
    assert everything == total_params(a) + lora_params(a, 64)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
@pytest.mark.parametrize(("batch", "dropout"), [(1, 0.05), (1, 0.0), (2, 0.05), (2, 0.0)])
def test_saved_activations_match_autograd_on_cpu(model_type, batch, dropout, monkeypatch):
    """Count the bytes autograd really saves in one HF decoder layer with PEFT LoRA (bf16, CPU)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    import sftkit.launch.estimate

    # CPU dropout keeps bf16 noise, CUDA a bool mask
    monkeypatch.setattr(sftkit.launch.estimate, "DROPOUT_MASK_BYTES", 2)
    h, heads, kv_heads, head_dim, inter, rank, seq = 256, 4, 2, 64, 768, 8, 128
    config = AutoConfig.for_model(model_type, hidden_size=h, num_hidden_layers=1, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
                                  vocab_size=100, attn_implementation="sdpa")
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(
        r=rank, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])).to(torch.bfloat16)
    model.train()  # as DeepSpeed's bf16 engine leaves it: LoRA weights in bf16 too
    inner = model.base_model.model.model
    x = torch.randn(batch, seq, h, dtype=torch.bfloat16, requires_grad=True)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        attention_mask[-1, -5:] = 0  # a padded micro-batch
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    rope = inner.rotary_emb(x, positions)
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=attention_mask, past_key_values=None,
                              position_ids=positions)
    assert (mask is not None) == (batch > 1)
    shared = {p.data_ptr() for p in model.parameters()} | {x.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr()}
    shared |= {mask.data_ptr()} if mask is not None else set()  # counted elsewhere: weights, checkpoint, mask
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.layers[0](x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    arch = Architecture(model_type, h, 1, heads, kv_heads, head_dim, inter, 100, False)
    predicted = batch * seq * layer_activation_bytes_per_token(arch, rank, False, dropout > 0, batch > 1)
    predicted += 2 * batch * seq**2 if batch > 1 else 0  # sdpa's bf16 copy of the bool mask, saved for backward
    assert sum(saved.values()) == predicted


@pytest.mark.parametrize("name", MODELS)
def test_totals_near_published_sizes(name):
    assert total_params(arch(name)) == pytest.approx(PUBLISHED[name], rel=0.005)


def test_tied_embeddings_counted_once():
    a = arch("llama3.2-3b")
    untied = replace(a, tie_word_embeddings=False)
    assert total_params(untied) - total_params(a) == a.vocab_size * a.hidden_size


def test_flops_formula_by_hand():
    tiny = Architecture("llama", hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=4, intermediate_size=16, vocab_size=32, tie_word_embeddings=False)
    # Frozen linears per layer: q 8x8=64, k 8x4=32, v 32, o 64, gate 8x16=128, up 128, down 128 -> 576;
    # 2 layers -> 1152; lm_head 32x8=256 -> 1408; x4 = 5632.
    # LoRA r=2 per layer: q 2(8+8)=32, k 2(8+4)=24, v 24, o 32, gate 2(8+16)=48, up 48, down 48 -> 256;
    # 2 layers -> 512; x6 = 3072.
    # Attention forward: 4 x 2 layers x 2 heads x 4 head_dim x 10/2 = 320; x3 = 960.
    # Total: 5632 + 3072 + 960 = 9664.
    assert lora_params(tiny, 2) == 512
    assert lora_flops_per_token(tiny, lora_rank=2, seq_len=10) == 9664
    # Tying the embedding does not change the FLOPs: the output projection is still a matmul.
    assert lora_flops_per_token(replace(tiny, tie_word_embeddings=True), 2, 10) == 9664


def test_qwen3_8b_flops_per_token_and_json_shape():
    result = run_sftkit("estimate", "--model", "qwen3-8b", "--gpus", "4", "--cutoff-len", "20480",
                        "--gpu-memory-gb", "80", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1  # one JSON object and nothing else on stdout
    report = json.loads(result.stdout)
    assert report["flops_per_token"] == pytest.approx(49.4e9, rel=0.02)
    for key in ("total_params", "lora_params", "per_gpu_bytes", "breakdown", "fits", "suggestions",
                "flops_per_token", "gpu_memory_bytes", "assumptions"):
        assert key in report
    assert report["total_params"] == total_params(arch("qwen3-8b"))
    assert report["lora_params"] == lora_params(arch("qwen3-8b"), 64)
    breakdown = report["breakdown"]
    assert all(isinstance(v, int) and v >= 0 for v in breakdown.values())
    peak_parts = list(ALWAYS) + list(PHASES[report["peak_phase"]])
    assert report["per_gpu_bytes"] == sum(breakdown[k] for k in peak_parts)
    assert report["fits"] is True and report["suggestions"] == []


def test_human_output_is_a_table():
    result = run_sftkit("estimate", "--model", "llama3.2-3b", "--gpus", "4", "--gpu-memory-gb", "80", timeout=120)
    assert result.returncode == 0, result.stderr
    for text in ("weights_shard", "activation_checkpoints", "logits_and_loss", "peak per GPU", "fits: yes",
                 "FLOPs per token", "fused loss (Liger) on: preset default"):
        assert text in result.stdout


@pytest.mark.parametrize("name", MODELS)
def test_estimate_moves_the_right_way(name):
    a = arch(name)
    seed = estimate_peak_memory(a, gpus=4).per_gpu_bytes
    assert estimate_peak_memory(a, gpus=8).per_gpu_bytes < seed
    assert estimate_peak_memory(a, gpus=4, nodes=2).per_gpu_bytes < seed
    assert estimate_peak_memory(a, gpus=4, liger=True).per_gpu_bytes < estimate_peak_memory(
        a, gpus=4, liger=False).per_gpu_bytes
    assert estimate_peak_memory(a, gpus=4, cutoff_len=32768).per_gpu_bytes > seed
    assert estimate_peak_memory(a, gpus=4, batch=4).per_gpu_bytes > seed
    assert estimate_peak_memory(a, gpus=4, lora_rank=128).per_gpu_bytes > seed


def test_seed_settings_on_four_80gb_gpus():
    for name in MODELS:  # the presets' fused loss makes every preset fit
        assert estimate_peak_memory(arch(name), gpus=4, liger=True).per_gpu_bytes <= GB80
    for name in ("qwen3-8b", "qwen3-14b"):  # full-vocabulary logits in fp32 do not fit
        estimate = estimate_peak_memory(arch(name), gpus=4, liger=False)
        assert estimate.per_gpu_bytes > GB80 and estimate.peak_phase == "loss"


def test_suggestions_keep_the_global_batch_cheapest_first():
    a = arch("qwen3-8b")
    seed = {"gpus": 4, "nodes": 1, "cutoff_len": 20480, "batch": 2, "lora_rank": 64, "offload": False}
    fused = suggestions(a, {**seed, "liger": False}, GB80)
    assert len(fused) == 1 and fused[0]["fits"] and "enable_liger_kernel" in fused[0]["change"]
    assert fused[0]["per_gpu_bytes"] == estimate_peak_memory(a, gpus=4, liger=True).per_gpu_bytes
    smaller = suggestions(arch("qwen3-14b"), {**seed, "liger": True}, 40 * 10**9)
    assert smaller[-1]["fits"] and smaller[-1]["settings"] == {"batch": 1, "liger": True, "offload": False}
    assert "gradient_accumulation_steps x2 (8 -> 16)" in smaller[-1]["change"]
    hopeless = suggestions(a, {**seed, "cutoff_len": 131072, "liger": False}, 24 * 10**9)
    assert not hopeless[-1]["fits"] and hopeless[-1]["settings"]["offload"]
    assert [s["settings"]["batch"] for s in hopeless] == [2, 1, 1]


def test_config_json_and_model_folder(tmp_path):
    qwen = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        loaded, _, preset_liger = load_architecture(model)
        assert loaded == arch("qwen3-8b") and preset_liger is None
    # Llama 3.2's config sets tie_word_embeddings; without the key, transformers' default (untied) applies.
    llama = {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
             "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps({**llama, "tie_word_embeddings": True}))
    assert load_architecture(str(tmp_path))[0] == arch("llama3.2-3b")
    (tmp_path / "config.json").write_text(json.dumps(llama))
    assert load_architecture(str(tmp_path))[0].tie_word_embeddings is False


@pytest.mark.parametrize("case", ["unknown-preset", "missing-file", "not-json", "gpus-0", "no-config-in-dir",
                                  "unsupported-type", "missing-gpus"])
def test_bad_input_gets_one_line_and_nonzero_exit(case, tmp_path):
    bad_json = tmp_path / "bad" / "config.json"
    bad_json.parent.mkdir()
    bad_json.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_type": "gpt2"}))
    model, gpus = {
        "unknown-preset": ("qwen9-1t", "4"), "missing-file": (str(tmp_path / "nope" / "config.json"), "4"),
        "not-json": (str(bad_json), "4"), "gpus-0": ("qwen3-8b", "0"), "no-config-in-dir": (str(tmp_path), "4"),
        "unsupported-type": (str(other), "4"), "missing-gpus": ("qwen3-8b", None),
    }[case]
    args = ["estimate", "--model", model, "--json"] + (["--gpus", gpus] if gpus else [])
    result = run_sftkit(*args, timeout=120)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("estimate: "), result.stderr
