"""Behavioural cloning, DAgger and the on-policy-distillation analogue on gymnasium vector envs (MISSION row 6).

Who acts is the only difference between the first two (Ross, Gordon & Bagnell 2011): in iteration i each env of the
vector env, at each step, lets the expert act with probability β_i and the student otherwise; the expert labels every
visited state; the labels are aggregated and the student is retrained on all of them. β ≡ 1 is behavioural cloning
(only expert states, so the student never sees its own mistakes: compounding error); β decaying to 0 is DAgger.

`run_onpolicy_distill` is the analogue of LM on-policy distillation: the student samples its own actions, the teacher
gives its full action distribution on the visited states, the loss is a divergence (reverse KL by default) on the
fresh batch, and nothing is aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from opd.control.common import MetricsLog, cat_outputs, check_loss, policy_loss, take
from opd.control.envs import env_shapes, evaluate, make_vec_env
from opd.control.policies import Policy, PolicySpec
from opd.control.teachers import Teacher, TeacherOutput, as_teacher

Schedule = Literal["bc", "linear", "exponential", "zero"]


def beta_schedule(schedule: Schedule, iteration: int, iterations: int, decay: float = 0.5) -> float:
    """Probability that the expert acts in iteration `iteration` (0-based) of `iterations`.

    bc: 1 always. zero: 0 always (the student acts from the start). linear: 1 at the first iteration down to 0 at
    the last. exponential: decay**iteration (Ross et al.'s β_i = p^(i-1) with 1-based i).
    """
    if not 0 <= iteration < iterations:
        raise ValueError(f"iteration={iteration} is outside 0..{iterations - 1}")
    if schedule == "bc":
        return 1.0
    if schedule == "zero":
        return 0.0
    if schedule == "linear":
        return 1.0 - iteration / max(1, iterations - 1)
    if schedule == "exponential":
        if not 0 <= decay <= 1:
            raise ValueError(f"decay={decay}; pass a decay in [0, 1]")
        return decay**iteration
    raise ValueError(f"unknown β schedule {schedule!r}; choose bc, linear, exponential or zero")


@dataclass(frozen=True)
class DAggerConfig:
    """One BC / DAgger run."""

    env_id: str = "CartPole-v1"
    """gymnasium environment id."""
    schedule: Schedule = "linear"
    """β schedule: bc (expert always acts = behavioural cloning), linear, exponential, zero."""
    beta_decay: float = 0.5
    """Base of the exponential schedule."""
    iterations: int = 10
    """Collect-label-aggregate-retrain rounds."""
    steps_per_iteration: int = 50
    """Vector-env steps per round; each labels `num_envs` states, so a round adds steps × num_envs labels."""
    num_envs: int = 4
    """Parallel environments; each draws expert-or-student independently at every step."""
    max_episode_steps: int | None = None
    """Episode horizon for collection and evaluation (None: the environment's own limit)."""
    loss: str = "nll"
    """nll (cross-entropy to the expert's action, works with any expert) or a divergence to the expert's distribution."""
    temperature: float = 1.0
    """τ of softmax(teacher/τ) for divergence losses."""
    updates_per_iteration: int = 200
    """Minibatch updates on the aggregated data after each round."""
    batch_size: int = 64
    """States per minibatch."""
    lr: float = 1e-3
    """Adam learning rate."""
    hidden: tuple[int, ...] = (64, 64)
    """Student MLP widths (MinAtar students get a conv layer first)."""
    eval_episodes: int = 10
    """Greedy evaluation episodes after each round."""
    seed: int = 0
    """Seeds the envs, the student's initialisation and the β coin flips."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class RunResult:
    """The trained student and one metrics row per round (`step` = expert labels so far)."""

    student: Policy
    history: list[dict]


def _fit(student, optimizer, obs_NO, labels: TeacherOutput, loss, temperature, updates, batch_size, generator):
    """`updates` Adam steps on minibatches drawn uniformly from (obs_NO, labels); returns the last loss."""
    value = torch.tensor(float("nan"))
    for _ in range(updates):
        index = torch.randint(len(obs_NO), (min(batch_size, len(obs_NO)),), generator=generator)
        value = policy_loss(student(obs_NO[index]), take(labels, index), loss, temperature).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return float(value.detach())


def run_dagger(teacher, config: DAggerConfig, student: Policy | None = None, run_dir=None) -> RunResult:
    """BC (schedule="bc") or DAgger with a β schedule; `teacher` is anything `as_teacher` accepts."""
    teacher: Teacher = as_teacher(teacher)
    check_loss(config.loss, teacher.kind)
    torch.manual_seed(config.seed)
    obs_shape, num_actions = env_shapes(config.env_id)
    student = student or Policy(PolicySpec(obs_shape, num_actions, config.hidden))
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    coins = np.random.default_rng(config.seed)
    env = make_vec_env(config.env_id, config.num_envs, config.seed, config.max_episode_steps)
    obs, _ = env.reset(seed=config.seed)
    dataset_obs: list[torch.Tensor] = []
    dataset_labels: list[TeacherOutput] = []
    log = MetricsLog(run_dir)
    for iteration in tqdm(range(config.iterations), desc=f"dagger[{config.schedule}]", disable=not config.progress):
        beta = beta_schedule(config.schedule, iteration, config.iterations, config.beta_decay)
        # act: the mixture policy visits states; the expert labels every one of them
        expert_acted = 0
        for _ in range(config.steps_per_iteration):
            labels = teacher(obs)
            dataset_obs.append(torch.as_tensor(obs, dtype=torch.float32))
            dataset_labels.append(labels)
            expert_turn = coins.random(config.num_envs) < beta
            expert_acted += int(expert_turn.sum())
            actions = np.where(expert_turn, labels.actions_N.numpy(), student.act(obs))
            obs, _, _, _, _ = env.step(actions)
        # aggregate, then retrain on everything labelled so far
        all_obs, all_labels = torch.cat(dataset_obs), cat_outputs(dataset_labels)
        loss = _fit(student, optimizer, all_obs, all_labels, config.loss, config.temperature,
                    config.updates_per_iteration, config.batch_size, generator)  # fmt: skip
        returns = evaluate(student.act, config.env_id, config.eval_episodes, seed=10_000 + config.seed,
                           max_episode_steps=config.max_episode_steps)  # fmt: skip
        log.log(len(all_obs), iteration=iteration, beta=beta, expert_action_fraction=expert_acted / (
            config.steps_per_iteration * config.num_envs), dataset_size=len(all_obs), loss=loss,
            return_mean=float(returns.mean()), return_std=float(returns.std()))  # fmt: skip
    env.close()
    return RunResult(student.eval(), log.rows)


@dataclass(frozen=True)
class OnPolicyDistillConfig:
    """On-policy distillation on a control task: the student acts, the teacher grades, no aggregation."""

    env_id: str = "CartPole-v1"
    """gymnasium environment id."""
    iterations: int = 10
    """Rounds of (student rollout, teacher grading, updates on that batch)."""
    steps_per_iteration: int = 50
    """Vector-env steps per round (labels per round = steps × num_envs)."""
    num_envs: int = 4
    """Parallel environments."""
    max_episode_steps: int | None = None
    """Episode horizon (None: the environment's own limit)."""
    loss: str = "reverse_kl"
    """Divergence to the teacher's distribution: reverse_kl (default), forward_kl, jsd, tvd; nll for action-only experts."""
    temperature: float = 1.0
    """τ of softmax(teacher/τ); a small τ sharpens Q-value teachers."""
    sample: bool = True
    """The student samples from its softmax (True) or acts greedily."""
    updates_per_iteration: int = 50
    """Minibatch updates on each fresh batch."""
    batch_size: int = 64
    """States per minibatch."""
    lr: float = 1e-3
    """Adam learning rate."""
    hidden: tuple[int, ...] = (64, 64)
    """Student MLP widths."""
    eval_episodes: int = 10
    """Greedy evaluation episodes after each round."""
    seed: int = 0
    """Seeds envs, student initialisation and action sampling."""
    progress: bool = True
    """Show a progress bar."""


def run_onpolicy_distill(teacher, config: OnPolicyDistillConfig, student: Policy | None = None, run_dir=None):
    """The student acts; the loss is a divergence to the teacher's action distribution on the states it visited."""
    teacher = as_teacher(teacher)
    check_loss(config.loss, teacher.kind)
    torch.manual_seed(config.seed)
    obs_shape, num_actions = env_shapes(config.env_id)
    student = student or Policy(PolicySpec(obs_shape, num_actions, config.hidden))
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    env = make_vec_env(config.env_id, config.num_envs, config.seed, config.max_episode_steps)
    obs, _ = env.reset(seed=config.seed)
    log, labels_so_far = MetricsLog(run_dir), 0
    for iteration in tqdm(range(config.iterations), desc="on-policy distill", disable=not config.progress):
        batch_obs, batch_labels = [], []
        for _ in range(config.steps_per_iteration):
            batch_obs.append(torch.as_tensor(obs, dtype=torch.float32))
            batch_labels.append(teacher(obs))
            obs, _, _, _, _ = env.step(student.act(obs, greedy=not config.sample, generator=generator))
        batch_obs_NO = torch.cat(batch_obs)
        labels_so_far += len(batch_obs_NO)
        loss = _fit(student, optimizer, batch_obs_NO, cat_outputs(batch_labels), config.loss, config.temperature,
                    config.updates_per_iteration, config.batch_size, generator)  # fmt: skip
        returns = evaluate(student.act, config.env_id, config.eval_episodes, seed=10_000 + config.seed,
                           max_episode_steps=config.max_episode_steps)  # fmt: skip
        log.log(labels_so_far, iteration=iteration, loss=loss, return_mean=float(returns.mean()),
                return_std=float(returns.std()))  # fmt: skip
    env.close()
    if math.isnan(log.rows[-1]["loss"]):
        raise RuntimeError("on-policy distillation diverged (NaN loss); lower lr or raise the teacher temperature")
    return RunResult(student.eval(), log.rows)
