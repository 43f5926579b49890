"""Stage 2: distill the fine-tuned teacher into a student cut from its layers."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from edgekd.data import Dataset, Encoded
from edgekd.manifest import is_done, read_manifest, stage_input, stage_key, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import count_parameters, load_classifier, load_tokenizer
from edgekd.errors import ModelError
from edgekd.recipe import Recipe

from edgekd.distill.augment import augment
from edgekd.distill.cache import teacher_logits
from edgekd.distill.student import cut_layers, trim_vocabulary, vocabulary_coverage
from edgekd.distill.trainer import DistillationTrainer
from edgekd.distill.training import accuracy_metric, collator, last_checkpoint, predict_logits, training_args


def distill(recipe: Recipe, dataset: Dataset, teacher_dir: Path, out: Path, cache_dir: Path) -> dict:
    """Cut the student from `teacher_dir`, trim its vocabulary, train it on the teacher's soft labels."""
    cfg = recipe.student
    teacher_manifest, teacher_input = stage_input(teacher_dir, "finetune")
    max_length = teacher_manifest["max_length"]
    if teacher_manifest["labels"] != dataset.label_names:
        raise ModelError(f"the teacher's labels {teacher_manifest['labels']} differ from the data's "
                         f"{dataset.label_names}; fine-tune the teacher on this data first")
    params = {"student": cfg.__dict__, "seed": recipe.seed, "max_length": max_length}
    inputs = {"teacher": teacher_input, "data": dataset.fingerprint()}
    if is_done(out, "distill", params, inputs):
        return read_manifest(out)["metrics"]
    checkpoints = out.parent / f".{out.name}.checkpoints-{stage_key(params, inputs)}"
    teacher = load_classifier(str(teacher_dir))
    tokenizer = load_tokenizer(str(teacher_dir))
    with write_stage(out, "distill", params, inputs) as stage:
        torch.manual_seed(recipe.seed)
        # Transfer set: the labelled texts, then teacher-labelled augmentations of them.
        extra = augment(dataset.train.texts, cfg.augment, tokenizer.mask_token, recipe.seed) if cfg.augment else []
        transfer = dataset.train.texts + extra
        soft, cache_hit = teacher_logits(teacher, tokenizer, transfer, max_length, teacher_input["sha256"],
                                         cache_dir)
        student = cut_layers(teacher, cfg.layers)
        student_tok = tokenizer
        if cfg.trim_vocab:
            student, student_tok, kept = trim_vocabulary(student, tokenizer, dataset.train.texts, cfg.vocab_margin)
            stage.metrics["vocabulary"] = {"kept": len(kept), "original": len(tokenizer.get_vocab()),
                                           "test_coverage": vocabulary_coverage(tokenizer, kept, dataset.test.texts)}
        train = Encoded(student_tok, transfer, dataset.label_ids(dataset.train) + [-100] * len(extra), max_length)
        val = Encoded(student_tok, dataset.validation.texts, dataset.label_ids(dataset.validation), max_length)
        args = training_args(checkpoints, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                             batch_size=cfg.batch_size, seed=recipe.seed)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=train, eval_dataset=val,
                                      data_collator=collator(student_tok), compute_metrics=accuracy_metric,
                                      teacher_logits=torch.from_numpy(soft), temperature=cfg.temperature,
                                      alpha=cfg.alpha)
        trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints))
        student = trainer.model.eval()
        for split_name in ("validation", "test"):
            split = getattr(dataset, split_name)
            reference = predict_logits(teacher, tokenizer, split.texts, max_length)
            stage.metrics[split_name] = classification_metrics(
                predict_logits(student, student_tok, split.texts, max_length), dataset.label_ids(split), reference)
        stage.metrics["params"] = count_parameters(student)
        stage.metrics["teacher_cache_hit"] = cache_hit
        stage.metrics["transfer_set"] = {"labelled": len(dataset.train), "augmented": len(extra)}
        stage.extra["max_length"] = max_length
        stage.extra["labels"] = dataset.label_names
        student.save_pretrained(stage.path)
        student_tok.save_pretrained(stage.path)
        for name in ("LICENSE", "NOTICE"):
            if (teacher_dir / name).is_file():
                shutil.copyfile(teacher_dir / name, stage.path / name)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return stage.metrics
