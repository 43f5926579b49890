"""Distill a decoder LM: the HF Trainer with loss alpha * KD(teacher top-k cache) + (1 - alpha) * CE(labels).

The teacher's top-k per label position is computed once (`distill/lm_cache.py`), so epochs and reruns pay for
the student only. alpha = 0 is the no-teacher baseline: the same student, data, steps and code, with the KD
term weighted 0 (and so no teacher pass for the cache). Data follows the shared LM contract: `input_ids`,
`attention_mask` (right padding), `labels` with -100 where no loss; logits at t predict token t + 1.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from edgekd.distill.lm_cache import TopK, as_records, cache_key, teacher_topk
from edgekd.distill.lm_losses import _divergence, check_kd_args, kd_divergence
from edgekd.distill.training import drop_checkpoints, last_checkpoint, quiet_progress, training_args
from edgekd.errors import DataError, ModelError, RecipeError, StageError
from edgekd.lm_metrics import label_logits

METRICS_FILE = "lm_distill.json"   # marks a folder distill_lm wrote (and may replace)


class LMRecords(torch.utils.data.Dataset):
    """Examples as the Trainer sees them: input_ids, attention_mask, labels and `index`, the example's row in
    the teacher cache."""

    def __init__(self, records: list[dict]):
        self.rows = [dict(r, index=i) for i, r in enumerate(records)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def lm_collator(pad_id: int, pad_to_multiple_of: int = 8):
    """Right padding whatever the tokenizer's padding_side (the contract): pad ids under attention 0, labels
    -100 so padding never enters a loss, and `index` kept. Rows -> input_ids/attention_mask/labels [B, L],
    index [B]."""
    def collate(rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        batch = {"input_ids": torch.full((len(rows), length), pad_id, dtype=torch.int64),
                 "attention_mask": torch.zeros(len(rows), length, dtype=torch.int64),
                 "labels": torch.full((len(rows), length), -100, dtype=torch.int64),
                 "index": torch.tensor([r["index"] for r in rows], dtype=torch.int64)}
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(r["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(r["labels"])
        return batch
    return collate


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise RecipeError(f"alpha {alpha} must be in [0, 1]: 1 is KD only, 0 is the no-teacher baseline")


class LMDistillationTrainer(Trainer):
    """Trainer whose training loss is alpha * lm_kd_loss(student, cached teacher top-k) + (1 - alpha) * CE.

    `teacher_topk` holds the cached rows indexed by each example's `index`; None only with alpha = 0.
    Evaluation loss is the plain next-token CE (exp of it is the perplexity).
    """

    # compute_loss returns a per-batch mean over label tokens (it ignores num_items_in_batch), so the Trainer must
    # divide it by the gradient-accumulation steps; for a decoder that accepts loss kwargs it otherwise would not.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher_topk: TopK | None, kind: str = "forward", temperature: float = 1.0,
                 skew: float = 0.1, alpha: float = 1.0, **kwargs):
        _divergence(kind)
        check_kd_args(temperature, skew)
        check_alpha(alpha)
        if alpha > 0 and teacher_topk is None:
            raise RecipeError("alpha > 0 needs the teacher's top-k cache; give teacher_topk or set alpha: 0")
        super().__init__(*args, **kwargs)
        self.teacher_topk, self.kind, self.temperature, self.skew, self.alpha = (
            teacher_topk, kind, temperature, skew, alpha)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        # The logits at label positions only: the LM head never runs where there is no loss.
        logits, targets, _ = label_logits(model, inputs)
        loss = (torch.nn.functional.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0.0)
        if model.training and self.alpha > 0:
            values, indices = self.teacher_topk.rows(index.cpu(), inputs["labels"].cpu())
            kd = kd_divergence(logits, values.to(logits.device), indices.to(logits.device), self.kind,
                               self.temperature, self.skew)
            loss = self.alpha * kd + (1.0 - self.alpha) * loss
        return (loss, logits) if return_outputs else loss


def model_digest(model) -> str:
    """sha256 of a model's config and weights: the teacher's part of the cache key when no stage digest is given."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def lm_validation(student, teacher, records: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Token-weighted means over the label tokens of `records`: next-token CE and perplexity of the student,
    and with a teacher its full-vocabulary forward KL(p_T || q_S) at T = 1 (top-k = vocabulary: exact)."""
    student.eval()
    device = next(student.parameters()).device
    collate = lm_collator(pad_id)
    totals = {"loss": 0.0, "kl": 0.0, "tokens": 0}
    for start in range(0, len(records), batch_size):
        batch = collate([dict(r, index=0) for r in records[start:start + batch_size]])
        logits, targets, _ = label_logits(student, batch)
        if not len(targets):
            continue
        tokens = len(targets)
        totals["loss"] += float(torch.nn.functional.cross_entropy(logits, targets)) * tokens
        if teacher is not None:
            t_logp = label_logits(teacher, batch)[0].to(device).log_softmax(-1)
            every = torch.arange(t_logp.shape[-1], device=device).expand_as(t_logp)  # the whole vocabulary: exact
            totals["kl"] += float(kd_divergence(logits, t_logp, every, "forward")) * tokens
        totals["tokens"] += tokens
    if not totals["tokens"]:
        raise DataError("the validation data has no label tokens (every label is -100); give completions to score")
    loss = totals["loss"] / totals["tokens"]
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": totals["tokens"]}
    if teacher is not None:
        metrics["kl_to_teacher"] = totals["kl"] / totals["tokens"]
    return metrics


def distill_lm(student, teacher, tokenizer, train, validation, out: Path, *, kind: str = "forward",
               temperature: float = 1.0, alpha: float = 1.0, skew: float = 0.1, k: int = 64, epochs: float = 1.0,
               lr: float = 5e-4, batch_size: int = 8, seed: int = 0, cache_dir: Path,
               teacher_digest: str | None = None) -> dict:
    """Distill `teacher` into `student` (both HF *ForCausalLM sharing one tokenizer) and save the student.

    `train` / `validation`: records or batches (`lm_cache.as_records`). alpha = 1 (default) is logit-only KD,
    Minitron's recipe after pruning; alpha = 0 trains on the labels alone, the baseline. Writes `out`
    (safetensors weights, config, tokenizer, `lm_distill.json`) atomically; returns the metrics: validation
    loss, perplexity and KL to the teacher, and whether the teacher cache was reused.
    """
    out = Path(out)
    train_records, val_records = as_records(train), as_records(validation)
    pad_id = _pad_id(tokenizer)
    _check(student, teacher, train_records + val_records, out, kind, temperature, skew, alpha, k)
    digest = teacher_digest or model_digest(teacher)
    hyper = dict(kind=kind, temperature=temperature, alpha=alpha, skew=skew, k=k, epochs=epochs, lr=lr,
                 batch_size=batch_size, seed=seed)
    run = hashlib.sha256(json.dumps([hyper, cache_key(digest, train_records, k)]).encode()).hexdigest()[:16]
    checkpoints = out.parent / f".{out.name}.checkpoints-{run}"
    args = training_args(checkpoints, epochs=epochs, learning_rate=lr, batch_size=batch_size, seed=seed,
                         per_device_eval_batch_size=batch_size, metric_for_best_model="loss",
                         greater_is_better=False, prediction_loss_only=True, label_names=["labels"])
    teacher.to(args.device)
    top, hit = (teacher_topk(teacher, train_records, k, digest, cache_dir, batch_size) if alpha > 0
                else (None, False))
    trainer = LMDistillationTrainer(model=student, args=args, train_dataset=LMRecords(train_records),
                                    eval_dataset=LMRecords(val_records), data_collator=lm_collator(pad_id),
                                    teacher_topk=top, kind=kind, temperature=temperature, skew=skew, alpha=alpha)
    quiet_progress(trainer).train(resume_from_checkpoint=last_checkpoint(checkpoints))
    student = trainer.model.eval()
    validation_metrics = lm_validation(student, teacher.to(next(student.parameters()).device), val_records, pad_id,
                                       batch_size)
    metrics = {"validation": validation_metrics, "teacher_cache_hit": hit, "params": hyper,
               "train_examples": len(train_records), "teacher_digest": digest}
    _save(student, tokenizer, metrics, out)
    drop_checkpoints(checkpoints, out)
    return metrics


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token to one of its "
                         "tokens (padding is masked, any id works)")
    return pad


def _check(student, teacher, records: list[dict], out: Path, kind, temperature, skew, alpha, k) -> None:
    """Everything that can be refused before the teacher or the Trainer runs."""
    _divergence(kind)
    check_kd_args(temperature, skew)
    check_alpha(alpha)
    vocab_s = student.get_output_embeddings().weight.shape[0]
    vocab_t = teacher.get_output_embeddings().weight.shape[0]
    if vocab_s != vocab_t:
        raise ModelError(f"the student's vocabulary ({vocab_s}) differs from the teacher's ({vocab_t}); the cached "
                         f"top-k are teacher token ids: cut or prune the student from the teacher, or build it from "
                         f"the teacher's config")
    if alpha > 0 and not 0 < k <= vocab_t:
        raise RecipeError(f"top-k {k} must be in 1..{vocab_t} (the teacher's vocabulary); 64 is a good default")
    context = min(getattr(m.config, "max_position_embeddings", None) or 1 << 30 for m in (student, teacher))
    longest = max(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    if len(records[longest]["input_ids"]) > context:
        raise DataError(f"an example has {len(records[longest]['input_ids'])} tokens, more than the models' context "
                        f"of {context}; truncate the data to {context} tokens")
    if out.exists() and any(out.iterdir()) and not (out / METRICS_FILE).is_file():
        raise StageError(f"{out} exists and was not written by edgekd's LM distillation; choose another output "
                         f"folder or empty it")


def _save(student, tokenizer, metrics: dict, out: Path) -> None:
    """Build the folder in a temporary sibling, then rename: a killed run leaves no half-written student."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)   # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(tmp)
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():   # our own earlier result (checked before training): swap it out, then delete it
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
