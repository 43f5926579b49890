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
