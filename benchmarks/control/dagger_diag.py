"""Why the on-policy-distillation analogue holds CartPole worse than DAgger at long horizons (control.md's table).

    OMP_NUM_THREADS=1 python -m benchmarks.control.dagger_diag        # about 70 s on one core

Reruns the `job_dagger` setting of control/run.py (10 rounds of 10 vector-env steps × 4 envs = 400 labels,
the soft scripted teacher ±5·(w·obs)) with one ingredient changed at a time, and evaluates every final student
greedily at horizon 2000 on the same episodes as control.md (10 episodes, seed 50_000 + seed). For each variant it
prints the mean return / 2000, how the failed episodes ended (cart off the track |x| > 2.4, or pole past 12°), the
rate at which the student's greedy action differs from the teacher's on the states it visits, and how sure the soft
teacher was on those states. Nothing is written; the numbers are quoted in benchmarks/results/control_notes.md.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.control.teachers import soft_cartpole_teacher
from opd.control.dagger import DAggerConfig, OnPolicyDistillConfig, run_dagger, run_onpolicy_distill
from opd.control.envs import make_vec_env
from opd.control.teachers import as_teacher

HORIZON, EPISODES = 2000, 10
BENCH = dict(iterations=10, steps_per_iteration=10, num_envs=4, progress=False)
VARIANTS = {
    # name: (runner, config overrides); the first two are the benchmark's own settings
    "dagger linear (bench)": ("dagger", dict(schedule="linear")),
    "onpolicy (bench)": ("onpolicy", dict(updates_per_iteration=100)),
    "onpolicy, 200 updates/round": ("onpolicy", dict(updates_per_iteration=200)),
    "onpolicy, greedy rollouts": ("onpolicy", dict(updates_per_iteration=100, sample=False)),
    "onpolicy, teacher tau=0.1": ("onpolicy", dict(updates_per_iteration=100, temperature=0.1)),
    "onpolicy, hard labels (nll)": ("onpolicy", dict(updates_per_iteration=100, loss="nll")),
    "student acts + aggregate, reverse KL": ("dagger", dict(schedule="zero", loss="reverse_kl")),
    "student acts + aggregate, nll (DAgger b=0)": ("dagger", dict(schedule="zero")),
}


def rollouts(actor, seed: int):
    """`opd.control.envs.evaluate` at horizon 2000 (same episodes), also returning how each episode ended and the
    visited states."""
    env = make_vec_env("CartPole-v1", min(8, EPISODES), seed=seed, max_episode_steps=HORIZON)
    obs, _ = env.reset(seed=seed)
    returns, ends, visited, running = [], [], [], np.zeros(env.num_envs)
    quota = np.full(env.num_envs, EPISODES // env.num_envs) + (np.arange(env.num_envs) < EPISODES % env.num_envs)
    while len(returns) < EPISODES:
        visited.append(obs[quota > 0])
        obs, reward, terminated, truncated, info = env.step(actor(obs))
        running += reward
        for i in np.flatnonzero(terminated | truncated):
            if quota[i] > 0:
                x, _, theta, _ = info["final_obs"][i]
                ends.append("horizon" if truncated[i] else ("x" if abs(x) > 2.4 else "angle"))
                returns.append(running[i])
                quota[i] -= 1
            running[i] = 0.0
    env.close()
    return np.array(returns), ends, np.concatenate(visited)


def main():
    torch.set_num_threads(1)
    teacher = as_teacher(soft_cartpole_teacher, kind="logits")
    start = time.time()
    returns, ends, _ = zip(*(rollouts(teacher.act, 50_000 + s) for s in range(3)))
    print(f"scripted teacher (greedy): return/{HORIZON} {np.mean(returns) / HORIZON:.2f}")
    print(f"{'variant':44s} {'ret/2000':>8s} {'per seed':>17s}  ends(x/angle/horizon)  disagree  p_T(max) there")
    for name, (runner, overrides) in VARIANTS.items():
        per_seed, all_ends, disagree, confidence = [], [], [], []
        for seed in range(3):
            if runner == "onpolicy":
                result = run_onpolicy_distill(teacher, OnPolicyDistillConfig(seed=seed, **BENCH, **overrides))
            else:
                result = run_dagger(teacher, DAggerConfig(seed=seed, **BENCH, **overrides))
            returns, ends, states = rollouts(result.student.act, 50_000 + seed)
            per_seed.append(returns.mean())
            all_ends += ends
            wrong = result.student.act(states) != teacher.act(states)
            probs = torch.softmax(torch.as_tensor(soft_cartpole_teacher(states)), -1).max(-1).values.numpy()
            disagree.append(wrong.mean())
            confidence += list(probs[wrong])
        ends_str = "/".join(str(all_ends.count(k)) for k in ("x", "angle", "horizon"))
        seeds_str = " ".join(f"{r:5.0f}" for r in per_seed)
        print(f"{name:44s} {np.mean(per_seed) / HORIZON:8.2f} {seeds_str:>17s}  {ends_str:>21s}  "
              f"{100 * np.mean(disagree):6.1f} %  {np.median(confidence) if confidence else float('nan'):.2f} median")
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
