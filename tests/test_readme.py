"""Every command the README shows is run here (dry run where a GPU would be needed).

A command added to the README without a case here fails `test_every_readme_command_is_exercised`.
None trains (the merge and chat test makes its adapter with PEFT), so all run in the parallel fast part,
each xdist worker with a user folder of its own.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KIT_DIR, kit_env

README = KIT_DIR / "README.md"


def readme_commands() -> list[str]:
    """The lines of the README's ```bash blocks."""
    commands, in_bash = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.strip():
            commands.append(line.strip())
    return commands


# README command -> the test that runs it (here, or the named test elsewhere for the long ones)
COVERED_ELSEWHERE = {
    "make demo": "tests/test_e2e.py::test_demo_trains_merges_and_answers runs its recipe; checked below",
    "make demo-real": "tests/test_real_model.py::test_demo_real_learns_a_new_identity runs its recipe; checked below",
    "make test": "this very run; its recipe is checked below",
    "pip install -r requirements.txt": "tests/test_environment.py::test_installed_versions_match_the_pins",
    "conda env create -f environment.yml": "tests/test_environment.py::test_environment_yml_builds_the_same_stack",
    "pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cu128":
        "tests/test_environment.py::test_the_cuda_12_8_routes_install_the_same_pins",
    "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 conda env create -f environment.yml":
        "tests/test_environment.py::test_the_cuda_12_8_routes_install_the_same_pins",
    "sbatch --nodes=2 slurm/sft_train.sbatch --model qwen3-14b --model-path saves/Qwen3-14B --dataset my.jsonl":
        "tests/test_faults.py::test_slurm_script_resolves_torchrun_arguments (faked scontrol/srun)",
}


def test_every_readme_command_is_exercised() -> None:
    handled = set(COVERED_ELSEWHERE) | set(RUN_HERE)
    missing = [command for command in readme_commands() if command not in handled]
    assert not missing, f"README commands without a test: {missing}"
    stale = [command for command in handled if command not in readme_commands()]
    assert not stale, f"test cases for commands the README no longer shows: {stale}"


def test_make_recipes_are_what_the_readme_says() -> None:
    demo = subprocess.run(["make", "-n", "-C", str(KIT_DIR), "demo"], capture_output=True, text=True, check=True)
    assert "-m sftkit demo" in demo.stdout
    real = subprocess.run(["make", "-n", "-C", str(KIT_DIR), "demo-real"], capture_output=True, text=True, check=True)
    assert "-m sftkit demo-real" in real.stdout
    test = subprocess.run(["make", "-n", "-C", str(KIT_DIR), "test"], capture_output=True, text=True, check=True)
    runs = [shlex.split(line.split("-m pytest ", 1)[1]) for line in test.stdout.splitlines() if "-m pytest " in line]
    # the whole suite: the tests not marked slow (spread over the cores), then the slow ones
    assert [run[:3] for run in runs] == [["tests", "-m", "not slow"], ["tests", "-m", "slow"]], test.stdout
    assert runs[0][3:] == ["-n", "logical"] and runs[1][3:] == [], test.stdout
    fast = subprocess.run(["make", "-n", "-C", str(KIT_DIR), "test-fast"], capture_output=True, text=True, check=True)
    assert any(line.endswith('-m pytest tests -m "not slow" -n logical') for line in fast.stdout.splitlines()), \
        fast.stdout


# ---- the commands run here, in a scratch folder laid out like a user's ------------------------

DRY_RUN = "bash sft_train.sh --model qwen3-8b --model-path saves/Qwen3-8B --dataset my.jsonl --gpus 4 --dry-run"
TRAIN = "bash sft_train.sh --model qwen3-8b --model-path saves/Qwen3-8B --dataset my.jsonl"
MULTI_NODE = ("NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash sft_train.sh --model qwen3-14b "
              "--model-path saves/Qwen3-14B --dataset my.jsonl")
HF_DOWNLOAD = "hf download Qwen/Qwen3-8B --local-dir saves/Qwen3-8B"
KIT_MERGE = "python -m sftkit merge --adapter saves/Qwen3-8B-lora"
RUN_EXPORT = "llamafactory-cli export saves/Qwen3-8B-lora/merge_model.yaml"
TOP_EXPORT = "llamafactory-cli export merge_model.yaml"
CHAT = 'python -m sftkit chat --model saves/Qwen3-8B-merged --prompt "Who are you?"'
VERIFY = ("python -m sftkit verify-merge --base saves/Qwen3-8B --adapter saves/Qwen3-8B-lora "
          "--merged saves/Qwen3-8B-merged")
CHECK_DATA = "python -m sftkit check-data my.jsonl --model qwen3-8b --model-path saves/Qwen3-8B"
ESTIMATE = "python -m sftkit estimate --model qwen3-14b --gpus 4 --cutoff-len 20480"
COST = "python -m sftkit check-data my.jsonl --model qwen3-8b --model-path saves/Qwen3-8B --gpu-type H100 --epochs 1"
RUN_HERE = [HF_DOWNLOAD, DRY_RUN, TRAIN, RUN_EXPORT, TOP_EXPORT, KIT_MERGE, VERIFY, CHAT, MULTI_NODE, ESTIMATE,
            CHECK_DATA, COST]


def run(command: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a README command line: leading VAR=value assignments go to the environment."""
    words = shlex.split(command)
    env = kit_env(**(extra_env or {}))
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] == ["bash", "sft_train.sh"]:
        words[1] = str(KIT_DIR / "sft_train.sh")
    if words[0] == "python":
        words[0] = sys.executable
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def make_trained_adapter(base: Path, out: Path) -> None:
    """A LoRA adapter over all decoder linear layers with non-zero B, as training leaves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out)


def make_user_dir(root: Path, tiny_qwen3: Path) -> Path:
    """A user's working folder: saves/Qwen3-8B and saves/Qwen3-14B (tiny stand-ins), my.jsonl."""
    shutil.copytree(tiny_qwen3, root / "saves" / "Qwen3-8B")
    shutil.copytree(tiny_qwen3, root / "saves" / "Qwen3-14B")
    (root / "my.jsonl").write_text('{"instruction": "Hi", "input": "", "output": "Hello!"}\n', encoding="utf-8")
    shutil.copy(KIT_DIR / "merge_model.yaml", root / "merge_model.yaml")
    return root


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, tiny_qwen3: Path) -> Path:
    """One user folder for the commands that only read it (no run, adapter or merge is written there)."""
    return make_user_dir(tmp_path_factory.mktemp("user"), tiny_qwen3)


def test_hf_download_takes_the_options_shown() -> None:
    # No hub here: check that the CLI installed with the stack has the command and its option.
    result = subprocess.run([str(Path(sys.executable).parent / "hf"), "download", "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "--local-dir" in result.stdout


def test_dry_run_command(user_dir: Path) -> None:
    result = run(DRY_RUN, user_dir)
    assert result.returncode == 0, result.stderr
    assert "saves/Qwen3-8B-lora" in result.stdout
    assert not (user_dir / "saves" / "Qwen3-8B-lora").exists()


def test_train_command_plans_and_refuses_without_gpus(user_dir: Path) -> None:
    result = run(TRAIN + " --dry-run", user_dir)
    assert result.returncode == 0, result.stderr
    result = run(TRAIN, user_dir)  # no GPU on this machine: refused before anything starts
    assert result.returncode != 0
    assert "sees no GPU" in result.stderr
    assert not (user_dir / "saves" / "Qwen3-8B-lora").exists()


def test_check_data_command(user_dir: Path) -> None:
    """The report counts what Qwen3's own chat template makes of my.jsonl's one row."""
    from transformers import AutoTokenizer

    result = run(CHECK_DATA, user_dir)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(user_dir / "saves" / "Qwen3-8B")
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, enable_thinking=False, tokenize=False)
    whole = tokenizer.apply_chat_template([user, answer], enable_thinking=False, tokenize=False)
    assert whole.startswith(prompt)
    n_prompt, n_whole = (len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (prompt, whole))
    assert "my.jsonl: jsonl, format alpaca, 1 rows read, 1 valid" in result.stdout
    assert f"per row as trained p50 {n_whole}," in result.stdout, result.stdout
    assert f"prompt:   p50 {n_prompt}," in result.stdout, result.stdout
    assert f"response: p50 {n_whole - n_prompt}," in result.stdout, result.stdout


def test_cost_command(user_dir: Path) -> None:
    """The time line for 1 epoch on the named GPU, with its assumption; fill and packing lines for a short row."""
    result = run(COST, user_dir)
    assert result.returncode == 0, result.stderr
    assert "for 1 epoch on 4 x H100 (at 27% MFU, assumed: " in result.stdout, result.stdout
    assert "fill:       a micro-batch holds" in result.stdout
    assert "packing:    rows are short against the cutoff" in result.stdout


def test_estimate_command(user_dir: Path) -> None:
    """Parameter counts worked out here from Qwen3-14B's published config.json, and the verdict."""
    hidden, layers, inter, vocab, kv = 5120, 40, 17408, 151936, 8 * 128  # Qwen/Qwen3-14B config.json
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, inter)] * 3
    lora = layers * sum(64 * (a + b) for a, b in linears)  # the seed's rank 64 on every linear layer
    params = layers * (sum(a * b for a, b in linears) + 2 * hidden + 2 * 128) + 2 * vocab * hidden + hidden
    result = run(ESTIMATE, user_dir)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert f"{lora / 1e6:.1f}M trainable of {params / 1e9:.2f}B params" in first, first
    assert "4 GPU(s) x 1 node(s), micro-batch 2, cutoff 20480" in first
    assert "fits: yes" in result.stdout  # about 45 of the 80 GB assumed when no GPU is visible


def test_multi_node_command(user_dir: Path) -> None:
    result = run(MULTI_NODE + " --dry-run", user_dir)
    assert result.returncode == 0, result.stderr
    assert "--nnodes 2 --node_rank 0" in result.stdout
    assert "--master_addr 10.0.0.1 --master_port 29500" in result.stdout


def test_merge_commands_and_chat(tiny_qwen3: Path, tmp_path: Path) -> None:
    """The three ways to merge from the README, then the chat command, on a tiny adapter (in a user folder of
    its own: it writes the adapter, the merged model and the top-level merge_model.yaml)."""
    user_dir = make_user_dir(tmp_path / "user", tiny_qwen3)
    sys.path.insert(0, str(KIT_DIR))
    from sftkit.launch import plan as plan_module
    from sftkit.launch.run_record import merge_config

    # the run's merge_model.yaml, as sft_train.sh writes it at launch (planned from the user's folder)
    args = plan_module.parse_args(["--model", "qwen3-8b", "--model-path", "saves/Qwen3-8B", "--dataset", "my.jsonl",
                                   "--gpus", "4", "--dry-run"])
    cwd = Path.cwd()
    os.chdir(user_dir)
    try:
        the_plan = plan_module.build_plan(args)
    finally:
        os.chdir(cwd)
    adapter = user_dir / "saves" / "Qwen3-8B-lora"
    make_trained_adapter(user_dir / "saves" / "Qwen3-8B", adapter)
    (adapter / "merge_model.yaml").write_text(merge_config(the_plan), encoding="utf-8")

    merged = user_dir / "saves" / "Qwen3-8B-merged"
    result = run(KIT_MERGE, user_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert any(merged.glob("*.safetensors"))
    result = run(VERIFY, user_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    result = run(RUN_EXPORT, user_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(merged.glob("*.safetensors"))

    # the top-level file, with model_name_or_path set to the local base as the README says
    top = user_dir / "merge_model.yaml"
    top.write_text(top.read_text().replace("model_name_or_path: Qwen/Qwen3-8B", "model_name_or_path: saves/Qwen3-8B"))
    result = run(TOP_EXPORT, user_dir)
    assert result.returncode == 0, result.stderr[-2000:]

    result = run(CHAT, user_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "user:      Who are you?" in result.stdout
    assert "assistant:" in result.stdout
