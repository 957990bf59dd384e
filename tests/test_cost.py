"""The run's cost before it starts (sftkit.launch.cost): FLOPs, hours, padding and packing against figures worked out
by hand from Qwen3-8B's published config (hidden 4096, 36 layers, 32 heads x 128, 8 kv heads, intermediate
12288, vocab 151936, untied), and the time:, fill: and packing: lines of check-data on the reference data.

Hand figures (LoRA rank 64, the seed's):
  frozen linears per layer: q 4096x4096 = 16,777,216; k, v 4096x1024 = 4,194,304 each; o 16,777,216;
  gate, up, down 4096x12288 = 50,331,648 each: 192,937,984; x 36 layers = 6,945,767,424;
  + lm_head 151936 x 4096 = 622,329,856: 7,568,097,280; x 4 FLOPs (forward + input gradient) = 30,272,389,120.
  LoRA per layer r x (in + out): 8192 + 5120 + 5120 + 8192 + 16384 + 16384 + 16384 = 75,776; x 64 x 36 =
  174,587,904 params; x 6 = 1,047,527,424.  Linear work per token: 31,319,916,544.
  Causal attention forward per token at seq S: 4 x 36 x 32 x 128 x S/2 = 589,824 x S/2; x 3 with backward.
  S = 20480: 18,119,393,280, so 49,439,309,824 per token, 36.6% of it attention ("a third").
"""

from __future__ import annotations

import json
import re

import fake_gpus
import pytest
from conftest import REFERENCE_DATA, kit_env, run_launcher, run_sftkit

from sftkit.data import data_report
from sftkit.launch import cost
from sftkit.launch.estimate import lora_flops_per_token
from sftkit.models import PRESETS

QWEN3_8B = PRESETS["qwen3-8b"].architecture
LINEAR = 31_319_916_544
H100, MFU = 989e12, 0.27


def attention(seq: int) -> int:
    return 3 * 589_824 * seq // 2


def test_qwen3_8b_flops_per_token_by_hand():
    assert lora_flops_per_token(QWEN3_8B, 64, 0) == LINEAR
    assert lora_flops_per_token(QWEN3_8B, 64, 20480) == 49_439_309_824 == LINEAR + attention(20480)
    assert 0.33 < attention(20480) / 49_439_309_824 < 0.40  # the "a third of the work at 20k"


def test_hours_by_hand():
    """8 rows of 2048 tokens on 4 GPUs x batch 2: one micro-step, each rank 2 x 2048 positions at
    LINEAR + attention(2048) = 33,131,855,872 per token: 135,708,081,651,712 FLOPs per rank, over
    989e12 x 0.27 FLOP/s = 0.508 s = 1.4117e-4 h per epoch."""
    assert LINEAR + attention(2048) == 33_131_855_872
    figures = cost.run_cost(QWEN3_8B, [2048] * 8, cutoff_len=20480, batch=2, world=4, lora_rank=64, epochs=1,
                            peak=H100, packing=False, mfu=MFU)
    work = figures["unpacked"]
    assert work["flops"] == 4096 * 33_131_855_872 == 135_708_081_651_712
    assert work["hours"] == pytest.approx(135_708_081_651_712 / (989e12 * 0.27) / 3600) == pytest.approx(1.4117e-4,
                                                                                                            rel=1e-4)
    assert (work["micro_steps"], work["positions"], work["tokens"], work["padding_share"]) == (1, 16384, 16384, 0)
    assert work["fill"] == pytest.approx(2048 / 20480)
    twice = cost.run_cost(QWEN3_8B, [2048] * 8, cutoff_len=20480, batch=2, world=4, lora_rank=64, epochs=2,
                          peak=H100, packing=False, mfu=MFU)["unpacked"]["hours"]
    assert twice == pytest.approx(2 * work["hours"])


def test_micro_batch_padded_to_its_longest_row_rounded_to_8():
    """Rows of 100 and 3 tokens in one micro-batch: both padded to 104 (LLaMA-Factory pads to a multiple of 8);
    2 x 104 x (LINEAR + attention(104)) = 208 x 31,411,929,088 = 6,533,681,250,304 FLOPs; 105 of 208 padding."""
    work = cost.run_cost(QWEN3_8B, [100, 3], cutoff_len=20480, batch=2, world=1, lora_rank=64, epochs=1,
                         peak=H100, packing=False)["unpacked"]
    assert LINEAR + attention(104) == 31_411_929_088
    assert work["flops"] == 6_533_681_250_304
    assert (work["positions"], work["tokens"]) == (208, 103)
    assert work["padding_share"] == pytest.approx(105 / 208)


def test_neat_packing_attention_stays_within_each_row():
    """Three rows of 1000 packed to cutoff 4096 (capacity 4095): one sequence of 4096 positions; linear work on
    all of them, attention 1000 x attention(1000) per row: 4096 x LINEAR + 3000 x 884,736,000."""
    figures = cost.run_cost(QWEN3_8B, [1000, 1000, 1000], cutoff_len=4096, batch=1, world=1, lora_rank=64,
                            epochs=1, peak=H100, packing=True)
    packed = figures["packed"]
    assert figures["planned"] == "packed" and attention(1000) == 884_736_000
    assert packed["flops"] == 4096 * LINEAR + 3000 * 884_736_000 == 130_940_586_164_224
    assert (packed["sequences"], packed["rows_per_sequence"], packed["tokens"]) == (1, 3, 3000)
    # sdpa with the 4-D mask computes the whole 4096 x 4096 square: twice the causal attention at 4096 per position,
    # 2 x 4096 x 3,623,878,656 = 29,686,813,949,952, beside the same linear work: 157,973,192,114,176 in all
    assert attention(4096) == 3_623_878_656
    assert packed["sdpa_attention_factor"] == pytest.approx(157_973_192_114_176 / 130_940_586_164_224)


def test_gpu_peaks_by_name():
    assert cost.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert cost.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert cost.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert cost.gpu_peak_flops("NVIDIA H200") == 989e12
    assert cost.gpu_peak_flops("Tesla T4") is None


@pytest.fixture(scope="module")
def h100_env(tmp_path_factory):
    bin_dir = fake_gpus.install(tmp_path_factory.mktemp("gpus") / "bin", [fake_gpus.gpu(i) for i in range(4)])
    return fake_gpus.path_with(bin_dir, kit_env())


@pytest.mark.skipif(not REFERENCE_DATA.is_dir(), reason="no ../shared/reference-data here")
def test_check_data_time_line_on_reference_data(tmp_path, tiny_qwen3, h100_env):
    """alpaca_en_demo (999 rows, p50 140, max 665 with the genuine Qwen3 tokenizer), qwen3-8b, 4 stand-in H100s."""
    data = str(REFERENCE_DATA / "alpaca_en_demo.json")

    def check(*extra: str) -> tuple[dict, str]:  # the report, and its lines as the terminal shows them
        result = run_sftkit("check-data", data, "--model", "qwen3-8b", "--model-path", str(tiny_qwen3), "--gpus", "4",
                            "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--json", *extra, env=h100_env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        return report, data_report.render(report)

    report, text = check()
    time_line = next(line for line in text.splitlines() if line.startswith("time:"))
    assert "3 epochs on 4 x NVIDIA H100 80GB HBM3" in time_line and " h) " in time_line and "27% MFU" in time_line
    assert "packing:    rows are short against the cutoff" in text and "fill:" in text
    one, two = (check("--epochs", n)[0]["cost"]["unpacked"]["hours"] for n in ("1", "2"))
    assert two == pytest.approx(2 * one, rel=0.10) and report["cost"]["unpacked"]["hours"] == pytest.approx(3 * one)
    packed, packed_text = check("--packing")
    assert packed["packing"] and packed["cost"]["planned"] == "packed"
    assert packed["cost"]["packed"]["sequences"] == packed["packed_sequences"]  # LLaMA-Factory's own count
    assert packed["cost"]["packed"]["hours"] < report["cost"]["unpacked"]["hours"]
    assert "neat packing" in packed_text


def test_bad_gpu_type_and_epochs_one_line(tmp_path, tiny_qwen3, h100_env):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Hi?", "input": "", "output": "Hello."}) + "\n", encoding="utf-8")
    for flags, words in ((("--gpu-type", "Tesla T4"), "--gpu-type 'Tesla T4'"), (("--epochs", "0"), "--epochs 0")):
        result = run_sftkit("check-data", str(data), "--model", "qwen3-8b",
                            "--model-path", str(tiny_qwen3), "--no-progress", *flags, env=h100_env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and words in result.stderr


def test_launcher_packing_plans_neat_packing_and_the_time(tmp_path, tiny_qwen3):
    """`sft_train.sh --packing --dry-run` plans `neat_packing: true`, and the plan shows time:, fill:, packing:;
    on a machine without GPUs --gpu-type names the card the time is for."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {n}?", "input": "", "output": f"Answer {n}."}) + "\n"
                            for n in range(40)), encoding="utf-8")
    common = ("--model", "qwen3-8b", "--model-path", str(tiny_qwen3), "--dataset", str(data), "--gpus", "4",
              "--output-dir", str(tmp_path / "out"), "--dry-run")
    packed = run_launcher(*common, "--packing", "--gpu-type", "H100")
    assert packed.returncode == 0, packed.stderr
    assert "\n  neat_packing: true\n" in packed.stdout  # in the printed train.yaml the workers run
    assert "time:       ~" in packed.stdout and "on 4 x H100 (at 27% MFU" in packed.stdout
    assert re.search(r"^packing:    neat packing \(rows do not attend to each other\): 40 rows in [12] sequences "
                     "of 20480", packed.stdout, re.MULTILINE)  # a pack per tokenizing process (LF packs per shard)
    plain = run_launcher(*common, env=kit_env(CUDA_VISIBLE_DEVICES=""))
    assert plain.returncode == 0, plain.stderr
    assert "neat_packing" not in plain.stdout and "time:       not estimated (no GPU visible here" in plain.stdout
    assert "packing:    rows are short against the cutoff" in plain.stdout
    # refused before the data check, which can take minutes on a big file: a broken one is not even read
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    bad = run_launcher(*common, "--gpu-type", "Tesla T4", "--dataset", str(tmp_path / "broken.jsonl"))
    assert bad.returncode != 0 and "--gpu-type 'Tesla T4'" in bad.stderr and "Traceback" not in bad.stderr


def test_measured_beside_the_estimate(tmp_path):
    """A run that took 600 s for 3 epochs of 100,000 tokens on 4 GPUs: 300,000 / 600 / 4 = 125 tokens/s per GPU;
    3 x 1.0e17 FLOPs per GPU / 600 s / 989e12 = 50.6% MFU; the ranks' peaks, the largest of this launch."""
    import time

    from sftkit.launch import calibration

    estimate = {"hours": 0.1, "mfu_assumed": 0.27, "tokens_per_epoch": 100_000, "flops_per_gpu_per_epoch": 1.0e17,
                "peak_flops": 989e12, "start_epoch": 0.0, "peak_memory_per_gpu_bytes": 40 * 2**30}
    assert calibration.measured_record(tmp_path, estimate, 4, 0.0) is None  # no train_results.json: nothing measured
    (tmp_path / "train_results.json").write_text(json.dumps({"epoch": 3.0, "train_runtime": 600.0}))
    peaks = tmp_path / "sftkit" / "peak-memory"
    peaks.mkdir(parents=True)
    since = time.time()
    (peaks / "rank-9.json").write_text(json.dumps({"rank": 9, "max_memory_allocated": 99 * 2**30, "time": since - 9}))
    for rank, gib in ((0, 30), (1, 31)):
        (peaks / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "max_memory_allocated": gib * 2**30,
                                                             "time": since + 1}))
    measured = calibration.measured_record(tmp_path, estimate, 4, since)
    assert measured["train_seconds"] == 600.0 and measured["tokens"] == 300_000
    assert measured["tokens_per_second_per_gpu"] == pytest.approx(125.0)
    assert measured["mfu"] == pytest.approx(3e17 / 600 / 989e12) == pytest.approx(0.5056, rel=1e-3)
    assert measured["peak_memory_per_gpu_bytes"] == 31 * 2**30 and set(measured["peak_memory_by_rank"]) == {"0", "1"}
    line = calibration.summary(estimate, measured)
    assert "trained 600 s = 0.167 h (estimate 0.1 h at 27% MFU, assumed)" in line and "125 tokens/s per GPU" in line
    resumed = calibration.measured_record(tmp_path, dict(estimate, start_epoch=2.0), 4, since)
    assert resumed["epochs"] == 1.0 and resumed["tokens"] == 100_000
