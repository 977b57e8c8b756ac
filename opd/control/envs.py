"""Environments for the control side: gymnasium classic control, LunarLander and MinAtar, single or vectorised.

MinAtar observations arrive as (10, 10, C) booleans; every env made here returns them channels-first float32
(C, 10, 10), which is what torch convolutions and stable-baselines3 custom extractors expect. Games differ in C
(Breakout 4, Freeway 7, Seaquest 10, ...), so multi-game students see observations zero-padded to a common channel
count (`pad_obs`), with a separate action head per game.
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch

MINATAR_MAX_CHANNELS = 10
"""Seaquest has the most channels of the MinAtar games; padding to 10 fits every game."""


def is_minatar(env_id: str) -> bool:
    """True for MinAtar games (`MinAtar/Breakout-v1`, ...)."""
    return env_id.startswith("MinAtar/")


def _register_minatar() -> None:
    if "MinAtar/Breakout-v1" not in gym.registry:
        import minatar.gym

        minatar.gym.register_envs()


class ChannelsFirst(gym.ObservationWrapper):
    """(H, W, C) bool grid -> (C', H, W) float32, optionally zero-padded to C' channels."""

    def __init__(self, env: gym.Env, pad_to: int | None = None):
        super().__init__(env)
        h, w, c = env.observation_space.shape
        self.channels = c if pad_to is None else pad_to
        if self.channels < c:
            raise ValueError(f"pad_to={pad_to} is smaller than the {c} channels of {env.spec.id}; pass pad_to >= {c}")
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.channels, h, w), np.float32)

    def observation(self, obs):
        return pad_obs(np.transpose(obs, (2, 0, 1)).astype(np.float32), self.channels)


class PadVector(gym.ObservationWrapper):
    """Vector observations zero-padded to `size` features (to share a student with a game that has more)."""

    def __init__(self, env: gym.Env, size: int):
        super().__init__(env)
        (d,) = env.observation_space.shape
        if size < d:
            raise ValueError(f"pad_to={size} is smaller than the {d} features of {env.spec.id}; pass pad_to >= {d}")
        low = np.concatenate([env.observation_space.low, np.zeros(size - d, np.float32)])
        high = np.concatenate([env.observation_space.high, np.zeros(size - d, np.float32)])
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.size = size

    def observation(self, obs):
        return pad_obs(np.asarray(obs, np.float32), self.size)


def pad_obs(obs, size: int | None):
    """Zero-pad observations (numpy or torch, batched or not) up to `size` channels for grids (axis -3 of 3-D/4-D
    arrays) or `size` features for vectors (axis -1 of 1-D/2-D arrays), so that one student reads several games."""
    axis = -3 if obs.ndim >= 3 else -1
    if size is None or obs.shape[axis] == size:
        return obs
    if obs.shape[axis] > size:
        raise ValueError(f"observation has {obs.shape[axis]} channels/features, more than the student's {size}")
    if isinstance(obs, torch.Tensor):
        pad = (0, size - obs.shape[-1]) if axis == -1 else (0, 0, 0, 0, 0, size - obs.shape[-3])
        return torch.nn.functional.pad(obs, pad)
    widths = [(0, 0)] * obs.ndim
    widths[axis] = (0, size - obs.shape[axis])
    return np.pad(obs, widths)


def make_env(
    env_id: str,
    seed: int | None = None,
    max_episode_steps: int | None = None,
    pad_to: int | None = None,
    render_mode: str | None = None,
) -> gym.Env:
    """One environment; MinAtar games come channels-first float32 (see module docstring)."""
    if is_minatar(env_id):
        _register_minatar()
    try:
        env = gym.make(env_id, max_episode_steps=max_episode_steps, render_mode=render_mode)
    except gym.error.Error as error:
        raise ValueError(f"cannot make environment {env_id!r}: {error}") from None
    if is_minatar(env_id):
        env = ChannelsFirst(env, pad_to)
    elif pad_to is not None:
        env = PadVector(env, pad_to)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} has action space {env.action_space}; opd.control handles Discrete actions only")
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_vec_env(
    env_id: str, num_envs: int, seed: int = 0, max_episode_steps: int | None = None, pad_to: int | None = None
) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies in one synchronous vector env (autoreset: next-step), seeded seed, seed+1, ..."""
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}; pass at least 1")
    env = gym.vector.SyncVectorEnv(
        [lambda: make_env(env_id, max_episode_steps=max_episode_steps, pad_to=pad_to) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    env.reset(seed=seed)
    return env


def env_shapes(env_id: str, pad_to: int | None = None) -> tuple[tuple[int, ...], int]:
    """(observation shape, number of actions) of an environment as `make_env` returns it."""
    env = make_env(env_id, pad_to=pad_to)
    shapes = tuple(env.observation_space.shape), int(env.action_space.n)
    env.close()
    return shapes


def evaluate(actor: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int = 10, seed: int = 10_000,
             max_episode_steps: int | None = None, num_envs: int = 8, pad_to: int | None = None) -> np.ndarray:
    """Undiscounted returns of `episodes` episodes of a greedy `actor(obs_NO) -> actions_N` (vectorised)."""
    env = make_vec_env(env_id, min(num_envs, episodes), seed=seed, max_episode_steps=max_episode_steps, pad_to=pad_to)
    obs, _ = env.reset(seed=seed)
    returns, running = [], np.zeros(env.num_envs)
    # Envs that already finished their share stop counting, so every episode is scored once and none is biased short.
    quota = np.full(env.num_envs, episodes // env.num_envs) + (np.arange(env.num_envs) < episodes % env.num_envs)
    while len(returns) < episodes:
        obs, reward, terminated, truncated, _ = env.step(actor(obs))
        running += reward
        for i in np.flatnonzero(terminated | truncated):
            if quota[i] > 0:
                returns.append(running[i])
                quota[i] -= 1
            running[i] = 0.0
    env.close()
    return np.array(returns)
