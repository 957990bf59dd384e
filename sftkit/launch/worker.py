"""What torchrun starts on each GPU: LLaMA-Factory's own `run_exp`, plus one callback.

    torchrun ... -m sftkit.launch.worker OUTPUT_DIR/sftkit/train.yaml [key=value ...]
    (the run's LLaMA-Factory YAML, read by LLaMA-Factory's own read_args as `llamafactory-cli train` reads it)

The callback (`KitCallback`) adds two things to LLaMA-Factory's run, each decided by all ranks
together at the end of an optimizer step (one all-reduce of two numbers, so they act on the same
step):

- A stop request is graceful. On SIGTERM, SIGINT or SIGHUP (Slurm preemption, Ctrl-C, a closed
  terminal, or the supervisor forwarding one) a worker only raises a flag; at the end of the
  current step all ranks save a checkpoint together and exit with status 143, and the next
  `sft_train.sh` run resumes from it. Before the first step there is nothing to save: the worker
  exits at once.
- Checkpoints by the clock: with SFTKIT_SAVE_EVERY_MINUTES=M (the launcher's --save-every-minutes,
  default 30), a checkpoint is saved when M minutes have passed since the last save, beside
  `save_steps`; `save_total_limit` bounds how many are kept.

Without a signal and with the clock off, the run is exactly LLaMA-Factory's.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOPPED_EXIT = 143  # 128 + SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopRequest:
    """Installed first thing (torchrun starts workers with these signals ignored; see sftkit.launch.supervise)."""

    def __init__(self) -> None:
        self.requested = False
        self.training = False  # set once the first step can start: from then on a stop saves first
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True
        if not self.training:  # still loading: no step taken, nothing to save
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STOPPED_EXIT)


STOP = _StopRequest()

from transformers import TrainerCallback  # noqa: E402 - after the handlers: importing takes seconds


class KitCallback(TrainerCallback):
    def __init__(self, save_every_minutes: float = 0.0) -> None:
        self.save_every_s = save_every_minutes * 60.0
        self.last_save = time.monotonic()
        self.stopping = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        STOP.training = True
        return control

    def _agree(self) -> tuple[bool, bool]:
        """(anyone asked to stop, rank 0's clock says save): the same answer on every rank."""
        clock = self.save_every_s > 0 and time.monotonic() - self.last_save >= self.save_every_s
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return STOP.requested, clock
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        flags = torch.tensor([float(STOP.requested), float(clock and dist.get_rank() == 0)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopping:
            return control
        stop, clock = self._agree()
        if stop:
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"sftkit: stop requested; saving checkpoint-{state.global_step} and exiting", flush=True)
        elif clock and not control.should_save:
            control.should_save = True
            if state.is_world_process_zero:
                print(f"sftkit: {self.save_every_s / 60:g} min since the last checkpoint; saving "
                      f"checkpoint-{state.global_step}", flush=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        from sftkit.launch.calibration import write_peak_memory

        write_peak_memory(args.output_dir)  # on a GPU: this rank's peak, for the manifest's `measured`
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        if self.stopping:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's shard is on disk before anyone leaves
            sys.exit(STOPPED_EXIT)  # not LLaMA-Factory's end-of-training save: this run is not finished
        return control


def main() -> None:
    import atexit

    from llamafactory.train.tuner import run_exp

    callbacks: list[TrainerCallback] = [KitCallback(float(os.environ.get("SFTKIT_SAVE_EVERY_MINUTES") or 0))]
    if os.environ.get("SFTKIT_BENCH_OUT"):  # bench/run.sh: step times, tokens and peak memory
        from bench.benchmark import ThroughputCallback

        callbacks.append(ThroughputCallback(os.environ["SFTKIT_BENCH_OUT"]))
    run_exp(callbacks=callbacks)
    # Everything is saved and the process group destroyed. Run the exit handlers (trackers such as
    # wandb and mlflow finish their runs there), then leave without the interpreter's teardown, where
    # gloo's background threads have been seen to abort a finished CPU run (SIGABRT).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
