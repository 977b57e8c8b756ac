"""Distillation for gymnasium control policies (MISSION rows 4-6, 11, 12, 17, 18; rows 1-3 on digits live in `opd.kd`).

teachers: SB3 DQN/PPO or any callable as a teacher; train + cache teachers.   policies: student networks, save/load.
dagger: BC, DAgger (β schedules), on-policy distillation.   distill: Rusu policy distillation (single/multi-task).
actor_mimic: Actor-Mimic and DQN transfer from its network.
sim2real: a privileged teacher distilled DAgger-style into a student with a robot's noisy, delayed, partial view.
rldg: RL experts per sub-task → a generalist trained on their successful rollouts, or on human-like demonstrations.
rpd: refined policy distillation, PPO pulled toward a teacher by a cosine-annealed term.
interpretable: VIPER decision trees, linear policies and short formulas distilled from a teacher (`opd interpret`).
"""

from opd.control.actor_mimic import ActorMimicConfig, TransferConfig, actor_mimic, transfer_dqn
from opd.control.dagger import DAggerConfig, OnPolicyDistillConfig, beta_schedule, run_dagger, run_onpolicy_distill
from opd.control.distill import PolicyDistillConfig, compression_student, distill_policy
from opd.control.interpretable import (
    FormulaPolicy, InterpretConfig, LinearPolicy, TreePolicy, describe, distill_interpretable, load_interpretable,
    save_interpretable, viper_weights,
)  # fmt: skip
from opd.control.policies import Policy, PolicySpec, load_policy, save_policy
from opd.control.rldg import (
    GeneralistConfig, HumanArgs, HumanDemonstrator, SubTask, collect_successful, train_expert, train_generalist,
)  # fmt: skip
from opd.control.rpd import RPD, RPDConfig, rpd_lambda, run_rpd, train_generalist_teacher
from opd.control.sim2real import (
    DynamicsRandomization, DynamicsShift, MaskObservation, ObservationDelay, ObservationNoise, PrivilegedDistillConfig,
    PrivilegedObservation, RobotObsArgs, apply_dynamics, distill_privileged, make_robot_env,
)  # fmt: skip
from opd.control.teachers import TeacherConfig, as_teacher, cartpole_expert, train_teacher

__all__ = [
    "ActorMimicConfig", "DAggerConfig", "DynamicsRandomization", "DynamicsShift", "FormulaPolicy", "GeneralistConfig",
    "HumanArgs", "HumanDemonstrator", "InterpretConfig", "LinearPolicy", "MaskObservation", "ObservationDelay",
    "ObservationNoise", "OnPolicyDistillConfig", "Policy", "PolicyDistillConfig", "PolicySpec",
    "PrivilegedDistillConfig", "PrivilegedObservation", "RPD", "RPDConfig", "RobotObsArgs", "SubTask",
    "TeacherConfig", "TransferConfig", "TreePolicy", "actor_mimic", "apply_dynamics", "as_teacher", "beta_schedule",
    "cartpole_expert", "collect_successful", "compression_student", "describe", "distill_interpretable",
    "distill_policy", "distill_privileged", "load_interpretable", "load_policy", "make_robot_env", "rpd_lambda",
    "run_dagger", "run_onpolicy_distill", "run_rpd", "save_interpretable", "save_policy", "train_expert",
    "train_generalist", "train_generalist_teacher", "train_teacher", "transfer_dqn", "viper_weights",
]  # fmt: skip
