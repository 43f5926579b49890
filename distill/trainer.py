"""The HF Trainer, taught to distill: the loss mixes cached teacher logits with the hard labels."""
from __future__ import annotations

import torch
from transformers import Trainer

from edgekd.distill.losses import soft_label_kd


class DistillationTrainer(Trainer):
    """Trainer whose loss is soft-label KD against precomputed teacher logits.

    `teacher_logits` is [N, C] over the training set, indexed by each example's `index`, so
    the teacher never runs during training (and `accelerate launch` / `torchrun` scale it as usual).
    """

    def __init__(self, *args, teacher_logits: torch.Tensor, temperature: float, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_logits = teacher_logits
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if not model.training:  # evaluation: plain cross-entropy, no teacher needed
            loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
        else:
            teacher = self.teacher_logits[index.cpu()].to(outputs.logits.device)
            loss = soft_label_kd(outputs.logits, teacher, labels, self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss
