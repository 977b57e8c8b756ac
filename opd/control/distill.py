"""Policy distillation (Rusu et al. 2015, MISSION row 4): DQN teachers play, students learn on their states.

The teacher acts (ε-greedy) in its game; every visited state goes into a FIFO replay memory together with the
teacher's Q-values (with `collector="student"` the student plays after the warm-up instead and the teacher labels the
states it visits: DAgger's collection, the on-policy variant of Rusu's off-policy replay). The student is trained on
minibatches from that memory with one of Rusu's three losses:

    kl   KL(softmax(Q_T/τ) ‖ softmax(student))   (the paper's best, with a small τ = sharpened targets)
    nll  −log π_student(argmax Q_T)              (hard labels)
    mse  (student output − Q_T)²                  (the student regresses Q-values)

With several teachers (one per game) the student has a shared trunk and one action head per game, sees MinAtar grids
zero-padded to a common channel count, and every update sums the losses of one minibatch per game.
`compression_student` builds students at a given fraction of the teacher's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from opd.control.common import MetricsLog, StateBuffer, check_loss, policy_loss
from opd.control.envs import MINATAR_MAX_CHANNELS, env_shapes, evaluate, is_minatar, make_vec_env, pad_obs
from opd.control.policies import Policy, PolicySpec, count_parameters, spec_for_fraction
from opd.control.teachers import Teacher, as_teacher


COLLECTORS = ("teacher", "student")
"""Who plays the states the student learns on after the warm-up (see `PolicyDistillConfig.collector`)."""


@dataclass(frozen=True)
class PolicyDistillConfig:
    """One (single- or multi-task) policy-distillation run."""

    loss: str = "kl"
    """kl (Rusu's KL with temperature), nll (teacher's argmax action), mse (regress Q-values); or reverse_kl, jsd, tvd."""
    temperature: float = 0.01
    """τ in softmax(Q_T/τ); Rusu found small values (sharp targets) best."""
    updates: int = 10_000
    """Student minibatch updates."""
    batch_size: int = 64
    """States per game per update."""
    lr: float = 1e-3
    """Adam learning rate."""
    buffer_size: int = 50_000
    """States kept per game (FIFO), like Rusu's replay memory of the teacher's recent experience."""
    warmup_steps: int = 500
    """Vector-env steps of teacher play before the first update."""
    collect_every: int = 10
    """Updates between two rounds of teacher play."""
    collect_steps: int = 4
    """Vector-env steps of teacher play per round (× num_envs states per game)."""
    num_envs: int = 4
    """Parallel environments per game."""
    teacher_epsilon: float = 0.05
    """The teacher acts ε-greedily, so the memory also holds states slightly off its own path."""
    collector: str = "teacher"
    """Who plays after the warm-up (the warm-up is always the teacher's): "teacher" is Rusu's replay of the
    teacher's ε-greedy play; "student" is DAgger-style, the student acts (greedy, same ε) and the teacher labels
    every state it visits, aggregated in the same buffer, so the student learns on the states its mistakes lead to."""
    eval_every: int = 2_500
    """Evaluate the student every this many updates (and at the end)."""
    eval_episodes: int = 10
    """Greedy evaluation episodes per game."""
    max_episode_steps: int | None = None
    """Horizon cap for evaluation episodes; None: the environment's own limit, and 2000 steps for MinAtar games
    (which have none, and a good Breakout policy could play forever)."""
    seed: int = 0
    """Seeds envs, student initialisation, ε-greedy and minibatches."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.collector not in COLLECTORS:
            raise ValueError(f"unknown collector {self.collector!r}; choose one of {', '.join(COLLECTORS)}")


def student_input_size(env_ids: list[str]) -> int:
    """Channels (grids) or features (vectors) every game's observation is padded to for a shared student: all 10
    MinAtar channels for several MinAtar games (so the network can later take up a held-out game too)."""
    shapes = [env_shapes(env_id)[0] for env_id in env_ids]
    if len({len(s) for s in shapes}) > 1 or len({s[1:] for s in shapes}) > 1:
        raise ValueError(f"games {env_ids} have observation shapes {shapes}; one student needs grids of one size "
                         "or vectors")  # fmt: skip
    if len(env_ids) > 1 and all(is_minatar(e) for e in env_ids):
        return MINATAR_MAX_CHANNELS
    return max(s[0] for s in shapes)


def default_student_spec(env_ids: list[str], hidden=(128,), conv_channels: int = 16) -> PolicySpec:
    """A student with the MinAtar teacher's architecture (conv 16 + dense 128) and one head per game."""
    shape = env_shapes(env_ids[0])[0]
    obs_shape = (student_input_size(env_ids), *shape[1:])
    return PolicySpec(obs_shape, tuple(env_shapes(e)[1] for e in env_ids), hidden, conv_channels)


def compression_student(env_id: str, teacher_params: int, fraction: float) -> PolicySpec:
    """A single-game student whose parameter count is closest to `fraction` × `teacher_params`."""
    return spec_for_fraction(default_student_spec([env_id]), round(fraction * teacher_params))


def collect(teacher: Teacher, env, obs, steps: int, epsilon: float, rng: np.random.Generator, buffer: StateBuffer,
            actor=None):
    """`steps` vector-env steps of ε-greedy play by the teacher (or by `actor(obs) -> actions` if given); the
    teacher grades every visited state and the state goes into `buffer` with its grade. Returns the last obs."""
    for _ in range(steps):
        grade = teacher(obs)
        buffer.add(obs, grade)
        actions = grade.actions_N.numpy() if actor is None else actor(obs)
        explore = rng.random(len(actions)) < epsilon
        actions = np.where(explore, rng.integers(env.single_action_space.n, size=len(actions)), actions)
        obs, _, _, _, _ = env.step(actions)
    return obs


def distill_policy(teachers: dict, config: PolicyDistillConfig, student: Policy | None = None, run_dir=None):
    """Distil `{env_id: teacher}` (one game or several) into one student; returns `RunResult` (student, history).

    History rows: `step` = updates so far, `states` = states collected per game, `return/<env_id>` per game.
    """
    from opd.control.dagger import RunResult

    env_ids = list(teachers)
    teachers = {env_id: as_teacher(t) for env_id, t in teachers.items()}
    for teacher in teachers.values():
        check_loss(config.loss, teacher.kind)
    torch.manual_seed(config.seed)
    student = student or Policy(default_student_spec(env_ids))
    pad_to = student.spec.obs_shape[0]
    if len(student.spec.num_actions) != len(env_ids):
        raise ValueError(f"the student has {len(student.spec.num_actions)} heads for {len(env_ids)} games")
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    envs = {e: make_vec_env(e, config.num_envs, config.seed + 100 * i) for i, e in enumerate(env_ids)}
    buffers = {e: StateBuffer(config.buffer_size) for e in env_ids}
    obs = {e: envs[e].reset(seed=config.seed + 100 * i)[0] for i, e in enumerate(env_ids)}
    for e in env_ids:  # teachers see their own observations; the buffer keeps them unpadded
        obs[e] = collect(teachers[e], envs[e], obs[e], config.warmup_steps, config.teacher_epsilon, rng, buffers[e])
    # after the warm-up: the teacher plays (actor None), or the student's head for each game on padded observations
    actors = {e: None if config.collector == "teacher" else (lambda o, h=head: student.act(pad_obs(o, pad_to), h))
              for head, e in enumerate(env_ids)}  # fmt: skip
    log = MetricsLog(run_dir)
    bar = tqdm(range(1, config.updates + 1), desc=f"distill[{config.loss}]", disable=not config.progress)
    for update in bar:
        if update % config.collect_every == 0:
            for e in env_ids:
                obs[e] = collect(teachers[e], envs[e], obs[e], config.collect_steps, config.teacher_epsilon, rng,
                                  buffers[e], actors[e])  # fmt: skip
        loss = 0.0
        for head, e in enumerate(env_ids):
            obs_b, labels_b = buffers[e].sample(config.batch_size, generator)
            student_out = student(pad_obs(obs_b, pad_to), head)
            loss = loss + policy_loss(student_out, labels_b, config.loss, config.temperature).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update % config.eval_every == 0 or update == config.updates:
            returns = {f"return/{e}": float(evaluate_student(student, e, head, config).mean())
                       for head, e in enumerate(env_ids)}  # fmt: skip
            log.log(update, loss=float(loss.detach()), states=buffers[env_ids[0]].total, **returns)
            bar.set_postfix(loss=float(loss.detach()), **{k.split("/")[-1]: v for k, v in returns.items()})
    for env in envs.values():
        env.close()
    return RunResult(student.eval(), log.rows)


def evaluate_student(student: Policy, env_id: str, head: int, config: PolicyDistillConfig) -> np.ndarray:
    """Greedy returns of one head of `student` on `env_id` (observations padded to the student's input size)."""
    horizon = config.max_episode_steps or (2_000 if is_minatar(env_id) else None)
    return evaluate(lambda o: student.act(pad_obs(o, student.spec.obs_shape[0]), head), env_id,
                    config.eval_episodes, seed=20_000 + config.seed, max_episode_steps=horizon)


def teacher_parameters(teacher_model) -> int:
    """Parameters of an SB3 DQN's Q-network, or of any torch module (what the compression fraction divides by)."""
    return count_parameters(getattr(teacher_model, "q_net", teacher_model))
