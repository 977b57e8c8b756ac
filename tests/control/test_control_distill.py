"""Rusu policy distillation: the three losses by hand, the replay memory, single- and multi-task students."""

import numpy as np
import pytest
import torch

from opd.control.common import StateBuffer, policy_loss
from opd.control.distill import PolicyDistillConfig, compression_student, default_student_spec, distill_policy
from opd.control.policies import Policy, count_parameters
from opd.control.teachers import TeacherOutput, as_teacher

W = np.array([0.1, 0.5, 3.0, 1.0])
# Q-value teachers made from scripted controllers: argmax is the controller's action
CARTPOLE_Q = as_teacher(lambda o: np.stack([-(o @ W), o @ W], -1), kind="q")
ACROBOT_Q = as_teacher(lambda o: np.stack([-o[:, 5], 0 * o[:, 5], o[:, 5]], -1), kind="q")


def test_rusu_losses_equal_hand_computed_values():
    q = torch.tensor([[1.0, 2.0]])
    teacher = TeacherOutput("q", q.argmax(-1), q)
    student = torch.tensor([[0.0, 1.0]])
    # τ = 0.5: p_T = softmax([2, 4]); π_s = softmax([0, 1]); KL(p_T ‖ π_s) by hand (see the test's git history)
    assert policy_loss(student, teacher, "kl", 0.5).item() == pytest.approx(0.0671307544531328, rel=1e-5)
    assert policy_loss(torch.zeros(1, 2), teacher, "kl", 0.5).item() == pytest.approx(0.32781332547273767, rel=1e-5)
    assert policy_loss(student, teacher, "nll").item() == pytest.approx(0.3132616875182228, rel=1e-6)  # −log π_s(1)
    assert policy_loss(student, teacher, "mse").item() == pytest.approx(1.0)  # ((0−1)² + (1−2)²) / 2
    # τ → 0 makes the KL the NLL of the argmax (minus the teacher's vanishing entropy)
    sharp = policy_loss(student, teacher, "kl", 1e-4).item()
    assert sharp == pytest.approx(policy_loss(student, teacher, "nll").item(), rel=1e-4)



def test_the_on_policy_divergences_equal_hand_computed_values():
    # τ = 0.5: p_T = softmax([2, 4, 1]), π_s = softmax([0, 1, −1]); by hand in float64 (numpy). The two KL directions
    # differ by 19 % here, so reverse_kl wired to the forward KL (or back) fails.
    q = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = TeacherOutput("q", q.argmax(-1), q)
    student = torch.tensor([[0.0, 1.0, -1.0]])
    expected = {
        "forward_kl": 0.08155467936943421,  # Σ p_T·log(p_T / π_s)
        "kl": 0.08155467936943421,  # Rusu's KL is the forward KL
        "reverse_kl": 0.09699909933708334,  # Σ π_s·log(π_s / p_T)
        "jsd": 0.02190650886155193,  # ½·KL(p_T ‖ m) + ½·KL(π_s ‖ m), m = ½·(p_T + π_s)
        "tvd": 0.17855377870651762,  # ½·Σ |π_s − p_T|
    }
    for loss, value in expected.items():
        assert policy_loss(student, teacher, loss, 0.5).item() == pytest.approx(value, rel=1e-5), loss

def test_state_buffer_is_fifo():
    buffer = StateBuffer(5)
    for start in (0, 3, 6):
        obs = torch.arange(start, start + 3, dtype=torch.float32)[:, None]
        buffer.add(obs, TeacherOutput("q", torch.arange(start, start + 3), obs.repeat(1, 2)))
    assert buffer.size == 5 and buffer.total == 9
    assert sorted(buffer.obs[:, 0].tolist()) == [4, 5, 6, 7, 8]  # the oldest four were overwritten
    obs, labels = buffer.sample(100, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(obs[:, 0].long().numpy(), labels.actions_N.numpy())
    np.testing.assert_array_equal(labels.values_NA[:, 1].numpy(), obs[:, 0].numpy())


@pytest.mark.parametrize("loss", ["kl", "nll", "mse"])
def test_single_task_distillation_recovers_the_teacher(loss):
    config = PolicyDistillConfig(loss=loss, lr=3e-3, updates=600, eval_every=600, warmup_steps=100, eval_episodes=4,
                                 progress=False)  # fmt: skip
    history = distill_policy({"CartPole-v1": CARTPOLE_Q}, config).history
    assert history[-1]["step"] == 600 and history[-1]["states"] == 100 * 4 + (600 // 10) * 4 * 4
    assert history[-1]["return/CartPole-v1"] >= 450  # untrained: ~20


def test_multi_task_student_has_a_head_per_game_and_plays_both():
    spec = default_student_spec(["CartPole-v1", "Acrobot-v1"], hidden=(64,))
    assert spec.obs_shape == (6,) and spec.num_actions == (2, 3)  # CartPole's 4 features padded to Acrobot's 6
    config = PolicyDistillConfig(updates=1200, eval_every=1200, warmup_steps=100, eval_episodes=4, progress=False)
    history = distill_policy({"CartPole-v1": CARTPOLE_Q, "Acrobot-v1": ACROBOT_Q}, config, Policy(spec)).history
    assert history[-1]["return/CartPole-v1"] >= 400
    assert history[-1]["return/Acrobot-v1"] >= -150  # random play: ~-490
    with pytest.raises(ValueError, match="heads"):
        distill_policy({"CartPole-v1": CARTPOLE_Q}, config, Policy(spec))


def test_compression_students_have_the_requested_size():
    teacher_params = count_parameters(Policy(default_student_spec(["MinAtar/Breakout-v1"])))
    for fraction in (0.25, 0.07, 0.04):
        got = count_parameters(Policy(compression_student("MinAtar/Breakout-v1", teacher_params, fraction)))
        assert got / teacher_params == pytest.approx(fraction, abs=0.01)
