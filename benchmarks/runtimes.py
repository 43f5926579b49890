"""Baseline runtimes: the same model measured in the runtimes a user would otherwise ship.

    edgekd bench ART... --baselines torch,onnxruntime

For every artifact, each baseline loads the model the artifact was exported from (the source
stage directory recorded in the export manifest, checked against its checksum) and runs it in
that runtime, interleaved with the artifacts:

- `torch`: PyTorch eager, float32, the export wrapper (int32 ids and mask, additive mask), under
  `torch.no_grad()`; the reference every exporter is checked against.
- `onnxruntime`: the wrapper exported with `torch.onnx.export` (TorchScript exporter, int32
  inputs); float artifacts are compared with the float32 ONNX model, quantized ones with
  `onnxruntime.quantization.quantize_dynamic` int8 (per-channel int8 weights, int8 activations
  computed at run time), the int8 peer a user would pick instead.

A baseline is a runtime, not an export target: it ships nowhere, has no parity gate and is built
in a cache beside the bench directory, so it is registered here and not in `targets`.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.errors import BenchError, install_command
from edgekd.registry import Registry


@dataclass(frozen=True)
class Baseline:
    name: str
    describe: str               # one line for the report
    build: Callable             # (source_dir, quant, max_length, threads, cache) -> runner
    requires: tuple[str, ...]   # importable modules
    extra: str                  # pip extra that installs them

    def check_installed(self) -> None:
        import importlib.util

        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(f"baseline '{self.name}' needs {', '.join(missing)}, which is not installed; "
                             f"run `{install_command(self.extra)}`")


BASELINES: Registry[Baseline] = Registry("baseline runtime")


def baseline_quant(artifact_quant: str) -> str:
    """The baseline's own precision for an artifact: float stays fp32, anything quantized is int8."""
    return "fp32" if artifact_quant in ("fp32", "fp16") else "int8"


class TorchEagerRunner:
    """The fp32 source model in PyTorch eager mode: call(ids, mask) -> logits."""

    runtime = "torch"

    def __init__(self, source_dir: Path, threads: int = 0):
        import torch

        from edgekd.models import load_classifier
        from edgekd.targets.graph import ExportWrapper

        if threads:
            torch.set_num_threads(threads)  # process-wide: the torch baseline is measured with these threads
        start = time.perf_counter()
        self.module = ExportWrapper(load_classifier(str(source_dir)).eval()).eval()
        self.load_ms = (time.perf_counter() - start) * 1e3
        self.size_bytes = sum(p.stat().st_size for p in Path(source_dir).glob("*.safetensors"))
        self.quant = "fp32"

    def __call__(self, ids, mask) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(ids, mask).numpy()

    @staticmethod
    def versions() -> dict:
        import torch
        return {"torch": torch.__version__}


def export_onnx(source_dir: Path, max_length: int, out_file: Path) -> Path:
    """The export wrapper of the source model as ONNX (opset 17, int32 ids and mask [1, seq])."""
    import torch

    from edgekd.models import load_classifier
    from edgekd.targets.graph import ExportWrapper, example_inputs

    wrapper = ExportWrapper(load_classifier(str(source_dir)).eval()).eval()
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter needs no onnxscript and handles the eager BERT graph.
        # A dynamic sequence axis: the baseline takes the same input as the artifact it is compared
        # with, padded to max_length or, for a dynamic-length artifact, at the text's own length.
        torch.onnx.export(wrapper, example_inputs(max_length), str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    tmp.replace(out_file)
    return out_file


def quantize_onnx(fp32_file: Path, out_file: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out_file.with_name(f".{out_file.name}.tmp")
    quantize_dynamic(str(fp32_file), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    tmp.replace(out_file)
    return out_file


def onnx_model(source_dir: Path, quant: str, max_length: int, cache: Path) -> Path:
    """The cached ONNX file of (source model, precision, length), built on first use."""
    from edgekd.manifest import inputs_digest, read_manifest

    key = hashlib.sha256(f"{inputs_digest(read_manifest(source_dir))}:{max_length}:seq".encode()).hexdigest()[:16]
    folder = Path(cache) / key
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model_fp32.onnx"
    if not fp32.is_file():
        export_onnx(source_dir, max_length, fp32)
    if quant == "fp32":
        return fp32
    int8 = folder / "model_int8.onnx"
    if not int8.is_file():
        quantize_onnx(fp32, int8)
    return int8


class OnnxRunner:
    """An ONNX file in ONNX Runtime's CPU provider: call(ids, mask) -> logits. Records load time."""

    runtime = "onnxruntime"

    def __init__(self, file: Path, threads: int = 0, quant: str = "fp32"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (the physical cores)
        options.inter_op_num_threads = 1
        # Workers that spin after a run steal the cores from the next variant of the interleaved loop
        # (measured: PyTorch eager 30x slower beside spinning ONNX Runtime threads on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        start = time.perf_counter()
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.load_ms = (time.perf_counter() - start) * 1e3
        self.size_bytes = Path(file).stat().st_size
        self.file, self.quant = Path(file), quant

    def __call__(self, ids, mask) -> np.ndarray:
        feed = {"input_ids": np.asarray(ids, dtype=np.int32), "attention_mask": np.asarray(mask, dtype=np.int32)}
        return self.session.run(["logits"], feed)[0]

    @staticmethod
    def versions() -> dict:
        import onnxruntime
        return {"onnxruntime": onnxruntime.__version__}


def _torch(source_dir: Path, quant: str, max_length: int, threads: int, cache: Path):
    return TorchEagerRunner(source_dir, threads)


def _onnxruntime(source_dir: Path, quant: str, max_length: int, threads: int, cache: Path):
    return OnnxRunner(onnx_model(source_dir, quant, max_length, cache), threads, quant)


BASELINES.register("torch")(Baseline(
    "torch", "PyTorch eager, float32, the model the artifact was exported from", _torch, ("torch",), "android"))
BASELINES.register("onnxruntime")(Baseline(
    "onnxruntime", "ONNX Runtime CPU: float32 ONNX for float artifacts, quantize_dynamic int8 for quantized ones",
    _onnxruntime, ("onnxruntime", "onnx"), "onnx"))


def parse_baselines(text: str | None) -> list[Baseline]:
    """'torch,onnxruntime' -> the registered baselines (an unknown name lists the known ones)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    found = [BASELINES.get(n) for n in dict.fromkeys(names)]
    for baseline in found:
        baseline.check_installed()
    return found


def source_model(export_manifest: dict) -> Path:
    """The stage directory an artifact was exported from, verified against the checksum export recorded."""
    from edgekd.manifest import inputs_digest, verify_stage

    entry = export_manifest["inputs"].get("model") or {}
    path = Path(entry.get("path", ""))
    if not (path / "manifest.json").is_file():
        raise BenchError(f"the model {export_manifest['artifact']} was exported from ({path}) is gone; a baseline "
                         f"needs it: bench without --baselines or restore that directory")
    if inputs_digest(verify_stage(path)) != entry.get("sha256"):
        raise BenchError(f"{path} changed after {export_manifest['artifact']} was exported from it; re-export, "
                         f"or bench without --baselines")
    return path
