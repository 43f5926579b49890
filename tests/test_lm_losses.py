"""Token-level KD losses against a top-k teacher: exact at full k, masking, gradients, the rest bucket."""
import pytest
import torch

from edgekd.distill.lm_losses import KINDS, causal_ce, lm_kd_loss
from edgekd.errors import RecipeError

B, L, V = 3, 7, 50


def batch(seed: int = 0):
    """Student and teacher logits [B, L, V] and labels [B, L] with a prompt and right padding masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g) * 2
    teacher = torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100           # prompt
    labels[1, 5:] = -100           # padding
    labels[2, :2] = -100
    return student, teacher, labels


def top_k(teacher_logits, k):
    values, indices = teacher_logits.log_softmax(-1).topk(k, -1)
    return values, indices


def direct(student, teacher, labels, kind, temperature, skew):
    """The full-vocabulary divergence, written out: the reference the top-k loss must equal at k = V."""
    log_p = (teacher / temperature).log_softmax(-1)[:, :-1]
    log_q = (student / temperature).log_softmax(-1)[:, :-1]
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward":
        per = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse":
        per = (q * (log_q - log_p)).sum(-1)
    elif kind == "skew":
        per = (p * (log_p - (skew * p + (1 - skew) * q).log())).sum(-1)
    else:
        per = (q * (log_q - (skew * q + (1 - skew) * p).log())).sum(-1)
    keep = labels[:, 1:] != -100
    return per[keep].mean() * temperature ** 2


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_the_full_vocabulary_divergence(kind, temperature):
    student, teacher, labels = batch()
    values, indices = top_k(teacher, V)
    got = lm_kd_loss(student, values, indices, labels, kind, temperature, skew=0.1)
    want = direct(student, teacher, labels, kind, temperature, 0.1)
    assert want > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_when_the_student_is_the_teacher(kind):
    _, teacher, labels = batch()
    values, indices = top_k(teacher, 8)
    assert lm_kd_loss(teacher, values, indices, labels, kind, 2.0).abs() < 1e-5


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_positions_without_a_label_do_not_change_the_loss(kind):
    student, teacher, labels = batch()
    values, indices = top_k(teacher, 8)
    before = lm_kd_loss(student, values, indices, labels, kind, 1.0)
    # Position t is unused when labels[t + 1] == -100, and the last position predicts nothing.
    unused = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], 1)
    student2, values2, indices2 = student.clone(), values.clone(), indices.clone()
    student2[unused] += torch.randn_like(student2[unused]) * 5
    values2[unused] = -0.01
    indices2[unused] = 0
    after = lm_kd_loss(student2, values2, indices2, labels, kind, 1.0)
    torch.testing.assert_close(before, after)
    student2[~unused] += 1.0 * torch.randn_like(student2[~unused])   # and a used one does
    assert (lm_kd_loss(student2, values2, indices2, labels, kind, 1.0) - before).abs() > 1e-3


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradient_reaches_the_student_only_and_only_at_label_positions(kind):
    student, teacher, labels = batch()
    values, indices = top_k(teacher, 8)
    student.requires_grad_(True)
    values.requires_grad_(True)
    lm_kd_loss(student, values, indices, labels, kind, 1.0).backward()
    assert values.grad is None
    used = labels[:, 1:] != -100
    grad = student.grad[:, :-1]
    assert grad[used].abs().sum(-1).min() > 0
    assert grad[~used].abs().max() == 0 and student.grad[:, -1].abs().max() == 0


def test_top_k_forward_kl_is_a_lower_bound_of_the_full_one():
    student, teacher, labels = batch()
    full = direct(student, teacher, labels, "forward", 1.0, 0.0)
    partial = [lm_kd_loss(student, *top_k(teacher, k), labels, "forward", 1.0) for k in (4, 16, 40)]
    assert 0 < partial[0] <= partial[1] <= partial[2] <= full + 1e-6


def test_the_rest_bucket_counts_the_students_tail_mass():
    """A student equal to the teacher on the top-k but with more mass on other tokens is not a perfect match
    (renormalizing over the top-k would call it one)."""
    _, teacher, labels = batch()
    values, indices = top_k(teacher, 8)
    student = teacher.clone()
    tail = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
    student[tail] += 2.0
    assert lm_kd_loss(student, values, indices, labels, "forward", 1.0) > 0.05


def test_no_label_token_gives_zero_with_a_gradient():
    student, teacher, labels = batch()
    student.requires_grad_(True)
    loss = lm_kd_loss(student, *top_k(teacher, 8), torch.full_like(labels, -100))
    loss.backward()
    assert loss == 0 and student.grad is not None


def test_causal_ce_is_the_shifted_cross_entropy_on_label_tokens():
    student, _, labels = batch()
    keep = labels[:, 1:] != -100
    want = torch.nn.functional.cross_entropy(student[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(causal_ce(student, labels), want)


def test_bad_arguments_are_one_clear_line():
    student, teacher, labels = batch()
    values, indices = top_k(teacher, 8)
    with pytest.raises(RecipeError, match="forward, reverse, skew, skew_reverse"):
        lm_kd_loss(student, values, indices, labels, "kl")
    with pytest.raises(RecipeError, match="temperature"):
        lm_kd_loss(student, values, indices, labels, "forward", 0.0)
    with pytest.raises(RecipeError, match="skew"):
        lm_kd_loss(student, values, indices, labels, "skew", 1.0, skew=1.0)
