"""The HF Trainer, taught to distill.

The logit loss uses cached teacher logits. The intermediate losses (hidden states, attention,
value relations) need the teacher's internals, so when any is on the teacher runs alongside the
student on the same batch. `accelerate launch` / `torchrun` scale either mode as usual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer

from edgekd.errors import ModelError
from edgekd.distill.losses import attention_kl, hidden_state_mse, soft_label_kd, value_relation_kl

_VALUE_PROJECTIONS = ("value", "v_lin", "v")  # BERT/RoBERTa/ELECTRA, DistilBERT, MPNet


@dataclass
class Intermediate:
    """What the intermediate losses need: the teacher, how to feed it, and which layers to match."""
    teacher: torch.nn.Module
    layer_map: list[int]                       # student layer i <- teacher layer layer_map[i]
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    value_weight: float = 0.0
    to_teacher_ids: torch.Tensor | None = None  # [student vocab] -> teacher id, after vocabulary trimming
    projection: torch.nn.Module | None = None   # student width -> teacher width, when they differ
    _values: dict = field(default_factory=dict)


def _value_module(layer) -> torch.nn.Module:
    for name, module in layer.named_modules():
        if name.split(".")[-1] in _VALUE_PROJECTIONS and isinstance(module, torch.nn.Linear):
            return module
    raise ModelError(f"student.value_weight needs the value projection of each attention layer, and "
                     f"{type(layer).__name__} has none edgekd knows ({', '.join(_VALUE_PROJECTIONS)}); "
                     f"set student.value_weight: 0")


def _layers(model):
    from edgekd.distill.student import _layer_list

    base, path, _ = _layer_list(model)
    return getattr(base, path.split(".")[0]).layer


def _heads(model) -> int:
    return getattr(model.config, "num_attention_heads", None) or model.config.n_heads


class DistillationTrainer(Trainer):
    """Trainer whose loss is soft-label KD (+ optional intermediate losses).

    `teacher_logits` is [N, C] over the transfer set, indexed by each example's `index`; None runs
    the teacher on every batch instead (what the cache saves; `perf/distill_cache.py` measures it).
    """

    def __init__(self, *args, teacher_logits: torch.Tensor | None, temperature: float, alpha: float,
                 intermediate: Intermediate | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_logits = teacher_logits
        self.temperature = temperature
        self.alpha = alpha
        self.intermediate = intermediate
        if intermediate:  # the Trainer moved the student to its device (a GPU); its teacher goes along
            intermediate.teacher.to(self.args.device)
            if intermediate.projection is not None:
                intermediate.projection.to(self.args.device)
        if intermediate and intermediate.value_weight > 0:
            self._hook_values(intermediate)

    def _hook_values(self, inter: Intermediate) -> None:
        """Capture the value projections of the last student layer and its teacher layer."""
        def keep(key):
            def hook(module, inputs, output):
                inter._values[key] = output
            return hook

        _value_module(_layers(self.model)[-1]).register_forward_hook(keep("student"))
        _value_module(_layers(inter.teacher)[inter.layer_map[-1]]).register_forward_hook(keep("teacher"))

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        projection = self.intermediate.projection if self.intermediate else None
        if projection is not None and not any(p is next(projection.parameters()) for g in optimizer.param_groups
                                              for p in g["params"]):
            optimizer.add_param_group({"params": list(projection.parameters()), "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        labels = inputs.pop("labels")
        inter = self.intermediate if model.training else None
        outputs = model(**inputs, output_hidden_states=bool(inter and inter.hidden_weight),
                        output_attentions=bool(inter and inter.attention_weight))
        if not model.training:  # evaluation: plain cross-entropy, no teacher needed
            loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss
        teacher_out = self._run_teacher(inter, inputs) if inter and (
            self.teacher_logits is None or inter.hidden_weight or inter.attention_weight or inter.value_weight) \
            else None
        if self.teacher_logits is not None:
            teacher = self.teacher_logits[index.cpu()].to(outputs.logits.device)
        else:
            teacher = teacher_out.logits
        loss = soft_label_kd(outputs.logits, teacher, labels, self.temperature, self.alpha)
        if teacher_out is not None:
            loss = loss + self._intermediate_loss(inter, inputs["attention_mask"], outputs, teacher_out)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _run_teacher(inter: Intermediate, inputs):
        ids = inputs["input_ids"]
        if inter.to_teacher_ids is not None:  # the transfer set is fully covered by the trimmed vocabulary
            ids = inter.to_teacher_ids.to(ids.device)[ids]
        with torch.no_grad():
            return inter.teacher(input_ids=ids, attention_mask=inputs["attention_mask"],
                                 output_hidden_states=bool(inter.hidden_weight),
                                 output_attentions=bool(inter.attention_weight))

    def _intermediate_loss(self, inter: Intermediate, mask, student_out, teacher_out) -> torch.Tensor:
        loss = student_out.logits.new_zeros(())
        for s, t in enumerate(inter.layer_map):
            if inter.hidden_weight:  # hidden_states[0] is the embeddings: layer i is at i + 1
                loss = loss + inter.hidden_weight * hidden_state_mse(
                    student_out.hidden_states[s + 1], teacher_out.hidden_states[t + 1], mask, inter.projection)
            if inter.attention_weight:
                loss = loss + inter.attention_weight * attention_kl(
                    student_out.attentions[s], teacher_out.attentions[t], mask)
        if inter.value_weight:
            def split(values, model):  # [B, L, H] -> [B, heads, L, H / heads]
                b, length, _ = values.shape
                return values.view(b, length, _heads(model), -1).transpose(1, 2)

            loss = loss + inter.value_weight * value_relation_kl(
                split(inter._values["student"], self.model), split(inter._values["teacher"], inter.teacher), mask)
        return loss
