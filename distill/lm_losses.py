"""Token-level KD losses for decoder LMs, against the teacher's top-k. Each names its formula and its paper.

Shift convention (Hugging Face): logits at position t predict token t + 1, so position t carries a loss when
labels[t + 1] != -100. Every loss is the mean over those positions, times T^2.

The teacher comes as its top-k per position: `teacher_values` [B, L, k] are its log-probabilities
(log_softmax over the full vocabulary at T = 1; `distill/lm_cache.py` stores them) at `teacher_indices`
[B, L, k]. Both distributions are lumped into k + 1 outcomes: the k teacher tokens, plus one "rest" bucket
holding the mass of every other token (teacher: 1 - sum of its top-k; student: its own exact mass off those
indices). Why a rest bucket rather than renormalizing over the top-k:

- The KL of the lumped distributions is the exact KL of a coarser view of the same two distributions, so it is
  never above the full-vocabulary KL (data-processing inequality), is 0 only when the student matches the
  teacher on every top-k token and on the tail mass, and equals the full KL when k = vocabulary size.
- Renormalizing over the top-k throws the tail mass away on both sides: the student is never told how much
  probability belongs outside the top-k. Anshumann et al., 2025 ("Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs", arXiv:2503.16870) prove cached top-k probabilities give biased estimates of the
  teacher's distribution and worse-calibrated students. The rest bucket keeps the tail's total mass, which
  removes the renormalization's part of that bias but not all of it (the tail's shape is still unseen); their
  unbiased fix, importance-sampled tokens instead of the top-k, is not implemented here.

Temperature acts on the lumped distribution (the rest is one outcome, the cache keeps no detail of the tail):
P = softmax([log p_topk, log p_rest] / T). With k = vocabulary size there is no rest and P = softmax(z_t / T)
exactly, whatever T, because log-probabilities differ from logits by a per-position constant.
"""
from __future__ import annotations

import math

import torch

from edgekd.errors import RecipeError

# Floor for a teacher's rest mass that rounding (fp16 storage) pushed to or below 0; keeps the logs finite.
REST_FLOOR = 1e-8


def lm_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
               labels: torch.Tensor, kind: str = "forward", temperature: float = 1.0,
               skew: float = 0.1) -> torch.Tensor:
    """T^2 * mean over label positions of the divergence `kind` between teacher and student (module docstring).

    Shapes: student_logits [B, L, V]; teacher_values [B, L, k] float (teacher log-probabilities);
    teacher_indices [B, L, k] int64; labels [B, L] int64 with -100 where no loss. Returns a scalar; rows of the
    teacher tensors at positions without a loss are never read (they may hold anything).
    """
    keep = labels[:, 1:] != -100                       # [B, L-1]: position t predicts labels[t + 1]
    if not keep.any():
        _divergence(kind)
        check_kd_args(temperature, skew)
        return student_logits.sum() * 0.0              # no label token: zero, still in the graph
    return kd_divergence(student_logits[:, :-1][keep], teacher_values[:, :-1][keep], teacher_indices[:, :-1][keep],
                         kind, temperature, skew)


def kd_divergence(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                  kind: str = "forward", temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """lm_kd_loss on the label positions alone: student_logits [N, V], teacher_values / teacher_indices [N, k]."""
    divergence = _divergence(kind)
    check_kd_args(temperature, skew)
    if not len(student_logits):
        return student_logits.sum() * 0.0
    z = student_logits.float()
    t_logp = teacher_values.detach().float()           # the teacher is a fixed target
    log_p, log_q = lumped(z, t_logp, teacher_indices)  # [N, k(+1)] each
    log_p, log_q = log_p / temperature, log_q / temperature
    log_p, log_q = log_p.log_softmax(-1), log_q.log_softmax(-1)
    return divergence(log_p, log_q, skew).mean() * temperature ** 2


def lumped(student_logits: torch.Tensor, teacher_logp: torch.Tensor, index: torch.Tensor):
    """(teacher, student) log-probabilities over the teacher's top-k plus one rest bucket (none when k = V).

    Shapes: student_logits [N, V], teacher_logp [N, k], index [N, k] -> two [N, k + 1] (or [N, k]).
    """
    lse = student_logits.logsumexp(-1, keepdim=True)                       # [N, 1]
    log_q = student_logits.gather(-1, index) - lse                         # [N, k]
    if index.shape[-1] >= student_logits.shape[-1]:
        return teacher_logp, log_q
    off = student_logits.scatter(-1, index, float("-inf"))                 # the student's tail: exact
    q_rest = (off.logsumexp(-1, keepdim=True) - lse).clamp_min(math.log(REST_FLOOR))
    p_rest = (1.0 - teacher_logp.exp().sum(-1, keepdim=True)).clamp_min(REST_FLOOR).log()
    return torch.cat([teacher_logp, p_rest], -1), torch.cat([log_q, q_rest], -1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) per row, with 0 log 0 = 0. [N, K] -> [N]."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), computed in log space."""
    if weight <= 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def forward_kl(log_p, log_q, skew):
    """KL(p_T || q_S): Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"; mean-seeking.
    Minitron (Sreenivas et al., 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach") found
    logit-only forward KL best after pruning."""
    return _kl(log_p, log_q)


def reverse_kl(log_p, log_q, skew):
    """KL(q_S || p_T): Gu et al., 2024, "MiniLLM: Knowledge Distillation of Large Language Models"; mode-seeking,
    the student does not spread mass over what the teacher finds unlikely."""
    return _kl(log_q, log_p)


def skew_kl(log_p, log_q, skew):
    """KL(p_T || a p_T + (1 - a) q_S): Ko et al., 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models" (skew KL, a = 0.1 default); bounded where q_S is near 0, so gradients stay stable."""
    return _kl(log_p, _mix(log_p, log_q, skew))


def skew_reverse_kl(log_p, log_q, skew):
    """KL(q_S || a q_S + (1 - a) p_T): Ko et al., 2024, "DistiLLM" (skew reverse KL)."""
    return _kl(log_q, _mix(log_q, log_p, skew))


KINDS = {"forward": forward_kl, "reverse": reverse_kl, "skew": skew_kl, "skew_reverse": skew_reverse_kl}


def _divergence(kind: str):
    if kind not in KINDS:
        raise RecipeError(f"unknown LM distillation loss '{kind}'; use one of {', '.join(KINDS)}")
    return KINDS[kind]


def check_kd_args(temperature: float, skew: float) -> None:
    if not temperature > 0:
        raise RecipeError(f"distillation temperature {temperature} must be > 0; 1.0 (no softening) is the default")
    if not 0.0 <= skew < 1.0:
        raise RecipeError(f"skew {skew} must be in [0, 1) (DistiLLM's a, 0.1 by default); 1 would make the loss 0")


def causal_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over label tokens (HF shift). Shapes: logits [B, L, V], labels [B, L]."""
    shifted = labels[:, 1:]
    if not (shifted != -100).any():
        return student_logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                             ignore_index=-100)
