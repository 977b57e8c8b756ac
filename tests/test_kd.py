"""Classic KD on digits: the split, the identities between methods, and that distillation actually transfers."""

import pytest
import torch

from opd.kd import KDConfig, fitnets, hinton_kd, load_digits_split, mutual_learning, train_alone, train_teacher

torch.set_num_threads(1)
QUICK = KDConfig(train_size=100, transfer_size=500, steps=600, seed=0)


def test_split_sizes_and_disjointness():
    data = load_digits_split(QUICK)
    assert data.x.shape == (600, 64) and int(data.labelled.sum()) == 100 and data.labelled[:100].all()
    assert data.x_test.shape == (1797 - 600, 64)
    assert float(data.x.max()) == 1.0 and float(data.x.min()) == 0.0
    train_rows = {tuple(r) for r in data.x.tolist()}
    assert sum(tuple(r) in train_rows for r in data.x_test.tolist()) < 20  # digits has a few duplicate images only
    with pytest.raises(ValueError, match="labelled"):
        load_digits_split(KDConfig(train_size=5))


def test_kd_without_teacher_weight_or_transfer_set_is_training_alone():
    config = KDConfig(train_size=100, transfer_size=0, steps=50, alpha=0.0)
    teacher, _ = train_alone(config, (32,), seed_offset=7)
    student_kd, acc_kd = hinton_kd(teacher, config)
    student_alone, acc_alone = train_alone(config)
    assert acc_kd == acc_alone
    for a, b in zip(student_kd.parameters(), student_alone.parameters()):
        torch.testing.assert_close(a, b)


def test_distillation_transfers_the_teacher():
    teacher, teacher_acc = train_teacher(QUICK)
    _, alone = train_alone(QUICK)
    _, kd = hinton_kd(teacher, QUICK)
    assert teacher_acc > 0.85
    # 100 labels: an 8-unit student alone is well below the teacher; soft targets on the transfer set close the gap
    assert kd > alone + 0.015, (kd, alone, teacher_acc)
    _, fit_alone = train_alone(QUICK, QUICK.fitnet_hidden)
    _, fit = fitnets(teacher, QUICK)
    assert fit > fit_alone + 0.03, (fit, fit_alone)


def test_mutual_learning_trains_two_different_students():
    (a, b), (acc_a, acc_b) = mutual_learning(QUICK)
    assert min(acc_a, acc_b) > 0.6
    assert not torch.equal(a.out.weight, b.out.weight)
