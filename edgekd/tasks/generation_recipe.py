"""The text-generation recipe: a decoder LM teacher, fine-tuned on prompt/completion data, distilled into a
student cut and pruned from it, quantized to int4, exported with a KV cache (edgekd/tasks/generation.py).

Sections share the classifier recipe's names (teacher, data, student, compress, targets, bench); their keys are
the ones a decoder LM needs, checked the same way: an unknown key or a wrong type is one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgekd.errors import RecipeError
from edgekd.recipe import RECIPE_VERSION, RecipeBase, TargetConfig, _positive, _short, check_header
from edgekd.registry import did_you_mean

BUILTIN_LLM = "builtin:SmolLM2-135M-Instruct"
KD_LOSSES = ("forward-kl", "reverse-kl", "skew-kl", "skew-reverse-kl")
KD_TOKENS = ("completion", "all")
LAYER_IMPORTANCE = ("cosine", "loss")
RECORD_KINDS = ("classification", "prompt-completion", "text")
BUDGET_METRICS = ("perplexity", "task-accuracy")
# (target, format) -> the decoder export format its stage writes (edgekd/tasks/generation.py export); a target's
# format None is its default, the first listed for it.
DECODER_TARGETS = {("android", "executorch"): "executorch-llm", ("android", "litert"): "litert-lm",
                   ("ios", "coreml"): "coreml-llm"}
# The built-in data is labelled financial news; a decoder learns it as a prompt whose completion is the label word.
SENTIMENT_PROMPT = ("Classify the sentiment of this financial news as negative, neutral or positive.\n{text}")


def _choice(section: str, key: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise RecipeError(f"{section}.{key} must be {', '.join(known)}, not {_short(value)}"
                          f"{did_you_mean(value, known)}")


@dataclass
class LMTeacherConfig:
    model: str = BUILTIN_LLM          # a local Hugging Face folder, a hub id, or builtin:SmolLM2-135M-Instruct
    epochs: float = 1.0               # 0: use the model as it is (no fine-tuning)
    learning_rate: float = 5e-5
    batch_size: int = 8
    lora_rank: int = 0                # 0: full fine-tuning; > 0: LoRA adapters of this rank, merged back (peft)
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        _positive(self, "learning_rate", "batch_size")
        if self.epochs < 0 or self.lora_rank < 0:
            raise RecipeError("teacher.epochs and teacher.lora_rank must be >= 0")


@dataclass
class LMDataConfig:
    train: str = "builtin:finsent/train.csv"
    validation: str | None = "builtin:finsent/validation.csv"
    test: str | None = "builtin:finsent/test.csv"
    format: str = "auto"              # auto (from the extension), csv, tsv, jsonl
    encoding: str = "utf-8"
    # What a row is: classification (text and label phrased by prompt_template, the label word as completion;
    # task accuracy is measured), prompt-completion (two columns), or text (loss on every token).
    records: str = "classification"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    text_column: str = "text"
    label_column: str = "label"
    prompt_template: str = SENTIMENT_PROMPT   # records: classification; {text} is replaced by the row's text
    max_length: int = 128             # tokens of prompt + completion (chat template included)
    max_train: int | None = None      # a seeded, stratified sample of this many training records (None: all)
    # Validation and test each cut to a seeded, stratified sample of this many records (None: all). Every
    # metric runs the models over them several times: on a CPU this is where an LLM run's minutes go.
    max_eval: int | None = None
    # Prompts without completions (a text column phrased by prompt_template for classification records, the
    # prompt column for prompt-completion): the teacher completes each greedily and they join the distillation
    # transfer set, data no-teacher training cannot use. Prompts of the train/validation/test splits are dropped.
    unlabeled: str | None = None
    max_unlabeled: int | None = None  # a seeded sample of this many unlabelled prompts (None: all)
    split_fractions: list[float] = field(default_factory=lambda: [0.15, 0.15])

    def __post_init__(self):
        _choice("data", "format", self.format, ("auto", "csv", "tsv", "jsonl"))
        _choice("data", "records", self.records, RECORD_KINDS)
        if "{text}" not in self.prompt_template:
            raise RecipeError("data.prompt_template must contain {text}, where each record's text goes")
        if not 8 <= self.max_length <= 8192:
            raise RecipeError(f"data.max_length must be between 8 and 8192 tokens, not {self.max_length}")
        if self.unlabeled and self.records == "text":
            raise RecipeError("data.unlabeled holds prompts for the teacher to complete, and text records have no "
                              "prompt: add the text to data.train, or use prompt-completion records")
        for key in ("max_train", "max_eval", "max_unlabeled"):
            if getattr(self, key) is not None and getattr(self, key) < 2:
                raise RecipeError(f"data.{key} must be at least 2 records (or left out: all)")


@dataclass
class LMStudentConfig:
    # Cut from the teacher (Minitron): keep `layers` of its layers, chosen by measured importance, and remove
    # `ffn` of every layer's MLP neurons, attention heads down to `kv_groups` / `heads` and `hidden` of the
    # embedding channels, each by activation importance on `calibration` training texts; then distill.
    layers: int = 10
    layer_importance: str = "cosine"  # cosine: 1 - cos(hidden in, out) (ShortGPT's BI); loss: LM loss without it
    ffn: float = 0.0                  # fraction of MLP neurons removed in every layer
    kv_groups: int | None = None      # KV heads kept (whole groups, with their query heads); None: all
    heads: int | None = None          # query heads kept in all, the same number per kept KV head; None: all
    hidden: float = 0.0               # fraction of hidden (embedding) channels removed, by norm-output importance
    # init: fresh builds that shape instead as a random init of the teacher's family (its embeddings kept where
    # the hidden size is the teacher's): the other student kind, for distillation data of many tokens.
    init: str = "cut"
    calibration: int = 64
    loss: str = "forward-kl"          # forward-kl (Minitron's pick after pruning), reverse-kl, skew-kl, skew-reverse-kl
    temperature: float = 1.0
    alpha: float = 1.0                # weight of the KD loss; 1 - alpha on the completion tokens' cross-entropy
    kd_tokens: str = "completion"     # the tokens the KD loss covers: completion, or all (prompt and completion)
    # > 0: also match each student layer's output to the teacher layer it was cut from (Minitron's
    # intermediate-state loss, for deep cuts), this many times the logit loss's size; the teacher runs every step.
    state_weight: float = 0.0
    top_k: int = 64                   # the teacher's logits cached as its top-k per position
    epochs: float = 2.0
    learning_rate: float = 1e-4
    batch_size: int = 8

    def __post_init__(self):
        _positive(self, "layers", "calibration", "temperature", "top_k", "epochs", "learning_rate", "batch_size")
        _choice("student", "layer_importance", self.layer_importance, LAYER_IMPORTANCE)
        _choice("student", "loss", self.loss, KD_LOSSES)
        _choice("student", "kd_tokens", self.kd_tokens, KD_TOKENS)
        _choice("student", "init", self.init, ("cut", "fresh"))
        for key in ("ffn", "hidden"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise RecipeError(f"student.{key} must be a fraction in [0, 1) (the share removed), not "
                                  f"{getattr(self, key)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"student.alpha must be in [0, 1], not {self.alpha}")
        if self.state_weight < 0:
            raise RecipeError(f"student.state_weight must be >= 0 (0: off), not {self.state_weight}")
        if self.state_weight and self.init == "fresh" and self.hidden:
            raise RecipeError("student.state_weight matches hidden states channel for channel, and a fresh student "
                              "with student.hidden has no channels of the teacher's: set state_weight: 0 or hidden: 0")


@dataclass
class LMCompressConfig:
    # QuantSpecs: int4 (8da4w g32), int4-g64, int8 ... Without a budget, each is exported. With one, they are the
    # budget search's candidates, most compressed first: each is scored on the validation records and the first
    # within the budget is the one exported (edgekd.tasks.generation.choose_quant).
    quant: list[str] = field(default_factory=lambda: ["int4"])
    budget: float | None = None       # perplexity: percent above; task-accuracy: points below (validation)
    budget_metric: str = "perplexity"
    budget_from: str = "teacher"      # the budget counts from the teacher's validation figure, or the fp32 student's

    def __post_init__(self):
        if not self.quant:
            raise RecipeError("compress.quant must list at least one QuantSpec, e.g. [int4]")
        _choice("compress", "budget_metric", self.budget_metric, BUDGET_METRICS)
        _choice("compress", "budget_from", self.budget_from, ("teacher", "student"))
        if self.budget is not None and self.budget < 0:
            unit = "percent" if self.budget_metric == "perplexity" else "points"
            raise RecipeError(f"compress.budget must be >= 0 {unit}, not {self.budget}")


@dataclass
class LMBenchConfig:
    prompt_lengths: list[int] = field(default_factory=lambda: [64, 128])
    new_tokens: int = 32
    rounds: int = 3
    threads: int = 0                  # 0: the runtime's default (all cores)
    prompts: int = 8                  # parity prompts (validation records) per exported variant

    def __post_init__(self):
        _positive(self, "new_tokens", "rounds", "prompts")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise RecipeError("bench.prompt_lengths must list positive prompt lengths, e.g. [64, 128]")


@dataclass
class GenerationRecipe(RecipeBase):
    """A text-generation recipe."""
    version: int = RECIPE_VERSION
    task: str = "text-generation"
    name: str = "finsent-lm"
    seed: int = 0
    teacher: LMTeacherConfig = field(default_factory=LMTeacherConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    student: LMStudentConfig = field(default_factory=LMStudentConfig)
    compress: LMCompressConfig = field(default_factory=LMCompressConfig)
    targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig("android", "executorch")])
    bench: LMBenchConfig = field(default_factory=LMBenchConfig)
    max_seq_len: int = 256            # the exported KV cache's positions: prompt + generated tokens
    base_dir: str = field(default=".", metadata={"internal": True})

    def __post_init__(self):
        check_header(self)
        if not self.targets:
            raise RecipeError("targets is empty; list at least one, e.g. `targets: [android]`")
        for target in self.targets:
            target.format = target.format or next((f for t, f in DECODER_TARGETS if t == target.target), None)
            if (target.target, target.format) not in DECODER_TARGETS:
                known = ", ".join(f"{t}/{f}" for t, f in DECODER_TARGETS)
                # ExecuTorch's Core ML delegate keeps no KV cache as state (targets/llm_coreml.py says why)
                raise RecipeError(f"a text-generation recipe exports to {known}, not {target.target}/"
                                  f"{target.format or 'its default'}; e.g. `targets: [android, ios]`")
            if target.options or target.quant:
                raise RecipeError(f"targets {target.target}/{target.format}: a text-generation target takes no "
                                  f"options or quant of its own; list the specs in compress.quant")
        names = [f"{t.target}/{t.format}" for t in self.targets]
        if len(set(names)) != len(names):
            twice = ", ".join(dict.fromkeys(n for n in names if names.count(n) > 1))
            raise RecipeError(f"targets lists {twice} twice; list each target once")
        if (self.compress.budget is not None and self.compress.budget_metric == "task-accuracy"
                and self.data.records != "classification"):
            raise RecipeError(f"compress.budget_metric task-accuracy needs labelled records (data.records: "
                              f"classification), not {self.data.records}; use budget_metric: perplexity")
        if self.data.unlabeled and self.student.alpha == 0:
            raise RecipeError("data.unlabeled is completed by the teacher for distillation, and student.alpha 0 "
                              "trains without the teacher: set student.alpha above 0, or remove data.unlabeled")
        if self.max_seq_len < self.data.max_length:
            raise RecipeError(f"max_seq_len {self.max_seq_len} must be at least data.max_length "
                              f"{self.data.max_length}: the exported cache must hold a whole record")
