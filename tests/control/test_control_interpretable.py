"""Interpretable students: VIPER's weights, a tree that balances CartPole, printed rules and formulas that are the
policy, saving, and `opd interpret`."""

import re

import numpy as np
import pytest
import torch

from opd.cli import main
from opd.control.interpretable import (FormulaPolicy, InterpretConfig, LinearPolicy, TreePolicy, describe,
                                       distill_interpretable, load_interpretable, names, save_interpretable,
                                       viper_weights)  # fmt: skip
from opd.control.envs import evaluate
from opd.control.teachers import TeacherOutput, as_teacher, cartpole_expert

FEATURES, ACTIONS = names("CartPole-v1", 4, 2)


def soft_expert(obs):
    """The scripted CartPole controller as logits ±5·(w·obs)."""
    score = 5 * (obs @ np.array([0.1, 0.5, 3.0, 1.0]))
    return np.stack([-score, score], -1)


def test_viper_weights_are_the_q_gap():
    q = torch.tensor([[1.0, 3.0], [2.0, 2.0], [-1.0, 4.0]])
    np.testing.assert_allclose(viper_weights(TeacherOutput("q", q.argmax(-1), q)), [2.0, 0.0, 5.0])
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    logp = torch.log_softmax(logits, -1)  # the gap of log-probs is the gap of logits
    expected = (logp.max(-1).values - logp.min(-1).values).numpy()
    np.testing.assert_allclose(viper_weights(TeacherOutput("logits", logits.argmax(-1), logits)), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [3.0, 0.0], atol=1e-6)
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    np.testing.assert_allclose(viper_weights(TeacherOutput("probs", probs.argmax(-1), probs)), [0.0, np.log(9)],
                               rtol=1e-6)  # fmt: skip
    assert viper_weights(TeacherOutput("action", torch.tensor([0, 1]))).tolist() == [1.0, 1.0]


def test_a_tree_distilled_from_the_scripted_expert_balances_and_the_best_round_is_kept():
    config = InterpretConfig(kind="tree", iterations=6, steps_per_iteration=100, max_leaf_nodes=16)
    result = distill_interpretable(as_teacher(soft_expert, kind="logits"), config)
    returns = [row["return_mean"] for row in result.history]
    assert [row["labels"] for row in result.history] == [400 * (i + 1) for i in range(6)]
    assert result.best_iteration == int(np.argmax(returns))
    size = result.student.size()
    assert size["leaves"] <= 16 and size["nodes"] == 2 * size["leaves"] - 1
    assert evaluate(result.student.act, "CartPole-v1", 10, seed=123).mean() >= 475  # CartPole-v1's "solved"


def _states(n=2_000):
    rng = np.random.default_rng(0)
    return rng.normal(0, [1.0, 1.0, 0.1, 1.0], size=(n, 4))


def test_the_printed_rules_are_the_tree():
    result = distill_interpretable(as_teacher(soft_expert, kind="logits"),
                                   InterpretConfig(kind="tree", iterations=2, steps_per_iteration=100))
    text = result.student.text(FEATURES, ACTIONS)
    assert text.startswith("def policy(cart_position, cart_velocity, pole_angle, pole_angular_velocity):")
    assert text.count("return ") == result.student.size()["leaves"]
    scope = {}
    exec(text, scope)  # the rules are Python: run them on the same states as the tree
    states = _states()
    printed = np.array([scope["policy"](*s) for s in states])
    assert (printed == result.student.act(states)).all() and 0 < printed.mean() < 1


def _expression(text):
    """'push right if EXPR > 0 else push left' -> EXPR, with names numpy can evaluate."""
    return re.match(r"push right if (.*) > 0 else push left$", text).group(1)


def test_linear_and_formula_students_print_as_the_equations_they_are():
    teacher = as_teacher(soft_expert, kind="logits")
    states = _states()
    scope = dict(zip(FEATURES, states.T))
    for kind in ("linear", "formula"):
        result = distill_interpretable(teacher, InterpretConfig(kind=kind, iterations=3, steps_per_iteration=100))
        student = result.student
        printed = (eval(_expression(student.text(FEATURES, ACTIONS)), scope) > 0).astype(int)
        assert (printed == student.act(states)).all()
        assert evaluate(student.act, "CartPole-v1", 10, seed=123).mean() >= 400
    # the formula keeps at most max_terms monomials besides the constant
    assert student.size()["terms"] <= 1 + 4
    words = set(re.findall(r"[a-z_]+", student.text(FEATURES, ACTIONS)))
    assert "pole_angle" in words or "pole_angular_velocity" in words


def test_multi_action_students_and_saving_round_trip(tmp_path):
    tree = TreePolicy([0, -1, -1], [0.5, 0.0, 0.0], [1, -1, -1], [2, -1, -1], [0, 2, 1])
    linear = LinearPolicy([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], [0.0, 0.0, 0.1], [0, 1, 2])
    formula = FormulaPolicy([[], [0], [0, 1]], [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    states = np.array([[0.0, 0.0], [1.0, 0.2], [-2.0, 3.0], [0.2, 0.4]])
    assert tree.act(states).tolist() == [2, 1, 2, 2]
    assert linear.act(states).tolist() == [2, 0, 1, 1]
    assert formula.act(states).tolist() == [0, 1, 0, 0]  # scores (1, 0, 0), (1, 2, .6), (1, -4, -18), (1, .4, .24)
    save_interpretable(tmp_path, "MountainCar-v0", {"tree": tree, "linear": linear, "formula": formula})
    env_id, loaded = load_interpretable(tmp_path)
    assert env_id == "MountainCar-v0"
    for kind, student in (("tree", tree), ("linear", linear), ("formula", formula)):
        assert loaded[kind].act(states).tolist() == student.act(states).tolist()
    text = describe(tmp_path)
    assert "if position <= 0.5:" in text and "return 1  # no push" in text
    assert "score[push right] = 3*position*velocity" in text and "action = argmax(score)" in text


def test_opd_interpret_prints_the_saved_students(tmp_path, capsys):
    result = distill_interpretable(cartpole_expert, InterpretConfig(kind="tree", iterations=1, steps_per_iteration=50))
    save_interpretable(tmp_path, "CartPole-v1", {"tree": result.student})
    main(["interpret", "--policy", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("# CartPole-v1") and result.student.text(FEATURES, ACTIONS) in out
    with pytest.raises(SystemExit) as exit_info:
        main(["interpret", "--policy", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "interpretable.json" in capsys.readouterr().err
