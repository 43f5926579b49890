"""QuantSpec: quantization declared once, realized by each backend's own quantizer.

Here it is realized for PyTorch with torchao and PT2E (the XNNPACK quantizer), which is both
how its accuracy is evaluated before export and the graph the ExecuTorch exporter lowers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgekd.errors import RecipeError
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

    def __post_init__(self):
        if self.weights not in WEIGHT_TYPES:
            raise RecipeError(f"QuantSpec {self.name}: weights must be one of {', '.join(WEIGHT_TYPES)}")
        if self.weights in ("fp32", "fp16") and self.activations != "none":
            raise RecipeError(f"QuantSpec {self.name}: float weights take no quantized activations")
        if self.activations not in ("none", "dynamic", "static"):
            raise RecipeError(f"QuantSpec {self.name}: activations must be none, dynamic or static")
        if self.activations == "static" and self.calibration_samples <= 0:
            raise RecipeError(f"QuantSpec {self.name}: static activations need calibration_samples > 0")
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
    QuantSpec("int4-weights", weights="int4", group_size=32, embeddings="int4"),
    QuantSpec("palettize4", weights="lut4"),
):
    SPECS.register(_spec.name)(_spec)


def get_spec(name: str) -> QuantSpec:
    return SPECS.get(name)


def quantize_embeddings(model: torch.nn.Module, bits: str) -> None:
    """Weight-only, per-row quantization of every nn.Embedding with torchao (in place)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None  # torchao's embedding path ignores it; lowering needs it unset
    dtype = {"int8": torch.int8, "int4": torch.int4}[bits]
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0)),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Embedding))


def quantize_for_xnnpack(model, spec: QuantSpec, max_length: int, calibration=()):
    """The exported program of `model` quantized by `spec` with PT2E + the XNNPACK quantizer.

    `calibration` is a list of encode_fixed() inputs (used for static activations).
    Returns a torch.export ExportedProgram ready to lower.
    """
    import copy

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgekd.targets.graph import ExportWrapper, example_inputs

    wrapper = ExportWrapper(copy.deepcopy(model).eval()).eval()
    if spec.embeddings:
        quantize_embeddings(wrapper, spec.embeddings)
    example = example_inputs(max_length)
    program = torch.export.export(wrapper, example, strict=False)
    if spec.weights == "int8":
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=spec.activations == "dynamic"))
        prepared = prepare_pt2e(program.module(), quantizer)
        with torch.no_grad():
            samples = list(calibration)[: spec.calibration_samples] if spec.activations == "static" else []
            for ids, mask in samples or [example]:
                prepared(ids, mask)
        program = torch.export.export(convert_pt2e(prepared), example, strict=False)
    elif spec.weights == "int4":
        raise RecipeError(f"QuantSpec {spec.name}: int4 linear weights are not realized for ExecuTorch yet")
    return program
