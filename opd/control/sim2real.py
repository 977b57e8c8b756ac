"""Sim-to-real distillation (MISSION row 11): a privileged teacher distilled DAgger-style into a student that sees
only what a real robot would, evaluated under dynamics changed beyond training.

The teacher is trained with RL on the clean simulator state. The student reads a "real robot" observation built from
reusable gymnasium wrappers: `MaskObservation` (drop what has no sensor, e.g. velocities), `ObservationNoise`,
`ObservationDelay` and gymnasium's `FrameStackObservation` (the memory a masked, delayed state needs), with
`PrivilegedObservation` innermost so that the clean state travels in `info["privileged_obs"]` for the teacher.
`distill_privileged` is DAgger with a continuous, frame-stacked student: whoever acts (teacher with probability β,
else the student), the teacher labels every visited state from the privileged observation and the student regresses
the teacher's action (MSE) on its own observation; β ≡ 1 is behavioural cloning. `DynamicsShift` / `apply_dynamics`
scale the MuJoCo model (masses, actuator gear, friction, damping); `DynamicsRandomization` samples a shift per episode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from opd.control.common import MetricsLog
from opd.control.dagger import RunResult, Schedule, beta_schedule

# --- observation wrappers -----------------------------------------------------------------------------------------


class PrivilegedObservation(gym.Wrapper):
    """Copies the clean observation into `info["privileged_obs"]` (apply first, before any corrupting wrapper)."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, "privileged_obs": np.asarray(obs, np.float32).copy()}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "privileged_obs": np.asarray(obs, np.float32).copy()}


class MaskObservation(gym.ObservationWrapper):
    """Keeps only the features at `keep` (e.g. positions without velocities: sensors a real robot has)."""

    def __init__(self, env: gym.Env, keep: tuple[int, ...]):
        super().__init__(env)
        self.keep = np.asarray(keep, dtype=np.int64)
        low, high = env.observation_space.low[self.keep], env.observation_space.high[self.keep]
        self.observation_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    def observation(self, obs):
        return np.asarray(obs, np.float32)[self.keep]


class ObservationNoise(gym.ObservationWrapper):
    """Adds independent Gaussian noise N(0, std²) per feature (sensor noise); `reset(seed=...)` reseeds it."""

    def __init__(self, env: gym.Env, std: float | tuple[float, ...]):
        super().__init__(env)
        self.std = np.asarray(std, np.float32)
        self.rng = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        if seed is not None:  # its own stream: the noise must not perturb the simulator's random state
            self.rng = np.random.default_rng(seed + 7_919)
        return super().reset(seed=seed, options=options)

    def observation(self, obs):
        obs = np.asarray(obs, np.float32)
        return obs + (self.std * self.rng.standard_normal(obs.shape)).astype(np.float32)


class ObservationDelay(gym.ObservationWrapper):
    """Returns the observation from `steps` steps ago (sensing/communication latency); the first `steps` observations
    after a reset repeat the reset observation (nothing older exists)."""

    def __init__(self, env: gym.Env, steps: int):
        super().__init__(env)
        if steps < 0:
            raise ValueError(f"delay steps={steps}; pass 0 or more")
        self.steps = steps
        self.queue: deque = deque(maxlen=steps + 1)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.queue.clear()
        self.queue.extend([obs] * (self.steps + 1))
        return self.queue[0], info

    def observation(self, obs):
        self.queue.append(obs)  # maxlen drops the oldest, so queue[0] is the observation from `steps` steps ago
        return self.queue[0]


@dataclass(frozen=True)
class RobotObsArgs:
    """What the "real robot" student observes (defaults: InvertedPendulum positions without velocities)."""

    keep: tuple[int, ...] | None = (0, 1)
    """Feature indices with a sensor (None: all). InvertedPendulum-v5: 0 cart position, 1 pole angle, 2-3 velocities."""
    noise_std: float = 0.002
    """Gaussian sensor noise (same units as the observation; 0.002 rad is about 0.1°, an encoder's resolution)."""
    delay: int = 1
    """Observation latency in control steps."""
    frame_stack: int = 4
    """Observations stacked (flattened) so that a memoryless MLP can infer velocities from differences."""


# --- dynamics shifts ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicsShift:
    """Multiplicative change of a MuJoCo model, relative to its nominal values."""

    mass: float = 1.0
    """Scale of body masses (and inertias, i.e. a density change) of `bodies`."""
    gear: float = 1.0
    """Scale of the actuator gear (motor strength)."""
    friction: float = 1.0
    """Scale of the geoms' sliding friction."""
    damping: float = 1.0
    """Scale of the joints' damping."""
    bodies: tuple[str, ...] = ()
    """Bodies whose mass is scaled (empty: every body)."""


def apply_dynamics(env: gym.Env, shift: DynamicsShift) -> None:
    """Set `env`'s MuJoCo model to nominal × `shift` (idempotent: shifts never compound)."""
    base = env.unwrapped
    model = base.model
    if not hasattr(base, "_opd_nominal"):  # remember the compiled values once, so later shifts start from them
        fields = ("body_mass", "body_inertia", "actuator_gear", "geom_friction", "dof_damping")
        base._opd_nominal = {k: getattr(model, k).copy() for k in fields}
    nominal = base._opd_nominal
    names = [model.body(i).name for i in range(model.nbody)]
    unknown = set(shift.bodies) - set(names)
    if unknown:
        raise ValueError(f"no bodies named {sorted(unknown)}; this model has {names}")
    scale = np.array([shift.mass if (not shift.bodies or n in shift.bodies) else 1.0 for n in names])
    model.body_mass[:] = nominal["body_mass"] * scale
    model.body_inertia[:] = nominal["body_inertia"] * scale[:, None]
    model.actuator_gear[:] = nominal["actuator_gear"] * shift.gear
    model.geom_friction[:] = nominal["geom_friction"]
    model.geom_friction[:, 0] *= shift.friction
    model.dof_damping[:] = nominal["dof_damping"] * shift.damping


class DynamicsRandomization(gym.Wrapper):
    """Domain randomisation: each reset draws mass and gear scales log-uniformly in [1/r, r] and applies them."""

    def __init__(self, env: gym.Env, mass_range: float = 1.0, gear_range: float = 1.0, bodies: tuple[str, ...] = ()):
        super().__init__(env)
        self.mass_range, self.gear_range, self.bodies = mass_range, gear_range, bodies

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.env.reset(seed=seed)  # seed the simulator's stream first so the draws below are reproducible
        rng = self.env.unwrapped.np_random
        draw = lambda r: float(np.exp(rng.uniform(-np.log(r), np.log(r))))  # noqa: E731
        apply_dynamics(self.env, DynamicsShift(mass=draw(self.mass_range), gear=draw(self.gear_range),
                                               bodies=self.bodies))  # fmt: skip
        return self.env.reset(options=options)


def make_robot_env(env_id: str, obs: RobotObsArgs | None, shift: DynamicsShift | None = None,
                   randomize: tuple[float, float] | None = None, bodies: tuple[str, ...] = ()) -> gym.Env:
    """An env whose observation is the robot's (`obs`) or the clean state (`obs=None`), clean state always in
    `info["privileged_obs"]`; dynamics fixed to `shift` or randomised per episode (`randomize` = (mass r, gear r))."""
    env = gym.make(env_id)
    if randomize is not None:
        env = DynamicsRandomization(env, *randomize, bodies=bodies)
    elif shift is not None:
        apply_dynamics(env, shift)
    env = PrivilegedObservation(env)
    if obs is None:
        space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
        return gym.wrappers.TransformObservation(env, lambda o: np.asarray(o, np.float32), space)
    if obs.keep is not None:
        env = MaskObservation(env, obs.keep)
    if obs.noise_std > 0:
        env = ObservationNoise(env, obs.noise_std)
    if obs.delay > 0:
        env = ObservationDelay(env, obs.delay)
    if obs.frame_stack > 1:
        env = gym.wrappers.FlattenObservation(gym.wrappers.FrameStackObservation(env, obs.frame_stack))
    return env


# --- student, teacher, evaluation ---------------------------------------------------------------------------------


class ContinuousPolicy(nn.Module):
    """MLP from observations [N, D] to actions [N, A] squashed into the action box (tanh, then rescaled).

    Inputs are standardised with `fit_normalizer`'s statistics: the features of a stacked robot observation are small
    (radians, metres) and differ between frames by less still, which an MLP at default initialisation barely resolves.
    """

    def __init__(self, obs_dim: int, low, high, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, len(low)))
        low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.register_buffer("action_center", torch.as_tensor((high + low) / 2))
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def fit_normalizer(self, obs_ND: torch.Tensor, act_NA: torch.Tensor | None = None) -> None:
        """Standardise inputs with the mean and std of `obs_ND`; with `act_NA`, also narrow the output range to the
        actions' mean ± 3 std (within the action box), so that small actions (an RL expert that pays for torque) are
        not regressed through the flat ends of a tanh sized for the whole box."""
        self.obs_mean.copy_(obs_ND.mean(0))
        self.obs_std.copy_(obs_ND.std(0).clamp_min(1e-6))
        if act_NA is not None:
            box_low, box_high = self.action_center - self.action_scale, self.action_center + self.action_scale
            spread = 3 * act_NA.std(0).clamp_min(1e-3)
            low = torch.maximum(box_low, act_NA.mean(0) - spread)
            high = torch.minimum(box_high, act_NA.mean(0) + spread)
            self.action_center.copy_((high + low) / 2)
            self.action_scale.copy_((high - low) / 2)

    def forward(self, obs_ND: torch.Tensor) -> torch.Tensor:
        z = (obs_ND.float() - self.obs_mean) / self.obs_std
        return self.action_center + self.action_scale * torch.tanh(self.net(z))

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a numpy batch of observations."""
        return self(torch.as_tensor(np.asarray(obs), dtype=torch.float32)).numpy()


def sb3_actor(model) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic (mean) action of an SB3 model, batched."""
    return lambda obs: model.predict(np.asarray(obs, np.float32), deterministic=True)[0]


def evaluate_robot(actor, env_fn: Callable[[], gym.Env], episodes: int, seed: int, privileged: bool = False):
    """Returns [episodes] of `actor` (on the robot observation, or on `info["privileged_obs"]`), one episode per env."""
    envs = [env_fn() for _ in range(episodes)]
    pairs = [env.reset(seed=seed + i) for i, env in enumerate(envs)]
    obs = [p[0] for p in pairs]
    priv = [p[1]["privileged_obs"] for p in pairs]
    returns, alive = np.zeros(episodes), np.ones(episodes, bool)
    while alive.any():
        live = np.flatnonzero(alive)
        actions = actor(np.stack([(priv if privileged else obs)[i] for i in live]))
        for i, action in zip(live, actions):
            obs[i], reward, terminated, truncated, info = envs[i].step(action)
            priv[i] = info["privileged_obs"]
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    for env in envs:
        env.close()
    return returns


# --- DAgger from a privileged teacher -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivilegedDistillConfig:
    """DAgger (or BC) from a privileged-state teacher into a robot-observation student."""

    env_id: str = "InvertedPendulum-v5"
    """gymnasium MuJoCo environment id."""
    obs: RobotObsArgs = field(default_factory=RobotObsArgs)
    """What the student observes."""
    randomize: tuple[float, float] | None = (1.25, 1.25)
    """Training-time domain randomisation (mass range, gear range); evaluation shifts go beyond it."""
    bodies: tuple[str, ...] = ()
    """Bodies whose mass is randomised (empty: all)."""
    schedule: Schedule = "exponential"
    """β schedule of `opd.control.dagger.beta_schedule`; "bc" (the teacher always acts) is behavioural cloning."""
    beta_decay: float = 0.5
    """Base of the exponential schedule."""
    iterations: int = 8
    """Collect-label-aggregate-retrain rounds."""
    steps_per_iteration: int = 250
    """Steps per round in each env (labels per round = steps × num_envs)."""
    num_envs: int = 4
    """Parallel environments; each flips its own expert-or-student coin at every step."""
    updates_per_iteration: int = 500
    """Minibatch updates on the aggregated data after each round."""
    batch_size: int = 128
    """States per minibatch."""
    lr: float = 3e-4
    """Adam learning rate (1e-3 made the closed-loop return swing between rounds on InvertedPendulum)."""
    hidden: tuple[int, ...] = (64, 64)
    """Student MLP widths."""
    eval_episodes: int = 5
    """Evaluation episodes (nominal dynamics) after each round."""
    seed: int = 0
    """Seeds envs, noise, student initialisation and the β coins."""


def distill_privileged(teacher: Callable[[np.ndarray], np.ndarray], config: PrivilegedDistillConfig,
                       run_dir=None) -> RunResult:
    """DAgger: the mixture policy acts on robot observations, `teacher(privileged_obs_ND) -> actions_NA` labels every
    visited state, the student is retrained (MSE) on all labels so far. Returns the student and per-round metrics."""
    torch.manual_seed(config.seed)
    env_fn = lambda: make_robot_env(config.env_id, config.obs, randomize=config.randomize,  # noqa: E731
                                    bodies=config.bodies)
    env = gym.vector.SyncVectorEnv([env_fn] * config.num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    space = env.single_action_space
    student = ContinuousPolicy(env.single_observation_space.shape[0], space.low, space.high, config.hidden)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    generator, coins = torch.Generator().manual_seed(config.seed), np.random.default_rng(config.seed)
    obs, info = env.reset(seed=config.seed)
    data_obs, data_act, log = [], [], MetricsLog(run_dir)
    for iteration in range(config.iterations):
        beta = beta_schedule(config.schedule, iteration, config.iterations, config.beta_decay)
        teacher_acted = 0
        for _ in range(config.steps_per_iteration):
            # SAME_STEP autoreset: after a reset `info` is the new episode's, so it always matches `obs`
            labels = np.asarray(teacher(info["privileged_obs"]), np.float32)
            data_obs.append(obs.astype(np.float32))
            data_act.append(labels)
            turn = coins.random(config.num_envs) < beta
            teacher_acted += int(turn.sum())
            actions = np.where(turn[:, None], labels, student.act(obs))
            obs, _, _, _, info = env.step(actions)
        all_obs, all_act = torch.as_tensor(np.concatenate(data_obs)), torch.as_tensor(np.concatenate(data_act))
        if iteration == 0:  # first-round statistics only: later rounds must not move the inputs under the weights
            student.fit_normalizer(all_obs)
        for _ in range(config.updates_per_iteration):
            index = torch.randint(len(all_obs), (min(config.batch_size, len(all_obs)),), generator=generator)
            loss = ((student(all_obs[index]) - all_act[index]) ** 2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        returns = evaluate_robot(student.act, lambda: make_robot_env(config.env_id, config.obs), config.eval_episodes,
                                 seed=10_000 + config.seed)  # fmt: skip
        log.log(len(all_obs), iteration=iteration, beta=beta, dataset_size=len(all_obs), loss=float(loss.detach()),
                teacher_action_fraction=teacher_acted / (config.steps_per_iteration * config.num_envs),
                return_mean=float(returns.mean()))  # fmt: skip
    env.close()
    return RunResult(student.eval(), log.rows)
