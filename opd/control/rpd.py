"""Refined Policy Distillation (RPD; Jülg et al. 2025): PPO pulled toward a generalist teacher, then set free.

The student is trained by PPO on the environment's reward, plus a term that pulls its action distribution toward a
teacher's on the same minibatch of states:

    loss = PPO's clipped surrogate + c_v·value loss − c_e·entropy + λ(t)·D(student, teacher)

D is the MSE between the student's mean action and the teacher's (Box actions) or KL(teacher ‖ student) over actions
(Discrete actions; cross-entropy to the teacher's action for teachers that give only actions). λ(t) follows RPD's
cosine decay, λ_max·(1 + cos(π·t/T))/2, and is 0 from t = T on: early on the teacher shows the student where the
reward is; afterwards PPO alone refines the student, which can then surpass an imperfect teacher.

`RPD` is stable-baselines3's PPO with its `train()` rewritten around that one extra term (λ_max = 0 reproduces PPO's
update exactly, which the tests check); `run_rpd` trains it with a greedy-evaluation learning curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from opd.control.common import MetricsLog, policy_loss
from opd.control.teachers import TeacherConfig, as_teacher, teacher_path, train_cached


def rpd_lambda(step: int, anneal_steps: int, lambda_max: float = 1.0) -> float:
    """RPD's weight of the teacher term after `step` environment steps: λ_max·(1 + cos(π·step/T))/2, 0 from T on."""
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps={anneal_steps}; pass a positive number of steps")
    if step >= anneal_steps:
        return 0.0
    return lambda_max * 0.5 * (1.0 + math.cos(math.pi * step / anneal_steps))


def continuous_teacher(obj) -> Callable[[np.ndarray], np.ndarray]:
    """A teacher for Box actions as `obs_NO -> mean actions [N, act_dim]`: an SB3 model's deterministic (unclipped,
    like the student's mean it is compared with) action, or any callable returning actions."""
    if hasattr(obj, "policy") and hasattr(obj.policy, "get_distribution"):
        policy = obj.policy

        @torch.no_grad()
        def act(obs):
            obs_t, _ = policy.obs_to_tensor(np.asarray(obs))
            return policy.get_distribution(obs_t).distribution.mean.cpu().numpy()

        return act
    if not callable(obj):
        raise ValueError(f"cannot use a {type(obj).__name__} as a teacher; pass an SB3 model or a callable")
    return obj


class RPD(PPO):
    """SB3 PPO plus RPD's teacher term, weighted by `rpd_lambda(num_timesteps, anneal_steps, lambda_max)`.

    `teacher`: for Box actions anything `continuous_teacher` accepts; for Discrete actions anything `as_teacher`
    accepts (an SB3 DQN/PPO, a Policy, a callable returning logits with kind=..., or hard actions).
    """

    def __init__(self, policy, env, teacher, lambda_max: float = 1.0, anneal_steps: int = 50_000,
                 teacher_kind: str | None = None, **ppo_kwargs):  # fmt: skip
        super().__init__(policy, env, **ppo_kwargs)
        self.discrete = isinstance(self.action_space, spaces.Discrete)
        if not self.discrete and not isinstance(self.action_space, spaces.Box):
            raise ValueError(f"RPD handles Box or Discrete actions, not {self.action_space}")
        self.teacher = as_teacher(teacher, teacher_kind) if self.discrete else continuous_teacher(teacher)
        self.lambda_max, self.anneal_steps = lambda_max, anneal_steps
        self.last_distill_loss = float("nan")

    def distill_loss(self, obs: torch.Tensor, dist) -> torch.Tensor:
        """D(student, teacher) on a minibatch, averaged over states: the term λ weighs."""
        if not self.discrete:
            teacher_mean = torch.as_tensor(self.teacher(obs.cpu().numpy()), dtype=torch.float32)
            return F.mse_loss(dist.distribution.mean, teacher_mean.reshape(dist.distribution.mean.shape))
        grade = self.teacher(obs.cpu().numpy())
        return policy_loss(dist.distribution.logits, grade, "nll" if grade.kind == "action" else "kl").mean()

    def train(self) -> None:
        """PPO's update on the collected rollout (as in SB3 2.x), with λ·D added to each minibatch's loss."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(self._current_progress_remaining)
        lam = rpd_lambda(self.num_timesteps, self.anneal_steps, self.lambda_max)
        pg_losses, value_losses, distill_losses = [], [], []
        for _ in range(self.n_epochs):
            approx_kls, stop = [], False
            for batch in self.rollout_buffer.get(self.batch_size):
                actions = batch.actions.long().flatten() if self.discrete else batch.actions
                dist = self.policy.get_distribution(batch.observations)
                log_prob, entropy = dist.log_prob(actions), dist.entropy()
                values = self.policy.predict_values(batch.observations).flatten()
                advantages = batch.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                ratio = torch.exp(log_prob - batch.old_log_prob)
                clipped = advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
                pg_loss = -torch.min(advantages * ratio, clipped).mean()
                if clip_range_vf is not None:  # keep the value near the one that collected the data
                    values = batch.old_values + (values - batch.old_values).clamp(-clip_range_vf, clip_range_vf)
                value_loss = F.mse_loss(batch.returns, values)
                entropy_loss = -(entropy.mean() if entropy is not None else -log_prob.mean())
                loss = pg_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                if lam > 0:  # the only departure from PPO: pull toward the teacher while λ lasts
                    distill = self.distill_loss(batch.observations, dist)
                    loss = loss + lam * distill
                    distill_losses.append(distill.item())
                pg_losses.append(pg_loss.item())
                value_losses.append(value_loss.item())
                with torch.no_grad():
                    log_ratio = log_prob - batch.old_log_prob
                    approx_kls.append(((torch.exp(log_ratio) - 1) - log_ratio).mean().item())
                if self.target_kl is not None and approx_kls[-1] > 1.5 * self.target_kl:
                    stop = True  # SB3's early stop: the policy moved too far from the one that collected the data
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if stop:
                break
        self.last_distill_loss = float(np.mean(distill_losses)) if distill_losses else float("nan")
        self.logger.record("train/policy_gradient_loss", float(np.mean(pg_losses)))
        self.logger.record("train/value_loss", float(np.mean(value_losses)))
        self.logger.record("train/rpd_lambda", lam)
        self.logger.record("train/rpd_distill_loss", self.last_distill_loss)


@dataclass(frozen=True)
class RPDConfig:
    """One RPD (or, with lambda_max=0, plain PPO) run."""

    env_id: str = "InvertedPendulum-v5"
    """gymnasium id with Box or Discrete actions."""
    total_steps: int = 60_000
    """Environment steps of training."""
    lambda_max: float = 1.0
    """λ at step 0; 0 turns RPD into PPO from scratch (same update code)."""
    anneal_steps: int = 30_000
    """Steps over which λ decays to 0 by a half cosine (RPD's `max_ppd_anneal_steps`)."""
    n_envs: int = 4
    """Parallel environments collecting rollouts."""
    n_steps: int = 256
    """Steps per environment per rollout (a rollout is n_steps × n_envs transitions)."""
    batch_size: int = 64
    """PPO minibatch size."""
    n_epochs: int = 10
    """PPO passes over each rollout."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE λ (not RPD's λ)."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    eval_every: int = 5_000
    """Greedy evaluation every this many environment steps (the learning curve's resolution)."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    seed: int = 0
    """Seeds SB3, the environments and the evaluation episodes."""


def ppo_kwargs(config: RPDConfig) -> dict:
    """The SB3 PPO settings of `config`."""
    return dict(n_steps=config.n_steps, batch_size=config.batch_size, n_epochs=config.n_epochs,
                learning_rate=config.learning_rate, gamma=config.gamma, gae_lambda=config.gae_lambda,
                ent_coef=config.ent_coef, seed=config.seed, device="cpu", verbose=0)  # fmt: skip


def evaluate_model(model, env_id: str, episodes: int = 10, seed: int = 10_000) -> np.ndarray:
    """Undiscounted returns of `episodes` greedy episodes of an SB3 model (Box or Discrete actions)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_vec_env(env_id, n_envs=min(episodes, 4), seed=seed)
    returns, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True)
    env.close()
    return np.asarray(returns, dtype=float)


class _Curve(BaseCallback):
    """Greedy evaluation at step 0 and every `eval_every` steps, into a MetricsLog."""

    def __init__(self, config: RPDConfig, log: MetricsLog):
        super().__init__()
        self.config, self.log, self.next_eval = config, log, 0

    def _evaluate(self):
        returns = evaluate_model(self.model, self.config.env_id, self.config.eval_episodes, 10_000 + self.config.seed)
        lam = rpd_lambda(self.num_timesteps, self.config.anneal_steps, self.config.lambda_max)
        self.log.log(self.num_timesteps, return_mean=float(returns.mean()), return_std=float(returns.std()),
                     rpd_lambda=lam, distill_loss=getattr(self.model, "last_distill_loss", float("nan")))  # fmt: skip
        self.next_eval = self.num_timesteps + self.config.eval_every

    def _on_training_start(self):
        self._evaluate()

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_eval:
            self._evaluate()
        return True


@dataclass
class RPDResult:
    """The trained SB3 model and the learning curve (one row per evaluation; `step` = environment steps)."""

    model: RPD
    history: list[dict]


def run_rpd(teacher, config: RPDConfig, run_dir=None, teacher_kind: str | None = None) -> RPDResult:
    """Train RPD toward `teacher` (see `RPD`), or PPO from scratch when `config.lambda_max == 0`."""
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(config.env_id, n_envs=config.n_envs, seed=config.seed)
    model = RPD("MlpPolicy", env, teacher, config.lambda_max, config.anneal_steps, teacher_kind, **ppo_kwargs(config))
    log = MetricsLog(run_dir)
    model.learn(config.total_steps, callback=_Curve(config, log))
    if log.rows[-1]["step"] < model.num_timesteps:  # always end the curve at the final policy
        returns = evaluate_model(model, config.env_id, config.eval_episodes, 10_000 + config.seed)
        log.log(model.num_timesteps, return_mean=float(returns.mean()), return_std=float(returns.std()),
                rpd_lambda=rpd_lambda(model.num_timesteps, config.anneal_steps, config.lambda_max),
                distill_loss=model.last_distill_loss)  # fmt: skip
    env.close()
    return RPDResult(model, log.rows)


def train_generalist_teacher(env_id: str, total_steps: int, seed: int = 0, **ppo_overrides):
    """A PPO teacher trained for only `total_steps` (good but not perfect, so it can be surpassed), cached under
    `$OPD_CACHE/teachers` like `train_teacher`; works for Box actions too. Returns the SB3 PPO model."""
    from stable_baselines3.common.env_util import make_vec_env

    config = RPDConfig(env_id=env_id, seed=seed)

    def make():
        env = make_vec_env(env_id, n_envs=config.n_envs, seed=seed)
        return PPO("MlpPolicy", env, **{**ppo_kwargs(config), **ppo_overrides}), env

    return train_cached(teacher_path(TeacherConfig(env_id, "ppo", total_steps, seed)), PPO, make, total_steps)
