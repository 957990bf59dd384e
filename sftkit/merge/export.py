"""Merge a LoRA adapter into its base model with LLaMA-Factory's export, verified, never half-written.

    python -m sftkit merge --adapter saves/Qwen3-8B-lora [--out saves/Qwen3-8B-merged] [--overwrite]
    python -m sftkit merge --adapter saves/Qwen3-8B-lora/checkpoint-500     (any checkpoint of a run)

Settings come from the run's `merge_model.yaml` (else the kit's), `--set key=value` overrides; another template
or thinking setting than the run's needs `--force-template`. The export goes to a hidden `.<name>.partial-*`
folder, gets LLaMA-Factory's template as its chat template (sftkit.merge.served_template: the prompt it is served is the
one it trained on), is checked by verify-merge, and is renamed into place unless proven wrong (exit 3 when a check
could not run, 1 when nothing was written).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from sftkit.files import KIT_DIR
from sftkit.merge import merge_behaviour, served_template, verify_merge
from sftkit.merge.chat import MERGE_RECORD, first_line

KIT_MERGE_CONFIG = KIT_DIR / "merge_model.yaml"
RUN_KEYS = ("template", "enable_thinking")  # what must match training
THINKING_MARK = served_template.THINKING_MARK
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class MergeError(Exception):
    pass


class UnverifiedMerge(MergeError):
    """The merged model is in place, but a check could not run (a resource problem, not a finding)."""

    def __init__(self, out: Path, message: str):
        super().__init__(message)
        self.out = out


VERIFIED_KEYS = ("merged_dtype", "max_abs_logit_diff", "tolerance", "greedy_match", "differs_from_base", "eos_token")


def load_config(adapter: Path, config: Path | None = None, overrides: list[str] = (),
                force_template: bool = False) -> dict:
    """The export settings: the run's record (or `config`, or the kit's file), then `overrides`; the run's
    template and thinking setting win unless `force_template`."""
    adapter = Path(adapter)
    record = verify_merge.run_record_path(adapter)
    source = Path(config) if config else record or KIT_MERGE_CONFIG
    try:
        settings = verify_merge.read_yaml(source)
        run = verify_merge.read_yaml(record) if record else {}
    except ValueError as err:
        fix = "fix it, or leave out --config to use the run's own" if config else "restore it (sft_train.sh writes one)"
        raise MergeError(f"{err}: {fix}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeError(f"--set {item!r}: write it as key=value")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise MergeError(f"--set {item!r}: the value is not valid YAML ({problem}): quote it, e.g. "
                             f"--set '{key.strip()}=\"{value}\"'") from None
    for key in RUN_KEYS:
        if key in run and settings.setdefault(key, run[key]) != run[key] and not force_template:
            raise MergeError(
                f"{key} {settings[key]!r} differs from the run's {run[key]!r} ({record}): a model merged with "
                f"another {key} than it was trained with stops or thinks wrongly; drop it, or pass "
                "--force-template if you really mean it"
            )
    settings["adapter_name_or_path"] = str(adapter)
    settings.pop("export_dir", None)  # the destination is --out; the export goes to a temporary folder
    return settings


def default_destination(adapter: Path) -> Path:
    """`<Model>-merged` beside `<Model>-lora`; `<Model>-checkpoint-N-merged` for a checkpoint of it."""
    adapter = Path(adapter)
    if verify_merge.CHECKPOINT_NAME.fullmatch(adapter.name):
        run = adapter.parent
        return run.parent / f"{run.name.removesuffix('-lora')}-{adapter.name}-merged"
    return adapter.parent / f"{adapter.name.removesuffix('-lora')}-merged"


def resolve_model_path(value: str) -> str:
    """A relative base-model path as written at training time: from here, else from the kit's folder."""
    path = Path(value).expanduser()
    for folder in (path, KIT_DIR / path):
        if folder.is_dir():
            return str(folder.resolve())
    return str(path) if path.is_absolute() else value


def local_base(value: str) -> Path:
    """The base model's local folder, for the verification (a hub id resolves to its cached snapshot)."""
    if Path(value).is_dir():
        return Path(value)
    if HUB_ID.fullmatch(value):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(value, local_files_only=True))
        except Exception:  # noqa: BLE001 - reported below as one line
            pass
    raise MergeError(
        f"base model {value!r} is not a folder here (nor a model in the hub cache): run from the folder you trained "
        "in, or pass --set model_name_or_path=/path/to/the/base/model"
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return pid != os.getpid()


def clean_leftovers(out: Path) -> None:
    """Remove a killed merge's `.partial-*` export, put back a `.old-*` model it was replacing; refuse while
    another merge into `out` runs."""
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        found = re.search(r"\.(partial|old)-(\d+)", leftover.name)
        if found is None:
            continue
        if pid_alive(int(found.group(2))):
            raise MergeError(
                f"another merge into {out} is running (pid {found.group(2)}, writing {leftover}): wait for it, or "
                f"stop it and delete {leftover}"
            )
        if found.group(1) == "old" and not out.exists():
            leftover.rename(out)
            print(f"merge: put back {out}, which an interrupted merge was replacing")
            continue
        print(f"merge: removing {leftover}, left by an interrupted merge")
        shutil.rmtree(leftover, ignore_errors=True)


def record_thinking_default(model_dir: Path, thinking: bool | None) -> bool:
    """Make the run's thinking setting the chat template's default (a request may override it); True if changed."""
    text = None if thinking is None else served_template.current_template(model_dir)
    if text is None or "enable_thinking" not in text or THINKING_MARK in text:
        return False
    text = served_template.thinking_header(thinking) + text
    jinja, config_path = model_dir / "chat_template.jinja", model_dir / "tokenizer_config.json"
    if jinja.is_file():
        jinja.write_text(text, encoding="utf-8")
    else:
        config = dict(json.loads(config_path.read_text(encoding="utf-8")), chat_template=text)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def export_command() -> list[str]:
    beside = Path(sys.executable).parent / "llamafactory-cli"
    found = str(beside) if beside.is_file() else shutil.which("llamafactory-cli")
    if found is None:
        raise MergeError("llamafactory-cli not found: activate the kit's environment (see README, 'Install')")
    return [found, "export"]


# Runs the export as a child that the kernel kills when the merge process dies (PR_SET_PDEATHSIG
# survives exec), so a killed merge cannot leave an export writing on; exits if already orphaned.
_WATCHDOG = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def with_watchdog(command: list[str]) -> list[str]:
    linux = sys.platform.startswith("linux")
    return [sys.executable, "-c", _WATCHDOG, str(os.getpid()), *command] if linux else command


def _preload() -> None:
    """Import what the verification needs while the export runs (they take seconds each)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from llamafactory.data import template  # noqa: F401


def merge(adapter: Path, out: Path, settings: dict, overwrite: bool, verify: bool = True,
          device: str | None = None, behaviour: str = "auto") -> Path:
    """Export `adapter` merged into its base to `out`, verified; `out` appears only when no check proved it wrong.

    Raises MergeError when nothing was written, UnverifiedMerge (after writing `out`) when a check could not run.
    """
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(
            f"{adapter} has no adapter_config.json: pass the folder sft_train.sh wrote (--output-dir), or one of its "
            "checkpoint-N folders"
        )
    if out.parent.is_dir():
        clean_leftovers(out)
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists: pass --overwrite to replace it, or --out another folder")
    settings = dict(settings)
    if not settings.get("model_name_or_path"):
        raise MergeError("no model_name_or_path in the merge settings: pass --set model_name_or_path=DIR")
    settings["model_name_or_path"] = resolve_model_path(str(settings["model_name_or_path"]))
    if not Path(settings["model_name_or_path"]).is_dir() and not HUB_ID.fullmatch(settings["model_name_or_path"]):
        local_base(settings["model_name_or_path"])  # raises the one-line error
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    process = None
    unverified = None
    try:
        merged = staging / "model"
        settings["export_dir"] = str(merged)
        config_file = staging / "merge.yaml"
        config_file.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        process = subprocess.Popen(with_watchdog([*export_command(), str(config_file)]))
        if verify:
            _preload()
        if process.wait() != 0:
            raise MergeError(f"llamafactory-cli export failed (exit {process.returncode}); see its output above")
        if not merged.is_dir() or not any(merged.glob("*.safetensors")):
            raise MergeError(f"the export wrote no weights into {merged}")
        record = {key: settings.get(key) for key in ("model_name_or_path", "adapter_name_or_path", *RUN_KEYS)}
        (merged / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # the served prompt is the trained one: LLaMA-Factory's template, else the model's own with the run's thinking
        if not served_template.write(merged, settings.get("template"), settings.get("enable_thinking")):
            record_thinking_default(merged, settings.get("enable_thinking"))
        if verify:
            record["verified"], unverified = verified(settings, adapter, merged, out, device, behaviour)
            if unverified:
                record["unverified"] = unverified
            (merged / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            merged.rename(out)
            shutil.rmtree(old)
        else:
            merged.rename(out)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(staging, ignore_errors=True)
    if unverified:
        raise UnverifiedMerge(out, f"{out} is in place, but not fully verified: {'; '.join(unverified)}. Check it "
                              f"again with python -m sftkit verify-merge --base {settings['model_name_or_path']} "
                              f"--adapter {adapter} --merged {out}")
    return out


def verified(settings: dict, adapter: Path, merged: Path, out: Path, device: str | None,
             behaviour: str) -> tuple[dict | None, list[str]]:
    """(the record's `verified` entry, why a check could not run); MergeError when a check proved the merge wrong."""
    try:
        report = verify_merge.verify(local_base(settings["model_name_or_path"]), adapter, merged, device, behaviour)
    except MergeError as err:
        return None, [f"the verification could not run ({err})"]
    except Exception as err:  # noqa: BLE001 - a verifier that fails proves nothing about the merge
        return None, [f"the verification could not run ({type(err).__name__}: {first_line(err)})"]
    print("\n".join(verify_merge.summary(report)).replace(str(merged), str(out)))
    defects = verify_merge.proven_defects(report)
    if defects:
        names = ", ".join(sorted({p["name"] for p in defects}))
        raise MergeError(f"the merged model failed verification ({names}); {out} was not written")
    entry = {key: report[key] for key in VERIFIED_KEYS}
    entry["weights_proof"] = report["weights_proof"]
    entry["behaviour"] = (report["behaviour"] or {}).get("reason")
    return entry, [p["message"].replace(str(merged), str(out)) for p in report["problems"]]


def _terminate(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)  # unwinds through merge()'s cleanup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder (or one checkpoint-N)")
    parser.add_argument("--out", type=Path, help="destination (default: <Model>-merged beside the adapter)")
    parser.add_argument("--config", type=Path, help="a merge_model.yaml to use instead of the run's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one export setting, e.g. infer_dtype=float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--force-template", action="store_true",
                        help="allow a template or enable_thinking other than the run's (you rarely want this)")
    parser.add_argument("--behaviour", choices=merge_behaviour.MODES, default="auto",
                        help="the verification's logits check: auto (where it fits the memory at hand), always, never")
    parser.add_argument("--device", help="where the logits check computes (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if not args.adapter.is_dir():
            raise MergeError(f"--adapter {args.adapter}: no such folder")
        settings = load_config(args.adapter, args.config, args.overrides, args.force_template)
        out = merge(args.adapter, args.out or default_destination(args.adapter), settings, args.overwrite,
                    device=args.device, behaviour=args.behaviour)
    except UnverifiedMerge as err:
        print(f"merged model: {err.out} (not fully verified)")
        print(f"sftkit merge: error: {err}", file=sys.stderr)
        return 3
    except MergeError as err:
        print(f"sftkit merge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sftkit merge: interrupted; no merged model was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"merged model: {out}")
    return 0
