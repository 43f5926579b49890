"""The distillation losses against values computed by hand (plain numpy or arithmetic), not by the code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgekd.distill.losses import attention_kl, hidden_state_mse, soft_label_kd, value_relation_kl


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


STUDENT = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
TEACHER = np.array([[3.0, 2.0, 1.0], [2.0, 0.0, -2.0]])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_soft_label_kd_is_alpha_t_squared_kl_plus_hard_cross_entropy(temperature, alpha):
    labels = np.array([0, 2])
    soft = temperature ** 2 * _kl(_softmax(TEACHER / temperature), _softmax(STUDENT / temperature)).mean()
    hard = -np.log(_softmax(STUDENT)[np.arange(2), labels]).mean()  # CE at T = 1
    expected = alpha * soft + (1 - alpha) * hard
    got = soft_label_kd(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(labels), temperature, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_soft_label_kd_by_hand_and_its_temperature_scaling():
    # Two classes, student logits [0, 0], teacher [ln 3, 0]: p_t = [3/4, 1/4] at T = 1, p_s = [1/2, 1/2].
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([-100])
    kl_t1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308...
    assert soft_label_kd(s, t, y, 1.0, 0.5).item() == pytest.approx(kl_t1, rel=1e-6)  # no label: soft only
    # At T = 2 the teacher's logits halve: p_t = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1); times T^2 = 4.
    r3 = math.sqrt(3.0)
    p = r3 / (r3 + 1)
    kl_t2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert soft_label_kd(s, t, y, 2.0, 0.5).item() == pytest.approx(4 * kl_t2, rel=1e-6)
    assert soft_label_kd(t, t, y, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-12)  # same logits: nothing to learn


def test_hidden_state_mse_projects_the_student_and_skips_padding():
    student = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [9.0, 9.0]]])        # [B=1, L=3, H_s=2]
    teacher = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # [1, 3, H_t=3]
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    projection = torch.nn.Linear(2, 3)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # h -> [h0, h1, h0 + h1]
        projection.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    # token 0: [1, 2, 4] vs [1, 2, 3] -> squared errors 0, 0, 1; token 1: [0, 1, 2] vs [1, 1, 1] -> 1, 0, 1
    assert hidden_state_mse(student, teacher, mask, projection).item() == pytest.approx(3 / 6)
    same = torch.tensor([[[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 4.0], [3.0, 5.0], [7.0, 7.0]]])
    assert hidden_state_mse(same, target, mask).item() == pytest.approx(4 / 4)  # one error of 2, squared, over 4


def test_attention_kl_by_hand_over_real_query_rows():
    teacher = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]], [[1.0, 0.0], [0.2, 0.8]]]])  # [B=1, heads=2, L=2, L=2]
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]], [[0.5, 0.5], [0.6, 0.4]]]])
    rows = [0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75),   # head 0, query 0
            0.9 * math.log(1.8) + 0.1 * math.log(0.2),        # head 0, query 1
            math.log(2),                                      # head 1, query 0 (0 log 0 = 0)
            0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(2)]    # head 1, query 1
    assert attention_kl(student, teacher, torch.tensor([[1, 1]])).item() == pytest.approx(sum(rows) / 4, rel=1e-5)
    # the second token is padding: only the query-0 rows of both heads count
    assert attention_kl(student, teacher, torch.tensor([[1, 0]])).item() == pytest.approx((rows[0] + rows[2]) / 2,
                                                                                       rel=1e-5)


def test_value_relation_kl_matches_softmax_of_scaled_value_products():
    rng = np.random.default_rng(0)
    vs, vt = rng.normal(size=(1, 2, 3, 4)), rng.normal(size=(1, 2, 3, 8))  # widths differ, heads match
    mask = np.array([[1, 1, 0]])

    def relation(v):
        scores = v @ v.swapaxes(-1, -2) / math.sqrt(v.shape[-1])
        scores[..., mask[0] == 0] = -np.inf  # padded keys get no weight
        return _softmax(scores)

    kl = _kl(relation(vt)[..., :2], relation(vs)[..., :2])  # [1, heads, L], over the real keys
    expected = kl[..., mask[0] == 1].mean()  # real query rows only
    got = value_relation_kl(torch.tensor(vs), torch.tensor(vt), torch.tensor(mask))
    assert expected > 0.01 and got.item() == pytest.approx(expected, rel=1e-6)
    same = value_relation_kl(torch.tensor(vt), torch.tensor(vt), torch.tensor(mask))
    assert same.item() == pytest.approx(0, abs=1e-9)
