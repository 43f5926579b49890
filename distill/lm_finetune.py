"""Fine-tune a decoder-LM teacher on prompt/completion or plain-text records: the loss on completion tokens only.

Full fine-tuning, or LoRA (peft) on the attention and MLP projections of the architecture map, merged back with
`merge_and_unload()` so the saved teacher is a plain Hugging Face *ForCausalLM folder (safetensors) that the
next stages load with AutoModelForCausalLM. The Hugging Face Trainer does the loop (checkpoints each epoch,
resume, `accelerate launch` / `torchrun`); validation perplexity is measured before and after.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer

from edgekd.architecture import family_of
from edgekd.distill.training import drop_checkpoints, last_checkpoint, quiet_progress, training_args
from edgekd.errors import DataError, ModelError, RecipeError, StageError
from edgekd.lm_data import Collator, Record, batches, encode
from edgekd.lm_metrics import label_logits, perplexity
from edgekd.manifest import is_primary_process
from edgekd.models import count_parameters

METRICS_FILE = "finetune_metrics.json"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): W + (alpha / r) B A, with
    A [r, in] and B [out, r] trained and W frozen, on every q/k/v/o and MLP projection."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise RecipeError(f"teacher.lora_rank (LoRA r) must be a whole number of at least 1, not {self.r!r}")
        if not self.alpha > 0:
            raise RecipeError(f"LoRA alpha must be positive, not {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")


def lora_targets(model) -> list[str]:
    """The module paths LoRA adapts (peft matches them as name suffixes): attention q/k/v/o and the MLP."""
    family = family_of(model, "LoRA fine-tuning", "fine-tune it fully (no lora)")
    return [family.q, family.k, family.v, family.o, *family.mlp_in, family.mlp_out]


def _with_lora(model, lora: LoraSettings):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("LoRA fine-tuning needs peft; run `pip install 'peft>=0.15'` "
                         "(or install edgekd[llm])") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_targets(model), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class CompletionTrainer(Trainer):
    """The mean cross-entropy of the label tokens, with the LM head run only where there is one (label_logits): on
    classification prompts a few positions of each row instead of every one."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, targets, _ = label_logits(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0.0
        return (loss, logits) if return_outputs else loss


def _check_out(out: Path) -> None:
    """`out` must be missing or an empty folder: never replace what edgekd did not write."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StageError(f"{out} already exists and is not empty; choose another output folder or remove it yourself")


def finetune_lm(model, tokenizer, train_records: list[Record], validation_records: list[Record], out: Path,
                epochs: float, learning_rate: float, batch_size: int, seed: int, lora: LoraSettings | None = None,
                max_length: int | None = None, checkpoints: Path | None = None) -> dict:
    """Fine-tune `model` (a *ForCausalLM) on `train_records`; write it and `tokenizer` to `out` atomically.

    Returns (and writes to out/finetune_metrics.json) validation perplexity before and after. Checkpoints go to
    `checkpoints` (default: a hidden sibling of `out` keyed by the model's config, the records and the settings),
    a rerun resumes from the newest, and they are deleted once `out` is written. All records are encoded
    before any training, so bad input stops it in one line.
    """
    from transformers import set_seed

    out = Path(out)
    _check_out(out)
    context = getattr(model.config, "max_position_embeddings", None)
    max_length = max_length or min(512, context or 512)  # None: 512 tokens, or the model's context if shorter
    if context and max_length > context:
        raise DataError(f"max_length {max_length} is longer than the model's context of {context} tokens; "
                        f"set max_length to at most {context}")
    train = encode(tokenizer, train_records, max_length)
    validation = encode(tokenizer, validation_records, max_length)
    if lora is not None:
        lora_targets(model)  # an unmapped architecture: refused before the baseline pass
    collate = Collator(tokenizer)
    before = perplexity(model, batches(validation, collate, batch_size))
    set_seed(seed)  # LoRA's A matrices are drawn here, before the Trainer seeds itself
    trained = _with_lora(model, lora) if lora is not None else model
    if checkpoints is None:
        key = _run_key(model, train_records + validation_records, [epochs, learning_rate, batch_size, seed, lora,
                                                                    max_length])
        checkpoints = out.parent / f".{out.name}.checkpoints-{key}"
    checkpoints = Path(checkpoints)
    # With more than one epoch the best epoch by validation loss is kept; with one there is nothing to choose, and
    # the validation pass each epoch would only cost time (the perplexity after training is measured below).
    choose = {} if epochs > 1 else {"eval_strategy": "no", "load_best_model_at_end": False}
    args = training_args(checkpoints, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                         per_device_eval_batch_size=batch_size, metric_for_best_model="loss", greater_is_better=False,
                         prediction_loss_only=True, label_names=["labels"],  # no [N, L, vocab] logits kept in eval
                         **choose)
    trainer = CompletionTrainer(model=trained, args=args, train_dataset=train, eval_dataset=validation,
                                data_collator=collate)
    quiet_progress(trainer).train(resume_from_checkpoint=last_checkpoint(checkpoints))
    model = trainer.model.merge_and_unload() if lora is not None else trainer.model
    model.eval()
    metrics = {"validation_before": before, "validation": perplexity(model, batches(validation, collate, batch_size)),
               "train_records": len(train), "validation_records": len(validation), "max_length": max_length,
               "lora": asdict(lora) if lora is not None else None, "params": count_parameters(model)}
    if is_primary_process():
        _save(model, tokenizer, metrics, out)
    drop_checkpoints(checkpoints, out)
    return metrics


def _run_key(model, records: list[Record], settings: list) -> str:
    """What the checkpoints belong to (the model's config, the data, the settings): a rerun with any of them
    changed starts afresh instead of resuming another run's checkpoints."""
    from edgekd.manifest import stage_key

    data = [[r.prompt, r.completion] for r in records]
    return stage_key({"config": model.config.to_dict(), "settings": [str(s) for s in settings]}, {"data": data})


def _save(model, tokenizer, metrics: dict, out: Path) -> None:
    """The teacher folder built in a temporary sibling, then renamed: a killed run leaves no half folder."""
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        model.save_pretrained(work)  # safetensors
        tokenizer.save_pretrained(work)
        (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        _check_out(out)  # the training took a while: something may have been put there meanwhile
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
