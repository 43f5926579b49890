"""QuantSpec: quantization declared once, realized by each backend's own quantizer.

Here it is realized for PyTorch with torchao and PT2E (the XNNPACK quantizer), which is both
how its accuracy is evaluated before export and the graph the ExecuTorch exporter lowers. Each
target format evaluates its specs with its own backend (its Format's `evaluate` hook); this
module's PyTorch path is the ExecuTorch one and the fallback when no format is named.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgekd.errors import RecipeError, install_command
from edgekd.registry import Registry

SPECS: Registry["QuantSpec"] = Registry("quantization spec")
WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4", "lut4")


@dataclass(frozen=True)
class QuantSpec:
    name: str
    weights: str = "fp32"           # fp32 | fp16 | int8 (per channel) | int4 (per group) | lut4 (4-bit palette)
    activations: str = "none"       # none (weight-only) | dynamic | static (calibrated)
    group_size: int | None = None   # int4 weights: per-group scales
    embeddings: str | None = None   # None | int8 | int4: weight-only rows of every nn.Embedding
    calibration_samples: int = 0    # static activations: examples of the user's data
    # int4 Linear weights: how each group's scale is chosen. affine: from the group's min/max; hqq: HQQ's
    # scale search (Badri & Shaji, 2023; torchao's hqq_scale_only, what ExecuTorch's LLM export uses for 8da4w),
    # which lowers the rounding error for the same file and kernels.
    qparams: str = "affine"

    def __post_init__(self):
        if self.weights not in WEIGHT_TYPES:
            raise RecipeError(f"QuantSpec {self.name}: weights must be one of {', '.join(WEIGHT_TYPES)}")
        if self.weights in ("fp32", "fp16") and self.activations != "none":
            raise RecipeError(f"QuantSpec {self.name}: float weights take no quantized activations")
        if self.activations not in ("none", "dynamic", "static"):
            raise RecipeError(f"QuantSpec {self.name}: activations must be none, dynamic or static")
        if self.activations == "static" and self.calibration_samples <= 0:
            raise RecipeError(f"QuantSpec {self.name}: static activations need calibration_samples > 0")
        if self.qparams not in ("affine", "hqq") or (self.qparams == "hqq" and self.weights != "int4"):
            raise RecipeError(f"QuantSpec {self.name}: qparams must be affine, or hqq for int4 weights")
        if self.weights == "int4" and self.group_size not in (32, 64, 128):
            raise RecipeError(f"QuantSpec {self.name}: int4 weights need group_size 32, 64 or 128")

    @property
    def is_float(self) -> bool:
        return self.weights == "fp32" and self.embeddings is None

    def to_dict(self) -> dict:
        return asdict(self)


# The specs a recipe names. Each target format lists which of them its backend realizes.
for _spec in (
    QuantSpec("fp32"),
    QuantSpec("fp16", weights="fp16"),
    QuantSpec("int8", weights="int8", activations="dynamic", embeddings="int8"),
    QuantSpec("int8-static", weights="int8", activations="static", embeddings="int8", calibration_samples=100),
    QuantSpec("int8-weights", weights="int8", embeddings="int8"),
    QuantSpec("int4", weights="int4", activations="dynamic", group_size=32, embeddings="int4"),
    QuantSpec("int4-g64", weights="int4", activations="dynamic", group_size=64, embeddings="int4"),
    QuantSpec("int4-g128", weights="int4", activations="dynamic", group_size=128, embeddings="int4"),
    QuantSpec("int4-hqq", weights="int4", activations="dynamic", group_size=32, embeddings="int4", qparams="hqq"),
    QuantSpec("int4-weights", weights="int4", group_size=32, embeddings="int4"),
    QuantSpec("palettize4", weights="lut4"),
):
    SPECS.register(_spec.name)(_spec)


def get_spec(name: str) -> QuantSpec:
    return SPECS.get(name)


def quantize_embeddings(model: torch.nn.Module, bits: str) -> None:
    """Weight-only, per-row quantization of every nn.Embedding with torchao (in place)."""
    from torchao.quantization import quantize_

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None  # torchao's embedding path ignores it; lowering needs it unset
    for width, only in embedding_widths(model):
        quantize_(model, embedding_config(bits, width), filter_fn=only)


def embedding_widths(model: torch.nn.Module):
    """(width, filter_fn selecting the nn.Embeddings of that width): the group size depends on it."""
    widths = sorted({m.embedding_dim for m in model.modules() if isinstance(m, torch.nn.Embedding)})
    return [(w, lambda module, fqn, w=w: isinstance(module, torch.nn.Embedding) and module.embedding_dim == w)
            for w in widths]


EMBEDDING_INT4_GROUP = 32


def embedding_config(bits: str, width: int):
    """The torchao config of weight-only embedding quantization (also QAT's base config): int8 per row;
    int4 per group of 32 along the row. One int4 scale per 384-wide row cost the default student 6 points
    of top-1 agreement with fp32 on its own (94.0 % vs 97.5 % per group of 32, 200 validation texts)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    grouped = bits == "int4" and width % EMBEDDING_INT4_GROUP == 0
    return IntxWeightOnlyConfig(weight_dtype={"int8": torch.int8, "int4": torch.int4}[bits],
                                granularity=PerGroup(EMBEDDING_INT4_GROUP) if grouped else PerAxis(0))


def check_groups(spec: QuantSpec, widths) -> None:
    """An int4 spec's group size must divide the input width of every Linear it quantizes (`widths`)."""
    widths = sorted(set(widths))
    if spec.weights == "int4" and any(width % spec.group_size for width in widths):
        raise RecipeError(f"QuantSpec {spec.name} groups {spec.group_size} input channels, but this model has "
                          f"Linear layers {widths} wide; choose a group size that divides them (int4: 32)")


def linear_config(model: torch.nn.Module, spec: QuantSpec):
    """The torchao config of `spec`'s Linear quantization: int4 grouped / int8 per channel weights, with
    dynamic int8 activations or weight-only (also QAT's base config). A group size that does not divide
    every Linear's input width is refused."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    dtype = {"int8": torch.int8, "int4": torch.int4}[spec.weights]
    granularity = PerGroup(spec.group_size) if spec.weights == "int4" else PerAxis(0)
    check_groups(spec, {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    qparams = (IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if spec.qparams == "hqq"
               else IntxChooseQParamsAlgorithm.AFFINE)
    if spec.activations == "dynamic":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                     intx_choose_qparams_algorithm=qparams)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, intx_choose_qparams_algorithm=qparams)


def quantize_linears(model: torch.nn.Module, spec: QuantSpec) -> None:
    """torchao quantization of every nn.Linear per `spec` (in place): the form XNNPACK lowers (8da4w, 8da8w)."""
    from torchao.quantization import quantize_

    quantize_(model, linear_config(model, spec), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))


def quantize_for_xnnpack(model, spec: QuantSpec, max_length: int, calibration=(), dynamic: bool = False):
    """The exported program of `model` quantized by `spec`, in the form the XNNPACK delegate lowers.

    int8 (dynamic or static activations): PT2E with the XNNPACK quantizer; `calibration` is a list
    of encode_fixed() inputs for static activations (encode_unpadded() ones for a dynamic graph).
    int4: torchao 8-bit dynamic activations with 4-bit grouped weights. Embeddings: torchao
    weight-only rows. `dynamic`: the sequence length may be 1..max_length (both exports say so).
    Returns a torch.export ExportedProgram.
    """
    import copy

    from edgekd.targets.graph import ExportWrapper, StaticInt8Wrapper, dynamic_shapes, example_inputs

    wrap = StaticInt8Wrapper if spec.activations == "static" else ExportWrapper
    wrapper = wrap(copy.deepcopy(model).eval()).eval()
    if spec.embeddings:
        quantize_embeddings(wrapper, spec.embeddings)
    if spec.weights == "int4":
        quantize_linears(wrapper, spec)
    example = example_inputs(max_length)
    shapes = dynamic_shapes(max_length) if dynamic else None
    program = torch.export.export(wrapper, example, strict=False, dynamic_shapes=shapes)
    if spec.weights == "int8":
        try:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
        except ImportError:
            raise RecipeError(f"QuantSpec {spec.name} is realized here with ExecuTorch's XNNPACK quantizer; "
                              f"run `{install_command('android')}`, or name the target you export to") from None
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=spec.activations == "dynamic"))
        prepared = prepare_pt2e(program.module(), quantizer)
        with torch.no_grad():
            samples = list(calibration)[: spec.calibration_samples] if spec.activations == "static" else []
            for ids, mask in samples or [example]:
                prepared(ids, mask)
        program = torch.export.export(convert_pt2e(prepared), example, strict=False, dynamic_shapes=shapes)
    return program


def quantized_module(model, spec: QuantSpec, max_length: int, calibration=()) -> torch.nn.Module:
    """`model` as `spec` quantizes it, in PyTorch: (ids, mask) -> float logits, for accuracy before export.

    The ExecuTorch specs are evaluated on the very graph that exporter lowers; the others with
    torchao (weight-only int8/int4), a float16 copy, or coremltools' own palettizer (4-bit LUT).
    """
    import copy

    from edgekd.targets.graph import ExportWrapper

    if spec.is_float:
        return ExportWrapper(copy.deepcopy(model).eval()).eval()
    if spec.activations != "none":
        return quantize_for_xnnpack(model, spec, max_length, calibration).module()
    wrapper = ExportWrapper(copy.deepcopy(model).eval()).eval()
    if spec.weights == "fp16":
        return Float32Out(wrapper.half())
    if spec.weights == "lut4":
        return palettize(wrapper)
    if spec.embeddings:
        quantize_embeddings(wrapper, spec.embeddings)
    quantize_linears(wrapper, spec)
    return wrapper


class Float32Out(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, ids, mask):
        return self.module(ids, mask).float()


def palettize(model: torch.nn.Module) -> torch.nn.Module:
    """4-bit k-means palettization of the Linear weights with coremltools' PyTorch palettizer."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.WARNING)  # it logs every k-means block at INFO
    try:
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig
    except ImportError:
        raise RecipeError(f"QuantSpec palettize4 is evaluated with coremltools; "
                          f"run `{install_command('ios')}`") from None
    config = PostTrainingPalettizerConfig.from_dict(
        {"global_config": {"n_bits": 4, "granularity": "per_tensor"},
         "module_type_configs": {torch.nn.Embedding: None}})
    return PostTrainingPalettizer(model, config).compress()
