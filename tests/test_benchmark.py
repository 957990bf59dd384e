"""The benchmark harness (bench/run.sh, bench/benchmark.py) without training: fast, no GPU."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from bench import benchmark as b
from sftkit.launch.estimate import lora_flops_per_token
from sftkit.models import PRESETS, Architecture

# ---------------------------------------------------------------- LoRA-MFU


def test_lora_mfu_by_hand():
    """hidden 8, 2 layers, 2 heads x head_dim 4, 1 kv head, MLP 16, vocab 32, LoRA r2, seq 10."""
    arch = Architecture("llama", 8, 2, 2, 1, 4, 16, 32, False)
    # frozen: per layer q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate/up/down 3 x 8x16 = 576; x2 layers + lm_head 32x8
    frozen = 2 * 576 + 256
    # LoRA r2: r x (in + out) per linear: q 32, k 24, v 24, o 32, gate/up/down 48 each = 256 per layer
    lora = 2 * 256
    # causal attention forward: 4 x layers x heads x head_dim x seq/2 = 4 x 2 x 2 x 4 x 5
    attention = 320
    by_hand = 4 * frozen + 6 * lora + 3 * attention
    assert by_hand == 9664
    assert lora_flops_per_token(arch, 2, 10) == by_hand
    assert b.lora_mfu(by_hand, 1e9, 989e12) == pytest.approx(9664e9 / 989e12)
    assert b.lora_mfu(by_hand, None, 989e12) is None
    assert b.lora_mfu(by_hand, 1e9, None) is None


def test_headline_mfu_scale():
    """Qwen3-8B at 16,384 tokens: 45.8e9 FLOPs/token (49.4e9 at 20,480), so 8,000 tokens/s on an H100 is ~37%."""
    flops = lora_flops_per_token(PRESETS["qwen3-8b"].architecture, 64, 16384)
    assert 45.5e9 < flops < 46.1e9
    assert b.lora_mfu(flops, 8000, 989e12) == pytest.approx(flops * 8000 / 989e12)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
])
def test_gpu_peaks(name, peak):
    assert b.gpu_peak_flops(name) == (peak, None)


@pytest.mark.parametrize("name", ["Tesla T4", "cpu", None])
def test_unknown_gpu_has_no_peak_and_says_why(name):
    peak, note = b.gpu_peak_flops(name)
    assert peak is None and note


# ---------------------------------------------------------------- variants


def _settings(preset: str, cpu: bool = False, gpus: int = 1) -> b.Settings:
    return b.Settings(preset, seq_len=16384, batch=2, grad_accum=1, gpus=gpus, warmup=2, steps=4, cpu=cpu)


def _plan(preset: str, cuda: bool, importable=lambda module: module != "flash_attn") -> list[dict]:
    settings = _settings(preset, cpu=not cuda)
    return b.plan_variants(list(b.VARIANTS), dict(PRESETS[preset].overrides), b.seed_args(), settings, cuda,
                           importable)


def test_seed_args_are_read_from_the_launcher():
    seed = b.seed_args()
    assert seed["lora_rank"] == "64" and seed["lora_target"] == "all" and seed["cutoff_len"] == "20480"
    assert seed["per_device_train_batch_size"] == "2" and seed["gradient_accumulation_steps"] == "8"


@pytest.mark.parametrize("preset", ["qwen3-8b", "llama3.2-3b", "demo"])
def test_every_variant_has_the_same_global_batch_tokens(preset):
    planned = _plan(preset, cuda=preset != "demo")
    sizes = {(p["resolved"]["cutoff_len"], p["resolved"]["per_device_train_batch_size"],
              p["resolved"]["gradient_accumulation_steps"], p["resolved"]["max_steps"]) for p in planned}
    assert sizes == {("16384", "2", "1", "6")}
    for p in planned:  # the sizes are passed explicitly after `--`, where they win over the preset
        assert p["extra"]["cutoff_len"] == "16384" and p["extra"]["per_device_train_batch_size"] == "2"
        assert p["extra"]["gradient_accumulation_steps"] == "1" and p["extra"]["train_from_scratch"] == "True"
        args = b.extra_args(p["extra"])
        assert args[args.index("--max_steps") + 1] == "6"


def test_gpu_variants_flags():
    planned = {p["variant"]: p for p in _plan("qwen3-8b", cuda=True)}
    assert planned["seed"]["extra"]["enable_liger_kernel"] == "False"  # the seed's flags, without the preset's
    assert planned["seed"]["resolved"]["bf16"] == "True" and planned["seed"]["skip"] is None
    assert "enable_liger_kernel" not in planned["kit"]["extra"]
    assert planned["kit"]["resolved"]["enable_liger_kernel"] == "True"
    assert "identical flags to variant 'kit'" in planned["liger"]["skip"]  # the preset already has it
    assert "flash_attn is not importable" in planned["fa2"]["skip"]
    assert planned["packing"]["extra"]["neat_packing"] == "True" and planned["packing"]["skip"] is None
    assert planned["no_gc"]["extra"]["disable_gradient_checkpointing"] == "True"
    assert planned["unsloth_gc"]["extra"]["use_unsloth_gc"] == "True" and planned["unsloth_gc"]["skip"] is None


def test_fa2_runs_when_flash_attn_is_importable():
    planned = {p["variant"]: p for p in _plan("qwen3-8b", cuda=True, importable=lambda module: True)}
    assert planned["fa2"]["skip"] is None and planned["fa2"]["extra"]["flash_attn"] == "fa2"


def test_cpu_variants():
    planned = {p["variant"]: p for p in _plan("demo", cuda=False)}
    assert planned["seed"]["extra"]["lora_dropout"] == "0.05"  # the demo preset's 0.0 put back to the seed's
    assert planned["kit"]["resolved"]["lora_dropout"] == "0.0"
    assert all(p["resolved"]["bf16"] == "False" for p in planned.values())
    for name in ("liger", "fa2", "unsloth_gc"):
        assert planned[name]["skip"].startswith("not applicable on CPU")
    for name in ("seed", "kit", "packing", "no_gc"):
        assert planned[name]["skip"] is None


# ---------------------------------------------------------------- outcome of a run

CUDA_OOM_LOG = """\
[rank0]:   File "/opt/torch/.venv/lib/python3.12/site-packages/torch/nn/functional.py", line 3462, in cross_entropy
[rank0]:     return torch._C._nn.cross_entropy_loss(
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 18.55 GiB. GPU 0 has a total \
capacity of 79.19 GiB of which 9.81 GiB is free. Of the allocated memory 61.02 GiB is allocated by PyTorch.
E1128 12:00:01.000000 1234 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 0
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
sftkit: run failed (exit status 1); record in saves/x/run_manifest.json
"""

ERROR_LOG = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/main/sftkit/launch/worker.py", line 73, in main
[rank0]: KeyError: 'history'
[rank1]: KeyError: 'history'
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_cuda_oom_is_detected():
    status, reason = b.classify(1, CUDA_OOM_LOG, None)
    assert status == "oom" and "CUDA out of memory" in reason


def test_preflight_refusal_is_a_predicted_oom():
    log = ("sft_train.sh: error: estimated peak 95.3 GiB per GPU exceeds 78.6 GiB free on the emptiest-loaded GPU: "
           "keep the global batch and change enable_liger_kernel: True (fused loss)\n")
    status, reason = b.classify(1, log, None)
    assert status == "oom" and reason.startswith("not run:") and "95.3 GiB" in reason


def test_other_failures_name_the_first_exception():
    status, reason = b.classify(1, ERROR_LOG, None)
    assert status == "error" and reason == "exit status 1: [rank0]: KeyError: 'history'"
    assert b.classify(None, "still loading\n", None) == ("error", "timed out: still loading")
    assert b.classify(0, "", None)[0] == "error"  # finished, but without the figures
    assert b.classify(0, "fine\n", {"tokens_per_s_per_gpu": 10.0}) == ("ok", None)


# ---------------------------------------------------------------- the callback


def test_non_pad_token_counts():
    ids = torch.ones(2, 6, dtype=torch.long)
    assert b.count_non_pad_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0],
                                                                                       [1, 1, 1, 1, 1, 1]])}) == 9
    assert b.count_non_pad_tokens({"input_ids": ids, "attention_mask": None}) == 12  # FA2 packing: unpadded
    # neat packing without FA2: LLaMA-Factory's 4-D mask; the last two positions are padding
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[:, 4:] = False
    allowed[4:, :] = False
    boolean = allowed.expand(2, 1, 6, 6)
    additive = torch.where(boolean, 0.0, torch.finfo(torch.float32).min)
    assert b.count_non_pad_tokens({"input_ids": ids, "attention_mask": boolean}) == 8
    assert b.count_non_pad_tokens({"input_ids": ids, "attention_mask": additive}) == 8


class _Tiny(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None):
        return input_ids.float().sum()


def test_callback_writes_the_figures_json(tmp_path):
    from transformers import TrainerControl, TrainerState

    out = tmp_path / "figures.json"
    callback = b.ThroughputCallback(out, warmup=1, exit_when_done=False)
    model, args, state, control = _Tiny(), SimpleNamespace(), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    for _ in range(3):  # 3 optimizer steps of 2 micro-batches (6 non-pad tokens each)
        callback.on_step_begin(args, state, control)
        time.sleep(0.01)
        for _ in range(2):
            model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=mask)
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    figures = json.loads(out.read_text())
    assert figures["step_tokens"] == [12, 12, 12]
    assert figures["warmup_steps"] == 1 and figures["measured_steps"] == 2 and figures["world_size"] == 1
    assert figures["tokens_per_step"] == 12
    measured = sum(figures["step_times_s"][1:])
    assert figures["step_time_s"] == pytest.approx(measured / 2, rel=1e-3) and measured >= 0.02
    assert figures["tokens_per_s_per_gpu"] == pytest.approx(24 / measured, rel=1e-3)
    assert figures["gpu"] == "cpu" and figures["peak_reserved_bytes"] is None
    assert figures["peak_allocated_bytes"] is None


def test_result_record_shape(tmp_path):
    runner = b.Runner(b._parse(["--preset", "demo", "--workdir", str(tmp_path)]))
    runner.arch = Architecture("qwen3", 128, 2, 4, 2, 32, 256, 409, False)
    planned = {p["variant"]: p for p in b.plan_variants(runner.names, dict(runner.preset.overrides), b.seed_args(),
                                                        runner.settings, False, lambda module: False)}
    ok = runner.record(planned["kit"], "ok", None, {"gpu": "NVIDIA H100 80GB HBM3", "tokens_per_s_per_gpu": 1000.0,
                                                    "step_time_s": 1.0, "peak_reserved_bytes": 2**30,
                                                    "tokens_per_step": 1024}, 30.0)
    for key in ("variant", "status", "tokens_per_s_per_gpu", "step_time_s", "lora_mfu", "peak_bytes",
                "estimate_bytes", "gpu", "seq_len", "steps", "versions"):
        assert key in ok
    assert ok["seq_len"] == 256 and ok["steps"] == 4 and ok["global_batch_tokens"] == 2 * 2 * 256
    assert ok["lora_mfu"] == pytest.approx(ok["flops_per_token"] * 1000.0 / 989e12)
    assert ok["estimate_bytes"] > 0 and ok["peak_bytes"] == 2**30 and ok["versions"]["torch"]
    oom = runner.record(planned["no_gc"], "oom", "CUDA out of memory", None, 12.0)
    assert oom["tokens_per_s_per_gpu"] is None and oom["lora_mfu"] is None and oom["estimate_bytes"] > 0
    assert "gradient checkpointing" in oom["notes"][0]
    json.dumps([ok, oom])
    assert "1,000 tok/s/GPU" in b.summary_line(ok) and "LoRA-MFU" in b.summary_line(ok)
    assert "CUDA out of memory" in b.summary_line(oom) and "estimate" in b.summary_line(oom)


def test_gpu_preset_without_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(b, "visible_gpus", lambda: (0, None))
    with pytest.raises(b.BenchError, match="needs a GPU"):
        b.Runner(b._parse(["--preset", "qwen3-8b"]))


def test_model_folder_has_the_real_architecture_and_no_weights(tmp_path):
    folder = b.build_model_dir("qwen3-8b", tmp_path / "model", 16384)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 151936 and config["hidden_size"] == 4096
    assert config["num_hidden_layers"] == 36 and config["max_position_embeddings"] >= 16384
    assert config["dtype"] == "bfloat16" and not config["tie_word_embeddings"]
    assert not list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) < config["vocab_size"] and "<|im_start|>" in tokenizer.get_vocab()
    data = b.build_dataset(tmp_path / "data.json", 3, 64)
    rows = json.loads(data.read_text())
    assert len(rows) == 3 and all(len(r["instruction"].split()) == 64 == len(r["output"].split()) for r in rows)
    assert len(tokenizer(rows[0]["instruction"])["input_ids"]) >= 64  # truncated to seq_len, never short of it


def test_first_step_check_compares_kit_with_seed():
    first_step_check = b.first_step_check

    def run(variant, loss, grad, status="ok"):
        return {"variant": variant, "status": status, "reason": None,
                "step_logs": [{"loss": loss, "grad_norm": grad}]}

    ok, line = first_step_check([run("seed", 12.70, 1.00), run("kit", 12.71, 1.03)])
    assert ok and line.startswith("first-step check ok")
    # an all-zero (un-gathered) lm_head gives ln(V) = 11.93 instead of ~12.7
    ok, line = first_step_check([run("seed", 12.70, 1.00), run("kit", 11.93, 1.00)])
    assert not ok and "loss differs" in line
    ok, line = first_step_check([run("seed", 12.70, 1.00), run("kit", 12.70, 1.5)])
    assert not ok and "grad_norm differs" in line
    ok, line = first_step_check([run("seed", 12.70, 1.00), run("kit", 0, 0, status="error")])
    assert not ok and "kit ended error" in line
    assert not first_step_check([run("seed", 12.70, 1.00)])[0]


def test_gpu_run_checks_every_gpu_preset_first():
    text = (b.KIT_DIR / "bench" / "gpu_run.sh").read_text(encoding="utf-8")
    assert 'CHECK_PRESETS="qwen3-8b,qwen3-14b,llama3.2-3b"' in text
    assert '--layers 2 --steps 1 --warmup 0 --variants "seed,kit"' in text
    assert text.index("first_step_check") < text.index('bash "$KIT_DIR/bench/run.sh" "${ARGS[@]}"')


def test_the_benchmark_sees_the_gpus_the_kit_sees(tmp_path, monkeypatch):
    """One GPU probe: CUDA_VISIBLE_DEVICES by index or UUID picks those GPUs, as the launcher's count does."""
    import fake_gpus

    from sftkit import hardware

    cards = [fake_gpus.gpu(0, name="NVIDIA A100-SXM4-80GB"), fake_gpus.gpu(1), fake_gpus.gpu(2)]
    bin_dir = fake_gpus.install(tmp_path / "bin", cards)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SFTKIT_VISIBLE_GPUS", raising=False)
    for mask, expected in ((None, (3, "NVIDIA A100-SXM4-80GB")), ("2,1", (2, fake_gpus.H100["name"])),
                           (cards[1]["uuid"][:12], (1, fake_gpus.H100["name"])), ("", (0, None)), ("7", (0, None))):
        if mask is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        assert b.visible_gpus() == expected, mask
        assert b.visible_gpus()[0] == hardware.visible_gpu_count(), mask
