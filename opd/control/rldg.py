"""RLDG, reinforcement-learning-distilled generalists (MISSION row 12): RL experts on narrow sub-tasks produce the
data set for one generalist, compared with the same generalist trained on human-like demonstrations.

Sub-tasks are regions of Reacher-v5's target disk (`SubTask`: an angular sector and a radius band, placed by the
`TargetRegion` wrapper). `train_expert` trains one SB3 PPO expert per sub-task; `collect_successful` keeps only the
rollouts that succeed (`SUCCESS_DISTANCE`: the fingertip ends within 3 cm of the target). `HumanDemonstrator` is a
scripted teleoperation-style demonstrator: right in intent (a task-space spring toward the target, which alone
succeeds most of the time), but with per-episode gains, a late start, random pauses and noisy commands, so its
successful demonstrations are correct yet inconsistent. `train_generalist` regresses one larger MLP on either data
set; the target position in Reacher's observation is what tells the generalist which sub-task it is in, so it can be
evaluated on held-out regions too (`success_rate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from opd.control.sim2real import ContinuousPolicy, sb3_actor
from opd.control.teachers import PPOArgs, train_ppo

SUCCESS_DISTANCE = 0.03
"""An episode succeeds when the fingertip ends (after Reacher's 50 steps) within 3 cm of the target; the arm reaches
0.21 m, the target sits 8-20 cm from the base."""

LINK_LENGTHS = (0.1, 0.11)
"""Reacher's upper arm and forearm-to-fingertip lengths (reacher.xml), used by the scripted demonstrator."""


@dataclass(frozen=True)
class SubTask:
    """A narrow variant of Reacher: targets in one angular sector and radius band."""

    name: str
    """Label in tables and cache names."""
    angle: tuple[float, float]
    """Target angle range in degrees (counter-clockwise from +x)."""
    radius: tuple[float, float] = (0.08, 0.2)
    """Target distance range from the arm's base, in metres."""


SUBTASKS = tuple(SubTask(f"sector{a}", (a, a + 60)) for a in (0, 90, 180, 270))
"""Training sub-tasks: four 60° sectors of the target disk."""
HELDOUT = (SubTask("gaps", (60, 90)), SubTask("gaps", (150, 180)), SubTask("gaps", (240, 270)),
           SubTask("gaps", (330, 360)))  # fmt: skip
"""Held-out variants: the four 30° gaps between the training sectors (no expert and no demonstration there)."""


class TargetRegion(gym.Wrapper):
    """Reacher with the target drawn uniformly in a `SubTask`'s region (one of `tasks`, picked per episode)."""

    def __init__(self, env: gym.Env, tasks: SubTask | tuple[SubTask, ...]):
        super().__init__(env)
        self.tasks = (tasks,) if isinstance(tasks, SubTask) else tuple(tasks)

    def reset(self, **kwargs):
        _, info = self.env.reset(**kwargs)
        base = self.env.unwrapped
        rng = base.np_random
        task = self.tasks[rng.integers(len(self.tasks))]
        angle = np.deg2rad(rng.uniform(*task.angle))
        radius = np.sqrt(rng.uniform(task.radius[0] ** 2, task.radius[1] ** 2))  # uniform over the area
        qpos = base.data.qpos.copy()
        qpos[-2:] = radius * np.cos(angle), radius * np.sin(angle)  # the last two joints are the target's slides
        base.set_state(qpos, base.data.qvel.copy())  # recomputes positions, so the observation below is consistent
        return base._get_obs(), {**info, "subtask": task.name}


def make_reacher(tasks: SubTask | tuple[SubTask, ...]) -> gym.Env:
    """Reacher-v5 (50-step episodes) with targets in `tasks`."""
    return TargetRegion(gym.make("Reacher-v5"), tasks)


def final_distance(obs: np.ndarray) -> float:
    """Fingertip-to-target distance in a Reacher-v5 observation (its last two features are fingertip − target)."""
    return float(np.linalg.norm(np.asarray(obs)[8:10]))


@dataclass(frozen=True)
class HumanArgs:
    """The scripted demonstrator's intent and flaws."""

    stiffness: float = 100.0
    """Task-space spring constant toward the target (alone, it succeeds in about 90 % of episodes)."""
    damping: float = 0.1
    """Joint-velocity damping."""
    gain_spread: float = 1.6
    """Per-episode gains are the nominal ones × a log-uniform factor in [1/spread, spread] (inconsistency)."""
    noise_std: float = 0.2
    """Gaussian noise on every torque command (hand tremor; torques are clipped to [-1, 1])."""
    max_reaction_steps: int = 8
    """Idle steps before the first command, uniform in 0..max (hesitant start)."""
    pause_prob: float = 0.05
    """Chance per step of a pause (hesitation) of 1..max_pause_steps steps."""
    max_pause_steps: int = 4
    """Longest pause."""


class HumanDemonstrator:
    """Scripted teleoperation: a task-space spring toward the target with human-like flaws (see `HumanArgs`)."""

    def __init__(self, args: HumanArgs, seed: int = 0):
        self.args, self.rng = args, np.random.default_rng(seed)
        self.begin_episode()

    def begin_episode(self) -> None:
        """Draw this episode's habits: gains (inconsistent across demos) and reaction delay (hesitant start)."""
        a = self.args
        self.stiffness = a.stiffness * np.exp(self.rng.uniform(-np.log(a.gain_spread), np.log(a.gain_spread)))
        self.damping = a.damping * np.exp(self.rng.uniform(-np.log(a.gain_spread), np.log(a.gain_spread)))
        self.idle = int(self.rng.integers(0, a.max_reaction_steps + 1))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Torques [2] for one observation."""
        a = self.args
        if self.idle > 0:  # reacting late or pausing mid-motion: no command
            self.idle -= 1
            return np.zeros(2, np.float32)
        if self.rng.random() < a.pause_prob:
            self.idle = int(self.rng.integers(1, a.max_pause_steps + 1))
        c1, c2, s1, s2 = obs[:4]
        c12, s12 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
        l1, l2 = LINK_LENGTHS
        jacobian = np.array([[-l1 * s1 - l2 * s12, -l2 * s12], [l1 * c1 + l2 * c12, l2 * c12]])
        # Jacobian transpose: joint torques that pull the fingertip along the (target − fingertip) direction
        torque = jacobian.T @ (-self.stiffness * obs[8:10]) - self.damping * obs[6:8]
        return np.clip(torque + a.noise_std * self.rng.standard_normal(2), -1, 1).astype(np.float32)


@dataclass
class Demonstrations:
    """Successful episodes, flattened: observations [N, 10], actions [N, 2], and how many attempts it took."""

    obs_ND: np.ndarray
    act_NA: np.ndarray
    episodes: int
    attempts: int


def rollout(actor: Callable[[np.ndarray], np.ndarray], env: gym.Env, seed: int):
    """One episode: (observations [T, 10], actions [T, 2], final fingertip distance)."""
    obs, _ = env.reset(seed=seed)
    if hasattr(actor, "begin_episode"):
        actor.begin_episode()
    observations, actions, done = [], [], False
    while not done:
        action = np.asarray(actor(obs), np.float32).reshape(-1)
        observations.append(np.asarray(obs, np.float32))
        actions.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    return np.stack(observations), np.stack(actions), final_distance(obs)


def collect_successful(actor, tasks, episodes: int, seed: int, max_attempts: int | None = None,
                       success_distance: float = SUCCESS_DISTANCE) -> Demonstrations:
    """Roll `actor` out on `tasks` until `episodes` episodes succeed (end within `success_distance`) or `max_attempts`
    (default 20 × episodes) are spent; keep only the successful ones (RLDG's filter, for RL expert and human alike)."""
    env, kept, attempts = make_reacher(tasks), [], 0
    for attempts in range(1, (max_attempts or 20 * episodes) + 1):
        obs_TD, act_TA, distance = rollout(actor, env, seed + attempts)
        if distance < success_distance:
            kept.append((obs_TD, act_TA))
        if len(kept) == episodes:
            break
    env.close()
    if not kept:
        raise RuntimeError(f"no successful episode in {attempts} attempts on {tasks}; train the actor longer")
    return Demonstrations(np.concatenate([o for o, _ in kept]), np.concatenate([a for _, a in kept]), len(kept),
                          attempts)  # fmt: skip


def merge(parts: list[Demonstrations]) -> Demonstrations:
    """Concatenate the demonstrations of several sub-tasks."""
    return Demonstrations(np.concatenate([p.obs_ND for p in parts]), np.concatenate([p.act_NA for p in parts]),
                          sum(p.episodes for p in parts), sum(p.attempts for p in parts))  # fmt: skip


def train_expert(task: SubTask, args: PPOArgs, retrain: bool = False):
    """An SB3 PPO expert for one sub-task, cached under `$OPD_CACHE/teachers`."""
    return train_ppo(lambda: make_reacher(task), args, f"reacher-{task.name}", retrain=retrain)


def expert_actor(model) -> Callable[[np.ndarray], np.ndarray]:
    """The expert's deterministic action for one observation."""
    act = sb3_actor(model)
    return lambda obs: act(np.asarray(obs)[None])[0]


@dataclass(frozen=True)
class GeneralistConfig:
    """The generalist: one MLP for every sub-task, trained by regression (MSE) on the demonstrations."""

    hidden: tuple[int, ...] = (256, 256)
    """MLP widths (larger than the experts' 64 × 64)."""
    updates: int = 3_000
    """Adam steps."""
    batch_size: int = 256
    """States per minibatch."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Initialisation and minibatch seed."""


def train_generalist(data: Demonstrations, config: GeneralistConfig) -> ContinuousPolicy:
    """Fit a `ContinuousPolicy` to the (observation, action) pairs of `data`."""
    torch.manual_seed(config.seed)
    policy = ContinuousPolicy(data.obs_ND.shape[1], -np.ones(2), np.ones(2), config.hidden)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    obs, act = torch.as_tensor(data.obs_ND), torch.as_tensor(data.act_NA)
    policy.fit_normalizer(obs, act)
    for _ in range(config.updates):
        index = torch.randint(len(obs), (min(config.batch_size, len(obs)),), generator=generator)
        loss = ((policy(obs[index]) - act[index]) ** 2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def final_distances(actor, tasks, episodes: int, seed: int) -> np.ndarray:
    """Fingertip-to-target distance at the end of each of `episodes` episodes; `actor` maps one observation."""
    env = make_reacher(tasks)
    distances = np.array([rollout(actor, env, seed + i)[2] for i in range(episodes)])
    env.close()
    return distances


def success_rate(actor, tasks, episodes: int, seed: int, success_distance: float = SUCCESS_DISTANCE) -> float:
    """Fraction of `episodes` that end within `success_distance` of the target; `actor` maps one observation."""
    return float(np.mean(final_distances(actor, tasks, episodes, seed) < success_distance))


def policy_actor(policy: ContinuousPolicy) -> Callable[[np.ndarray], np.ndarray]:
    """A single-observation actor for a `ContinuousPolicy`."""
    return lambda obs: policy.act(np.asarray(obs, np.float32)[None])[0]
