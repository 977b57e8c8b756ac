"""Classic knowledge distillation on scikit-learn's bundled digits (MISSION rows 1-3), all offline and in seconds.

- `hinton_kd`: a small student learns from the teacher's softened outputs (temperature T, loss scaled by T²) mixed
  with hard-label cross-entropy (Hinton, Vinyals & Dean 2015); `temperature_sweep` runs it over several T.
- `fitnets`: a deeper, thinner student first regresses a middle layer onto the teacher's hint layer through a
  learned linear projection, then trains with KD (Romero et al. 2015).
- `mutual_learning`: two students train at the same time, each adding KL(peer ‖ self) to its cross-entropy
  (Zhang et al. 2018, deep mutual learning); no pre-trained teacher.
- `train_alone`: the baseline every method is compared with: the same student architecture, labels only.

Every method returns the test accuracy of its student(s); one visible loop per method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opd.losses import feature_l2, forward_kl, hinton_kd as hinton_kd_loss, token_cross_entropy


@dataclass(frozen=True)
class KDConfig:
    """Data split, networks and optimisation shared by the classic-KD experiments."""

    train_size: int = 200
    """Labelled training images (of 1797). The teacher and every student see only these labels."""
    transfer_size: int = 800
    """Further training images without labels: Hinton's transfer set, where the distillation terms (and FitNets'
    hints, and the mutual-learning KL) also apply. The rest of the 1797 images are the test set."""
    teacher_hidden: tuple[int, ...] = (256, 256)
    """Teacher MLP widths."""
    student_hidden: tuple[int, ...] = (16,)
    """Student MLP widths (the baseline uses the same)."""
    fitnet_hidden: tuple[int, ...] = (16, 16, 16)
    """FitNets' deeper, thinner student; its middle layer is guided by the teacher's first hidden layer."""
    temperature: float = 4.0
    """Softmax temperature T of the soft targets."""
    alpha: float = 0.9
    """Weight of the distillation term (1 − alpha on the hard-label cross-entropy)."""
    hint_weight: float = 1.0
    """Weight of FitNets' feature L2 during stage 1 (the only loss there)."""
    epochs: int = 150
    """Passes over the training set per training stage."""
    batch_size: int = 64
    """Images per minibatch."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 0
    """Seeds the split and the initialisations."""


class MLP(nn.Module):
    """An MLP that also returns its hidden activations (the hint/guided layers of FitNets)."""

    def __init__(self, sizes: tuple[int, ...], in_dim: int = 64, classes: int = 10):
        super().__init__()
        widths = (in_dim, *sizes)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        activations = []
        for layer in self.hidden:
            x = F.relu(layer(x))
            activations.append(x)
        return (self.out(x), activations) if return_hidden else self.out(x)


@dataclass(frozen=True)
class DigitsSplit:
    """Seeded split of the 1797 digits, pixels scaled to [0, 1]."""

    x: torch.Tensor
    """Training images: the labelled ones first, then the unlabelled transfer set."""
    y: torch.Tensor
    """Labels of `x`; only valid where `labelled`."""
    labelled: torch.Tensor
    """Bool mask over `x`."""
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(config: "KDConfig") -> DigitsSplit:
    """The split `config` describes (train_size labelled + transfer_size unlabelled + the rest for testing)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n_train = config.train_size + config.transfer_size
    if config.train_size < 10 or config.transfer_size < 0 or n_train > len(x) - 100:
        raise ValueError(f"train_size={config.train_size}, transfer_size={config.transfer_size}: need >= 10 "
                         f"labelled and at least 100 of the {len(x)} images left for testing")  # fmt: skip
    order = np.random.default_rng(config.seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    labelled = torch.arange(n_train) < config.train_size
    return DigitsSplit(x[:n_train], y[:n_train], labelled, x[n_train:], y[n_train:])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct argmax predictions."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _batches(n: int, config: KDConfig, generator: torch.Generator):
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        yield from order.split(config.batch_size)


def _train(model, params, x, y, loss_fn, config: KDConfig, seed_offset: int) -> None:
    optimizer = torch.optim.Adam(params, lr=config.lr)
    for index in _batches(len(x), config, torch.Generator().manual_seed(config.seed + seed_offset)):
        loss = loss_fn(index).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_alone(config: KDConfig, hidden: tuple[int, ...] | None = None, seed_offset: int = 1) -> tuple[MLP, float]:
    """A network trained on labels only (the teacher, or the baseline student). Returns (model, test accuracy)."""
    x, y, x_test, y_test = load_digits_split(config.train_size, config.seed)
    torch.manual_seed(config.seed + seed_offset)
    model = MLP(hidden or config.student_hidden)
    _train(model, model.parameters(), x, y,
           lambda i: token_cross_entropy(F.log_softmax(model(x[i]), -1), y[i]), config, seed_offset)  # fmt: skip
    return model.eval(), accuracy(model, x_test, y_test)


def hinton_kd(teacher: nn.Module, config: KDConfig, seed_offset: int = 1) -> tuple[MLP, float]:
    """Student trained with α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE. Returns (student, acc)."""
    x, y, x_test, y_test = load_digits_split(config.train_size, config.seed)
    with torch.no_grad():
        teacher_logits = teacher(x)
    torch.manual_seed(config.seed + seed_offset)  # the same initialisation as train_alone's student
    student = MLP(config.student_hidden)

    def loss_fn(i):
        return hinton_kd_loss(student(x[i]), teacher_logits[i], y[i], config.temperature, config.alpha)

    _train(student, student.parameters(), x, y, loss_fn, config, seed_offset)
    return student.eval(), accuracy(student, x_test, y_test)


def temperature_sweep(teacher: nn.Module, config: KDConfig, temperatures=(1.0, 2.0, 4.0, 8.0, 16.0)) -> dict:
    """{T: student test accuracy} for Hinton KD at each temperature."""
    return {t: hinton_kd(teacher, KDConfig(**{**config.__dict__, "temperature": t}))[1] for t in temperatures}


def fitnets(teacher: MLP, config: KDConfig, seed_offset: int = 1) -> tuple[MLP, float]:
    """FitNets: stage 1 fits the student's middle layer to the teacher's first hidden layer through a learned
    projection (feature L2); stage 2 trains the whole student with Hinton KD. Returns (student, test accuracy)."""
    x, y, x_test, y_test = load_digits_split(config.train_size, config.seed)
    with torch.no_grad():
        teacher_logits, teacher_hidden = teacher(x, return_hidden=True)
    hint = teacher_hidden[0]
    torch.manual_seed(config.seed + seed_offset)
    student = MLP(config.fitnet_hidden)
    guided = len(config.fitnet_hidden) // 2  # the student's middle layer
    regressor = nn.Linear(config.fitnet_hidden[guided], hint.shape[-1])
    stage1_params = [*student.hidden[: guided + 1].parameters(), *regressor.parameters()]

    def hint_loss(i):
        _, hidden = student(x[i], return_hidden=True)
        return config.hint_weight * feature_l2(regressor(hidden[guided]), hint[i])

    _train(student, stage1_params, x, y, hint_loss, config, seed_offset)

    def kd_loss(i):
        return hinton_kd_loss(student(x[i]), teacher_logits[i], y[i], config.temperature, config.alpha)

    _train(student, student.parameters(), x, y, kd_loss, config, seed_offset + 100)
    return student.eval(), accuracy(student, x_test, y_test)


def mutual_learning(config: KDConfig, seed_offset: int = 1) -> tuple[tuple[MLP, MLP], tuple[float, float]]:
    """Deep mutual learning of two students: each minimises CE + KL(p_peer ‖ p_self) with the peer held fixed for
    its step, both updated on every minibatch. Returns ((student_a, student_b), (acc_a, acc_b))."""
    x, y, x_test, y_test = load_digits_split(config.train_size, config.seed)
    torch.manual_seed(config.seed + seed_offset)
    students = (MLP(config.student_hidden), MLP(config.student_hidden))
    optimizers = [torch.optim.Adam(s.parameters(), lr=config.lr) for s in students]
    for index in _batches(len(x), config, torch.Generator().manual_seed(config.seed + seed_offset)):
        for me, peer, optimizer in ((0, 1, optimizers[0]), (1, 0, optimizers[1])):
            my_logp = F.log_softmax(students[me](x[index]), -1)
            with torch.no_grad():
                peer_logp = F.log_softmax(students[peer](x[index]), -1)
            loss = (token_cross_entropy(my_logp, y[index]) + forward_kl(my_logp, peer_logp)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return tuple(s.eval() for s in students), tuple(accuracy(s, x_test, y_test) for s in students)


def run_classic_kd(config: KDConfig, temperatures=(1.0, 2.0, 4.0, 8.0, 16.0)) -> dict:
    """Every row-1-3 experiment for one seed: test accuracies of teacher, student alone, KD per T, FitNets (and its
    architecture alone), mutual learning (and two independent students)."""
    teacher, teacher_acc = train_alone(config, config.teacher_hidden, seed_offset=1000)
    sweep = temperature_sweep(teacher, config, temperatures)
    (_, ml_acc) = mutual_learning(config)
    return {
        "teacher": teacher_acc,
        "student_alone": train_alone(config)[1],
        "student_alone_b": train_alone(config, seed_offset=2)[1],
        "hinton_kd": {str(t): acc for t, acc in sweep.items()},
        "fitnet_alone": train_alone(config, config.fitnet_hidden)[1],
        "fitnet_kd_only": hinton_kd(teacher, KDConfig(**{**config.__dict__, "student_hidden": config.fitnet_hidden}))[1],
        "fitnets": fitnets(teacher, config)[1],
        "mutual_learning": list(ml_acc),
    }
