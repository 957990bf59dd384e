"""What torchrun starts on each GPU: LLaMA-Factory's own `run_exp`, plus one callback.

    torchrun ... -m sftkit.worker --stage sft ...   (same arguments as `-m llamafactory.launcher`)

The callback makes a stop request graceful. On SIGTERM, SIGINT or SIGHUP (Slurm preemption,
Ctrl-C, a closed terminal, or sft_train.sh forwarding one) a worker only raises a flag; at the
end of the current optimizer step all ranks agree on it (one all-reduce of a single number, so
they stop at the same step), save a checkpoint together, and exit with status 143. The next
`sft_train.sh` run resumes from that checkpoint, so a stop loses nothing. Without a signal the
run is exactly LLaMA-Factory's.
"""

from __future__ import annotations

import signal
import sys

from transformers import TrainerCallback

STOPPED_EXIT = 143  # 128 + SIGTERM


class StopOnSignal(TrainerCallback):
    def __init__(self) -> None:
        self.requested = False
        self.stopping = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def _anyone_requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopping and self._anyone_requested():
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"sftkit: stop requested; saving checkpoint-{state.global_step} and exiting", flush=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's shard is on disk before anyone leaves
            sys.exit(STOPPED_EXIT)  # not LLaMA-Factory's end-of-training save: this run is not finished
        return control


def main() -> None:
    import os

    from llamafactory.train.tuner import run_exp

    callbacks: list[TrainerCallback] = [StopOnSignal()]
    if os.environ.get("SFTKIT_BENCH_OUT"):  # bench/run.sh: step times, tokens and peak memory
        from sftkit.benchmark import ThroughputCallback

        callbacks.append(ThroughputCallback(os.environ["SFTKIT_BENCH_OUT"]))
    run_exp(callbacks=callbacks)
    # Everything is saved and the process group destroyed. Leave without the interpreter's teardown,
    # where gloo's background threads have been seen to abort a finished CPU run (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
