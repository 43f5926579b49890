"""The pre-flight: the whole recipe checked against the models' config.json and tokenizer files before any
training, every problem on its own line (`RecipeProblems`), so a run cannot stop hours in on a setting
that could have been read at the start. No weights are loaded: an architecture question (is there a
value projection?) is answered by a model built on the meta device, which allocates nothing.

    edgekd run / demo / finetune / distill / compress -> preflight(recipe, ...) -> the variant plan
"""
from __future__ import annotations

import math
from pathlib import Path

from edgekd.errors import EdgeKDError, RecipeProblems
from edgekd.recipe import Recipe


def preflight(recipe: Recipe, teacher: Path | str | None = None, student: Path | str | None = None) -> list:
    """Check `recipe`; return its variant plan, or raise RecipeProblems listing every problem.

    `teacher`: a fine-tuned teacher folder (single-stage distill/compress), else `teacher.model` is read.
    `student`: a distilled student folder (single-stage compress): the student-building checks are then moot.
    """
    from edgekd.tasks.classification import variant_plan

    problems, plan = [], []
    try:
        plan = variant_plan(recipe)
    except RecipeProblems as exc:
        problems += exc.problems
    problems += _search_problems(recipe)
    problems += _qat_problems(recipe)
    given = [Path(d) for d in (teacher, student) if d is not None]
    try:  # a stage folder given on the command line that is no model: its stage says what is wrong with it
        if all((d / "config.json").is_file() for d in given):
            check = ModelCheck(recipe, teacher, student)
            problems += check.problems() + _model_spec_problems(plan, check)
    except EdgeKDError as exc:  # a model that cannot be read at all: the one line says why
        problems.append(str(exc))
    if problems:
        raise RecipeProblems(list(dict.fromkeys(problems)))  # two entries of one format: one line
    return plan


def _search_problems(recipe: Recipe) -> list[str]:
    """The budget search picks its spec on the first target; every other target must realize what it may pick."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format

    if recipe.compress.budget is None or len(recipe.targets) < 2:
        return []
    try:
        formats = [get_format(t.target, t.format) for t in recipe.targets]
    except EdgeKDError:
        return []  # variant_plan reports the target itself
    candidates = [n for n in formats[0].specs if not get_spec(n).is_float
                  and (not recipe.compress.search_quant or n in recipe.compress.search_quant)]
    problems = []
    for i, fmt in enumerate(formats[1:], 1):
        unmet = [n for n in candidates if not _realizes(fmt, n)]
        if unmet:
            common = [n for n in candidates if all(_realizes(f, n) for f in formats)]
            fix = (f"set compress.search_quant: [{', '.join(common)}]" if common else
                   "search with one target at a time (the others cannot share a spec)")
            problems.append(f"the budget search may choose {', '.join(unmet)} on {formats[0].target}/"
                            f"{formats[0].name}, which targets[{i}] {fmt.target}/{fmt.name} cannot realize; {fix}")
    return problems


def _model_spec_problems(plan: list, check: "ModelCheck") -> list[str]:
    """Specs a format cannot realize for this very model (embedded/tflm: full int8 of a GELU model)."""
    found = []
    for variant in plan:
        config = check.teacher if variant.role == "teacher" else (check.student or check.teacher)
        problem = variant.fmt.model_check(variant.spec, config) if variant.fmt.model_check and config else None
        if problem:
            found.append(problem)
    return found


def _realizes(fmt, name: str) -> bool:
    return name in fmt.specs or name in fmt.nearest


def _qat_problems(recipe: Recipe) -> list[str]:
    from edgekd.compress.qat import qat_supported
    from edgekd.compress.quant import get_spec

    cfg = recipe.compress
    if not cfg.qat_epochs or cfg.budget is not None:
        return []
    try:
        quantized = [s for s in map(get_spec, cfg.quant) if not s.is_float]
    except EdgeKDError:
        return []  # variant_plan reports the unknown name
    if len(quantized) != 1:
        return [f"compress.qat_epochs trains the student for one QuantSpec, and compress.quant lists "
                f"{len(quantized)} quantized ones; list exactly one"]
    if not qat_supported(quantized[0]):
        return [f"quantization-aware training covers int8 and int4 weights with dynamic or no activation "
                f"quantization, not {quantized[0].name}; set compress.quant: [int8], or compress.qat_epochs: 0"]
    return []


class ModelCheck:
    """The recipe's student and compression settings against the teacher's (and student's) config and tokenizer."""

    def __init__(self, recipe: Recipe, teacher: Path | str | None, student: Path | str | None):
        from edgekd.models import load_tokenizer

        self.recipe, self.cfg = recipe, recipe.student
        self.built = student is not None  # a distilled student is given: nothing left to build
        trust = recipe.teacher.trust_remote_code
        if self.built:  # only compression is left: the student's own config is what pruning applies to
            prune = recipe.compress.prune
            self.student = _config(str(student), trust) if prune.heads or prune.layers else None
            self.student_tok = self.teacher = None
            return
        source = str(teacher) if teacher else recipe.teacher.model
        self.teacher = _config(source, trust, recipe.teacher.allow_pickle)
        self.teacher_tok = load_tokenizer(source, trust, recipe.teacher.allow_pickle)
        if self.cfg.model:
            self.student = _config(self.cfg.model, trust, self.cfg.allow_pickle)
            self.student_tok = load_tokenizer(self.cfg.model, trust, self.cfg.allow_pickle)
        else:
            self.student, self.student_tok = None, self.teacher_tok  # cut from the teacher or fresh in its family

    def problems(self) -> list[str]:
        found = [] if self.built else self._building()
        return found + self._pruning()

    def _building(self) -> list[str]:
        cfg, found = self.cfg, []
        total = _layers(self.teacher)
        cut = None if cfg.config or (cfg.model and cfg.layers is None) else self.student if cfg.model else self.teacher
        whose, fix = (("student.model", "leave student.layers out to keep the whole model") if cfg.model else
                      ("teacher", "give student.config or student.model instead"))
        if cut is not None and not _mapped(cut):
            from edgekd.architecture import supported

            found.append(f"student.layers cuts layers from the families of edgekd's architecture map ({supported()}), "
                         f"not a {cut.model_type} {whose}; {fix}")
        elif cut is not None and cfg.layers is not None:
            keep, count = cfg.layers, _layers(cut)
            if any(not 0 <= i < count for i in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
                from edgekd.distill.student import uniform_layers
                example = uniform_layers(count, min(len(keep), count))
                found.append(f"student.layers {keep} must be increasing, distinct {whose} layers in 0..{count - 1} "
                             f"(the {whose} has {count}); e.g. student.layers: {example}")
        if cfg.config:
            for key in vars(cfg.config):
                if not hasattr(self.teacher, key):
                    found.append(f"student.config.{key} does not apply to a {self.teacher.model_type} teacher; "
                                 f"use student.layers or student.model instead")
        if cfg.trim_vocab and not _wordpiece(self.student_tok):
            found.append("student.trim_vocab supports WordPiece (BERT-family) tokenizers only, and this student's "
                         "tokenizer is not one; set student.trim_vocab: false")
        if cfg.intermediate:
            found += self._intermediate(total, layers_ok=not found)
        return found

    def _student_layers(self) -> int:
        from edgekd.distill.student import layers_to_keep

        cfg = self.cfg
        if self.built or (cfg.model and cfg.layers is None):
            return _layers(self.student)
        if cfg.config:
            return cfg.config.num_hidden_layers
        return len(layers_to_keep(cfg.layers, _layers(self.teacher)))

    def _intermediate(self, teacher_layers: int, layers_ok: bool) -> list[str]:
        from edgekd.distill.student import layer_map, layers_to_keep, same_tokenization

        cfg, found = self.cfg, []
        if cfg.model and not same_tokenization(self.student_tok, self.teacher_tok):
            found.append(f"student.model '{cfg.model}' tokenizes differently from the teacher, so its layers cannot "
                         f"be matched token by token; set student.hidden_weight, attention_weight and value_weight "
                         f"to 0 (logit distillation works across tokenizers)")
        heads = (_heads(self.student) if self.student is not None else
                 cfg.config.num_attention_heads if cfg.config else _heads(self.teacher))
        student_layers = self._student_layers()
        kept = None if cfg.model or cfg.config else layers_to_keep(cfg.layers, teacher_layers)
        try:  # (with student.layers wrong, its own line says so; the layer map follows from it)
            if layers_ok:
                layer_map(cfg.layer_map, student_layers, teacher_layers, kept)
        except EdgeKDError as exc:
            found.append(str(exc))
        for weight, what in ((cfg.value_weight, "value_weight"), (cfg.attention_weight, "attention_weight")):
            if weight and heads != _heads(self.teacher):
                found.append(f"student.{what} needs as many attention heads in the student ({heads}) as in the "
                             f"teacher ({_heads(self.teacher)}); set student.{what}: 0")
        if cfg.value_weight:
            for name, config in (("teacher", self.teacher), ("student", self.student)):
                if config is not None and not _mapped(config):
                    found.append(f"student.value_weight needs the value projection of each attention layer, and "
                                 f"the {name}'s {config.model_type} family is not in edgekd's architecture map; "
                                 f"set student.value_weight: 0")
        return found

    def _pruning(self) -> list[str]:
        prune, found = self.recipe.compress.prune, []
        if prune.heads == 0 and prune.layers == 0:
            return found
        cfg = self.cfg
        heads = (_heads(self.student) if self.student is not None else
                 cfg.config.num_attention_heads if cfg.config else _heads(self.teacher))
        layers = self._student_layers()
        heads = min(heads) if isinstance(heads, list) else heads  # a pruned student lists heads per layer
        if prune.heads and math.floor(prune.heads * heads) == 0:
            least = math.ceil(100 / heads) / 100  # the smallest two-decimal fraction that removes one head
            fix = (f"use compress.prune.heads: {least} or more" if heads > 1 else
                   "set compress.prune.heads: 0 (a layer with one head keeps it)")
            found.append(f"compress.prune.heads {prune.heads} removes no head of the student's {heads} per layer "
                         f"(it removes the fraction's whole heads); {fix}")
        if prune.layers >= layers:
            found.append(f"compress.prune.layers {prune.layers} would remove every layer (the student has {layers}); "
                         f"use at most {layers - 1}")
        return found


def _config(source: str, trust_remote_code: bool, allow_pickle: bool = False):
    """A model's config from its config.json (a local folder, the built-in model, or a hub id)."""
    from transformers import AutoConfig

    from edgekd.errors import ModelError
    from edgekd.models import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(source, allow_pickle), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read the config of model '{source}': {reason}") from None


def _layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layers


def _heads(config):
    return getattr(config, "num_attention_heads", None) or config.n_heads


def _wordpiece(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordPiece"


def _mapped(config) -> bool:
    """Whether edgekd's architecture map knows the family (layer cutting, heads, value projections)."""
    from edgekd.architecture import family_of

    try:
        family_of(config)
    except EdgeKDError:
        return False
    return True
