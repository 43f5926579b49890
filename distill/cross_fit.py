"""Out-of-fold soft labels (`teacher.cross_fit: K`).

A teacher fine-tuned on the training texts is near certain on them (on BANKING77 its mean top probability on
its own training texts was 0.986), so its soft labels there teach little beyond the hard label. Cross-fitting
splits the training texts into K stratified folds and fine-tunes K more teachers, each on the other K-1
folds, so every training text, and every augmented copy made from it, is labelled by a teacher that never
saw it (Dao et al., "Knowledge Distillation as Semiparametric Inference", ICLR 2021). The unlabelled texts
and their copies, which no teacher saw, keep the final teacher's labels; the final teacher (trained on all
the texts) stays the one that is reported, exported and compared against.

The fold teachers are trained with the teacher's own settings and live in the run's cache
(RUN/.cache/cross-fit-KEY/fold-N, each written whole once trained, so a stopped run resumes at the fold it
was in); their logits go to the logit cache like the final teacher's.
"""
from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np

from edgekd.data import Dataset
from edgekd.distill.cache import teacher_logits
from edgekd.distill.finetune import teacher_params, train_teacher
from edgekd.distill.training import drop_checkpoints
from edgekd.manifest import is_primary_process, stage_key
from edgekd.models import load_classifier
from edgekd.pipeline import log
from edgekd.recipe import Recipe
from edgekd.sample import stratified_order


def folds(texts: list[str], labels: list[str], k: int, seed: int) -> list[int]:
    """The fold of each row. Identical texts share one (no teacher sees a copy of a text it labels); the
    distinct texts are dealt out label by label in a seeded order, one count running across labels, so each
    fold holds each label's texts within one of an equal share, whatever order the file came in."""
    first: dict[str, int] = {}
    for row, text in enumerate(texts):
        first.setdefault(text, row)
    distinct = list(first.values())
    by_label: dict[str, list[int]] = {}
    for i in stratified_order([labels[row] for row in distinct], seed, "cross-fit"):  # seeded within a label
        by_label.setdefault(labels[distinct[i]], []).append(distinct[i])
    fold_of_text = {texts[row]: position % k
                    for position, row in enumerate(row for rows in by_label.values() for row in rows)}
    return [fold_of_text[text] for text in texts]


def out_of_fold_logits(recipe: Recipe, dataset: Dataset, tokenizer, transfer: list[str], copied_from: list[int],
                       soft: np.ndarray, max_length: int, cache_dir: Path) -> dict:
    """Overwrite the rows of `soft` (the final teacher's logits on `transfer`: train + unlabeled + augmented
    copies) that come from a training text with the logits of the fold teacher that did not see that text.
    `copied_from`: for each augmented copy, the index in train + unlabeled of the text it was made from. An
    unlabelled text that is also a training text counts as that one. Returns, for the manifest, who labelled
    what, and the fold teachers' accuracy and confidence on the training texts."""
    k = recipe.teacher.cross_fit
    train = dataset.train.texts
    first = {text: i for i, text in reversed(list(enumerate(train)))}
    of_corpus = [first.get(text, i) for i, text in enumerate(train + dataset.unlabeled)]
    sources = of_corpus + [of_corpus[i] for i in copied_from]
    fold = folds(train, dataset.train.labels, k, recipe.seed)
    params, inputs = teacher_params(recipe, dataset, max_length)
    root = Path(cache_dir) / f"cross-fit-{stage_key({**params, 'cross_fit': k}, inputs)}"
    hits = []
    for f in range(k):
        rows = [i for i, source in enumerate(sources) if source < len(train) and fold[source] == f]
        build = partial(_fold_teacher, recipe, dataset, tokenizer, fold, f, max_length, root / f"fold-{f}")
        soft[rows], hit = teacher_logits(build, tokenizer, [transfer[i] for i in rows], max_length,
                                         f"{root.name}/fold-{f}", cache_dir)
        hits.append(hit)
    labelled = sum(source < len(train) for source in sources)
    own = soft[:len(train)]
    return {"folds": k, "by_fold_teachers": labelled, "by_final_teacher": len(transfer) - labelled,
            "cache_hit": all(hits), "teacher_confidence": confidence(own),
            "accuracy": float(np.mean(own.argmax(-1) == np.array(dataset.label_ids(dataset.train))))}


def confidence(logits: np.ndarray) -> float:
    """Mean top probability (temperature 1): near 1, the soft labels say little more than the hard ones."""
    import torch

    return float(torch.softmax(torch.as_tensor(logits, dtype=torch.float32), -1).max(-1).values.mean())


def _fold_teacher(recipe: Recipe, dataset: Dataset, tokenizer, fold: list[int], f: int, max_length: int,
                  model_dir: Path):
    """Fold f's teacher: from the cache, or fine-tuned on every training text outside fold f and cached."""
    if model_dir.is_dir():
        return load_classifier(str(model_dir)).eval()
    labels = dataset.label_ids(dataset.train)
    keep = [i for i, g in enumerate(fold) if g != f]
    k = recipe.teacher.cross_fit
    log(f"cross-fit: teacher {f + 1} of {k}, on the {len(keep)} training texts outside fold {f + 1}")
    checkpoints = model_dir.parent / f".{model_dir.name}.checkpoints"
    model = train_teacher(recipe, dataset, tokenizer, [dataset.train.texts[i] for i in keep],
                          [labels[i] for i in keep], max_length, checkpoints)
    if is_primary_process():  # written whole, then renamed: a fold folder is always a finished teacher
        scratch = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(scratch)
        os.replace(scratch, model_dir)
    drop_checkpoints(checkpoints)
    return model
