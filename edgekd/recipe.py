"""The recipe: a typed, versioned pipeline config. Unknown keys and wrong types are errors.

Paths in a recipe are relative to the recipe file; `builtin:NAME` names a file shipped
in `edgekd/resources` (the default data) or the built-in default model.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekd.errors import RecipeError
from edgekd.registry import did_you_mean

RECIPE_VERSION = 1


@dataclass
class TeacherConfig:
    model: str = "builtin:all-MiniLM-L6-v2"   # a local HF folder, a hub id, or builtin:
    epochs: float = 4.0
    learning_rate: float = 5e-5
    batch_size: int = 16
    patience: int = 2           # early stopping: evaluations without improvement
    weight_decay: float = 0.01
    trust_remote_code: bool = False   # run Python code shipped with a model: only for models you trust
    allow_pickle: bool = False  # read .bin/.pt-only weights, with torch.load(weights_only=True)
    cross_fit: int = 0          # K >= 2: K more teachers, each without one fold, label the texts it left out

    def __post_init__(self):
        _positive(self, "epochs", "learning_rate", "batch_size")
        if self.cross_fit != 0 and not 2 <= self.cross_fit <= 20:
            raise RecipeError(f"teacher.cross_fit must be 0 (off) or a number of folds from 2 to 20, "
                              f"not {self.cross_fit}")


@dataclass
class DataConfig:
    train: str = "builtin:finsent/train.csv"
    validation: str | None = "builtin:finsent/validation.csv"
    test: str | None = "builtin:finsent/test.csv"
    unlabeled: str | None = None   # domain text without labels: the teacher labels it for distillation
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    format: str = "auto"        # auto (from the extension), csv, tsv, jsonl
    split_fractions: list[float] = field(default_factory=lambda: [0.15, 0.15])  # validation, test
    max_length: int | None = None  # None: the p99 token length of the training texts

    def __post_init__(self):
        if self.format not in ("auto", "csv", "tsv", "jsonl"):
            raise RecipeError(f"data.format must be auto, csv, tsv or jsonl, not {_short(self.format)}")
        if len(self.split_fractions) != 2 or not all(0 < f < 0.5 for f in self.split_fractions):
            raise RecipeError("data.split_fractions must be two fractions in (0, 0.5), for validation and test")
        if self.max_length is not None and not 8 <= self.max_length <= 512:
            raise RecipeError("data.max_length must be between 8 and 512 tokens (or left out)")


@dataclass
class StudentShape:
    """A fresh student of the teacher's family: these fields override the teacher's config."""
    num_hidden_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    def __post_init__(self):
        _positive(self, "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        if self.hidden_size % self.num_attention_heads:
            raise RecipeError(f"student.config.hidden_size {self.hidden_size} must be a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")


LAYER_MAPS = ("auto", "uniform", "last")


@dataclass
class StudentConfig:
    # One of three students: `model` (any HF model; with `layers`, those of its layers), `config` (fresh,
    # the teacher's family), or else `layers` (cut from the teacher, initialized from its weights).
    # Unset, a cut keeps half the teacher's layers, evenly, ending at the last ([1, 3, 5] of 6): on BANKING77
    # the 3-layer student kept the teacher's accuracy within a point (-0.81 at int8, 10.5x smaller) where the
    # 2-layer one lost 1.8 (perf/README.md, "Student depth").
    layers: list[int] | None = None  # layers kept, 0-based
    config: StudentShape | None = None
    model: str | None = None
    allow_pickle: bool = False  # student.model with .bin/.pt-only weights: torch.load(weights_only=True)
    temperature: float = 2.0
    alpha: float = 0.5          # weight of the soft (KL) loss; 1 - alpha on hard-label CE
    # Defaults measured on the built-in data (perf/results/demo.json, issue notes): lr 2e-4 and 4
    # augmented copies beat lr 1e-4 without augmentation by ~6 points on validation.
    epochs: float = 4.0
    learning_rate: float = 2e-4
    batch_size: int = 32
    trim_vocab: bool = True     # keep the tokens the training texts use (and the alphabet)
    vocab_margin: int = 3000    # also keep this many frequent other tokens (lowest ids first)
    augment: int = 4            # teacher-labelled perturbed copies of each training text (Tang et al., 2019)
    # Intermediate-layer losses (0 = off); they run the teacher during training.
    # Hidden-state MSE (TinyBERT): on the demo, weight 1 moved the int8 student -0.54 points (SE 1.17, 3 seeds;
    # perf/student_levers.py), so it stays off.
    hidden_weight: float = 0.0
    attention_weight: float = 0.0   # self-attention KL (MiniLM)
    value_weight: float = 0.0       # value-relation KL of the last layer (MiniLM)
    # Student layer i learns from teacher layer layer_map[i]: auto (the kept layers when cut,
    # else uniform), uniform, last, or an explicit list of 0-based teacher layers.
    layer_map: str | list[int] = "auto"

    def __post_init__(self):
        _positive(self, "temperature", "epochs", "learning_rate", "batch_size")
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"student.alpha must be in [0, 1], not {self.alpha}")
        if self.layers is not None and not self.layers:
            raise RecipeError("student.layers must list at least one layer to keep (or be left out)")
        if self.augment < 0 or self.vocab_margin < 0:
            raise RecipeError("student.augment and student.vocab_margin must be >= 0")
        if min(self.hidden_weight, self.attention_weight, self.value_weight) < 0:
            raise RecipeError("student.hidden_weight, attention_weight and value_weight must be >= 0")
        if isinstance(self.layer_map, str) and self.layer_map not in LAYER_MAPS:
            raise RecipeError(f"student.layer_map must be {', '.join(LAYER_MAPS)} or a list of teacher layers, "
                              f"not {_short(self.layer_map)}{did_you_mean(self.layer_map, LAYER_MAPS)}")
        if self.model and self.config:
            raise RecipeError("student.model and student.config are alternatives; give one of them")

    @property
    def intermediate(self) -> bool:
        return max(self.hidden_weight, self.attention_weight, self.value_weight) > 0


@dataclass
class PruneConfig:
    heads: float = 0.0          # fraction of attention heads removed in every layer
    ffn: float = 0.0            # fraction of FFN neurons removed in every layer
    layers: int = 0             # whole layers removed (the least important first)

    def __post_init__(self):
        check_pruning(self.heads, self.ffn, self.layers)


def check_pruning(heads: float, ffn: float, layers: int) -> None:
    """Pruning amounts that can work: checked when the recipe is read, not after hours of training."""
    if heads >= 1.0:
        raise RecipeError(f"pruning heads {heads} would remove every head of a layer, and a layer without "
                          f"attention cannot be run; use a fraction below 1 (or prune layers)")
    for name, value in (("heads", heads), ("ffn", ffn)):
        if not 0.0 <= value < 1.0:
            raise RecipeError(f"compress.prune.{name} must be a fraction in [0, 1), not {value}")
    if layers < 0:
        raise RecipeError(f"compress.prune.layers must be >= 0, not {layers}")


@dataclass
class CompressConfig:
    quant: list[str] = field(default_factory=lambda: ["int8"])  # QuantSpec names
    prune: PruneConfig = field(default_factory=PruneConfig)
    recovery_epochs: float = 2.0   # distillation from the teacher after pruning
    budget: float | None = None    # search: validation accuracy points below the teacher it may lose
    objective: str = "latency"     # search: what to minimize within the budget (latency or size)
    search_quant: list[str] | None = None  # search: QuantSpecs to try (default: every one the target realizes)
    qat_epochs: float = 0.0        # quantization-aware distillation (0 = off); in a search, for specs over budget
    budget_from: str = "teacher"   # search: the budget counts from the teacher's accuracy, or the student's

    def __post_init__(self):
        if self.qat_epochs < 0:
            raise RecipeError(f"compress.qat_epochs must be >= 0, not {self.qat_epochs}")
        if self.budget is not None and self.budget < 0:
            raise RecipeError(f"compress.budget must be >= 0 accuracy points, not {self.budget}")
        if self.budget_from not in ("teacher", "student"):
            raise RecipeError(f"compress.budget_from must be teacher or student, not '{self.budget_from}'"
                              f"{did_you_mean(self.budget_from, ['teacher', 'student'])}")
        if self.objective not in ("latency", "size"):
            raise RecipeError(f"compress.objective must be latency or size, not '{self.objective}'"
                              f"{did_you_mean(self.objective, ['latency', 'size'])}")


@dataclass
class TargetConfig:
    target: str = "android"
    format: str | None = None   # None: the target's default format (android: executorch, ios: coreml, embedded: tflm)
    options: dict = field(default_factory=dict)  # format-specific, e.g. ios/coreml deployment_target: iOS17
    quant: list[str] | None = None     # this target's QuantSpecs (default: compress.quant, mapped to the format)


@dataclass
class BenchConfig:
    iterations: int = 100
    warmup: int = 10
    threads: int = 0            # 0: the runtime's default (all cores)

    def __post_init__(self):
        _positive(self, "iterations")


class RecipeBase:
    """What every task's recipe shares: its folder, path resolution and serialization (fields: `base_dir`)."""

    def resolve(self, value: str | None) -> str | None:
        """A recipe path made absolute (builtin: and hub ids are left alone)."""
        if value is None or value.startswith("builtin:"):
            return value
        try:
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (Path(self.base_dir) / path).resolve())
        except (RuntimeError, ValueError, OSError) as exc:  # ~unknown-user, a NUL byte, a name too long
            reason = getattr(exc, "strerror", None) or exc
            raise RecipeError(f"{_short(value)} in the recipe is not a usable path ({reason}); fix it") from None

    def model_source(self, value: str | None) -> str | None:
        """teacher.model / student.model as a stage loads it: a folder relative to the recipe file made
        absolute; a hub id ("org/name") that names no folder there is left alone."""
        if not value or value.startswith("builtin:"):
            return value
        resolved = self.resolve(value)
        try:
            exists = Path(resolved).exists()
        except OSError as exc:  # a name too long
            raise RecipeError(f"{_short(value)} in the recipe is not a usable path ({exc.strerror}); fix it") from None
        return resolved if exists or not _HUB_ID.fullmatch(value) else value

    def locate_models(self) -> None:
        """Every stage (and any other code) reads the models where the recipe file says they are, whatever the cwd."""
        self.teacher.model = self.model_source(self.teacher.model)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data


def check_header(recipe) -> None:
    """The fields every recipe starts with: version, task, name."""
    if recipe.version != RECIPE_VERSION:
        raise RecipeError(f"recipe version {_short(recipe.version)} is not supported; this edgekd reads version "
                          f"{RECIPE_VERSION}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", recipe.name):  # it becomes part of file names
        raise RecipeError(f"name {_short(recipe.name)} must be 1 to 64 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit (it names the exported files)")


@dataclass
class Recipe(RecipeBase):
    """A text-classification recipe (edgekd/tasks/classification.py)."""
    version: int = RECIPE_VERSION
    task: str = "text-classification"
    name: str = "finsent"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig("android", "executorch")])
    bench: BenchConfig = field(default_factory=BenchConfig)
    base_dir: str = field(default=".", metadata={"internal": True})  # where relative paths start

    def __post_init__(self):
        check_header(self)
        if not self.targets:
            raise RecipeError("targets is empty; list at least one, e.g. `targets: [android]` or "
                              "`targets: [{target: android, format: executorch}]`")

    def locate_models(self) -> None:
        super().locate_models()
        self.student.model = self.model_source(self.student.model)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _short(value) -> str:
    """repr of a value for an error line, cut when long (a pasted file is not a key's value)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} characters)"


def _positive(obj, *names):
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        if getattr(obj, name) <= 0:
            raise RecipeError(f"{section}.{name} must be > 0, not {getattr(obj, name)}")


def _build(cls, data, where: str):
    """Build dataclass `cls` from a dict, checking unknown keys and value types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'} must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"unknown key '{_join(where, str(key)[:60])}'{did_you_mean(str(key), fields)}; "
                              f"known: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, _join(where, key))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # defensive: dataclass signature mismatch
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for inner in options[:-1]:  # e.g. `str | list[int]`: the first type that fits
            try:
                return _convert(inner, value, where)
            except RecipeError:
                pass
        return _convert(options[-1], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, not {type(value).__name__} ({_short(value)})")
        return [_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads 5e-5 as a string
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):
            raise RecipeError(f"{where} must be a finite number, not {_short(value)}")
        if number is not None:
            return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(f"{where} must be {hint.__name__}, not {type(value).__name__} ({_short(value)})")
    return value


def recipe_from_dict(data: dict, base_dir: Path | str = ".") -> Recipe:
    if isinstance(data, dict) and isinstance(data.get("targets"), list):  # a bare name: its default format
        data = {**data, "targets": [{"target": t} if isinstance(t, str) else t
                                    for t in data["targets"]]}
    from edgekd.tasks import DEFAULT_TASK, get_task

    task = data.get("task", DEFAULT_TASK) if isinstance(data, dict) else DEFAULT_TASK
    recipe = _build(get_task(task).RECIPE, data or {}, "")
    recipe.base_dir = str(Path(base_dir).resolve())
    recipe.locate_models()
    return recipe


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder, not a YAML file; give the recipe file itself "
                          f"(`edgekd demo --print-recipe` prints one to start from)")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; `edgekd demo --print-recipe` prints one to start from")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{path} is not valid YAML: {first}") from None
    except OSError as exc:  # no read permission, an I/O error
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}; make it readable "
                          f"(e.g. `chmod u+r {path}`)") from None
    return recipe_from_dict(data, path.parent)


def builtin_recipe_text(task: str | None = None) -> str:
    """The built-in demo recipe of `task` (default: text-classification)."""
    from edgekd.tasks import DEFAULT_TASK, get_task

    name = get_task(task or DEFAULT_TASK).DEMO_RECIPE
    return (Path(__file__).parent / "resources" / "recipes" / name).read_text(encoding="utf-8")


def builtin_recipe(task: str | None = None):
    return recipe_from_dict(yaml.safe_load(builtin_recipe_text(task)), Path.cwd())
