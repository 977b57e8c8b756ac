"""Distillation for gymnasium control policies (MISSION rows 4-6; rows 1-3 on digits live in `opd.kd`).

teachers: SB3 DQN/PPO or any callable as a teacher; train + cache teachers.   policies: student networks, save/load.
dagger: BC, DAgger (β schedules), on-policy distillation.   distill: Rusu policy distillation (single/multi-task).
actor_mimic: Actor-Mimic and DQN transfer from its network.
"""

from opd.control.actor_mimic import ActorMimicConfig, TransferConfig, actor_mimic, transfer_dqn
from opd.control.dagger import DAggerConfig, OnPolicyDistillConfig, beta_schedule, run_dagger, run_onpolicy_distill
from opd.control.distill import PolicyDistillConfig, compression_student, distill_policy
from opd.control.policies import Policy, PolicySpec, load_policy, save_policy
from opd.control.teachers import TeacherConfig, as_teacher, cartpole_expert, train_teacher

__all__ = [
    "ActorMimicConfig", "DAggerConfig", "OnPolicyDistillConfig", "Policy", "PolicyDistillConfig", "PolicySpec",
    "TeacherConfig", "TransferConfig", "actor_mimic", "as_teacher", "beta_schedule", "cartpole_expert",
    "compression_student", "distill_policy", "load_policy", "run_dagger", "run_onpolicy_distill", "save_policy",
    "train_teacher", "transfer_dqn",
]  # fmt: skip
