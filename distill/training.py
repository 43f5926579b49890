"""Pieces shared by fine-tuning and distillation: Trainer arguments, batching, batched inference."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.data import Encoded


def collator(tokenizer):
    """Dynamic padding: a batch is padded to its own longest text, not to max_length."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)


def quiet_progress(trainer):
    """`trainer` with its progress bars (rate, ETA) but, instead of the raw log dicts the Trainer prints to
    the terminal ({'loss': ...}), one edgekd line per epoch: `[edgekd] epoch 2: loss 0.563`. Where the bars are
    off (the Trainer's default below INFO logging), a line each tenth of the steps says how far it is and how
    long is left: an LLM epoch on a CPU takes minutes."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class BarsOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    class EpochLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if state.is_world_process_zero and "epoch" in logs and ("loss" in logs or "eval_accuracy" in logs):
                figure = (f"loss {logs['loss']:.4g}" if "loss" in logs else
                          f"validation accuracy {logs['eval_accuracy']:.4f}")
                print(f"[edgekd] epoch {logs['epoch']:g}: {figure}", file=sys.stderr, flush=True)

    class StepLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first = time.perf_counter(), state.global_step  # a resumed run starts past 0

        def on_step_end(self, args, state, control, **kwargs):
            every, done = max(1, state.max_steps // 10), state.global_step - self.first
            if state.is_world_process_zero and done and state.global_step % every == 0 \
                    and state.global_step < state.max_steps:
                per_step = (time.perf_counter() - self.start) / done
                left = per_step * (state.max_steps - state.global_step)
                print(f"[edgekd] step {state.global_step}/{state.max_steps}: {per_step:.1f} s a step, about "
                      f"{_duration(left)} left", file=sys.stderr, flush=True)

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(StepLines if trainer.args.disable_tqdm else BarsOnly)
    trainer.add_callback(EpochLines)
    return trainer


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# Part of a classifier stage's key: batches of texts of like length (below) train differently from random ones.
BATCHING = "length-grouped"


def training_args(output_dir: Path, *, epochs: float, learning_rate: float, batch_size: int, seed: int,
                  weight_decay: float = 0.01, length_grouped: bool = False, **overrides):
    """HF TrainingArguments for a CPU-or-GPU run that checkpoints every epoch (for --resume).

    `length_grouped`: each batch holds texts of like length (the Trainer's LengthGroupedSampler: random
    megabatches of 50 batches, sorted within), so the per-batch padding of `collator` pads little. On long texts
    of varied length a random batch is padded to near its longest: perf/long_texts.py measures the difference."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=64, weight_decay=weight_decay,
        # Fused AdamW (CPU and GPU): one kernel per step instead of about ten per parameter tensor; the
        # optimizer step was the largest single item in a torch.profiler trace of a cached distillation step.
        optim="adamw_torch_fused",
        warmup_steps=0.1, lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="accuracy",
        greater_is_better=True, logging_strategy="epoch", report_to=[], seed=seed, data_seed=seed,
        remove_unused_columns=False, save_only_model=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if length_grouped else "random",
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def accuracy_metric(eval_pred) -> dict:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint to resume from, or None.

    The Trainer writes a checkpoint folder in place, trainer_state.json last; a run killed while
    writing leaves a newer folder without it (or with it cut short), which would fail the resume.
    """
    import json

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folders = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if Path(output_dir).is_dir() else []:
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and path.is_dir():
            folders.append((int(step), path))
    for _, path in sorted(folders, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        print(f"resuming from {path}", file=sys.stderr)
        return str(path)
    return None


def drop_checkpoints(checkpoints: Path, out: Path | None = None) -> None:
    """After a finished stage: every process is done with the checkpoints before rank 0 deletes them.

    With `out`, also the temporary stage folders (`.NAME.tmp-PID`) that killed runs left beside it:
    the stage is complete and every rank has removed its own, so any still there is stale.
    """
    import shutil

    from edgekd.manifest import is_primary_process

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if is_primary_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
        for stale in Path(out).parent.glob(f".{Path(out).name}.tmp-*") if out is not None else []:
            shutil.rmtree(stale, ignore_errors=True)


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits [n, num_labels] of a PyTorch classifier, batched with dynamic padding."""
    model.eval()
    device = next(model.parameters()).device  # after Trainer.train() on a GPU the model is there
    data = Encoded(tokenizer, texts, None, max_length)
    pad = collator(tokenizer)
    out = []
    for start in range(0, len(data), batch_size):
        rows = [{k: v for k, v in data[i].items() if k != "index"}
                for i in range(start, min(start + batch_size, len(data)))]
        batch = pad(rows)
        out.append(model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits.float().cpu())
    return torch.cat(out).numpy()
