"""Causal-LM metrics: perplexity, next-token agreement with the teacher, and task accuracy of greedy completions.

Batches are the standard causal-LM batches of edgekd.lm_data (`input_ids`, `attention_mask`, `labels` [B, L],
labels -100 where there is no loss); the logits at position t predict token t + 1. Figures are token-weighted
over label positions, not averages of batch means, so the batch size and padding do not change them.
"""
from __future__ import annotations

import math

import torch

from edgekd.intervals import wilson
from edgekd.lm_data import Collator, Record, encode, eos_id, prompt_ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


def label_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next-token logits only at the positions whose next token is a label: (logits [N, V] float32, those
    labels [N], each one's row in the batch [N]), row by row and left to right.

    The LM head (vocabulary x hidden, a small decoder's largest matmul) runs only on the sequence positions some
    row scores (`logits_to_keep`): a completion of a few tokens after a long prompt costs a few rows of it."""
    device = _device(model)
    labels = batch["labels"].to(device)
    keep = labels[:, 1:] != -100                                   # [B, L-1]: position t predicts labels[t + 1]
    positions = keep.any(0).nonzero().flatten()                    # [U] positions any row scores
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=positions).logits                # [B, U, V]
    chosen = keep[:, positions]                                    # [B, U]
    rows = chosen.nonzero()[:, 0]
    return logits[chosen].float(), labels[:, 1:][:, positions][chosen], rows


@torch.no_grad()
def perplexity(model, batches) -> dict:
    """exp of the mean negative log-likelihood per label token: {"perplexity", "nll", "tokens"}."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        logits, targets, _ = label_logits(model, batch)
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        tokens += len(targets)
    if not tokens:
        raise ValueError("perplexity needs at least one label token (labels other than -100)")
    return {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}


def _proportion(name: str, hits: int, n: int) -> dict:
    low, high = wilson(hits, n)  # at 0 % or 100 % rounding can put a bound 1e-17 past the estimate: clamp
    return {name: hits / n, "low": min(low, hits / n), "high": max(high, hits / n), "n": n}


@torch.no_grad()
def token_agreement(student, teacher, batches) -> dict:
    """Share of label positions where the student's top-1 next token is the teacher's, with a Wilson 95 %
    interval (over tokens, which are not independent: read it as a lower bound on the uncertainty)."""
    student.eval()
    teacher.eval()
    hits, n = 0, 0
    for batch in batches:
        student_logits, targets, _ = label_logits(student, batch)
        teacher_logits, _, _ = label_logits(teacher, batch)
        hits += int((student_logits.argmax(-1) == teacher_logits.argmax(-1).to(student_logits.device)).sum())
        n += len(targets)
    if not n:
        raise ValueError("token agreement needs at least one label token (labels other than -100)")
    return _proportion("agreement", hits, n)


def first_word(text: str) -> str:
    """The answer word of a completion: its first word, lower case, without surrounding punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'()[]") if words else ""


def greedy_completions(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int) -> list[str]:
    """The greedy completion of each record's prompt, decoded without special tokens (batched, left-padded)."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    answers = []
    for start in range(0, len(records), batch_size):
        prompts = [prompt_ids(tokenizer, r.prompt) for r in records[start:start + batch_size]]
        width = max(map(len, prompts))
        # Left padding: every prompt ends at the last column, so the generated tokens follow it directly.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos_id(tokenizer))
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def _graded(answers: list[str], records: list[Record]) -> dict:
    correct = [first_word(answer) == r.label.strip().lower() for answer, r in zip(answers, records)]
    return {**_proportion("accuracy", sum(correct), len(correct)), "correct": correct, "answers": answers}


def _labelled(records: list[Record]) -> list[Record]:
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise ValueError("task accuracy needs records with a label (a classification file phrased as prompts)")
    return labelled


@torch.no_grad()
def task_accuracy(model, tokenizer, records: list[Record], max_new_tokens: int = 4, batch_size: int = 16) -> dict:
    """Accuracy of the greedy completion of each labelled record's prompt: its first word against the label word
    (strip, lower case). {"accuracy", "low", "high", "n", "correct": [bool per record], "answers": [str]}."""
    labelled = _labelled(records)
    model.eval()
    return _graded(greedy_completions(model, tokenizer, labelled, max_new_tokens, batch_size), labelled)


@torch.no_grad()
def score_records(model, tokenizer, records: list[Record], max_length: int, teacher=None, max_new_tokens: int = 4,
                  batch_size: int = 16) -> dict:
    """perplexity(), token_agreement() with `teacher` and, where the records are labelled, task_accuracy(), from
    one teacher-forced pass of each model over the encoded records.

    A record whose whole completion and eos (at most max_new_tokens) the model predicts token for token is one
    greedy decoding reproduces: its answer is the completion, with no decoding. Only the other records are
    decoded ("decoded" counts them). {"perplexity", "agreement" (with a teacher), "task_accuracy" (labelled)}."""
    model.eval()
    if teacher is not None:
        teacher.eval()
    rows, collate, eos = encode(tokenizer, records, max_length), Collator(tokenizer), eos_id(tokenizer)
    total, tokens, hits, reproduced = 0.0, 0, 0, []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logits, targets, row = label_logits(model, batch)
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        tokens += len(targets)
        predicted = logits.argmax(-1)
        if teacher is not None:
            teacher_logits, _, _ = label_logits(teacher, batch)
            hits += int((predicted == teacher_logits.argmax(-1).to(predicted.device)).sum())
        wrong = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=row.device)
        wrong.index_add_(0, row, (predicted != targets).long())   # mispredicted label tokens per row
        reproduced += (wrong == 0).tolist()
    if not tokens:
        raise ValueError("perplexity needs at least one label token (labels other than -100)")
    metrics = {"perplexity": {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}}
    if teacher is not None:
        metrics["agreement"] = _proportion("agreement", hits, tokens)
    if any(r.label is not None for r in records):
        answers = {}
        for i, (record, row, same) in enumerate(zip(records, rows, reproduced)):
            completion = [t for t in row["labels"] if t != -100]
            if record.label is not None and same and completion[-1] == eos and len(completion) <= max_new_tokens:
                answers[i] = tokenizer.decode(completion, skip_special_tokens=True)
        rest = [i for i, r in enumerate(records) if r.label is not None and i not in answers]
        if rest:
            answers.update(zip(rest, greedy_completions(model, tokenizer, [records[i] for i in rest], max_new_tokens,
                                                     batch_size)))
        order = sorted(answers)
        metrics["task_accuracy"] = {**_graded([answers[i] for i in order], [records[i] for i in order]),
                                    "decoded": len(rest)}
    return metrics
