"""Android: ExecuTorch .pte with the XNNPACK delegate, and LiteRT .tflite (XNNPACK by default)."""
from edgekd.compress.quant import quantized_module
from edgekd.targets import FORMATS, Format
from edgekd.targets.executorch import ExecuTorchRunner, lower_xnnpack
from edgekd.targets.litert import SPECS as LITERT_SPECS
from edgekd.targets.litert import LiteRTRunner, evaluate_litert, export_litert


def evaluate_xnnpack(model, spec, max_length: int, calibration):
    """(module, how): the PT2E/torchao graph that lower_xnnpack lowers, run in PyTorch."""
    return (quantized_module(model, spec, max_length, calibration),
            "PT2E/torchao graph (XNNPACK quantizer) that the .pte lowers, run in PyTorch")


FORMATS.register("android/executorch")(Format(
    target="android", name="executorch", backend="xnnpack", suffix="pte",
    specs=("fp32", "int8", "int8-static", "int4", "int4-g64", "int4-g128"), export=lower_xnnpack,
    runner=ExecuTorchRunner,
    # Dynamic length by default: a text runs at its own token length (finsent's median 22 of 40 tokens: 1.5x
    # faster, perf/dynamic_length.py), and a padded input still runs (up to max_length), so nothing breaks.
    requires=("executorch", "torchao"), extra="android", options={"dynamic_length": True},
    evaluate=evaluate_xnnpack,
))

FORMATS.register("android/litert")(Format(
    target="android", name="litert", backend="litert", suffix="tflite",
    specs=LITERT_SPECS, export=export_litert, runner=LiteRTRunner,
    requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"), extra="litert",
    evaluate=evaluate_litert,
))
