"""Teachers for control: stable-baselines3 DQN/PPO models (trained and cached here) or any callable.

A teacher is called on a batch of numpy observations [N, *obs] and returns a `TeacherOutput`: what it gives per
state (Q-values, action logits, action probabilities or only a hard action), its greedy action, and, for SB3 models,
its last hidden layer (the features Actor-Mimic regresses onto). `as_teacher` turns any of these into a `Teacher`:

    as_teacher(sb3_dqn)                       # Q-values + features
    as_teacher(sb3_ppo)                       # action logits + features
    as_teacher(lambda obs_NO: actions_N)      # hard actions (DAgger's expert)
    as_teacher(fn, kind="q")                  # any callable returning [N, A] Q-values / logits / probs

`train_teacher(TeacherConfig(...))` trains an SB3 teacher once and caches it under `$OPD_CACHE/teachers`
(default `~/.cache/opd/teachers`); nothing is ever downloaded. `train_ppo(env_fn, PPOArgs(...), name)` does the same
for PPO on any env factory (the robotics teachers), and both go through `train_cached`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from opd.cache import cache_root
from opd.control.envs import is_minatar, make_env

Kind = Literal["q", "logits", "probs", "action"]


@dataclass
class TeacherOutput:
    """A teacher's grade of a batch of N states."""

    kind: Kind
    """What `values_NA` holds: Q-values, action logits, action probabilities; None for hard-action teachers."""
    actions_N: torch.Tensor
    """The teacher's greedy action (argmax of the values, or the action itself)."""
    values_NA: torch.Tensor | None = None
    features_ND: torch.Tensor | None = None
    """The teacher's last hidden layer, when the teacher is a network we can open (SB3 models)."""


def teacher_logp(output: TeacherOutput, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's action distribution as log-probs [N, A]: log_softmax(values / τ) (Rusu's softmax(Q/τ)).

    Probabilities are sharpened the same way (p^(1/τ), renormalised). A hard-action teacher has no distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; pass a positive temperature")
    if output.kind == "action":
        raise ValueError("this teacher gives hard actions only; use a cross-entropy / NLL loss on `actions_N`")
    if output.kind == "probs":
        return torch.log_softmax(torch.log(output.values_NA.clamp_min(1e-30)) / temperature, -1)
    return torch.log_softmax(output.values_NA / temperature, -1)


class Teacher:
    """A frozen teacher: `teacher(obs_NO) -> TeacherOutput`."""

    def __init__(self, grade: Callable[[np.ndarray], TeacherOutput], kind: Kind, has_features: bool = False):
        self.grade = grade
        self.kind = kind
        self.has_features = has_features

    def __call__(self, obs: np.ndarray) -> TeacherOutput:
        return self.grade(np.asarray(obs))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions as a numpy int array [N]."""
        return self(obs).actions_N.numpy()


def as_teacher(obj, kind: Kind | None = None) -> Teacher:
    """Wrap an SB3 DQN/PPO model, an `opd` Policy (logits), a `Teacher`, or a batched callable as a Teacher.

    A callable gets numpy observations [N, *obs]. Integer outputs [N] are hard actions; float outputs [N, A] need
    `kind` ("q", "logits" or "probs") because Q-values and logits cannot be told apart.
    """
    if isinstance(obj, Teacher):
        return obj
    from stable_baselines3 import DQN, PPO

    from opd.control.policies import Policy

    if isinstance(obj, DQN):
        return Teacher(_sb3_dqn_grade(obj), "q", has_features=True)
    if isinstance(obj, PPO):
        return Teacher(_sb3_ppo_grade(obj), "logits", has_features=True)
    if isinstance(obj, Policy):
        policy = obj

        @torch.no_grad()
        def grade_policy(obs):
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            features = policy.features(obs_t)
            logits = policy.heads[0](features)
            return TeacherOutput(kind or "logits", logits.argmax(-1), logits, features)

        return Teacher(grade_policy, kind or "logits", has_features=True)
    if not callable(obj):
        raise ValueError(f"cannot use a {type(obj).__name__} as a teacher; pass an SB3 DQN/PPO, a Policy or a callable")

    def grade_callable(obs):
        out = torch.as_tensor(np.asarray(obj(obs)))
        if not out.is_floating_point():
            if out.shape != (len(obs),):
                raise ValueError(f"teacher returned actions of shape {tuple(out.shape)}; expected ({len(obs)},)")
            return TeacherOutput("action", out.long())
        if kind in (None, "action") or out.ndim != 2:
            raise ValueError(
                f"teacher returned floats of shape {tuple(out.shape)}; return [N] int actions, or [N, A] values "
                "and pass kind='q', 'logits' or 'probs'"
            )
        return TeacherOutput(kind, out.argmax(-1), out.float())

    return Teacher(grade_callable, kind or "action")


def _sb3_dqn_grade(model):
    q_net = model.q_net

    @torch.no_grad()
    def grade(obs):
        obs_t, _ = model.policy.obs_to_tensor(obs)
        hidden = q_net.extract_features(obs_t, q_net.features_extractor)
        for layer in q_net.q_net[:-1]:  # the last Linear maps the feature layer to Q-values
            hidden = layer(hidden)
        q_values = q_net.q_net[-1](hidden)
        return TeacherOutput("q", q_values.argmax(-1).cpu(), q_values.cpu(), hidden.cpu())

    return grade


def _sb3_ppo_grade(model):
    policy = model.policy

    @torch.no_grad()
    def grade(obs):
        obs_t, _ = policy.obs_to_tensor(obs)
        features = policy.extract_features(obs_t)
        if not policy.share_features_extractor:
            features = features[0]
        latent = policy.mlp_extractor.forward_actor(features)
        logits = policy.action_net(latent)
        return TeacherOutput("logits", logits.argmax(-1).cpu(), logits.cpu(), latent.cpu())

    return grade


def cartpole_expert(obs_NO: np.ndarray) -> np.ndarray:
    """A hand-written linear CartPole controller (push toward where the pole is falling): return 500 every episode."""
    obs_NO = np.atleast_2d(obs_NO)
    return (obs_NO @ np.array([0.1, 0.5, 3.0, 1.0]) > 0).astype(np.int64)


class MinAtarCNN(nn.Module):
    """SB3 features extractor for MinAtar: MinAtar's DQN torso (one 3x3 conv, 16 channels) + a dense layer."""

    def __init__(self, observation_space, features_dim: int = 128, conv_channels: int = 16):
        super().__init__()
        c, h, w = observation_space.shape
        self.features_dim = features_dim
        self.net = nn.Sequential(
            nn.Conv2d(c, conv_channels, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(conv_channels * (h - 2) * (w - 2), features_dim), nn.ReLU(),
        )  # fmt: skip

    def forward(self, obs):
        return self.net(obs)


@dataclass(frozen=True)
class TeacherConfig:
    """Which SB3 teacher to train (and the cache key it is stored under)."""

    env_id: str = "CartPole-v1"
    """gymnasium id: CartPole-v1, LunarLander-v3, MinAtar/Breakout-v1, ..."""
    algo: Literal["dqn", "ppo"] = "dqn"
    """dqn gives Q-values (Rusu, Actor-Mimic); ppo gives action logits."""
    total_steps: int = 50_000
    """Environment steps of training."""
    seed: int = 0
    """Seed for SB3 and the environments."""


def dqn_ppo_hyperparameters(config: TeacherConfig) -> dict:
    """SB3 keyword arguments for training `config`'s teacher (also used by the transfer DQN)."""
    # Tuned values in the spirit of rl-baselines3-zoo, shrunk to what two CPU cores can train in minutes.
    if config.algo == "ppo":
        if config.env_id.startswith("LunarLander"):
            return dict(n_steps=1024, batch_size=64, gae_lambda=0.98, gamma=0.999, n_epochs=4, ent_coef=0.01)
        return dict(n_steps=256, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, learning_rate=1e-3)
    if is_minatar(config.env_id):
        # MinAtar's DQN (Young & Tian 2019) with Adam and a shorter ε decay for shorter runs.
        return dict(
            learning_rate=2.5e-4, buffer_size=100_000, learning_starts=5_000, batch_size=32, gamma=0.99,
            train_freq=4, target_update_interval=1_000, exploration_fraction=0.1, exploration_final_eps=0.05,
            policy_kwargs=dict(features_extractor_class=MinAtarCNN, net_arch=[]),
        )  # fmt: skip
    if config.env_id.startswith("LunarLander"):
        return dict(
            learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0, gamma=0.99,
            target_update_interval=250, train_freq=4, gradient_steps=-1, exploration_fraction=0.12,
            exploration_final_eps=0.1, policy_kwargs=dict(net_arch=[256, 256]),
        )  # fmt: skip
    return dict(
        learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1_000, gamma=0.99,
        target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]),
    )  # fmt: skip


def cache_dir() -> Path:
    """`$OPD_CACHE` or `~/.cache/opd` (`opd.cache.cache_root`)."""
    return cache_root()


def teacher_path(config: TeacherConfig) -> Path:
    """Where `train_teacher` caches this teacher."""
    name = f"{config.env_id.replace('/', '_')}-{config.algo}-{config.total_steps}-s{config.seed}.zip"
    return cache_dir() / "teachers" / name


def train_cached(path: Path, algo, make: Callable[[], tuple], total_steps: int, progress: bool = False,
                 retrain: bool = False):
    """The SB3 model cached at `path` (loaded with `algo.load`), or a new one: `make()` gives (model, vec env), the
    model learns `total_steps` and is saved atomically, its training seconds next to it (`train_seconds`)."""
    if path.exists() and not retrain:
        return algo.load(path, device="cpu")
    model, env = make()
    start = time.time()
    model.learn(total_steps, progress_bar=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)  # atomic: a parallel run never loads half a file
    path.with_suffix(".seconds").write_text(f"{time.time() - start:.1f}\n")  # training time, for the benchmarks
    env.close()
    return model


def train_seconds(path: Path) -> float | None:
    """Training seconds of the model `train_cached` saved at `path` (None if it was never trained here)."""
    seconds = path.with_suffix(".seconds")
    return float(seconds.read_text()) if seconds.exists() else None


def train_teacher(config: TeacherConfig, progress: bool = True, retrain: bool = False):
    """Train an SB3 teacher, or load it from the cache if it was trained before. Returns the SB3 model."""
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.env_util import make_vec_env as sb3_vec_env

    algo = {"dqn": DQN, "ppo": PPO}[config.algo]

    def make():
        env = sb3_vec_env(lambda: make_env(config.env_id), n_envs=8 if config.algo == "ppo" else 1, seed=config.seed)
        return algo("MlpPolicy", env, seed=config.seed, device="cpu", verbose=0,
                    **dqn_ppo_hyperparameters(config)), env  # fmt: skip

    return train_cached(teacher_path(config), algo, make, config.total_steps, progress, retrain)


@dataclass(frozen=True)
class PPOArgs:
    """An SB3 PPO run on any env factory (e.g. a privileged teacher, or an RL baseline on a robot's observation)."""

    total_steps: int = 100_000
    """Environment steps."""
    n_envs: int = 8
    """Parallel environments."""
    n_steps: int = 256
    """Rollout length per env and update."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (64, 64)
    """Actor and critic widths."""
    seed: int = 0
    """SB3 and environment seed."""


def train_ppo(env_fn: Callable[[], gym.Env], args: PPOArgs, name: str, retrain: bool = False):
    """Train SB3 PPO on `env_fn` envs, cached under `$OPD_CACHE/teachers/<name>-<hash of args>.zip` (`train_cached`;
    `ppo_seconds` reads its training time)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    def make():
        env = DummyVecEnv([env_fn for _ in range(args.n_envs)])
        env.seed(args.seed)
        model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, n_steps=args.n_steps, batch_size=256,
                    n_epochs=10, learning_rate=args.learning_rate, gamma=args.gamma,
                    policy_kwargs=dict(net_arch=list(args.hidden)))  # fmt: skip
        return model, env

    return train_cached(ppo_path(args, name), PPO, make, args.total_steps, retrain=retrain)


def ppo_path(args: PPOArgs, name: str) -> Path:
    """Where `train_ppo` caches this run."""
    key = hashlib.sha1(json.dumps([name, asdict(args)], sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "teachers" / f"{name}-{key}.zip"


def ppo_seconds(args: PPOArgs, name: str) -> float | None:
    """Training seconds of a cached `train_ppo` run (None if it was never trained here)."""
    return train_seconds(ppo_path(args, name))


def train_teacher_main(config: TeacherConfig) -> None:
    """CLI: train (or load from the cache) one teacher and print its path, training time and greedy score."""
    import torch

    from opd.control.envs import evaluate

    torch.set_num_threads(1)
    start = time.time()
    model = train_teacher(config)
    horizon = 2_000 if is_minatar(config.env_id) else None
    returns = evaluate(as_teacher(model).act, config.env_id, 20, max_episode_steps=horizon)
    print(f"{teacher_path(config)}  {time.time() - start:.0f} s  return {returns.mean():.1f} ± {returns.std():.1f}")


if __name__ == "__main__":
    import tyro

    train_teacher_main(tyro.cli(TeacherConfig))
