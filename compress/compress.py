"""Stage 3: compress the student.

    distilled student -> [structured pruning -> recovery distillation] -> QuantSpecs evaluated in PyTorch

With `compress.budget` set, the search (compress/search.py) chooses the pruning and the spec
instead, measuring each candidate on the target's runtime. The stage writes the (pruned)
student, the plan (pruning done, QuantSpecs to realize) and the accuracy of every variant,
measured in PyTorch on the very graph the exporter lowers (ExecuTorch) or with torchao /
the backend's own PyTorch quantizer (the others).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.prune import PruneSpec, importance, prune
from edgekd.compress.quant import QuantSpec, get_spec, quantized_module
from edgekd.data import Dataset, Encoded
from edgekd.distill.training import BATCHING, drop_checkpoints
from edgekd.errors import RecipeError
from edgekd.manifest import is_done, read_manifest, stage_input, stage_key, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import count_parameters, load_classifier, load_tokenizer
from edgekd.recipe import Recipe
from edgekd.sample import Samples
from edgekd.targets.graph import ExportWrapper, encode_fixed, encode_unpadded, median_length_text, run_graph

EVAL_TEXTS = 1000       # validation texts each variant is scored on
RANKING_TEXTS = 512     # validation texts the pruning importance is measured on
RETRAIN_FIELDS = ("temperature", "alpha", "learning_rate", "batch_size")  # the student.* fields retraining reads


def compress(recipe: Recipe, dataset: Dataset, student_dir: Path, out: Path, teacher_dir: Path | None = None,
             fmt=None, options: dict | None = None) -> dict:
    """Prune (when asked) and evaluate the QuantSpecs of `recipe.compress`; or search within its budget.

    `fmt`: the target format whose backend evaluates the specs (and whose exporter the search uses);
    `options`: that target's options from the recipe, which the search's candidates are exported with.
    """
    cfg = recipe.compress
    options = fmt.resolve_options(options) if fmt is not None else {}
    specs = [get_spec(name) for name in cfg.quant]  # unknown names fail before any work
    prune_spec = PruneSpec(**vars(cfg.prune))
    if fmt is not None and cfg.budget is not None:  # the search measures the format's own specs; plain specs are
        # evaluated in PyTorch, and each target exports its realization of them (checked by the pre-flight)
        _check_realizable(fmt, [get_spec(n) for n in cfg.search_quant or []])
    if (not prune_spec.is_noop or cfg.budget is not None or cfg.qat_epochs) and teacher_dir is None:
        raise RecipeError("pruning, quantization-aware training and the budget search retrain the student from "
                          "the teacher; give --teacher DIR")
    quantized = [s for s in specs if not s.is_float]
    if cfg.qat_epochs and cfg.budget is None and len(quantized) != 1:
        raise RecipeError(f"compress.qat_epochs trains the student for one QuantSpec, and compress.quant lists "
                          f"{len(quantized)} quantized ones; list exactly one")
    manifest, source = stage_input(student_dir, "distill")
    max_length = manifest["max_length"]
    params = {"compress": {"quant": [s.to_dict() for s in specs], "prune": prune_spec.to_dict(),
                           "recovery_epochs": cfg.recovery_epochs, "budget": cfg.budget, "objective": cfg.objective,
                           "search_quant": cfg.search_quant,
                           # fields added later enter the key only when set, so older runs keep their keys
                           **({"qat_epochs": cfg.qat_epochs} if cfg.qat_epochs else {}),
                           **({"budget_from": cfg.budget_from} if cfg.budget_from != "teacher" else {})},
              "target": f"{fmt.target}/{fmt.name}" if fmt else None, "seed": recipe.seed}
    retrains = not prune_spec.is_noop or cfg.budget is not None or bool(cfg.qat_epochs)
    if retrains:  # recovery distillation and QAT train with these student.* settings (distill_from_teacher)
        params["student"] = {k: getattr(recipe.student, k) for k in RETRAIN_FIELDS}
        params["batching"] = BATCHING
    if cfg.budget is not None and fmt is not None and options != fmt.options:  # candidates export with them;
        params["target_options"] = options  # defaults stay out of the key, so older runs keep theirs
    inputs = {"student": source, "data": dataset.fingerprint()}
    if teacher_dir is not None and retrains:
        inputs["teacher"] = stage_input(teacher_dir, "finetune")[1]
    if is_done(out, "compress", params, inputs):
        return read_manifest(out)["metrics"]
    # The search's results so far, kept beside the stage (as distill's checkpoints) and named by its key:
    # a rerun of the same command resumes, a changed recipe or input starts afresh.
    checkpoints = out.parent / f".{out.name}.checkpoints-{stage_key(params, inputs)}"
    student = load_classifier(str(student_dir)).eval()
    tokenizer = load_tokenizer(str(student_dir))
    with write_stage(out, "compress", params, inputs) as stage:
        job = Compression(recipe, dataset, student, tokenizer, max_length, teacher_dir, stage.path, fmt)
        if cfg.budget is not None:
            from edgekd.compress.search import search

            result = search(job, fmt, cfg.budget, cfg.objective, cfg.search_quant, checkpoints, cfg.qat_epochs,
                            cfg.budget_from, options)
            model, prune_spec, specs, qat = result.model, result.prune, [result.quant], result.qat
            stage.metrics["search"] = result.summary
        else:
            model = job.pruned(prune_spec) if not prune_spec.is_noop else student
            qat = bool(cfg.qat_epochs)
            if qat:
                from edgekd.compress.qat import quantization_aware

                model = quantization_aware(job, model, quantized[0], cfg.qat_epochs, checkpoints / "qat")
        stage.metrics["validation"] = job.evaluate(model, specs)
        stage.metrics["params"] = {"before": count_parameters(student), "after": count_parameters(model)}
        # which backend's quantizer and runtime scored each spec (a Core ML one is an estimate on Linux)
        stage.extra["evaluated_by"] = {s.name: job.evaluated_by.get(s.name, "PyTorch") for s in specs}
        stage.extra.update({"max_length": max_length, "labels": manifest["labels"], "samples": job.samples.records,
                            "plan": {"pruning": None if prune_spec.is_noop else prune_spec.to_dict(),
                                     "quant": [s.to_dict() for s in specs],
                                     "qat_epochs": cfg.qat_epochs if qat else 0}})
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        for name in ("LICENSE", "NOTICE"):
            if (student_dir / name).is_file():
                shutil.copyfile(student_dir / name, stage.path / name)
    drop_checkpoints(checkpoints, out)
    return stage.metrics


def _check_realizable(fmt, specs: list[QuantSpec]) -> None:
    for spec in specs:
        if spec.name not in fmt.specs and not spec.is_float:
            raise RecipeError(f"{fmt.target}/{fmt.name} cannot realize quantization '{spec.name}'; "
                              f"it supports: {', '.join(fmt.specs)}")


def _in_pytorch(model, spec: QuantSpec, max_length: int, calibration):
    return quantized_module(model, spec, max_length, calibration), "PyTorch (torchao / PT2E with XNNPACK's quantizer)"


class Compression:
    """What pruning and evaluation share: the student, its data, and the teacher for recovery."""

    def __init__(self, recipe: Recipe, dataset: Dataset, student, tokenizer, max_length: int,
                 teacher_dir: Path | None, workdir: Path, fmt=None):
        self.recipe, self.dataset, self.student, self.tokenizer = recipe, dataset, student, tokenizer
        self.max_length, self.teacher_dir, self.workdir, self.fmt = max_length, teacher_dir, workdir, fmt
        self.evaluated_by: dict[str, str] = {}  # spec name -> the backend whose quantizer and runtime scored it
        # Stratified, seeded samples (edgekd.sample), recorded in the manifest: files are often sorted by label.
        self.samples = Samples(dataset)
        self.eval_split = self.samples.split("validation", EVAL_TEXTS, "evaluation")
        self.eval_inputs = encode_fixed(tokenizer, self.eval_split.texts, max_length)
        self.eval_labels = dataset.label_ids(self.eval_split)
        # The export's calibration sample is a prefix of this one (same purpose and seed).
        self.calibration = encode_fixed(tokenizer, self.samples.split("train", 200, "calibration").texts, max_length)
        self._scores = None
        self._soft = None

    def evaluate(self, model, specs: list[QuantSpec]) -> dict:
        """Validation metrics of fp32 and each spec (agreement is with the fp32 model)."""
        reference = run_graph(ExportWrapper(model.eval()), self.eval_inputs).numpy()
        results = {"fp32": classification_metrics(reference, self.eval_labels)}
        for spec in specs:
            if not spec.is_float:
                results[spec.name] = self.accuracy_of(model, spec, reference)
        return results

    def accuracy_of(self, model, spec: QuantSpec, reference: np.ndarray | None = None) -> dict:
        """Validation metrics of `model` quantized by `spec` with the backend of the format compressed for
        (its Format's evaluate hook; without a format, the PyTorch graph the ExecuTorch exporter lowers)."""
        evaluate = getattr(self.fmt, "evaluate", None) or _in_pytorch
        predict, self.evaluated_by[spec.name] = evaluate(model, spec, self.max_length, self.calibration)
        with torch.no_grad():
            logits = np.concatenate([np.asarray(predict(ids, mask), dtype=np.float32)
                                     for ids, mask in self.eval_inputs])
        return classification_metrics(logits, self.eval_labels, reference)

    def timing_input(self, dynamic: bool):
        """The (ids, mask) a candidate is timed on: the export's sample input (the parity sample's text of median
        token length), unpadded for a dynamic length, as the benchmark stage will time the exported artifact."""
        from edgekd.targets.export import PARITY_TEXTS

        texts = self.samples.split("validation", PARITY_TEXTS, "parity").texts
        encode = encode_unpadded if dynamic else encode_fixed
        return encode(self.tokenizer, [median_length_text(self.tokenizer, texts, self.max_length)], self.max_length)[0]

    def check_artifact(self, model, spec: QuantSpec, runner, dynamic: bool, name: str, reference=None) -> dict:
        """The export stage's gate on a search candidate's artifact, against the reference its exporter returned
        (raises GateError when it fails)."""
        from edgekd.targets.export import PARITY_TEXTS, check_artifact

        texts = self.samples.split("validation", PARITY_TEXTS, "parity").texts  # the export stage's parity texts
        fmt_name = f"{self.fmt.target}/{self.fmt.name}" if self.fmt else "this format"
        return check_artifact(model, spec, runner, self.tokenizer, texts, self.max_length, dynamic, name, reference,
                              fmt_name)

    def teacher_accuracy(self) -> float:
        """The teacher's accuracy on the same validation texts: what a budget is counted from."""
        from edgekd.distill.training import predict_logits

        texts = self.eval_split.texts
        logits = predict_logits(load_classifier(str(self.teacher_dir)), load_tokenizer(str(self.teacher_dir)),
                                texts, self.max_length)
        return classification_metrics(logits, self.eval_labels)["accuracy"]

    def pruned(self, spec: PruneSpec, checkpoints: Path | None = None):
        """The student with `spec` removed, then recovered by distillation from the teacher.

        With `checkpoints`, the recovery keeps a Trainer checkpoint there every epoch and resumes from
        the newest one a killed run left.
        """
        if self._scores is None:
            self._scores = importance(self.student, self._ranking_batches())
        model = prune(self.student, spec, self._scores)
        epochs = self.recipe.compress.recovery_epochs
        return self.distill_from_teacher(model, epochs, checkpoints) if epochs > 0 else model

    def _ranking_batches(self) -> list[dict]:
        from edgekd.distill.training import collator

        val = self.samples.split("validation", RANKING_TEXTS, "pruning")
        data = Encoded(self.tokenizer, val.texts, self.dataset.label_ids(val), self.max_length)
        pad = collator(self.tokenizer)
        rows = [{k: v for k, v in data[i].items() if k != "index"} for i in range(len(data))]
        return [pad(rows[i:i + 32]) for i in range(0, len(rows), 32)]

    def distill_from_teacher(self, model, epochs: float, checkpoints: Path | None = None):
        """A short distillation from the cached teacher logits (the distill stage's loss and settings):
        recovery after pruning, quantization-aware training. With `checkpoints`, resumable."""
        from edgekd.distill.cache import teacher_logits
        from edgekd.distill.trainer import DistillationTrainer
        from edgekd.distill.training import collator, last_checkpoint, quiet_progress, training_args
        from edgekd.manifest import stage_input

        cfg, texts = self.recipe.student, self.dataset.train.texts
        if self._soft is None:
            teacher_manifest, teacher_input = stage_input(self.teacher_dir, "finetune")
            teacher = load_classifier(str(self.teacher_dir)).eval()
            # At the teacher's own length: a student.model of another tokenizer has its own (distill.py).
            soft, _ = teacher_logits(teacher, load_tokenizer(str(self.teacher_dir)), texts,
                                     teacher_manifest["max_length"], teacher_input["sha256"],
                                     self.workdir.parent / ".cache")
            self._soft = torch.from_numpy(soft)
        train = Encoded(self.tokenizer, texts, self.dataset.label_ids(self.dataset.train), self.max_length)
        scratch = checkpoints or self.workdir / ".recovery"
        # One checkpoint (the newest) is enough to resume; the caller deletes it once the model is saved.
        saving = dict(save_strategy="epoch", save_total_limit=1) if checkpoints else dict(save_strategy="no")
        args = training_args(scratch, epochs=epochs, learning_rate=cfg.learning_rate,
                             batch_size=cfg.batch_size, seed=self.recipe.seed, eval_strategy="no", length_grouped=True,
                             load_best_model_at_end=False, disable_tqdm=True, **saving)
        torch.manual_seed(self.recipe.seed)
        trainer = DistillationTrainer(model=model, args=args, train_dataset=train, temperature=cfg.temperature,
                                      data_collator=collator(self.tokenizer), teacher_logits=self._soft,
                                      alpha=cfg.alpha)
        quiet_progress(trainer).train(resume_from_checkpoint=last_checkpoint(scratch) if checkpoints else None)
        if not checkpoints:
            shutil.rmtree(scratch, ignore_errors=True)
        return trainer.model.cpu().eval()  # quantization and export run on the CPU, wherever training ran
