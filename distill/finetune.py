"""Stage 1: fine-tune the teacher (any HF encoder + classification head) on the user's data."""
from __future__ import annotations

from pathlib import Path

from edgekd.data import Dataset, Encoded, choose_max_length
from edgekd.distill.training import (
    BATCHING,
    accuracy_metric,
    collator,
    drop_checkpoints,
    last_checkpoint,
    predict_logits,
    quiet_progress,
    training_args,
)
from edgekd.manifest import is_done, read_manifest, stage_key, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import (
    classifier_tokenizer,
    copy_licenses,
    count_parameters,
    load_classifier,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from edgekd.recipe import Recipe


def tfidf_baseline(dataset: Dataset) -> dict:
    """TF-IDF + logistic regression: the floor a neural model has to beat (C chosen on validation)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vectorizer.fit_transform(dataset.train.texts)
    best = None
    for c in (0.1, 1.0, 10.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, dataset.train.labels)
        score = model.score(vectorizer.transform(dataset.validation.texts), dataset.validation.labels)
        if best is None or score > best[0]:
            best = (score, model)
    model = best[1]
    # decision_function gives per-class scores in model.classes_ order (sorted labels = label_names).
    scores = model.decision_function(vectorizer.transform(dataset.test.texts))
    if scores.ndim == 1:
        scores = __import__("numpy").stack([-scores, scores], 1)
    metrics = classification_metrics(scores, dataset.label_ids(dataset.test))
    return {"name": "TF-IDF + logistic regression", "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"]}


def teacher_params(recipe: Recipe, dataset: Dataset, max_length: int) -> tuple[dict, dict]:
    """(params, inputs) of a teacher's training: what makes one teacher differ from another.

    allow_pickle only says how weights may be read, and cross_fit how many other teachers label the transfer
    set (distill/cross_fit.py), not how this one is trained: neither is part of the key."""
    cfg = recipe.teacher
    params = {"teacher": {k: v for k, v in cfg.__dict__.items() if k not in ("allow_pickle", "cross_fit")},
              "max_length": max_length, "seed": recipe.seed,
              "labels": dataset.label_names, "batching": BATCHING}
    return params, {"model": model_fingerprint(cfg.model, cfg.allow_pickle), "data": dataset.fingerprint()}


def train_teacher(recipe: Recipe, dataset: Dataset, tokenizer, texts: list[str], labels: list[int], max_length: int,
                  checkpoints: Path):
    """`recipe.teacher.model` fine-tuned on (texts, labels) with early stopping on the validation split; resumes
    from the newest checkpoint in `checkpoints`. Returns the best model, in eval mode."""
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    cfg = recipe.teacher
    set_seed(recipe.seed)  # the new head is drawn here, before the Trainer seeds itself: one seed, one teacher
    model = load_classifier(cfg.model, dataset.label_names, cfg.trust_remote_code, cfg.allow_pickle)
    train = Encoded(tokenizer, texts, labels, max_length)
    val = Encoded(tokenizer, dataset.validation.texts, dataset.label_ids(dataset.validation), max_length)
    args = training_args(checkpoints, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                         batch_size=cfg.batch_size, seed=recipe.seed, weight_decay=cfg.weight_decay,
                         length_grouped=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=collator(tokenizer), compute_metrics=accuracy_metric,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=cfg.patience)])
    quiet_progress(trainer).train(resume_from_checkpoint=last_checkpoint(checkpoints))
    return trainer.model.eval()


def finetune(recipe: Recipe, dataset: Dataset, out: Path) -> dict:
    """Fine-tune `recipe.teacher.model` with early stopping; write the best checkpoint to `out`."""
    cfg = recipe.teacher
    tokenizer = classifier_tokenizer(load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.allow_pickle), cfg.model)
    max_length = recipe.data.max_length or choose_max_length(tokenizer, dataset.train.texts)
    params, inputs = teacher_params(recipe, dataset, max_length)
    # Checkpoints live beside the stage, keyed by it: a crash keeps them, a rerun resumes from them.
    checkpoints = out.parent / f".{out.name}.checkpoints-{stage_key(params, inputs)}"
    if is_done(out, "finetune", params, inputs):
        return read_manifest(out)["metrics"]
    with write_stage(out, "finetune", params, inputs) as stage:
        model = train_teacher(recipe, dataset, tokenizer, dataset.train.texts, dataset.label_ids(dataset.train),
                              max_length, checkpoints)
        stage.metrics = {
            split: classification_metrics(predict_logits(model, tokenizer, getattr(dataset, split).texts,
                                                         max_length), dataset.label_ids(getattr(dataset, split)))
            for split in ("validation", "test")
        }
        stage.metrics["baseline"] = tfidf_baseline(dataset)
        stage.metrics["params"] = count_parameters(model)
        stage.extra["max_length"] = max_length
        stage.extra["labels"] = dataset.label_names
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        copy_licenses(cfg.model if cfg.model.startswith("builtin:") else resolve_model(cfg.model, cfg.allow_pickle),
                      stage.path)
    drop_checkpoints(checkpoints, out)
    return stage.metrics
