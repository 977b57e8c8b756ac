"""Interpretable students: a decision tree (VIPER), a linear policy and a short formula, distilled from a teacher.

VIPER (Bastani, Pu & Solar-Lezama 2018) is DAgger with two changes: each state s is weighted by how much the choice
of action matters there, ℓ(s) = V(s) − min_a Q(s, a) = max_a Q(s, a) − min_a Q(s, a) (a Q-gap; for a policy teacher,
the gap of its action log-probs), and the tree is refit on a resample of the aggregated data drawn ∝ ℓ; of the trees
of all iterations the one with the best return on validation episodes is kept.

The same loop fits two other students: a linear policy (multinomial logistic regression, action = argmax(W·x + b))
and a formula (Lasso over degree-2 monomials of the observation regressing the teacher's centred scores, cut to a
few terms, refit by weighted least squares, coefficients rounded to 3 significant digits).

Every student is plain numbers (thresholds, weights, monomials) with `act`, `size` and `text`: the tree prints as a
Python function of if/else rules, the formula as an equation. `save_interpretable` / `describe` back `opd interpret`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from opd.control.common import cat_outputs
from opd.control.envs import env_shapes, evaluate, make_vec_env
from opd.control.teachers import TeacherOutput, as_teacher

FEATURE_NAMES = {
    "CartPole-v1": ("cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"),
    "Acrobot-v1": ("cos_theta1", "sin_theta1", "cos_theta2", "sin_theta2", "theta1_dot", "theta2_dot"),
    "MountainCar-v0": ("position", "velocity"),
    "LunarLander-v3": ("x", "y", "vx", "vy", "angle", "angular_velocity", "left_leg", "right_leg"),
}
ACTION_NAMES = {
    "CartPole-v1": ("push left", "push right"),
    "Acrobot-v1": ("torque -1", "torque 0", "torque +1"),
    "MountainCar-v0": ("push left", "no push", "push right"),
    "LunarLander-v3": ("noop", "fire left", "fire main", "fire right"),
}
Kind = Literal["tree", "linear", "formula"]


def viper_weights(grade: TeacherOutput) -> np.ndarray:
    """VIPER's state weights ℓ(s) = max_a Q(s,a) − min_a Q(s,a) [N]; for logits/probs the gap of the log-probs
    (log-softmax shifts cancel, so that is max − min logit); all ones for a teacher that gives only actions."""
    if grade.kind == "action":
        return np.ones(len(grade.actions_N))
    values = grade.values_NA.numpy().astype(np.float64)
    if grade.kind == "probs":
        values = np.log(np.clip(values, 1e-30, None))
    return values.max(1) - values.min(1)


def _scores(grade: TeacherOutput, num_actions: int) -> np.ndarray:
    """Regression targets for the formula [N, A]: the teacher's centred scores, or ±1 one-hot for hard actions."""
    if grade.kind == "action":
        return 2.0 * np.eye(num_actions)[grade.actions_N.numpy()] - 1.0
    values = grade.values_NA.numpy().astype(np.float64)
    if grade.kind == "probs":
        values = np.log(np.clip(values, 1e-30, None))
    return values - values.mean(1, keepdims=True)  # only differences between actions matter for the argmax


# --- the three students ------------------------------------------------------------------------------------------


@dataclass
class TreePolicy:
    """A binary decision tree: node i tests obs[feature[i]] <= threshold[i] (left) else right; leaves have left = -1."""

    feature: list[int]
    threshold: list[float]
    left: list[int]
    right: list[int]
    action: list[int]
    """The action of each node (used at leaves)."""

    @classmethod
    def from_sklearn(cls, model) -> TreePolicy:
        """The fitted tree with thresholds rounded to 4 significant digits (so the printed rules are the policy) and
        tests whose two sides pick the same action merged into one leaf (sklearn splits on impurity, not action)."""
        t = model.tree_
        actions = model.classes_[t.value[:, 0, :].argmax(1)]
        out = cls([], [], [], [], [])

        def copy(node) -> int:
            """Copy the subtree at sklearn `node` into `out`; returns its new index."""
            index = len(out.left)
            out.feature.append(-1), out.threshold.append(0.0), out.left.append(-1), out.right.append(-1)
            out.action.append(int(actions[node]))
            if t.children_left[node] == -1:
                return index
            left, right = copy(t.children_left[node]), copy(t.children_right[node])
            if out.left[left] == out.left[right] == -1 and out.action[left] == out.action[right]:
                for name in ("feature", "threshold", "left", "right", "action"):
                    del getattr(out, name)[left:]  # both children are leaves: drop them, the node becomes a leaf
                out.action[index] = int(actions[t.children_left[node]])
                return index
            out.feature[index], out.threshold[index] = int(t.feature[node]), float(f"{t.threshold[node]:.4g}")
            out.left[index], out.right[index] = left, right
            return index

        copy(0)
        return out

    def act(self, obs_NO: np.ndarray) -> np.ndarray:
        obs_NO = np.atleast_2d(obs_NO)
        feature, threshold = np.array(self.feature), np.array(self.threshold)
        left, right = np.array(self.left), np.array(self.right)
        node = np.zeros(len(obs_NO), dtype=int)
        while True:  # walk all states down together, one level per pass
            inner = left[node] != -1
            if not inner.any():
                return np.array(self.action)[node]
            go_left = obs_NO[np.arange(len(obs_NO)), np.maximum(feature[node], 0)] <= threshold[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)

    def size(self) -> dict:
        leaves = sum(1 for child in self.left if child == -1)
        return {"nodes": len(self.left), "leaves": leaves, "depth": self._depth(0)}

    def _depth(self, node: int) -> int:
        return 0 if self.left[node] == -1 else 1 + max(self._depth(self.left[node]), self._depth(self.right[node]))

    def text(self, features: list[str], actions: list[str]) -> str:
        lines = [f"def policy({', '.join(features)}):"]

        def emit(node, depth):
            pad = "    " * depth
            if self.left[node] == -1:
                lines.append(f"{pad}return {self.action[node]}  # {actions[self.action[node]]}")
                return
            lines.append(f"{pad}if {features[self.feature[node]]} <= {self.threshold[node]!r}:")
            emit(self.left[node], depth + 1)
            lines.append(f"{pad}else:")
            emit(self.right[node], depth + 1)

        emit(0, 1)
        return "\n".join(lines)


@dataclass
class LinearPolicy:
    """action = actions[argmax(W·obs + b)]: one row of W per action the teacher was seen to take (two actions: the
    first row is zero, so the policy is the sign of one score)."""

    weight: list[list[float]]
    bias: list[float]
    actions: list[int]
    """The action of each row."""

    @classmethod
    def from_sklearn(cls, model) -> LinearPolicy:
        weight, bias = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # sklearn keeps one row: the score of classes_[1] over classes_[0]
            weight, bias = np.concatenate([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        return cls(weight.tolist(), bias.tolist(), [int(a) for a in model.classes_])

    def act(self, obs_NO: np.ndarray) -> np.ndarray:
        scores = np.atleast_2d(obs_NO) @ np.array(self.weight).T + np.array(self.bias)
        return np.array(self.actions)[scores.argmax(1)]

    def size(self) -> dict:
        weight = np.array(self.weight)
        return {"parameters": (1 if len(weight) == 2 else len(weight)) * (weight.shape[1] + 1)}

    def text(self, features: list[str], actions: list[str]) -> str:
        weight, bias = np.array(self.weight), np.array(self.bias)
        names = [actions[a] for a in self.actions]
        if len(weight) == 2:
            return f"{names[1]} if {_linear_text(weight[1], bias[1], features)} > 0 else {names[0]}"
        rows = [f"score[{name}] = {_linear_text(w, b, features)}" for name, w, b in zip(names, weight, bias)]
        return "\n".join(rows + ["action = argmax(score)"])


def _linear_text(w, b, features) -> str:
    return _sum_text([(c, name) for c, name in zip(w, features)] + [(b, "")])


def _sum_text(pairs) -> str:
    """'0.52*x - 1.3*y + 0.1' from (coefficient, monomial) pairs; zero terms left out."""
    out = ""
    for coef, name in pairs:
        if coef == 0:
            continue
        number = f"{abs(coef):.3g}"
        term = number if not name else f"{number}*{name}"
        out += (" - " if coef < 0 else " + ") + term if out else ("-" if coef < 0 else "") + term
    return out or "0"


@dataclass
class FormulaPolicy:
    """Scores as sums of monomials of the observation: score_k = Σ_j coef[k][j]·Π_{i∈terms[j]} obs[i].

    One score (two actions): action 1 if score_0 > 0 else 0. Otherwise one score per action and action = argmax.
    """

    terms: list[list[int]]
    """Each monomial as the observation indices it multiplies ([] is the constant)."""
    coef: list[list[float]]

    def act(self, obs_NO: np.ndarray) -> np.ndarray:
        scores = _monomials(np.atleast_2d(obs_NO), self.terms) @ np.array(self.coef).T
        return (scores[:, 0] > 0).astype(int) if len(self.coef) == 1 else scores.argmax(1)

    def size(self) -> dict:
        return {"terms": int(np.count_nonzero(self.coef))}

    def text(self, features: list[str], actions: list[str]) -> str:
        names = ["*".join(features[i] for i in term) for term in self.terms]
        sums = [_sum_text(list(zip(row, names))) for row in self.coef]
        if len(sums) == 1:
            return f"{actions[1]} if {sums[0]} > 0 else {actions[0]}"
        return "\n".join([f"score[{actions[a]}] = {s}" for a, s in enumerate(sums)] + ["action = argmax(score)"])


def _monomials(obs_NO: np.ndarray, terms) -> np.ndarray:
    return np.stack([np.prod(obs_NO[:, term], axis=1) if term else np.ones(len(obs_NO)) for term in terms], 1)


def _round(x: np.ndarray, digits: int = 3) -> np.ndarray:
    return np.array([float(f"{v:.{digits}g}") for v in x.ravel()]).reshape(x.shape)


# --- fitting ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterpretConfig:
    """One VIPER-style extraction (DAgger with Q-gap weights and best-policy selection) of one kind of student."""

    env_id: str = "CartPole-v1"
    """gymnasium id (Discrete actions, vector observations)."""
    kind: Kind = "tree"
    """tree (VIPER), linear (logistic regression) or formula (sparse regression over degree-2 monomials)."""
    iterations: int = 8
    """DAgger rounds; the teacher acts in the first, the student afterwards (VIPER's β: 1 then 0)."""
    steps_per_iteration: int = 500
    """Vector-env steps per round (labels per round = steps × num_envs)."""
    num_envs: int = 4
    """Parallel environments collecting states."""
    max_leaf_nodes: int = 16
    """Tree size limit (tree kind)."""
    max_terms: int = 4
    """Monomials per score besides the constant (formula kind)."""
    linear_c: float = 100.0
    """Inverse L2 strength of the logistic regression (linear kind); weak, because observations such as CartPole's
    pole angle are small numbers whose weights must be large."""
    resample: int = 20_000
    """States drawn ∝ ℓ(s) from the aggregated data to fit each tree (VIPER's resampling)."""
    weighted: bool = True
    """Weight states by the teacher's Q-gap (VIPER); False weighs all states alike (plain DAgger)."""
    select_episodes: int = 10
    """Validation episodes per iteration to pick the best student."""
    seed: int = 0
    """Seeds the envs, the resampling and the fits."""


def fit_student(kind: Kind, obs_NO, grade: TeacherOutput, weights_N, num_actions: int, config: InterpretConfig,
                rng: np.random.Generator):  # fmt: skip
    """Fit one student of `kind` to the teacher's labels on `obs_NO`, states weighted by `weights_N`."""
    from sklearn.linear_model import LogisticRegression, lasso_path
    from sklearn.tree import DecisionTreeClassifier

    actions_N = grade.actions_N.numpy()
    weights_N = weights_N / weights_N.mean()
    if kind == "tree":
        index = rng.choice(len(obs_NO), size=config.resample, p=weights_N / weights_N.sum())
        tree = DecisionTreeClassifier(max_leaf_nodes=config.max_leaf_nodes, random_state=config.seed)
        return TreePolicy.from_sklearn(tree.fit(obs_NO[index], actions_N[index]))
    if len(np.unique(actions_N)) < 2:  # a one-action dataset: both models reduce to that constant action
        actions_N = actions_N.copy()
        actions_N[0] = (actions_N[0] + 1) % num_actions
    if kind == "linear":
        model = LogisticRegression(C=config.linear_c, max_iter=1_000).fit(obs_NO, actions_N, sample_weight=weights_N)
        return LinearPolicy.from_sklearn(model)
    if kind != "formula":
        raise ValueError(f"unknown student kind {kind!r}; choose tree, linear or formula")
    dim = obs_NO.shape[1]
    terms = [[]] + [[i] for i in range(dim)] + [[i, j] for i in range(dim) for j in range(i, dim)]
    features = _monomials(obs_NO, terms)
    scores = _scores(grade, num_actions)
    targets = scores[:, 1:2] - scores[:, :1] if num_actions == 2 else scores
    scale = features[:, 1:].std(0) + 1e-8  # Lasso needs comparable scales to pick terms fairly
    sqrt_w = np.sqrt(weights_N)[:, None]
    coef = np.zeros((targets.shape[1], len(terms)))
    for k in range(targets.shape[1]):
        x = (features[:, 1:] / scale - (features[:, 1:] / scale).mean(0)) * sqrt_w
        y = (targets[:, k] - targets[:, k].mean()) * sqrt_w[:, 0]
        _, path, _ = lasso_path(x, y, alphas=60)
        counts = (path != 0).sum(0)  # alphas go from large (no terms) to small (all terms)
        chosen = np.flatnonzero(path[:, np.flatnonzero(counts <= config.max_terms)[-1]]) + 1
        keep = np.concatenate([[0], chosen])  # the constant is always allowed
        solution, *_ = np.linalg.lstsq(features[:, keep] * sqrt_w, targets[:, k] * sqrt_w[:, 0], rcond=None)
        coef[k, keep] = _round(solution)
    return FormulaPolicy(terms, coef.tolist())


@dataclass
class InterpretResult:
    """The selected student, its iteration, and one row per iteration (validation return, dataset size, size)."""

    student: TreePolicy | LinearPolicy | FormulaPolicy
    best_iteration: int
    history: list[dict]


def distill_interpretable(teacher, config: InterpretConfig) -> InterpretResult:
    """VIPER's loop for any student kind: roll out (teacher first, then the student), label with the teacher,
    aggregate, weight by ℓ(s), refit; return the student with the best validation return."""
    teacher = as_teacher(teacher)
    rng = np.random.default_rng(config.seed)
    env = make_vec_env(config.env_id, config.num_envs, config.seed)
    num_actions = int(env.single_action_space.n)
    obs, _ = env.reset(seed=config.seed)
    all_obs, all_grades, history, best = [], [], [], None
    student = None
    for iteration in range(config.iterations):
        for _ in range(config.steps_per_iteration):
            grade = teacher(obs)
            all_obs.append(np.array(obs, dtype=np.float64))
            all_grades.append(grade)
            actions = grade.actions_N.numpy() if student is None else student.act(obs)
            obs, *_ = env.step(actions)
        obs_NO = np.concatenate(all_obs)
        grades = cat_outputs(all_grades)
        weights = viper_weights(grades) if config.weighted else np.ones(len(obs_NO))
        student = fit_student(config.kind, obs_NO, grades, np.maximum(weights, 1e-6), num_actions, config, rng)
        returns = evaluate(student.act, config.env_id, config.select_episodes, seed=20_000 + config.seed)
        history.append({"iteration": iteration, "labels": len(obs_NO), "return_mean": float(returns.mean()),
                        **student.size()})  # fmt: skip
        if best is None or returns.mean() > best[0]:
            best = (returns.mean(), iteration, student)
    env.close()
    return InterpretResult(best[2], best[1], history)


# --- saving and printing ------------------------------------------------------------------------------------------

_CLASSES = {"tree": TreePolicy, "linear": LinearPolicy, "formula": FormulaPolicy}


def save_interpretable(directory, env_id: str, students: dict[str, TreePolicy | LinearPolicy | FormulaPolicy],
                       extra: dict | None = None) -> Path:  # fmt: skip
    """Write `interpretable.json` (env id, each student's numbers under its kind) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kinds = {cls: k for k, cls in _CLASSES.items()}
    data = {"env_id": env_id, "students": {kinds[type(s)]: asdict(s) for s in students.values()}, **(extra or {})}
    (directory / "interpretable.json").write_text(json.dumps(data, indent=1))
    return directory


def load_interpretable(directory) -> tuple[str, dict]:
    """(env id, {kind: student}) from a directory written by `save_interpretable`."""
    path = Path(directory) / "interpretable.json"
    if not path.exists():
        raise ValueError(f"{directory} holds no interpretable.json; pass a directory written by save_interpretable")
    data = json.loads(path.read_text())
    return data["env_id"], {kind: _CLASSES[kind](**fields) for kind, fields in data["students"].items()}


def names(env_id: str, obs_dim: int, num_actions: int) -> tuple[list[str], list[str]]:
    """Readable observation and action names for `env_id` (x0, x1, ... and action 0, ... when unknown)."""
    features = list(FEATURE_NAMES.get(env_id, [f"x{i}" for i in range(obs_dim)]))
    actions = list(ACTION_NAMES.get(env_id, [f"action {a}" for a in range(num_actions)]))
    return features, actions


def describe(directory) -> str:
    """Every student in `directory` as text: the tree as if/else rules, the linear policy and formula as equations."""
    env_id, students = load_interpretable(directory)
    (obs_dim,), num_actions = env_shapes(env_id)
    features, actions = names(env_id, obs_dim, num_actions)
    blocks = []
    for kind, student in students.items():
        size = ", ".join(f"{k} {v}" for k, v in student.size().items())
        blocks.append(f"# {kind} ({size})\n{student.text(features, actions)}")
    return f"# {env_id}\n\n" + "\n\n".join(blocks)


def interpret_main(args) -> None:
    """CLI: print the students saved in `args.policy`."""
    print(describe(args.policy))
