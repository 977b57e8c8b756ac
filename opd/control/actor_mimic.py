"""Actor-Mimic (Parisotto, Ba & Salakhutdinov 2015, MISSION row 5): several experts, one multi-task student.

Per game i the loss is policy regression, the cross-entropy from softmax(Q_Ei/τ) to the student's policy
(`forward_kl`, which differs from that cross-entropy by the expert's entropy, a constant), plus feature regression:
L2 between a learned linear projection f_i of the student's last hidden layer and expert i's last hidden layer,
weighted 0.01 as in the official scripts. The student plays (ε-greedy) and the experts label what it visits, unless
`actor="teacher"`.

`transfer_dqn` then trains a DQN (stable-baselines3) on a held-out game with its torso initialised from the
Actor-Mimic network, or from scratch, and returns the learning curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from opd.control.common import MetricsLog, StateBuffer
from opd.control.distill import PolicyDistillConfig, collect, default_student_spec, evaluate_student
from opd.control.envs import make_env, pad_obs
from opd.control.policies import Policy, PolicySpec
from opd.control.teachers import as_teacher, teacher_logp
from opd.losses import feature_l2, forward_kl


@dataclass(frozen=True)
class ActorMimicConfig:
    """One Actor-Mimic run."""

    temperature: float = 0.1
    """τ of the experts' softmax(Q/τ). MinAtar Q-values differ by tenths, so τ = 1 would give near-uniform targets."""
    feature_weight: float = 0.01
    """β of the feature-regression term (the official Actor-Mimic scripts use 0.01)."""
    actor: Literal["student", "teacher"] = "student"
    """Who plays: the Actor-Mimic network itself (ε-greedy) or each game's expert."""
    epsilon: float = 0.1
    """ε of the ε-greedy player."""
    updates: int = 10_000
    """Student minibatch updates (each one minibatch per game)."""
    batch_size: int = 64
    """States per game per update."""
    lr: float = 1e-3
    """Adam learning rate (student and projections)."""
    buffer_size: int = 50_000
    """States kept per game (FIFO)."""
    warmup_steps: int = 500
    """Vector-env steps of play before the first update."""
    collect_every: int = 10
    """Updates between two rounds of play."""
    collect_steps: int = 4
    """Vector-env steps per round of play."""
    num_envs: int = 4
    """Parallel environments per game."""
    eval_every: int = 2_500
    """Evaluate every this many updates (and at the end)."""
    eval_episodes: int = 10
    """Greedy evaluation episodes per game."""
    seed: int = 0
    """Seeds envs, initialisation, exploration and minibatches."""
    progress: bool = True
    """Show a progress bar."""


def actor_mimic(experts: dict, config: ActorMimicConfig, student: Policy | None = None, run_dir=None):
    """Train one multi-task student from `{env_id: expert}` (experts must expose features, e.g. SB3 DQNs).

    Returns `RunResult`; the projections f_i are dropped (only the student is used afterwards)."""
    from opd.control.dagger import RunResult
    from opd.control.envs import make_vec_env

    env_ids = list(experts)
    experts = {e: as_teacher(t) for e, t in experts.items()}
    for e, expert in experts.items():
        if expert.kind == "action" or not expert.has_features:
            raise ValueError(f"the expert for {e} gives no Q-values/logits and features; pass an SB3 DQN/PPO or Policy")
    torch.manual_seed(config.seed)
    student = student or Policy(default_student_spec(env_ids))
    pad_to = student.spec.obs_shape[0]
    envs = {e: make_vec_env(e, config.num_envs, config.seed + 100 * i) for i, e in enumerate(env_ids)}
    obs = {e: envs[e].reset(seed=config.seed + 100 * i)[0] for i, e in enumerate(env_ids)}
    expert_dims = {e: experts[e](obs[e][:1]).features_ND.shape[-1] for e in env_ids}
    projections = nn.ModuleList(nn.Linear(student.feature_dim, expert_dims[e]) for e in env_ids)
    optimizer = torch.optim.Adam([*student.parameters(), *projections.parameters()], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    buffers = {e: StateBuffer(config.buffer_size) for e in env_ids}

    def player(head):
        if config.actor == "teacher":
            return None
        return lambda o: student.act(pad_obs(o, pad_to), head)

    def play(steps):
        for head, e in enumerate(env_ids):
            obs[e] = collect(experts[e], envs[e], obs[e], steps, config.epsilon, rng, buffers[e], player(head))

    play(config.warmup_steps)
    log = MetricsLog(run_dir)
    eval_config = PolicyDistillConfig(eval_episodes=config.eval_episodes, seed=config.seed)
    for update in tqdm(range(1, config.updates + 1), desc="actor-mimic", disable=not config.progress):
        if update % config.collect_every == 0:
            play(config.collect_steps)
        batches = [buffers[e].sample(config.batch_size, generator) for e in env_ids]
        loss, policy_term, feature_term = mimic_loss(
            student, projections, [(pad_obs(obs_b, pad_to), grade) for obs_b, grade in batches], config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update % config.eval_every == 0 or update == config.updates:
            returns = {f"return/{e}": float(evaluate_student(student, e, head, eval_config).mean())
                       for head, e in enumerate(env_ids)}  # fmt: skip
            log.log(update, policy_loss=float(policy_term.detach()), feature_loss=float(feature_term.detach()), **returns)
    for env in envs.values():
        env.close()
    return RunResult(student.eval(), log.rows)


def mimic_loss(student: Policy, projections: nn.ModuleList, batches: list, config: ActorMimicConfig):
    """One update's loss: (policy term + feature_weight · feature term, policy term, feature term), each term summed
    over the games of its mean over the game's states. `batches[i]`: game i's (states padded to the student's input,
    expert i's grades of them); head i and projection f_i belong to game i."""
    policy_term, feature_term = 0.0, 0.0
    for head, (obs_NO, grade) in enumerate(batches):
        features_ND = student.features(obs_NO)
        student_logp_NA = F.log_softmax(student.heads[head](features_ND), -1)
        policy_term = policy_term + forward_kl(student_logp_NA, teacher_logp(grade, config.temperature)).mean()
        feature_term = feature_term + feature_l2(projections[head](features_ND), grade.features_ND).mean()
    return policy_term + config.feature_weight * feature_term, policy_term, feature_term


class PolicyTorso(nn.Module):
    """SB3 features extractor that is an `opd` Policy's trunk, optionally initialised from a trained student."""

    def __init__(self, observation_space, spec: dict, trunk_state: dict | None = None):
        super().__init__()
        policy = Policy(PolicySpec(**spec))
        if trunk_state is not None:
            policy.trunk.load_state_dict(trunk_state)
        self.trunk = policy.trunk
        self.features_dim = policy.feature_dim

    def forward(self, obs):
        return self.trunk(obs)


@dataclass(frozen=True)
class TransferConfig:
    """DQN on a held-out game, from the Actor-Mimic network's torso or from scratch."""

    env_id: str = "MinAtar/SpaceInvaders-v1"
    """The held-out game (not among the experts)."""
    total_steps: int = 100_000
    """DQN environment steps."""
    window: int = 10_000
    """Width in steps of the bins of the learning curve."""
    seed: int = 0
    """Seeds SB3 and the environment."""
    progress: bool = True
    """Show a progress bar."""


def make_transfer_dqn(config: TransferConfig, init: Policy | None = None, spec: PolicySpec | None = None):
    """An untrained SB3 DQN on `config.env_id` (in a Monitor) whose torso is `init`'s trunk, or a fresh trunk of
    `spec`; observations are padded to the torso's input size and the Q head is new."""
    from stable_baselines3 import DQN
    from stable_baselines3.common.monitor import Monitor

    from opd.control.teachers import TeacherConfig, dqn_ppo_hyperparameters

    if (init is None) == (spec is None):
        raise ValueError("pass exactly one of init (a trained Policy) or spec (train from scratch)")
    spec = init.spec if init is not None else spec
    env = Monitor(make_env(config.env_id, pad_to=spec.obs_shape[0]))
    env.reset(seed=config.seed)
    hyper = dqn_ppo_hyperparameters(TeacherConfig(config.env_id, "dqn"))
    trunk_state = None if init is None else {k: v.clone() for k, v in init.trunk.state_dict().items()}
    spec_dict = {"obs_shape": spec.obs_shape, "num_actions": (env.action_space.n,), "hidden": spec.hidden,
                 "conv_channels": spec.conv_channels}  # fmt: skip
    hyper["policy_kwargs"] = dict(features_extractor_class=PolicyTorso, net_arch=[],
                                  features_extractor_kwargs=dict(spec=spec_dict, trunk_state=trunk_state))  # fmt: skip
    return DQN("MlpPolicy", env, seed=config.seed, device="cpu", verbose=0, **hyper)


def transfer_dqn(config: TransferConfig, init: Policy | None = None, spec: PolicySpec | None = None) -> dict:
    """Train `make_transfer_dqn(config, init, spec)`; returns the learning curve `{"steps": [...], "returns": [...]}`
    (mean return of the training episodes that ended in each window of `window` steps; NaN where none did)."""
    model = make_transfer_dqn(config, init, spec)
    env = model.get_env().envs[0]
    model.learn(config.total_steps, progress_bar=config.progress)
    ends = np.cumsum(env.get_episode_lengths())
    rewards = np.array(env.get_episode_rewards())
    steps, returns = [], []
    for start in range(0, config.total_steps, config.window):
        inside = (ends > start) & (ends <= start + config.window)
        steps.append(start + config.window)
        returns.append(float(rewards[inside].mean()) if inside.any() else float("nan"))
    env.close()
    return {"steps": steps, "returns": returns}
