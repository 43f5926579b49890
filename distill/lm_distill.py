"""Distill a decoder LM: the HF Trainer with loss alpha * KD(teacher top-k cache) + (1 - alpha) * CE(labels).

With `StateMatch`, a third term matches each student layer's output to the output of the teacher layer it was
cut from (Minitron's intermediate-state loss L_is, which its authors add when the depth is cut much: a student
of 10 of 30 layers gets a signal at every layer, not only at the logits). It is the mean over layers of the
hidden-state MSE (TinyBERT's, `distill/losses.py`) over real tokens, scaled each step to the size of the logit
loss (Minitron's balance, alpha = L_logit / L_is, held fixed in the gradient) times `weight`. The teacher runs
on each batch for it: hidden states are not cached.

The KD term covers the completion tokens (`kd_tokens="completion"`) or every token of prompt and completion
(`"all"`: Minitron distills whole sequences; a prompt of 60 tokens before a one-word completion gives the student
60 times the teacher signal per example). The cross-entropy always covers the completion tokens alone. The
teacher's top-k per KD position is computed once (`distill/lm_cache.py`), so epochs and reruns pay for
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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from edgekd.architecture import family_of
from edgekd.distill.lm_cache import TopK, as_records, cache_key, teacher_topk
from edgekd.distill.lm_losses import _divergence, check_kd_args, kd_divergence
from edgekd.distill.losses import hidden_state_mse
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


KD_TOKENS = ("completion", "all")


def every_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels [B, L] that score every next token of each row: its ids, -100 at the first position (no token
    predicts it) and under padding. What the KD term covers with kd_tokens="all"."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    return labels


def _kd_records(records: list[dict], kd_tokens: str) -> list[dict]:
    """The records whose label positions are the KD term's: the records themselves, or every token."""
    if kd_tokens == "completion":
        return records
    return [dict(r, labels=[-100] + list(r["input_ids"][1:])) for r in records]


@dataclass
class StateMatch:
    """The intermediate-state term: student layer j is matched to teacher layer layer_map[j], on the teacher's
    hidden `channels` the student kept (None: all; after hidden-channel pruning, the plan's list)."""
    layer_map: list[int]
    weight: float = 1.0
    channels: list[int] | None = None

    def __post_init__(self):
        if not self.weight > 0:
            raise RecipeError(f"the hidden-state loss weight must be > 0, not {self.weight} (0: leave it off)")


class _Outputs:
    """Forward hooks that keep the outputs of chosen layers (their hidden states) while `on`."""

    def __init__(self, model, layers: list[int]):
        from edgekd.compress.lm_prune import _hidden

        self.on, self.kept = False, {}
        blocks = family_of(model, "intermediate-state distillation").layer_list(model)
        for position, layer in enumerate(layers):
            blocks[layer].register_forward_hook(self._keep(position, _hidden))

    def _keep(self, position, hidden):
        def hook(module, args, output):
            if self.on:
                self.kept[position] = hidden(output)
        return hook

    def take(self) -> list[torch.Tensor]:
        kept, self.kept = [self.kept[i] for i in sorted(self.kept)], {}
        return kept


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise RecipeError(f"alpha {alpha} must be in [0, 1]: 1 is KD only, 0 is the no-teacher baseline")


def check_kd_tokens(kd_tokens: str) -> None:
    if kd_tokens not in KD_TOKENS:
        raise RecipeError(f"kd_tokens must be {' or '.join(KD_TOKENS)}, not {kd_tokens!r}")


class LMDistillationTrainer(Trainer):
    """Trainer whose training loss is alpha * lm_kd_loss(student, cached teacher top-k) + (1 - alpha) * CE.

    `teacher_topk` holds the cached rows indexed by each example's `index`; None only with alpha = 0.
    Evaluation loss is the plain next-token CE (exp of it is the perplexity).
    """

    # compute_loss returns a per-batch mean over label tokens (it ignores num_items_in_batch), so the Trainer must
    # divide it by the gradient-accumulation steps; for a decoder that accepts loss kwargs it otherwise would not.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher_topk: TopK | None, kind: str = "forward", temperature: float = 1.0,
                 skew: float = 0.1, alpha: float = 1.0, kd_tokens: str = "completion",
                 states: StateMatch | None = None, teacher=None, **kwargs):
        _divergence(kind)
        check_kd_args(temperature, skew)
        check_alpha(alpha)
        check_kd_tokens(kd_tokens)
        if alpha > 0 and teacher_topk is None:
            raise RecipeError("alpha > 0 needs the teacher's top-k cache; give teacher_topk or set alpha: 0")
        super().__init__(*args, **kwargs)
        self.teacher_topk, self.kind, self.temperature, self.skew, self.alpha, self.kd_tokens = (
            teacher_topk, kind, temperature, skew, alpha, kd_tokens)
        self.states, self.teacher = states, teacher
        if states:
            if teacher is None:
                raise RecipeError("the hidden-state loss needs the teacher model; give teacher=")
            self._student_out = _Outputs(self.model, list(range(len(states.layer_map))))
            self._teacher_out = _Outputs(teacher, states.layer_map)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        labels = inputs["labels"]
        distilling = model.training and self.alpha > 0
        kd_labels = (every_token_labels(inputs["input_ids"], inputs["attention_mask"])
                     if distilling and self.kd_tokens == "all" else labels)
        matching = self.states is not None and model.training
        if matching:
            self._student_out.on = True
        # The logits at scored positions only: the LM head never runs where there is no loss.
        logits, _, _ = label_logits(model, dict(inputs, labels=kd_labels))
        # The completion's positions among the KD ones (a subset: completions are real tokens), in the same
        # row-major order label_logits gives.
        on_completion = (labels[:, 1:] != -100)[kd_labels[:, 1:] != -100].to(logits.device)
        completion, targets = logits[on_completion], labels[:, 1:][labels[:, 1:] != -100].to(logits.device)
        loss = (torch.nn.functional.cross_entropy(completion, targets) if len(targets) else logits.sum() * 0.0)
        if distilling:
            values, indices = self.teacher_topk.rows(index.cpu(), kd_labels.cpu())
            kd = kd_divergence(logits, values.to(logits.device), indices.to(logits.device), self.kind,
                               self.temperature, self.skew)
            loss = self.alpha * kd + (1.0 - self.alpha) * loss
        if matching:
            self._student_out.on = False
            state = self._state_loss(self._student_out.take(), inputs)
            loss = loss + self.states.weight * (loss.detach() / state.detach().clamp_min(1e-12)) * state
        return (loss, completion) if return_outputs else loss

    def _state_loss(self, student_states: list[torch.Tensor], inputs) -> torch.Tensor:
        """Mean over the student's layers of the hidden-state MSE against the teacher layers they came from."""
        self._teacher_out.on = True
        with torch.no_grad():   # the decoder body only: the teacher's LM head is not needed
            self.teacher.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self._teacher_out.on = False
        teacher_states = self._teacher_out.take()
        channels = self.states.channels
        mask = inputs["attention_mask"]
        return sum(hidden_state_mse(s, t if channels is None else t[..., channels], mask)
                   for s, t in zip(student_states, teacher_states)) / len(student_states)


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
               teacher_digest: str | None = None, kd_tokens: str = "completion",
               states: StateMatch | None = None) -> dict:
    """Distill `teacher` into `student` (both HF *ForCausalLM sharing one tokenizer) and save the student.

    `train` / `validation`: records or batches (`lm_cache.as_records`). alpha = 1 (default) is logit-only KD,
    Minitron's recipe after pruning; alpha = 0 trains on the labels alone, the baseline. `kd_tokens`: the
    positions the KD term covers; `states`: the intermediate-state term, off when None (module docstring). Writes `out`
    (safetensors weights, config, tokenizer, `lm_distill.json`) atomically; returns the metrics: validation
    loss, perplexity and KL to the teacher, and whether the teacher cache was reused.
    """
    out = Path(out)
    train_records, val_records = as_records(train), as_records(validation)
    pad_id = _pad_id(tokenizer)
    _check(student, teacher, train_records + val_records, out, kind, temperature, skew, alpha, k)
    check_kd_tokens(kd_tokens)
    student_layers = len(family_of(student).layer_list(student))
    if states is not None and len(states.layer_map) != student_layers:
        raise RecipeError(f"the hidden-state loss maps {len(states.layer_map)} student layers, but the student has "
                          f"{student_layers}; give one teacher layer per student layer")
    digest = teacher_digest or model_digest(teacher)
    hyper = dict(kind=kind, temperature=temperature, alpha=alpha, skew=skew, k=k, epochs=epochs, lr=lr,
                 batch_size=batch_size, seed=seed, kd_tokens=kd_tokens,
                 states=None if states is None else states.__dict__)
    run = hashlib.sha256(json.dumps([hyper, cache_key(digest, train_records, k)]).encode()).hexdigest()[:16]
    checkpoints = out.parent / f".{out.name}.checkpoints-{run}"
    args = training_args(checkpoints, epochs=epochs, learning_rate=lr, batch_size=batch_size, seed=seed,
                         per_device_eval_batch_size=batch_size, metric_for_best_model="loss",
                         greater_is_better=False, prediction_loss_only=True, label_names=["labels"])
    teacher.to(args.device).eval()
    top, hit = (teacher_topk(teacher, _kd_records(train_records, kd_tokens), k, digest, cache_dir, batch_size)
                if alpha > 0 else (None, False))
    trainer = LMDistillationTrainer(model=student, args=args, train_dataset=LMRecords(train_records),
                                    eval_dataset=LMRecords(val_records), data_collator=lm_collator(pad_id),
                                    teacher_topk=top, kind=kind, temperature=temperature, skew=skew, alpha=alpha,
                                    kd_tokens=kd_tokens, states=states, teacher=teacher if states else None)
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
