"""How the speed benchmarks (`perf`, `scale`, `gpu`) set up TRL's trainers so that they match opd's settings, and how
they time TRL's steps. Nothing here imports TRL or transformers until it is called: the `gpu` benchmark runs where
TRL may not be installed."""

from __future__ import annotations

import time
from pathlib import Path


def trl_training_args(output_dir: Path, batch_size: int, steps: int, lr: float, seed: int,
                      use_cpu: bool = True) -> dict:
    """Keyword arguments of TRL's `*Config` that every benchmark sets alike.

    TRL's defaults except what must match opd: lr, constant schedule, no warm-up, no weight decay, clip 1.0, batch,
    the weights' own precision (bf16 autocast off). Gradient checkpointing is off: opd does not recompute the trunk,
    and with it on GKD also generates without a KV cache. No logging, saving or evaluation during training."""
    return {"output_dir": str(output_dir), "per_device_train_batch_size": batch_size, "max_steps": steps,
            "learning_rate": lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "gradient_checkpointing": False, "bf16": False, "logging_steps": 10**6,
            "save_strategy": "no", "report_to": [], "use_cpu": use_cpu, "disable_tqdm": True, "seed": seed,
            "dataloader_num_workers": 0}


def trl_beta(loss: str, beta: float) -> float:
    """TRL's β for opd's `loss`: 0 forward KL, 1 reverse KL, in between the generalized JSD (same mixture as opd's)."""
    return 1.0 if loss == "reverse_kl" else beta


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported by the caller) timing each optimizer step; `sync`
    runs at both ends of a step (e.g. `torch.cuda.synchronize`, so that queued GPU work is counted)."""

    def __new__(cls, sync=None):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.step_s = []

            def on_step_begin(self, args, state, control, **kwargs):
                if sync:
                    sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if sync:
                    sync()
                self.step_s.append(time.perf_counter() - self.t0)

        return Timer()
