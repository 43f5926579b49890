"""Stage 2: distill the fine-tuned teacher into a student.

The student is cut from the teacher's layers, built fresh in the teacher's family, or any HF
model the user names. The transfer set is the labelled training texts, the user's unlabelled
domain text and augmented copies; the teacher labels all of it once (cached), and the student
learns from those soft labels (plus, optionally, the teacher's hidden states and attention).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from edgekd.data import Dataset, Encoded, choose_max_length
from edgekd.distill.augment import augment_sources
from edgekd.distill.cache import teacher_logits
from edgekd.distill.cross_fit import confidence, out_of_fold_logits
from edgekd.distill.student import (
    cut_layers,
    fresh_student,
    layer_map,
    layers_to_keep,
    num_layers,
    same_tokenization,
    trim_vocabulary,
    vocabulary_coverage,
)
from edgekd.distill.trainer import DistillationTrainer, Intermediate, _heads
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
from edgekd.errors import ModelError
from edgekd.manifest import is_done, read_manifest, stage_input, stage_key, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import count_parameters, load_classifier, load_tokenizer, model_fingerprint
from edgekd.recipe import Recipe


def distill(recipe: Recipe, dataset: Dataset, teacher_dir: Path, out: Path, cache_dir: Path) -> dict:
    cfg = recipe.student
    teacher_manifest, teacher_input = stage_input(teacher_dir, "finetune")
    max_length = teacher_manifest["max_length"]
    if teacher_manifest["labels"] != dataset.label_names:
        raise ModelError(f"the teacher's labels {teacher_manifest['labels']} differ from the data's "
                         f"{dataset.label_names}; fine-tune the teacher on this data first")
    params = {"student": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "allow_pickle"},
              "seed": recipe.seed,
              "max_length": max_length, "batching": BATCHING}
    if recipe.teacher.cross_fit:  # the transfer set's soft labels come from the fold teachers too
        params["cross_fit"] = recipe.teacher.cross_fit
    inputs = {"teacher": teacher_input, "data": dataset.fingerprint()}
    if cfg.model:
        inputs["student_model"] = model_fingerprint(cfg.model, cfg.allow_pickle)
        if recipe.teacher.trust_remote_code:  # the student.model loads with it: its code may shape the model
            params["trust_remote_code"] = True
    if is_done(out, "distill", params, inputs):
        return read_manifest(out)["metrics"]
    checkpoints = out.parent / f".{out.name}.checkpoints-{stage_key(params, inputs)}"
    teacher = load_classifier(str(teacher_dir)).eval()
    tokenizer = load_tokenizer(str(teacher_dir))
    with write_stage(out, "distill", params, inputs) as stage:
        torch.manual_seed(recipe.seed)
        corpus = dataset.train.texts + dataset.unlabeled
        made = augment_sources(corpus, cfg.augment, tokenizer.mask_token, recipe.seed) if cfg.augment else []
        extra = [text for _, text in made]
        transfer = corpus + extra
        soft, cache_hit = teacher_logits(teacher, tokenizer, transfer, max_length, teacher_input["sha256"],
                                         cache_dir)
        transfer_set = {"labelled": len(dataset.train), "unlabeled": len(dataset.unlabeled), "augmented": len(extra),
                        "teacher_confidence": confidence(soft[:len(dataset.train)])}
        if recipe.teacher.cross_fit:
            transfer_set["cross_fit"] = out_of_fold_logits(recipe, dataset, tokenizer, transfer,
                                                           [source for source, _ in made], soft, max_length, cache_dir)
        torch.manual_seed(recipe.seed)  # the student starts the same whether the fold teachers trained or were cached
        student, student_tok, kept_layers = _build_student(recipe, teacher, tokenizer, dataset)
        shares_vocabulary = same_tokenization(student_tok, tokenizer)
        # A student.model of another tokenizer (an encoder taught by a decoder LLM) counts its own tokens.
        student_length = max_length if shares_vocabulary else (
            recipe.data.max_length or choose_max_length(student_tok, dataset.train.texts))
        to_teacher_ids = None
        if cfg.trim_vocab:
            untrimmed = student_tok
            student, student_tok, kept = trim_vocabulary(student, student_tok, corpus, cfg.vocab_margin)
            # The trimmed vocabulary covers the whole transfer set, so teacher ids are a lookup away.
            to_teacher_ids = torch.tensor(kept) if shares_vocabulary else None
            stage.metrics["vocabulary"] = {"kept": len(kept), "original": len(untrimmed.get_vocab()),
                                           "test_coverage": vocabulary_coverage(untrimmed, kept, dataset.test.texts)}
        intermediate = _intermediate(cfg, teacher, student, kept_layers, tokenizer, student_tok, to_teacher_ids)
        labels = dataset.label_ids(dataset.train) + [-100] * (len(transfer) - len(dataset.train))
        train = Encoded(student_tok, transfer, labels, student_length)
        val = Encoded(student_tok, dataset.validation.texts, dataset.label_ids(dataset.validation), student_length)
        args = training_args(checkpoints, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                             batch_size=cfg.batch_size, seed=recipe.seed, length_grouped=True)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=train, eval_dataset=val,
                                      data_collator=collator(student_tok), compute_metrics=accuracy_metric,
                                      teacher_logits=torch.from_numpy(soft), temperature=cfg.temperature,
                                      alpha=cfg.alpha, intermediate=intermediate)
        quiet_progress(trainer).train(resume_from_checkpoint=last_checkpoint(checkpoints))
        student = trainer.model.eval()
        if hasattr(student, "set_attn_implementation"):
            student.set_attn_implementation("sdpa")  # attention losses needed eager; ship the default
        for split_name in ("validation", "test"):
            split = getattr(dataset, split_name)
            reference = predict_logits(teacher, tokenizer, split.texts, max_length)
            stage.metrics[split_name] = classification_metrics(
                predict_logits(student, student_tok, split.texts, student_length), dataset.label_ids(split), reference)
        stage.metrics.update({
            "params": count_parameters(student), "teacher_params": count_parameters(teacher),
            "teacher_cache_hit": cache_hit,
            "transfer_set": transfer_set,
            "layer_map": intermediate.layer_map if intermediate else None,
        })
        stage.extra.update({"max_length": student_length, "labels": dataset.label_names})
        student.save_pretrained(stage.path)
        student_tok.save_pretrained(stage.path)
        for name in ("LICENSE", "NOTICE"):
            if (teacher_dir / name).is_file():
                shutil.copyfile(teacher_dir / name, stage.path / name)
    drop_checkpoints(checkpoints, out)
    return stage.metrics


def _build_student(recipe: Recipe, teacher, tokenizer, dataset: Dataset):
    """(student, its tokenizer, the teacher layers it was cut from or None)."""
    cfg = recipe.student
    if cfg.model:
        student = load_classifier(cfg.model, dataset.label_names, recipe.teacher.trust_remote_code, cfg.allow_pickle)
        student_tok = load_tokenizer(cfg.model, recipe.teacher.trust_remote_code, cfg.allow_pickle)
        if cfg.intermediate and not same_tokenization(student_tok, tokenizer):
            raise ModelError(f"student.model '{cfg.model}' tokenizes differently from the teacher, so its layers "
                             f"cannot be matched token by token; set hidden_weight, attention_weight and "
                             f"value_weight to 0 (logit distillation works across tokenizers)")
        if cfg.layers is not None:  # a cut of that model: its layers are not the teacher's, so none is "kept"
            student = cut_layers(student, cfg.layers)
        return student, student_tok, None
    if cfg.config:
        return fresh_student(teacher, cfg.config), tokenizer, None
    kept = layers_to_keep(cfg.layers, num_layers(teacher))
    return cut_layers(teacher, kept), tokenizer, kept


def _intermediate(cfg, teacher, student, kept_layers, tokenizer, student_tok, to_teacher_ids):
    if not cfg.intermediate:
        return None
    mapping = layer_map(cfg.layer_map, num_layers(student), num_layers(teacher), kept_layers)
    if cfg.value_weight and _heads(student) != _heads(teacher):
        raise ModelError(f"the value-relation loss needs as many attention heads in the student "
                         f"({_heads(student)}) as in the teacher ({_heads(teacher)}); set student.value_weight: 0")
    if cfg.attention_weight:
        if _heads(student) != _heads(teacher):
            raise ModelError(f"attention transfer needs as many heads in the student ({_heads(student)}) as in "
                             f"the teacher ({_heads(teacher)}); set student.attention_weight: 0")
        for model in (student, teacher):
            model.set_attn_implementation("eager")  # SDPA does not return attention probabilities
    widths = (student.config.hidden_size, teacher.config.hidden_size)
    projection = torch.nn.Linear(*widths) if cfg.hidden_weight and widths[0] != widths[1] else None
    return Intermediate(teacher=teacher, layer_map=mapping, hidden_weight=cfg.hidden_weight,
                        attention_weight=cfg.attention_weight, value_weight=cfg.value_weight,
                        to_teacher_ids=to_teacher_ids, projection=projection)
