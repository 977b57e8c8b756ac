"""Student policies: an MLP for vector observations, a small CNN for MinAtar grids, one action head per task.

A policy maps observations [N, *obs_shape] to action logits [N, A] (read as a softmax policy by the distillation
losses, or as Q-values by the MSE variant and by DQN). `features` returns the last hidden layer [N, D], the layer that
Actor-Mimic's feature regression and FitNets-style hints act on. Students are saved as safetensors + a JSON spec.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild a policy network (written next to its weights)."""

    obs_shape: tuple[int, ...]
    """Observation shape: (D,) for vector observations, (C, H, W) for MinAtar grids."""
    num_actions: tuple[int, ...]
    """Actions per head; one entry per task (one head for a single-task student)."""
    hidden: tuple[int, ...] = (64, 64)
    """Widths of the fully connected hidden layers (after the convolution for grids)."""
    conv_channels: int = 16
    """Channels of the single 3x3 convolution used for (C, H, W) observations (MinAtar's DQN uses 16)."""

    def __post_init__(self):
        object.__setattr__(self, "obs_shape", tuple(int(s) for s in self.obs_shape))
        num_actions = (self.num_actions,) if isinstance(self.num_actions, int) else self.num_actions
        object.__setattr__(self, "num_actions", tuple(int(a) for a in num_actions))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if len(self.obs_shape) not in (1, 3):
            raise ValueError(f"obs_shape={self.obs_shape}: expected (D,) or (C, H, W)")
        if not self.hidden:
            raise ValueError("hidden=(): give at least one hidden layer (its output is the feature layer)")


class Policy(nn.Module):
    """Trunk (conv for grids, then MLP) shared by all tasks, plus a linear action head per task."""

    def __init__(self, spec: PolicySpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        if len(spec.obs_shape) == 3:
            c, h, w = spec.obs_shape
            layers += [nn.Conv2d(c, spec.conv_channels, 3), nn.ReLU(), nn.Flatten()]
            width = spec.conv_channels * (h - 2) * (w - 2)
        else:
            width = spec.obs_shape[0]
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in spec.num_actions)
        self.feature_dim = width

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """Last hidden layer [N, D]."""
        return self.trunk(obs.float())

    def forward(self, obs: torch.Tensor, head: int = 0) -> torch.Tensor:
        """Action logits [N, A_head]."""
        return self.heads[head](self.features(obs))

    @torch.no_grad()
    def act(self, obs: np.ndarray, head: int = 0, greedy: bool = True, generator: torch.Generator | None = None):
        """Actions for a batch of numpy observations: argmax, or a sample from softmax(logits)."""
        logits = self(torch.as_tensor(np.asarray(obs), dtype=torch.float32), head)
        if greedy:
            return logits.argmax(-1).numpy()
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1).numpy()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (all of them; students are trained end to end)."""
    return sum(p.numel() for p in module.parameters())


def spec_parameters(spec: PolicySpec) -> int:
    """`count_parameters(Policy(spec))` without building the network (for size searches)."""
    if len(spec.obs_shape) == 3:
        c, h, w = spec.obs_shape
        total, width = c * spec.conv_channels * 9 + spec.conv_channels, spec.conv_channels * (h - 2) * (w - 2)
    else:
        total, width = 0, spec.obs_shape[0]
    for hidden in spec.hidden:
        total, width = total + width * hidden + hidden, hidden
    return total + sum(width * n + n for n in spec.num_actions)


def spec_for_fraction(reference: PolicySpec, target_params: int, depth: int = 1) -> PolicySpec:
    """A narrower spec of the same shape whose parameter count is closest to `target_params`.

    Used for compression sweeps: conv channels and hidden widths are scaled together by one factor.
    """
    best, best_gap = None, None
    for width in range(1, max(reference.hidden) + 1):
        scale = width / max(reference.hidden)
        spec = PolicySpec(
            reference.obs_shape,
            reference.num_actions,
            hidden=(width,) * depth,
            conv_channels=max(1, round(reference.conv_channels * scale)),
        )
        gap = abs(spec_parameters(spec) - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = spec, gap
    return best


def save_policy(policy: Policy, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (spec + `extra`) atomically into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    # Write to temp files then rename, so an interrupted save never leaves a half-written checkpoint behind.
    for name, write in (
        ("model.safetensors", lambda p: save_file(state, p)),
        ("config.json", lambda p: Path(p).write_text(json.dumps({"spec": asdict(policy.spec), **(extra or {})}))),
    ):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, directory / name)
    return directory


def load_policy(directory: str | Path) -> Policy:
    """Rebuild a policy saved by `save_policy`."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory} holds no config.json; pass a directory written by save_policy")
    config = json.loads((directory / "config.json").read_text())
    policy = Policy(PolicySpec(**config["spec"]))
    policy.load_state_dict(load_file(directory / "model.safetensors"))
    return policy.eval()
