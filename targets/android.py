"""Android: ExecuTorch .pte with the XNNPACK delegate, and LiteRT .tflite (XNNPACK by default)."""
from edgekd.targets import FORMATS, Format
from edgekd.targets.executorch import ExecuTorchRunner, lower_xnnpack
from edgekd.targets.litert import SPECS as LITERT_SPECS, LiteRTRunner, export_litert

FORMATS.register("android/executorch")(Format(
    target="android", name="executorch", backend="xnnpack", suffix="pte",
    specs=("fp32", "int8", "int8-static", "int4", "int4-g64", "int4-g128"), export=lower_xnnpack, runner=ExecuTorchRunner,
    requires=("executorch", "torchao"), extra="android", options={"dynamic_length": False},
))

FORMATS.register("android/litert")(Format(
    target="android", name="litert", backend="litert", suffix="tflite",
    specs=LITERT_SPECS, export=export_litert, runner=LiteRTRunner,
    requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"), extra="litert",
))
