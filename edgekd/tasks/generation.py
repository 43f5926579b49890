"""The text-generation task: a decoder LM (Llama, Qwen2/Qwen3, SmolLM) made phone-sized.

    RUN/finetune   the teacher fine-tuned on prompt/completion records (full, or LoRA merged back)
    RUN/distill    the student: cut by depth and pruned by width from the teacher by measured importance
                   (compress/lm_prune.py, Minitron), then distilled on the teacher's cached top-k logits
    RUN/compress   with compress.budget only: the budget search, each compress.quant spec of the student scored
                   on the validation records, the first within the budget chosen
    RUN/export/V   teacher fp32 for the first target, the student per compress.quant for every target, one
                   maker per format (ARTIFACT_MAKERS): android/executorch a .pte with a static KV cache for
                   XNNPACK (int4: 8da4w), android/litert a LiteRT-LM .litertlm, ios/coreml a stateful iOS 18
                   ML Program; each gated against its own reference in its own runtime (Core ML: off a Mac, its
                   torch wrapper proven and the package checked structurally)
    RUN/bench      TTFT, prefill and decode tokens/s of every .pte and .litertlm, and PyTorch eager fp32 of the
                   student and the teacher, interleaved in one run
    RUN/report.*   size, speed, perplexity and task accuracy of teacher and students side by side

Each stage writes a manifest (edgekd/manifest.py) and skips itself on a rerun with the same key, like the
classifier's chain; RUN/plan.json lists the variants and each one's outcome.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from edgekd.errors import DataError, GateError, StageError
from edgekd.pipeline import export_variants, exported, raise_if_failed, timed
from edgekd.tasks.generation_recipe import GenerationRecipe

RECIPE = GenerationRecipe
DEMO_RECIPE = "demo-generation.yaml"
KD_KINDS = {"forward-kl": "forward", "reverse-kl": "reverse", "skew-kl": "skew", "skew-reverse-kl": "skew_reverse"}
ANSWER_TOKENS = 4       # greedy tokens a task-accuracy answer may take (the label word and an eos)
EXPORT_WORKERS = 2  # exports of one run at a time, each in a process of its own (see run)
PARITY_NEW_TOKENS = 16  # tokens each parity prompt decodes through the .pte's cache


@dataclass
class LMDataset:
    """The recipe's records, split (classification rows phrased as prompts carry their label), and the
    unlabelled prompts (data.unlabeled: completion "") the teacher completes for distillation."""
    train: list
    validation: list
    test: list
    unlabeled: list = field(default_factory=list)

    def fingerprint(self) -> dict:
        """The labelled splits' digest: what the teacher is trained and every model is scored on."""
        digest = hashlib.sha256()
        for split in (self.train, self.validation, self.test):
            digest.update(json.dumps([[r.prompt, r.completion, r.label] for r in split]).encode())
        return {"sha256": digest.hexdigest(), "rows": [len(self.train), len(self.validation), len(self.test)]}

    def transfer_fingerprint(self) -> dict:
        """The unlabelled prompts' digest: what the distill stage adds to fingerprint()'s."""
        digest = hashlib.sha256(json.dumps([r.prompt for r in self.unlabeled]).encode())
        return {"sha256": digest.hexdigest(), "unlabeled": len(self.unlabeled)}


def load_records(recipe: GenerationRecipe) -> LMDataset:
    """Read every split (validation/test split off the training file, seeded, when not given); one line on bad data."""
    from edgekd.data import read_split, resolve_path, stratified_split
    from edgekd.lm_data import from_classification, read_prompt_completion, read_text
    from edgekd.recipe import DataConfig
    from edgekd.sample import stratified_sample

    cfg = recipe.data

    def read(value: str) -> list:
        path = resolve_path(value, recipe)
        if cfg.records == "prompt-completion":
            return read_prompt_completion(path, cfg.prompt_column, cfg.completion_column, cfg.encoding, cfg.format)
        if cfg.records == "text":
            return read_text(path, cfg.text_column, cfg.encoding, cfg.format)
        split = read_split(path, DataConfig(text_column=cfg.text_column, label_column=cfg.label_column,
                                            encoding=cfg.encoding, format=cfg.format))
        return from_classification(split, cfg.prompt_template, path.name)

    train = read(cfg.train)
    val_frac, test_frac = cfg.split_fractions
    # Unlabelled records split by a seeded order too: `label` None puts them all in one stratum.
    def split_off(records: list, fraction: float, seed: int) -> tuple[list, list]:
        from edgekd.data import Split
        whole = Split(list(range(len(records))), [str(r.label) for r in records])
        kept, taken = stratified_split(whole, fraction, seed)
        return [records[i] for i in kept.texts], [records[i] for i in taken.texts]

    test = read(cfg.test) if cfg.test else None
    if test is None:
        train, test = split_off(train, test_frac, recipe.seed)
    validation = read(cfg.validation) if cfg.validation else None
    if validation is None:
        train, validation = split_off(train, val_frac / (1 - test_frac), recipe.seed + 1)
    def sample(records: list, size: int | None, purpose: str) -> list:
        if size is None or len(records) <= size:
            return records
        return [records[i] for i in sorted(stratified_sample([str(r.label) for r in records], size, recipe.seed,
                                                              purpose))]

    train = sample(train, cfg.max_train, "max_train")
    # Prompts the student is trained or scored on are not unlabelled ones: the evaluation splits are dropped whole
    # (held out), so a file that also holds them (e.g. the training file itself, its labels unused) is safe.
    unlabeled = (_unlabeled_prompts(recipe, {r.prompt for r in train + validation + test}) if cfg.unlabeled
                 else [])
    validation, test = sample(validation, cfg.max_eval, "max_eval"), sample(test, cfg.max_eval, "max_eval-test")
    for name, split in (("validation", validation), ("test", test)):
        if not split:
            raise DataError(f"the {name} split is empty; give more rows or a separate {name} file")
    return LMDataset(train, validation, test, unlabeled)


def _unlabeled_prompts(recipe: GenerationRecipe, taken: set[str]) -> list:
    """data.unlabeled as prompt-only records: each distinct prompt not in `taken`, a seeded sample of
    data.max_unlabeled of them where set; one DataError line for a bad file or one with nothing new."""
    from edgekd.data import read_texts, resolve_path
    from edgekd.lm_data import Record, read_column
    from edgekd.recipe import DataConfig
    from edgekd.sample import stratified_sample

    cfg = recipe.data
    path = resolve_path(cfg.unlabeled, recipe)
    if cfg.records == "classification":
        texts = read_texts(path, DataConfig(text_column=cfg.text_column, encoding=cfg.encoding, format=cfg.format))
        prompts = [cfg.prompt_template.replace("{text}", text) for text in texts]
    else:
        prompts = read_column(path, cfg.prompt_column, cfg.encoding, cfg.format)
    fresh = list(dict.fromkeys(p for p in prompts if p.strip() and p not in taken))
    if not fresh:
        raise DataError(f"data.unlabeled {path}: none of its {len(prompts)} prompts is new (each is empty or already "
                        f"a training, validation or test prompt); give domain text the splits do not hold")
    if cfg.max_unlabeled is not None and len(fresh) > cfg.max_unlabeled:
        picked = stratified_sample([""] * len(fresh), cfg.max_unlabeled, recipe.seed, "max_unlabeled")
        fresh = [fresh[i] for i in sorted(picked)]
    return [Record(prompt, "", where=f"{path.name}, unlabeled {i + 1}") for i, prompt in enumerate(fresh)]


def _evaluate(model, tokenizer, records: list, max_length: int, teacher=None) -> dict:
    """Perplexity on the completions of `records`, task accuracy where they are labelled, agreement with `teacher`:
    one teacher-forced pass of each model (edgekd.lm_metrics.score_records)."""
    from edgekd.lm_metrics import score_records

    metrics = score_records(model, tokenizer, records, max_length, teacher, ANSWER_TOKENS)
    if "task_accuracy" in metrics:
        metrics["task_accuracy"] = {k: v for k, v in metrics["task_accuracy"].items() if k != "answers"}
    return metrics


def _move_into(folder: Path, stage_path: Path) -> None:
    for file in Path(folder).iterdir():
        shutil.move(str(file), stage_path / file.name)
    Path(folder).rmdir()


def finetune(recipe: GenerationRecipe, data: LMDataset, out: Path) -> dict:
    """The teacher fine-tuned on the training records (teacher.epochs 0: as it is), with its metrics."""
    from edgekd.distill.lm_finetune import LoraSettings, finetune_lm
    from edgekd.manifest import is_done, read_manifest, write_stage
    from edgekd.models import copy_licenses, count_parameters, load_causal_lm, load_tokenizer, model_fingerprint

    cfg = recipe.teacher
    params = {"teacher": {k: v for k, v in cfg.__dict__.items() if k != "allow_pickle"},
              "max_length": recipe.data.max_length, "seed": recipe.seed}
    inputs = {"model": model_fingerprint(cfg.model, cfg.allow_pickle), "data": data.fingerprint()}
    if is_done(out, "finetune", params, inputs):
        return read_manifest(out)["metrics"]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.allow_pickle)
    model = load_causal_lm(cfg.model, cfg.trust_remote_code, cfg.allow_pickle)
    with write_stage(out, "finetune", params, inputs) as stage:
        if cfg.epochs > 0:
            work = out.parent / f".{out.name}.work"  # outside the stage's temporary folder: checkpoints survive
            shutil.rmtree(work, ignore_errors=True)
            lora = LoraSettings(r=cfg.lora_rank, alpha=2.0 * cfg.lora_rank) if cfg.lora_rank else None  # alpha 2r
            stage.extra["training"] = finetune_lm(
                model, tokenizer, data.train, data.validation, work, epochs=cfg.epochs,
                learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=recipe.seed, lora=lora,
                max_length=recipe.data.max_length)
            _move_into(work, stage.path)
            model = load_causal_lm(str(stage.path))
        else:
            model.save_pretrained(stage.path)
            tokenizer.save_pretrained(stage.path)
        copy_licenses(cfg.model, stage.path)
        stage.metrics = {split: _evaluate(model, tokenizer, getattr(data, split), recipe.data.max_length)
                         for split in ("validation", "test")}
        stage.metrics["params"] = count_parameters(model)
        stage.extra["max_length"] = recipe.data.max_length
    return stage.metrics


def _calibration(recipe: GenerationRecipe, data: LMDataset, tokenizer) -> list[dict]:
    """Batches of a seeded, stratified sample of training records: what pruning measures importance on."""
    from edgekd.lm_data import Collator, batches, encode
    from edgekd.sample import stratified_sample

    cfg = recipe.student
    picked = stratified_sample([str(r.label) for r in data.train], cfg.calibration, recipe.seed, "lm-calibration")
    rows = encode(tokenizer, [data.train[i] for i in sorted(picked)], recipe.data.max_length)
    return list(batches(rows, Collator(tokenizer), cfg.batch_size))


def distill(recipe: GenerationRecipe, data: LMDataset, teacher_dir: Path, out: Path, cache_dir: Path) -> dict:
    """The student: cut and pruned from the teacher by measured importance (or, student.init fresh, a random init
    of that shape), then distilled from it."""
    from edgekd.architecture import family_of
    from edgekd.compress.lm_prune import prune_decoder
    from edgekd.distill.lm_distill import StateMatch, distill_lm
    from edgekd.distill.student import fresh_decoder, uniform_layers
    from edgekd.lm_data import encode
    from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
    from edgekd.models import count_parameters, load_causal_lm, load_tokenizer

    cfg = recipe.student
    params = {"student": dict(cfg.__dict__), "max_length": recipe.data.max_length, "seed": recipe.seed}
    _, teacher_entry = stage_input(teacher_dir, "finetune")
    inputs = {"teacher": teacher_entry, "data": data.fingerprint()}
    if data.unlabeled:  # only then: a run without data.unlabeled keeps its stage keys
        inputs["transfer"] = data.transfer_fingerprint()
    if is_done(out, "distill", params, inputs):
        return read_manifest(out)["metrics"]
    tokenizer = load_tokenizer(str(teacher_dir))
    teacher = load_causal_lm(str(teacher_dir))
    with write_stage(out, "distill", params, inputs) as stage:
        shape = dict(layers=cfg.layers, ffn_fraction=1 - cfg.ffn if cfg.ffn else None, kv_groups=cfg.kv_groups,
                     heads=cfg.heads, hidden_fraction=1 - cfg.hidden if cfg.hidden else None)
        total = family_of(teacher).num_layers(teacher.config)
        if cfg.init == "fresh":   # no layer of the teacher's: its hidden states are matched evenly spread
            student, plan = fresh_decoder(teacher, **shape, seed=recipe.seed)
            layers = uniform_layers(total, cfg.layers)
        else:
            student, plan = prune_decoder(teacher, _calibration(recipe, data, tokenizer), **shape,
                                          layer_method=cfg.layer_importance)
            layers = plan.get("layers", {}).get("kept") or list(range(total))
        states = (StateMatch(layers, cfg.state_weight, plan.get("hidden", {}).get("channels"))
                  if cfg.state_weight else None)
        work = out.parent / f".{out.name}.work"  # outside the stage's temporary folder: checkpoints survive
        shutil.rmtree(work, ignore_errors=True)
        length = recipe.data.max_length
        train = data.train
        if data.unlabeled:
            # As many new tokens as the longest labelled completion and its eos.
            longest = max(len(tokenizer(r.completion, add_special_tokens=False)["input_ids"]) for r in train) + 1
            completed, too_long = _teacher_completed(data, teacher, tokenizer, longest, length,
                                                     teacher_entry["sha256"], cache_dir, cfg.batch_size)
            train = train + completed
            stage.extra["transfer_set"] = {"labelled": len(data.train), "unlabeled": len(data.unlabeled),
                                           "teacher_completed": len(completed), "too_long": too_long,
                                           "max_new_tokens": longest}
        stage.extra["training"] = distill_lm(
            student, teacher, tokenizer, encode(tokenizer, train, length),
            encode(tokenizer, data.validation, length), work, kind=KD_KINDS[cfg.loss], temperature=cfg.temperature,
            alpha=cfg.alpha, k=cfg.top_k, epochs=cfg.epochs, lr=cfg.learning_rate, batch_size=cfg.batch_size,
            seed=recipe.seed, cache_dir=cache_dir, teacher_digest=teacher_entry["sha256"], kd_tokens=cfg.kd_tokens,
            states=states)
        _move_into(work, stage.path)
        student = load_causal_lm(str(stage.path))
        for name in ("LICENSE", "NOTICE"):
            if (Path(teacher_dir) / name).is_file():
                shutil.copyfile(Path(teacher_dir) / name, stage.path / name)
        stage.metrics = {split: _evaluate(student, tokenizer, getattr(data, split), length, teacher)
                         for split in ("validation", "test")}
        stage.metrics["params"] = count_parameters(student)
        stage.extra.update({"plan": plan, "max_length": length})
    return stage.metrics


def _teacher_completed(data: LMDataset, teacher, tokenizer, max_new_tokens: int, max_length: int, digest: str,
                       cache_dir: Path, batch_size: int) -> tuple[list, int]:
    """The unlabelled prompts with the teacher's greedy completions (sequence-level KD's targets; the KD term
    adds its top-k there), and how many prompts left no room in max_length for a completion (left out, like a
    prompt the teacher answers with nothing: unlabelled text is a supplement, not data a run must fit)."""
    from dataclasses import replace

    from edgekd.distill.lm_cache import teacher_completions
    from edgekd.lm_data import prompt_ids

    fits = [r for r in data.unlabeled if len(prompt_ids(tokenizer, r.prompt)) + max_new_tokens <= max_length]
    answers = teacher_completions(teacher, tokenizer, [r.prompt for r in fits], max_new_tokens, digest, cache_dir,
                                  batch_size)
    completed = [replace(r, completion=answer) for r, answer in zip(fits, answers) if answer.strip()]
    return completed, len(data.unlabeled) - len(fits)


def _figure(metrics: dict, metric: str) -> float:
    """A split's budget figure: its perplexity, or its task accuracy in points."""
    return metrics["perplexity"]["perplexity"] if metric == "perplexity" else 100 * metrics["task_accuracy"]["accuracy"]


def _quantized_reference(target: str):
    """(model, spec) -> the model quantized as `target`'s export quantizes it, in PyTorch (its export's reference)."""
    if target == "android/litert":
        from edgekd.targets.llm_litert import litert_reference
        return litert_reference
    if target == "ios/coreml":
        from edgekd.targets.llm_coreml import coreml_reference
        return coreml_reference
    from edgekd.targets.llm_executorch import quantize_decoder
    return quantize_decoder


def choose_quant(recipe: GenerationRecipe, data: LMDataset, teacher_dir: Path, student_dir: Path, out: Path) -> dict:
    """The budget search: every compress.quant spec of the distilled student, quantized as each target's export
    quantizes it (its reference in PyTorch, which the artifact matches within its export gate: torchao's for a .pte,
    ai-edge-quantizer's grid for a .litertlm, Core ML's for a package), scored on the validation records against
    the teacher's (or the fp32 student's) figure there, the worst target's figure counting; the first spec in the
    listed order (most compressed first) within compress.budget is the one chosen. None within it: one line with
    every figure."""
    from edgekd.compress.quant import get_spec
    from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
    from edgekd.models import load_causal_lm, load_tokenizer

    cfg = recipe.compress
    params = {"quant": cfg.quant, "budget": cfg.budget, "budget_metric": cfg.budget_metric,
              "budget_from": cfg.budget_from, "max_length": recipe.data.max_length}
    targets = [f"{t.target}/{t.format}" for t in recipe.targets]
    if targets != ["android/executorch"]:  # only then: a .pte-only recipe keeps its stage key
        params["targets"] = targets
    _, teacher = stage_input(teacher_dir, "finetune")
    _, student = stage_input(student_dir, "distill")
    inputs = {"teacher": teacher, "student": student, "data": data.fingerprint()}
    if is_done(out, "compress", params, inputs):
        return read_manifest(out)["metrics"]
    baseline_dir = teacher_dir if cfg.budget_from == "teacher" else student_dir
    baseline = _figure(read_manifest(baseline_dir)["metrics"]["validation"], cfg.budget_metric)
    unit = "%" if cfg.budget_metric == "perplexity" else " points"
    tokenizer, model = load_tokenizer(str(student_dir)), load_causal_lm(str(student_dir))
    candidates = []
    # what a figure costs against the baseline: percent of perplexity above it, or accuracy points below it
    cost_of = (lambda f: 100 * (f / baseline - 1)) if cfg.budget_metric == "perplexity" else (lambda f: baseline - f)
    for name in cfg.quant:
        by_target = {target: _figure(_evaluate(_quantized_reference(target)(model, get_spec(name)), tokenizer,
                                               data.validation, recipe.data.max_length), cfg.budget_metric)
                     for target in targets}
        worst = max(by_target, key=lambda target: cost_of(by_target[target]))
        cost = cost_of(by_target[worst])
        candidates.append({"quant": name, cfg.budget_metric: by_target[worst], "cost": cost,
                           "within": cost <= cfg.budget, "worst_target": worst,
                           "by_target": {t: {cfg.budget_metric: f, "cost": cost_of(f)} for t, f in by_target.items()}})
    chosen = next((c["quant"] for c in candidates if c["within"]), None)
    if chosen is None:
        tried = ", ".join(f"{c['quant']} {c['cost']:+.1f}{unit}" for c in candidates)
        raise StageError(f"no compress.quant spec stays within {cfg.budget:g}{unit} of the {cfg.budget_from}'s "
                         f"validation {cfg.budget_metric} ({baseline:.4g}): {tried}; raise compress.budget, list a "
                         f"lighter spec (int8) or distill a larger student (student.layers)")
    with write_stage(out, "compress", params, inputs) as stage:
        stage.metrics = {"chosen": chosen, "baseline": {"from": cfg.budget_from, cfg.budget_metric: baseline},
                         "budget": cfg.budget, "metric": cfg.budget_metric, "candidates": candidates}
    return stage.metrics


def parity_prompts(data: LMDataset, tokenizer, count: int, seed: int) -> list[list[int]]:
    """The export gate's prompts: `count` validation records, seeded and stratified by label, as token ids."""
    from edgekd.lm_data import prompt_ids
    from edgekd.sample import stratified_sample

    picked = stratified_sample([str(r.label) for r in data.validation], count, seed, "parity")
    return [prompt_ids(tokenizer, data.validation[i].prompt) for i in sorted(picked)]


def export(recipe: GenerationRecipe, data: LMDataset, model_dir: Path, source_stage: str, spec_name: str,
           out: Path, role: str, model_name: str, target: str = "android/executorch") -> dict:
    """One artifact for `target` (platform/format), gated against its own reference (fp32: the model; quantized:
    the model quantized as that format quantizes it, in PyTorch) on seeded validation prompts, or checked as the
    format allows off its device (ios/coreml); a failure writes nothing (GateError)."""
    from edgekd.compress.quant import get_spec
    from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
    from edgekd.models import count_parameters, load_causal_lm, load_tokenizer
    from edgekd.tasks.generation_recipe import DECODER_TARGETS

    spec = get_spec(spec_name)
    platform, _, fmt = target.partition("/")
    export_format = DECODER_TARGETS[(platform, fmt)]
    params = {"target": platform, "format": export_format, "quant": spec.to_dict(), "role": role,
              "max_seq_len": recipe.max_seq_len, "model_name": model_name, "parity_prompts": recipe.bench.prompts}
    if export_format == "litert-lm":  # its prefill signatures are fixed lengths: the bench's
        params["prefill_lengths"] = recipe.bench.prompt_lengths
    _, source = stage_input(model_dir, source_stage)
    inputs = {"model": source, "data": data.fingerprint()}
    if is_done(out, "export", params, inputs):
        return read_manifest(out)["metrics"]
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    prompts = parity_prompts(data, tokenizer, recipe.bench.prompts, recipe.seed)
    with write_stage(out, "export", params, inputs) as stage:
        made = ARTIFACT_MAKERS[export_format](recipe, model, tokenizer, Path(model_dir), spec, stage.path,
                                              model_name, prompts)
        # Quality of what ships: the model in PyTorch is what the artifact computes, within the gate; an fp32
        # artifact's is its source stage's (the same model on the same records), a quantized one's is measured here.
        source_quality = read_manifest(model_dir)["metrics"]["test"]
        quality = (source_quality if made.reference is model else
                   _evaluate(made.reference, tokenizer, data.test, recipe.data.max_length))
        stage.metrics = {"test": quality, "parity": made.parity, "params": count_parameters(model), **made.metrics}
        if made.reference is not model:  # what quantization cost: the same test records before and after
            stage.metrics["float_test_perplexity"] = source_quality["perplexity"]["perplexity"]
        for name in ("LICENSE", "NOTICE"):
            if (Path(model_dir) / name).is_file():
                shutil.copyfile(Path(model_dir) / name, stage.path / name)
        stage.extra.update({"artifact": made.artifact, "size_bytes": made.size_bytes, "role": role,
                            "quant": spec.to_dict(), "max_seq_len": recipe.max_seq_len, **made.extra})
    return stage.metrics


@dataclass
class MadeArtifact:
    """What a format's maker leaves in the stage folder: the artifact's name and size, the model its quality is
    measured on (`reference`: the model itself where the artifact computes it exactly), the gate's figures."""
    artifact: str
    size_bytes: int
    reference: object
    parity: dict
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _gate_failed(artifact: str, parity: dict) -> GateError:
    return GateError(f"{artifact} fails its export gate against its own reference ({parity['rule']}): top-1 "
                     f"{parity['teacher_forced_agreement']:.1%}, worst logit difference "
                     f"{parity['worst_logit_diff']:.3g}; nothing written")


def _eos_ids(model, tokenizer) -> set[int]:
    """Where generation stops: the tokenizer's eos and the generation config's."""
    from edgekd.lm_data import eos_id

    configured = model.generation_config.eos_token_id
    return {eos_id(tokenizer), *([] if configured is None else
                                 [configured] if isinstance(configured, int) else configured)}


def make_executorch(recipe, model, tokenizer, model_dir: Path, spec, folder: Path, model_name: str,
                    prompts) -> MadeArtifact:
    """A .pte with a static KV cache for XNNPACK (8da4w for int4), gated in the ExecuTorch runtime."""
    from edgekd.targets.llm_executorch import SIGNATURE, DecoderRunner, decoder_parity, export_decoder

    artifact = f"{model_name}_xnnpack_{spec.name.replace('-', '')}.pte"
    details = export_decoder(model, folder / artifact, spec, recipe.max_seq_len, tokenizer)
    reference = details.pop("reference", model)
    runner = DecoderRunner(folder / artifact, recipe.bench.threads)
    parity = decoder_parity(runner, reference, prompts, PARITY_NEW_TOKENS,
                            float_model=None if spec.is_float else model)
    if not parity["passed"]:
        raise _gate_failed(artifact, parity)
    return MadeArtifact(
        artifact, details["size_bytes"], reference, {k: v for k, v in parity.items() if k != "per_prompt"},
        metrics={"load_ms": runner.load_ms},
        extra={"signature": SIGNATURE, "metadata": details["metadata"],
               "delegation": {k: details[k] for k in ("backend", "delegated_nodes", "non_delegated_nodes",
                                                      "delegate_calls", "non_delegated_ops")},
               "companions": details["companions"], "export_phases_s": details["phases_s"],
               "model_inputs": SIGNATURE["inputs"], "runtime": DecoderRunner.versions()})


def make_litert(recipe, model, tokenizer, model_dir: Path, spec, folder: Path, model_name: str,
                prompts) -> MadeArtifact:
    """A .litertlm (litert-torch's export, ai-edge-quantizer's recipe): its .tflite gated in LiteRT's interpreter
    against its own reference, then the bundle itself in LiteRT-LM (start token and tokenizer ids, greedy text)."""
    import tempfile

    from edgekd.targets.llm_executorch import decoder_parity
    from edgekd.targets.llm_litert import (
        LiteRTDecoderRunner,
        LiteRTLMRunner,
        export_litert_decoder,
        litert_lm_check,
        litert_reference,
    )

    artifact = f"{model_name}_litert_{spec.name.replace('-', '')}.litertlm"
    threads = recipe.bench.threads
    with tempfile.TemporaryDirectory(prefix="edgekd-litert-") as work:  # the gate's .tflite: not shipped twice
        details = export_litert_decoder(model_dir, folder / artifact, spec, recipe.max_seq_len,
                                        recipe.bench.prompt_lengths, Path(work))
        reference = litert_reference(model, spec) if not spec.is_float else model
        litert = LiteRTDecoderRunner(Path(details.pop("tflite")), _eos_ids(model, tokenizer), threads)
        parity = decoder_parity(litert, reference, prompts, PARITY_NEW_TOKENS,
                                float_model=None if spec.is_float else model)
        if not parity["passed"]:
            raise _gate_failed(artifact, parity)
        engine = LiteRTLMRunner(folder / artifact, threads, recipe.max_seq_len)
        check = litert_lm_check(engine, litert, tokenizer, prompts, PARITY_NEW_TOKENS)
    if not check["passed"]:
        raise GateError(f"{artifact} in LiteRT-LM differs from its own .tflite in LiteRT ({check['rule']}): "
                        f"{check['tokens_equal']} of {check['prompts']} prompts tokenized alike, "
                        f"{check['decisive_forks']} greedy texts forked where LiteRT's choice is decisive; nothing "
                        f"written")
    parity = {k: v for k, v in parity.items() if k != "per_prompt"}
    parity["litert_lm"] = {k: v for k, v in check.items() if k != "per_prompt"}
    return MadeArtifact(artifact, details["size_bytes"], reference, parity,
                        metrics={"load_ms": engine.load_ms},
                        extra={"litert": {k: details[k] for k in ("recipe", "prefill_lengths", "tflite_size_bytes",
                                                                   "export_s")},
                               "eos_ids": sorted(engine.eos_ids), "stop_sequences": engine.stop_sequences,
                               "start_token_id": engine.bos_id,
                               "runtime": {**LiteRTDecoderRunner.versions(), **LiteRTLMRunner.versions()}})


def make_coreml(recipe, model, tokenizer, model_dir: Path, spec, folder: Path, model_name: str,
                prompts) -> MadeArtifact:
    """A stateful ML Program for iOS 18 (the KV cache as Core ML state, float16 compute, weights compressed per
    spec). Core ML runs on macOS and iOS only: here its torch wrapper and exported graph are proven against the
    model, the package checked structurally; its quality is that of coreml_reference, an estimate."""
    from edgekd.targets.llm_coreml import WRAPPER_TOLERANCE, coreml_reference, export_coreml_decoder

    artifact = f"{model_name}_coreml_{spec.name.replace('-', '')}.mlpackage"
    details = export_coreml_decoder(model, folder / artifact, spec, recipe.max_seq_len)
    wrapper, exported, check = details["wrapper_parity"], details["exported_parity"], details["check"]
    parity = {"passed": wrapper["passed"] and exported["passed"] and check["passed"],
              "rule": "the stateful torch wrapper and its exported graph against the model (fp32, logits within "
                      "1e-4 x (1 + max |logit|)); the saved package checked structurally (states, inputs, outputs, "
                      "weight storage, iOS 18); run on a Mac with coreml_decoder_parity",
              "worst_logit_diff": max(wrapper["worst_logit_diff"], exported["worst_logit_diff"]),
              "logit_tolerance": WRAPPER_TOLERANCE, "structural": check["checks"],
              "numeric_on_device": "not run here (Core ML runs on macOS and iOS)"}
    return MadeArtifact(artifact, details["size_bytes"], coreml_reference(model, spec), parity,
                        metrics={"quality_is": "an estimate: the model with the package's weights in PyTorch"},
                        extra={"coreml": {k: details[k] for k in ("deployment_target", "compute_precision", "quant",
                                                                   "inputs", "states", "outputs", "weights",
                                                                   "phases_s", "export_s")},
                               "runtime": {"coremltools": _version("coremltools")}})


def _version(package: str) -> str | None:
    from importlib import metadata
    return metadata.version(package)


ARTIFACT_MAKERS = {"executorch-llm": make_executorch, "litert-lm": make_litert, "coreml-llm": make_coreml}


def bench(recipe: GenerationRecipe, exports: list[Path], eager: dict[str, Path], out: Path) -> dict:
    """Every exported .pte and PyTorch eager fp32 of each model (`eager`: model label -> HF folder), interleaved."""
    from edgekd.benchmarks.llm import DecoderExport, DecoderVariant, bench_decoders
    from edgekd.manifest import is_done, read_manifest, stage_input, write_stage

    cfg = recipe.bench
    variants, inputs = [], {}
    for path in exports:
        manifest, inputs[path.name] = stage_input(path, "export")
        if DecoderExport(path, manifest).runtime:  # a Core ML package runs on a Mac or an iPhone only
            variants.append(DecoderExport(path, manifest).variant())
    for model, folder in eager.items():
        _, inputs[f"{model}-eager"] = stage_input(folder, "finetune" if model == "teacher" else "distill")
        variants.append(DecoderVariant(f"{model}-fp32-eager", str(folder), "torch", model=model))
    params = {"prompt_lengths": cfg.prompt_lengths, "new_tokens": cfg.new_tokens, "rounds": cfg.rounds,
              "threads": cfg.threads, "seed": recipe.seed}
    if is_done(out, "bench", params, inputs):
        return read_manifest(out)["metrics"]
    with write_stage(out, "bench", params, inputs) as stage:
        stage.metrics = bench_decoders(variants, cfg.prompt_lengths, cfg.new_tokens, cfg.rounds, cfg.threads,
                                       seed=recipe.seed)
    return stage.metrics


def preflight(recipe: GenerationRecipe) -> None:
    """The recipe against the teacher's config, before any training: a decoder this chain exports, a student
    depth it has, a context that holds max_seq_len, quant specs its export realizes; one RecipeError line each."""
    from transformers import AutoConfig

    from edgekd.architecture import family_of
    from edgekd.compress.lm_prune import check_shape, kept_neurons
    from edgekd.compress.quant import check_groups, get_spec
    from edgekd.errors import EdgeKDError, RecipeError
    from edgekd.models import BUILTIN_LLM, _gguf_kwargs, resolve_model
    from edgekd.targets.llm_executorch import DECODER_TYPES

    cfg = recipe.teacher
    source, kwargs = (_gguf_kwargs(cfg.model) if cfg.model == BUILTIN_LLM
                      else (resolve_model(cfg.model, cfg.allow_pickle), {}))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"teacher.model {cfg.model}: cannot read its config ({str(exc).splitlines()[0][:200]}); "
                          f"give a Hugging Face model folder or hub id") from None
    if config.model_type not in DECODER_TYPES:
        raise RecipeError(f"teacher.model {cfg.model} is a {config.model_type!r} model; a text-generation recipe takes "
                          f"a decoder LM of model type {', '.join(DECODER_TYPES)}")
    layers = config.num_hidden_layers
    if recipe.student.layers > layers:
        raise RecipeError(f"student.layers {recipe.student.layers}: the teacher has {layers} layers; choose 1 to "
                          f"{layers} (fewer make the student smaller and faster)")
    context = getattr(config, "max_position_embeddings", None)
    if context and recipe.max_seq_len > context:
        raise RecipeError(f"max_seq_len {recipe.max_seq_len} is longer than the teacher's context of {context} "
                          f"tokens; set max_seq_len (and data.max_length) to at most {context}")
    student = recipe.student
    try:  # a width the pruning cannot cut (heads that break grouped KV heads, a family without its norms mapped)
        _, heads = check_shape(config, None, None, student.kv_groups, student.heads,
                               1 - student.hidden if student.hidden else None)
    except EdgeKDError as exc:
        raise RecipeError(f"student: {exc}") from None
    # Every spec the student may be exported in, against the widths its Linear layers will have after pruning: a
    # group size that does not divide one would stop the export after the training.
    family = family_of(config)
    head_dim = family.head_dim(config)
    hidden, mlp = getattr(config, family.hidden_field), getattr(config, family.ffn_field)
    widths = {kept_neurons(hidden, 1 - student.hidden) if student.hidden else hidden, heads * head_dim,
              kept_neurons(mlp, 1 - student.ffn) if student.ffn else mlp}
    for target in recipe.targets:
        realizable = SPEC_CHECKS[(target.target, target.format)]()
        for name in recipe.compress.quant:
            try:
                spec = get_spec(name)
                realizable(spec)
                check_groups(spec, widths)
            except EdgeKDError as exc:
                raise RecipeError(f"compress.quant {name} on {target.target}/{target.format}: {exc}") from None


def _installed(target: str, modules: tuple[str, ...], extra: str) -> None:
    """One RecipeError line before any training when a target's exporter or runtime is not installed."""
    from edgekd.errors import RecipeError, install_command
    from edgekd.targets import _importable

    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise RecipeError(f"targets {target} needs {', '.join(missing)}, which is not installed; run "
                          f"`{install_command(extra)}`")


def _executorch_spec_check():
    _installed("android/executorch", ("executorch",), "android")
    from edgekd.targets.llm_executorch import check_decoder_spec
    return check_decoder_spec


def _litert_spec_check():
    _installed("android/litert", ("litert_torch", "ai_edge_quantizer", "tensorflow", "litert_lm"), "litert")
    from edgekd.targets.llm_litert import litert_recipe
    return litert_recipe


def _coreml_spec_check():
    _installed("ios/coreml", ("coremltools",), "ios")
    from edgekd.targets.llm_coreml import coreml_decoder_quant
    return coreml_decoder_quant


# (target, format) -> the check that a QuantSpec is one its export realizes (one EdgeKDError line if not), once
# the target's packages are found installed; imported when asked, so a recipe needs only its own targets' packages
SPEC_CHECKS = {("android", "executorch"): _executorch_spec_check, ("android", "litert"): _litert_spec_check,
               ("ios", "coreml"): _coreml_spec_check}


def run(recipe: GenerationRecipe, out: Path) -> dict:
    """fine-tune -> distill (prune + KD) -> export every variant -> bench -> report, into `out`."""
    from edgekd.manifest import claim_run_dir
    from edgekd.tasks.generation_report import write_report

    preflight(recipe)  # unknown or unexportable quant specs too: one line, before any training
    data = load_records(recipe)
    claim_run_dir(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    timed("finetune", finetune, recipe, data, out / "finetune")
    timed("distill", distill, recipe, data, out / "finetune", out / "distill", out / ".cache")
    quants = recipe.compress.quant
    if recipe.compress.budget is not None:
        quants = [timed("compress", choose_quant, recipe, data, out / "finetune", out / "distill",
                        out / "compress")["chosen"]]
    # The teacher's fp32 export on the first target is what the students are measured against; the student is
    # exported per compress.quant on every target, fp32 only where it is listed (a 135M export is minutes; PyTorch
    # eager fp32 of the student is benched beside it either way).
    targets = [f"{t.target}/{t.format}" for t in recipe.targets]
    plan = [("teacher-fp32", "finetune", "fp32", "teacher", targets[0])]
    plan += [(f"student-{q}", "distill", q, "student" if q == "fp32" else "compressed", target)
             for target in targets for q in quants]
    # Two exports at once, each in its own process: ExecuTorch's lowering of a decoder is single-threaded Python
    # (80 % of an export), so one export leaves a second core idle for most of its time (the demo's two: 392 s
    # side by side, 449 + 290 s one after the other). Not more: each process holds its model and the program.
    outcomes = export_variants(out, {
        f"{name}-{target.replace('/', '-')}": partial(
            export, recipe, data, out / source, source, quant, out / "export" / f"{name}-{target.replace('/', '-')}",
            role, f"{recipe.name}-{'teacher' if role == 'teacher' else 'student'}", target)
        for name, source, quant, role, target in plan}, workers=EXPORT_WORKERS)
    exports = exported(out, outcomes)
    if exports:
        timed("bench", bench, recipe, exports, {"teacher": out / "finetune", "student": out / "distill"},
              out / "bench")
    summary = write_report(out)
    raise_if_failed(outcomes, out / "report.md")
    return summary
