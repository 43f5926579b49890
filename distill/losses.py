"""Knowledge-distillation losses. Each names its formula and its paper."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al., 2015, "Distilling the Knowledge in a Neural Network":

        L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

    T^2 keeps the soft term's gradient scale independent of T. Shapes: logits [B, C], labels [B];
    a label of -100 (a text only the teacher labelled) contributes to the soft term only.
    """
    soft = F.kl_div(F.log_softmax(student_logits / temperature, -1),
                    F.log_softmax(teacher_logits / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    labelled = labels != -100
    if alpha >= 1.0 or not labelled.any():
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits[labelled], labels[labelled])


def hidden_state_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                     projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Jiao et al., 2020, "TinyBERT", eq. 8: MSE(H_s W_h, H_t) over real (non-pad) tokens.

    W_h is a learned projection when the widths differ. Shapes: hidden [B, L, H], mask [B, L].
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    keep = mask.bool()
    return F.mse_loss(student_hidden[keep], teacher_hidden[keep])


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wang et al., 2020, "MiniLM", eq. 4: KL(A_t || A_s) of the self-attention distributions,
    averaged over heads and real query positions. Shapes: attention [B, heads, L, L], mask [B, L].
    """
    return _relation_kl(student_attn, teacher_attn, mask)


def value_relation_kl(student_values: torch.Tensor, teacher_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wang et al., 2020, "MiniLM", eq. 5-6: KL between value relations softmax(V V^T / sqrt(d_k)).

    Shapes: values [B, heads, L, d_k] (head counts must match; widths may differ), mask [B, L].
    """
    def relation(values):
        scores = values @ values.transpose(-1, -2) / values.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(-1)

    return _relation_kl(relation(student_values), relation(teacher_values), mask)


def _relation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last axis, averaged over heads and real query rows."""
    eps = 1e-12
    kl = (teacher * ((teacher + eps).log() - (student + eps).log())).sum(-1)  # [B, heads, L]
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()
