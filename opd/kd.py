"""Classic knowledge distillation on scikit-learn's bundled digits (MISSION rows 1-3), all offline and in seconds.

- `hinton_kd`: a small student learns from the teacher's softened outputs (temperature T, loss scaled by T²) mixed
  with hard-label cross-entropy (Hinton, Vinyals & Dean 2015); `temperature_sweep` runs it over several T.
- `fitnets`: a deeper, thinner student first regresses a middle layer onto the teacher's hint layer through a
  learned linear projection, then trains with KD (Romero et al. 2015).
- `mutual_learning`: two students train at the same time on the labelled images, each adding KL(peer ‖ self) to
  its cross-entropy (Zhang et al. 2018, deep mutual learning); no pre-trained teacher.
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
    hints) also apply. The rest of the 1797 images are the test set."""
    teacher_hidden: tuple[int, ...] = (256, 256)
    """Teacher MLP widths."""
    student_hidden: tuple[int, ...] = (8,)
    """Student MLP widths (the baseline uses the same)."""
    fitnet_hidden: tuple[int, ...] = (16, 16, 16)
    """FitNets' deeper, thinner student; its middle layer is guided by the teacher's first hidden layer."""
    temperature: float = 4.0
    """Softmax temperature T of the soft targets."""
    alpha: float = 0.9
    """Weight of the distillation term (1 − alpha on the hard-label cross-entropy)."""
    hint_weight: float = 1.0
    """Weight of FitNets' feature L2 during stage 1 (the only loss there)."""
    steps: int = 2000
    """Minibatch updates per training stage, the same for every method (so the labels-only baseline, which has
    fewer images, is not undertrained)."""
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


def _minibatches(n: int, config: KDConfig, seed_offset: int):
    """`config.steps` index minibatches, each epoch a fresh permutation of range(n)."""
    generator = torch.Generator().manual_seed(config.seed + seed_offset)
    step = 0
    while True:
        for index in torch.randperm(n, generator=generator).split(config.batch_size):
            if step == config.steps:
                return
            step += 1
            yield index


def _train(params, n: int, loss_fn, config: KDConfig, seed_offset: int) -> None:
    """Adam on minibatches of indices into the training images; `loss_fn(index)` gives per-example losses."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    for index in _minibatches(n, config, seed_offset):
        loss = loss_fn(index).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _kd_loss(student_logits, teacher_logits, labels, labelled, config: KDConfig):
    """Hinton's loss on labelled images; the distillation term alone (α = 1) on the transfer set."""
    labels = torch.where(labelled, labels, torch.zeros_like(labels))
    with_labels = hinton_kd_loss(student_logits, teacher_logits, labels, config.temperature, config.alpha)
    without = hinton_kd_loss(student_logits, teacher_logits, labels, config.temperature, 1.0)
    return torch.where(labelled, with_labels, without)


def train_alone(config: KDConfig, hidden: tuple[int, ...] | None = None, seed_offset: int = 1) -> tuple[MLP, float]:
    """A network trained on the labelled images only (the teacher, or the baseline student): (model, test acc)."""
    data = load_digits_split(config)
    x, y = data.x[data.labelled], data.y[data.labelled]
    torch.manual_seed(config.seed + seed_offset)
    model = MLP(hidden or config.student_hidden)

    def loss_fn(i):
        return token_cross_entropy(F.log_softmax(model(x[i]), -1), y[i])

    _train(model.parameters(), len(x), loss_fn, config, seed_offset)
    return model.eval(), accuracy(model, data.x_test, data.y_test)


def train_teacher(config: KDConfig) -> tuple[MLP, float]:
    """The teacher: a wide MLP trained on the labelled images: (model, test acc)."""
    return train_alone(config, config.teacher_hidden, seed_offset=1000)


def hinton_kd(teacher: nn.Module, config: KDConfig, seed_offset: int = 1) -> tuple[MLP, float]:
    """Student trained with α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE (only the first term on
    the transfer set). Returns (student, test accuracy)."""
    data = load_digits_split(config)
    with torch.no_grad():
        teacher_logits = teacher(data.x)
    torch.manual_seed(config.seed + seed_offset)  # the same initialisation as train_alone's student
    student = MLP(config.student_hidden)

    def loss_fn(i):
        return _kd_loss(student(data.x[i]), teacher_logits[i], data.y[i], data.labelled[i], config)

    _train(student.parameters(), len(data.x), loss_fn, config, seed_offset)
    return student.eval(), accuracy(student, data.x_test, data.y_test)


def temperature_sweep(teacher: nn.Module, config: KDConfig, temperatures=(1.0, 2.0, 4.0, 8.0, 16.0)) -> dict:
    """{T: student test accuracy} for Hinton KD at each temperature."""
    return {t: hinton_kd(teacher, KDConfig(**{**config.__dict__, "temperature": t}))[1] for t in temperatures}


def fitnets(teacher: MLP, config: KDConfig, seed_offset: int = 1) -> tuple[MLP, float]:
    """FitNets: stage 1 fits the student's middle layer to the teacher's first hidden layer through a learned
    projection (feature L2); stage 2 trains the whole student with Hinton KD. Returns (student, test accuracy)."""
    data = load_digits_split(config)
    with torch.no_grad():
        teacher_logits, teacher_hidden = teacher(data.x, return_hidden=True)
    hint = teacher_hidden[0]
    torch.manual_seed(config.seed + seed_offset)
    student = MLP(config.fitnet_hidden)
    guided = len(config.fitnet_hidden) // 2  # the student's middle layer
    regressor = nn.Linear(config.fitnet_hidden[guided], hint.shape[-1])
    stage1_params = [*student.hidden[: guided + 1].parameters(), *regressor.parameters()]

    def hint_loss(i):
        _, hidden = student(data.x[i], return_hidden=True)
        return config.hint_weight * feature_l2(regressor(hidden[guided]), hint[i])

    _train(stage1_params, len(data.x), hint_loss, config, seed_offset)

    def kd_loss(i):
        return _kd_loss(student(data.x[i]), teacher_logits[i], data.y[i], data.labelled[i], config)

    _train(student.parameters(), len(data.x), kd_loss, config, seed_offset + 100)
    return student.eval(), accuracy(student, data.x_test, data.y_test)


def mutual_learning(config: KDConfig, seed_offset: int = 1) -> tuple[tuple[MLP, MLP], tuple[float, float]]:
    """Deep mutual learning of two students on the labelled images (as in the paper; on the unlabelled transfer set
    two small peers only agree with each other and drift from the labels): each minimises CE + KL(p_peer ‖ p_self)
    with the peer held fixed for its step; both update on every minibatch. Returns ((a, b), (acc_a, acc_b))."""
    data = load_digits_split(config)
    x, y = data.x[data.labelled], data.y[data.labelled]
    torch.manual_seed(config.seed + seed_offset)  # student a starts where train_alone's student starts
    students = (MLP(config.student_hidden), MLP(config.student_hidden))
    optimizers = [torch.optim.Adam(s.parameters(), lr=config.lr) for s in students]
    for i in _minibatches(len(x), config, seed_offset):
        for me, peer in ((0, 1), (1, 0)):
            my_logp = F.log_softmax(students[me](x[i]), -1)
            with torch.no_grad():
                peer_logp = F.log_softmax(students[peer](x[i]), -1)
            loss = (token_cross_entropy(my_logp, y[i]) + forward_kl(my_logp, peer_logp)).mean()
            optimizers[me].zero_grad()
            loss.backward()
            optimizers[me].step()
    return tuple(s.eval() for s in students), tuple(accuracy(s, data.x_test, data.y_test) for s in students)


def run_classic_kd(config: KDConfig, temperatures=(1.0, 2.0, 4.0, 8.0, 16.0)) -> dict:
    """Every row-1-3 experiment for one seed: test accuracies of teacher, student alone, KD per T, FitNets (and its
    architecture alone / with KD only), mutual learning (two students)."""
    teacher, teacher_acc = train_teacher(config)
    with_fitnet_student = KDConfig(**{**config.__dict__, "student_hidden": config.fitnet_hidden})
    return {
        "teacher": teacher_acc,
        "student_alone": train_alone(config)[1],
        "hinton_kd": {str(t): acc for t, acc in temperature_sweep(teacher, config, temperatures).items()},
        "fitnet_alone": train_alone(config, config.fitnet_hidden)[1],
        "fitnet_kd_only": hinton_kd(teacher, with_fitnet_student)[1],
        "fitnets": fitnets(teacher, config)[1],
        "mutual_learning": list(mutual_learning(config)[1]),
    }
