"""Android: ExecuTorch .pte with the XNNPACK delegate (the LiteRT format joins here later)."""
from edgekd.targets import FORMATS, Format
from edgekd.targets.executorch import ExecuTorchRunner, lower_xnnpack

FORMATS.register("android/executorch")(Format(
    target="android", name="executorch", backend="xnnpack", suffix="pte",
    specs=("fp32", "int8", "int8-static"), export=lower_xnnpack, runner=ExecuTorchRunner,
    requires=("executorch", "torchao"), extra="android",
))
