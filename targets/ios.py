"""iOS: a Core ML .mlpackage (coremltools) and an ExecuTorch .pte with the Core ML delegate.

Both start from torch.export of the graph in graph.py and compress with the backend's own tools
(`coremltools.optimize.coreml`). Core ML runs only on Apple hardware, so off macOS an artifact is
checked structurally instead of run: the .mlpackage is read back from disk and its interface,
op types and weight storage are compared with what was asked for; the .pte must be delegated
to CoreMLBackend. Export then records that parity was structural and claims no test metrics.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.quant import QuantSpec
from edgekd.errors import ExportError, RecipeError
from edgekd.registry import did_you_mean
from edgekd.targets import FORMATS, Format, RuntimeUnavailable
from edgekd.targets.executorch import ExecuTorchRunner, delegation_summary
from edgekd.targets.graph import INPUT_NAMES, ExportWrapper, example_inputs

DEPLOYMENT_TARGETS = {"iOS16": 7, "iOS17": 8, "iOS18": 9}  # -> Core ML specification version (ct.target value)
MIN_SHARE = 0.9  # the least share of weight parameters that must be stored as the spec asks


def _export(model, max_length: int):
    with torch.no_grad():
        return torch.export.export(ExportWrapper(model.eval()).eval(), example_inputs(max_length), strict=False)


def _target(spec: QuantSpec, deployment_target: str):
    import coremltools as ct

    problem = _int4_problem(spec, deployment_target)
    if problem:
        raise RecipeError(problem)
    return getattr(ct.target, deployment_target)


def _int4_problem(spec: QuantSpec, deployment_target: str) -> str | None:
    if spec.weights == "int4" and DEPLOYMENT_TARGETS[deployment_target] < DEPLOYMENT_TARGETS["iOS18"]:
        return (f"QuantSpec {spec.name} needs Core ML per-block int4, which starts with iOS18; set "
                f"`options: {{deployment_target: iOS18}}` in the ios target, or use int8-weights or palettize4")
    return None


def _precision(spec: QuantSpec):
    import coremltools as ct

    return ct.precision.FLOAT32 if spec.weights == "fp32" else ct.precision.FLOAT16


# ---------------------------------------------------------------------------------------- .mlpackage

def convert_coreml(model, spec: QuantSpec, max_length: int, calibration, out_file: Path,
                   deployment_target: str = "iOS17") -> dict:
    """Convert to an ML Program, compress per `spec`, save `out_file`, and check it structurally."""
    import coremltools as ct

    target = _target(spec, deployment_target)
    # The default decompositions first: with run_decompositions({}) conversion fails on new_ones.
    program = _export(model, max_length).run_decompositions()
    pipeline = ct.PassPipeline.DEFAULT
    if model.config.vocab_size > np.iinfo(np.int16).max:
        # add_int16_cast narrows the embedding's gather indices to int16; token ids past 32767
        # would not fit (coremltools#2222), so keep them int32 for large vocabularies.
        pipeline.remove_passes({"common::add_int16_cast"})
    mlmodel = ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=_precision(spec),
        inputs=[ct.TensorType(name=name, shape=(1, max_length), dtype=np.int32) for name in INPUT_NAMES],
        # float32 logits as on every other target; the cast from float16 is the graph's last op
        outputs=[ct.TensorType(name="logits", dtype=np.float32)], pass_pipeline=pipeline)
    mlmodel = _compress(mlmodel, spec)
    mlmodel.save(str(out_file))
    summary = inspect_mlpackage(out_file)
    summary["checks"] = check_mlpackage(summary, spec, max_length, model.config.num_labels, deployment_target)
    return {"backend": "CoreML", **summary}


def _compress(mlmodel, spec: QuantSpec):
    """coremltools.optimize.coreml per `spec`; weights under 2048 elements (biases, LayerNorm) stay float."""
    import coremltools.optimize.coreml as cto

    if spec.weights == "int8":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    if spec.weights == "int4":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                             block_size=spec.group_size)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    if spec.weights == "lut4":
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=4)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    return mlmodel  # fp32 / fp16: the conversion's compute precision already did it


def inspect_mlpackage(path: Path) -> dict:
    """What a saved .mlpackage holds: interface, deployment target, op types, how its weights are stored.

    Reads the package back from disk (no Core ML runtime needed) with the MIL loader that
    coremltools.optimize itself uses.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.proto import FeatureTypes_pb2

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    array_dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def features(items):
        return [{"name": f.name, "dtype": array_dtype(f.type.multiArrayType.dataType).lower(),
                 "shape": list(f.type.multiArrayType.shape)} for f in items]

    program = load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    ops = list(program.functions["main"].operations)
    weights, nonfinite = {}, []
    for op in ops:
        kind = _weight_kind(op)
        if kind:
            entry = weights.setdefault(kind, {"tensors": 0, "params": 0})
            entry["tensors"] += 1
            entry["params"] += int(np.prod(op.outputs[0].shape))
        if _is_float_const(op) and not np.isfinite(op.outputs[0].val).all():
            nonfinite.append(op.name)  # e.g. a float32 mask value that float16 turned into -inf
    versions = {v: k for k, v in DEPLOYMENT_TARGETS.items()}
    return {
        "specification_version": spec.specificationVersion,
        "runs_on": versions.get(spec.specificationVersion, f"spec {spec.specificationVersion}") + "+",
        "inputs": features(spec.description.input), "outputs": features(spec.description.output),
        "op_types": dict(Counter(op.op_type for op in ops).most_common()),
        "weights": weights, "nonfinite_constants": nonfinite,
        "size_bytes": sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()),
    }


def _weight_kind(op) -> str | None:
    """How one weight tensor is stored: fp32 / fp16 (a const), int8 / int4 (linear), lut<bits> (palette)."""
    from coremltools.converters.mil.mil import types

    if op.op_type == "constexpr_affine_dequantize":       # iOS16/17 linear quantization
        return types.builtin_to_string(op.quantized_data.dtype)
    if op.op_type == "constexpr_blockwise_shift_scale":   # iOS18 linear quantization
        return types.builtin_to_string(op.data.dtype)
    if op.op_type == "constexpr_lut_to_dense":             # palettization: 2^bits entries per palette
        lut = op.lut.shape  # iOS16/17: [entries]; iOS18: [..., entries, vector size]
        return f"lut{int(math.log2(lut[0] if len(lut) == 1 else lut[-2]))}"
    if op.op_type == "constexpr_sparse_to_dense":
        return "sparse"
    out = op.outputs[0]
    if (_is_float_const(op) and types.is_tensor(out.sym_type) and np.size(out.val) > 1
            # scales and palettes of compressed weights are part of those, not weights of their own
            and not all(child.op_type.startswith("constexpr") for child in out.child_ops)):
        return types.builtin_to_string(out.dtype)
    return None


def _is_float_const(op) -> bool:
    from coremltools.converters.mil.mil import types

    out = op.outputs[0]
    return op.op_type == "const" and out.val is not None and types.is_float(out.dtype)


def check_mlpackage(summary: dict, spec: QuantSpec, max_length: int, num_labels: int,
                    deployment_target: str) -> list[str]:
    """Structural parity: the package has the interface, target and weight storage asked for.

    Returns what was verified, one line each; raises ExportError (nothing is written) otherwise.
    """
    expected_in = [{"name": n, "dtype": "int32", "shape": [1, max_length]} for n in INPUT_NAMES]
    expected_out = [{"name": "logits", "dtype": "float32", "shape": [1, num_labels]}]
    problems = []
    if summary["inputs"] != expected_in:
        problems.append(f"inputs are {summary['inputs']}, expected {expected_in}")
    if summary["outputs"] != expected_out:
        problems.append(f"outputs are {summary['outputs']}, expected {expected_out}")
    if summary["specification_version"] > DEPLOYMENT_TARGETS[deployment_target]:
        problems.append(f"it needs {summary['runs_on']}, newer than the deployment target {deployment_target}")
    kind = spec.weights  # named as _weight_kind names storage: fp32, fp16, int8, int4, lut4
    total = sum(entry["params"] for entry in summary["weights"].values())
    share = summary["weights"].get(kind, {}).get("params", 0) / max(total, 1)
    if share < MIN_SHARE:
        problems.append(f"only {share:.0%} of the weight parameters are stored as {kind} "
                        f"(by kind: {summary['weights']})")
    if summary["nonfinite_constants"]:
        problems.append(f"constants hold inf/NaN: {', '.join(summary['nonfinite_constants'][:3])}")
    if problems:
        raise ExportError(f"Core ML package fails its structural check for {spec.name}: {'; '.join(problems)}")
    return [f"inputs {', '.join(n for n in INPUT_NAMES)}: int32 [1, {max_length}]",
            f"output logits: float32 [1, {num_labels}]",
            f"runs on {summary['runs_on']} (deployment target {deployment_target})",
            f"{share:.1%} of {total} weight parameters stored as {kind}",
            "no inf/NaN constants"]


class CoreMLRunner:
    """A loaded .mlpackage: call(ids, mask) -> logits, through MLModel.predict (macOS only)."""

    runtime = "coreml"

    def __init__(self, file: Path, threads: int = 0):
        if sys.platform != "darwin":
            raise RuntimeUnavailable("Core ML runs only on macOS")
        import coremltools as ct

        start = time.perf_counter()
        # CPU only: parity compares with float32 PyTorch on the CPU; where an app runs it
        # (Neural Engine, GPU) is a device benchmark's question.
        self.model = ct.models.MLModel(str(file), compute_units=ct.ComputeUnit.CPU_ONLY)
        self.load_ms = (time.perf_counter() - start) * 1e3

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        out = self.model.predict({"input_ids": ids.numpy().astype(np.int32),
                                  "attention_mask": mask.numpy().astype(np.int32)})
        return np.asarray(out["logits"], dtype=np.float32)

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {"coremltools": metadata.version("coremltools")}


def evaluate_coreml(model, spec: QuantSpec, max_length: int, calibration):
    """(module, how): an estimate in PyTorch of what convert_coreml's compression gives, with coremltools' own
    PyTorch-side optimizers (Core ML itself runs only on macOS, so the .mlpackage cannot be scored here).

    int8/int4 weights: coremltools.optimize.torch's linear quantizer on the Linear layers (per channel /
    per block of group_size; it has no Embedding support, so the estimate keeps the embedding table float,
    which the .mlpackage quantizes too); lut4: its 4-bit k-means palettizer; fp16: a float16 copy.
    """
    import copy

    from edgekd.compress.quant import Float32Out, palettize

    wrapper = ExportWrapper(copy.deepcopy(model).eval()).eval()
    if spec.weights == "fp16":
        module, how = Float32Out(wrapper.half()), "float16 copy in PyTorch"
    elif spec.weights == "lut4":
        module, how = palettize(wrapper), "coremltools.optimize.torch 4-bit palettizer in PyTorch"
    elif spec.weights in ("int8", "int4"):
        module, how = _linear_quantize(wrapper, spec), "coremltools.optimize.torch linear quantizer in PyTorch"
    else:
        module, how = wrapper, "PyTorch"
    return module, f"{how}: an estimate of the .mlpackage, which Core ML runs only on macOS"


def _linear_quantize(wrapper, spec: QuantSpec):
    import logging

    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    logging.getLogger("coremltools").setLevel(logging.WARNING)
    blocks = {"granularity": "per_block", "block_size": spec.group_size} if spec.weights == "int4" else {
        "granularity": "per_channel"}
    config = PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": spec.weights, **blocks}})
    return PostTrainingQuantizer(wrapper, config).compress()


# ------------------------------------------------------------------------------ ExecuTorch + Core ML

def lower_coreml(model, spec: QuantSpec, max_length: int, calibration, out_file: Path,
                 deployment_target: str = "iOS17") -> dict:
    """Lower to a .pte whose graph the Core ML delegate takes; check that it took all of it."""
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import to_edge_transform_and_lower

    specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=_target(spec, deployment_target),
                                                 compute_precision=_precision(spec))
    edge = to_edge_transform_and_lower(_export(model, max_length),
                                       partitioner=[CoreMLPartitioner(compile_specs=specs)])
    summary = delegation_summary(edge.exported_program().graph_module)
    # getitem only unpacks the delegate's output tuple: no kernel runs for it
    getitems = summary["non_delegated_ops"].pop("getitem", 0)
    summary.update(backend="CoreMLBackend", non_delegated_nodes=summary["non_delegated_nodes"] - getitems,
                   deployment_target=deployment_target)
    if not summary["delegated_nodes"]:
        raise ExportError(f"the Core ML delegate took no part of the graph for {spec.name}; nothing written")
    summary["checks"] = [
        (f"{summary['delegated_nodes']} nodes delegated to CoreMLBackend in {summary['delegate_calls']} "
         f"partition(s), {summary['non_delegated_nodes']} on portable kernels"),
        f"deployment target {deployment_target}",
    ]
    out_file.write_bytes(edge.to_executorch().buffer)
    return summary


class ExecuTorchCoreMLRunner(ExecuTorchRunner):
    """The ExecuTorch runtime, where its build has the Core ML backend (Apple platforms only)."""

    def __init__(self, file: Path, threads: int = 0):
        from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

        if "CoreMLBackend" not in _get_registered_backend_names():
            raise RuntimeUnavailable("Core ML runs only on Apple hardware; this ExecuTorch runtime has no "
                                     "CoreMLBackend")
        super().__init__(file, threads)

    @staticmethod
    def versions() -> dict:
        return {**ExecuTorchRunner.versions(), **CoreMLRunner.versions()}


# -------------------------------------------------------------------------------------- registration

@dataclass(frozen=True)
class IOSFormat(Format):
    """A Format whose deployment_target option is checked when the recipe is read, not after training."""

    def resolve_options(self, given: dict | None) -> dict:
        options = super().resolve_options(given)
        target = options["deployment_target"]
        if target not in DEPLOYMENT_TARGETS:
            raise RecipeError(f"{self.target}/{self.name}: deployment_target '{target}' is not supported"
                              f"{did_you_mean(str(target), DEPLOYMENT_TARGETS)}; choose one of "
                              f"{', '.join(DEPLOYMENT_TARGETS)}")
        return options

    def spec_problem(self, spec, options: dict) -> str | None:
        return _int4_problem(spec, options["deployment_target"])


FORMATS.register("ios/coreml")(IOSFormat(
    target="ios", name="coreml", backend="coreml", suffix="mlpackage",
    specs=("fp32", "fp16", "int8-weights", "palettize4", "int4-weights"), export=convert_coreml,
    runner=CoreMLRunner, requires=("coremltools",), extra="ios", options={"deployment_target": "iOS17"},
    # Core ML quantizes weights only: an int8 / int4 spec is realized as its weight-only twin.
    nearest={"int8": "int8-weights", "int8-static": "int8-weights", "int4": "int4-weights"},
    evaluate=evaluate_coreml,
))
FORMATS.register("ios/executorch-coreml")(IOSFormat(
    target="ios", name="executorch-coreml", backend="coreml", suffix="pte",
    specs=("fp32", "fp16"), export=lower_coreml, runner=ExecuTorchCoreMLRunner,
    requires=("executorch", "coremltools"), extra="android,ios", options={"deployment_target": "iOS17"},
    evaluate=evaluate_coreml,
))
