"""LiteRT: convert with litert-torch to a .tflite, quantize with ai-edge-quantizer recipes, run with LiteRT.

    ExportWrapper(model) --litert_torch.convert--> float .tflite --ai_edge_quantizer recipe--> .tflite

The graph is the one every exporter starts from (targets/graph.py): int32 ids and mask [1, L],
float32 logits [1, C] (int8 logits for int8-static, dequantized by the runner). LiteRT's
interpreter applies XNNPACK by default, so the runner measures what an Android app gets.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.quant import QuantSpec
from edgekd.errors import ExportError
from edgekd.targets import Reference
from edgekd.targets.graph import ExportWrapper, StaticInt8Wrapper, example_inputs
from edgekd.targets.native_log import native_stderr_filtered

# Which QuantSpecs ai-edge-quantizer realizes, and how (see quantization_recipe). Not int4-weights:
# its policy skips blockwise weight-only int4 and would return the float model unchanged.
SPECS = ("fp32", "fp16", "int8", "int8-static", "int8-weights", "int4", "int4-g64", "int4-g128")
SIGNATURE = "serving_default"   # litert-torch's default signature; inputs keep the wrapper's names
# A quantized .tflite is proven against itself in LiteRT's reference kernels (no XNNPACK), the kernels
# that define what each quantized op computes. Measured on a trained 2-layer, 64-wide student, 278 validation
# texts, 1 and 2 threads (identical): max |logit diff| / (1 + |logit|) 0.025 for dynamic int8, 0.060 for
# int8-static (TFLite Micro running that file: 0.013), every top-1 equal. XNNPACK's int8 .pte of the default
# 3 x 384 student was 0.215 off its own reference where the tiny one was 0.030, so the same margin as there:
# 1.0, far below a broken export (458 with wrong biases).
REFERENCE_TOLERANCE = 1.0


def convert_float(model, max_length: int, wrapper=ExportWrapper) -> bytes:
    """The float32 .tflite of wrapper(model) at the fixed shape [1, max_length]."""
    import litert_torch

    # litert-torch prints progress on stdout, where edgekd's --json output goes: off unless asked.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    ids, mask = example_inputs(max_length)
    module = wrapper(model.eval()).eval()
    with torch.no_grad():
        edge = litert_torch.convert(module, sample_kwargs={"input_ids": ids, "attention_mask": mask})
    with tempfile.TemporaryDirectory() as tmp:
        edge.export(f"{tmp}/model.tflite")
        return Path(f"{tmp}/model.tflite").read_bytes()


def quantization_recipe(spec: QuantSpec):
    """The ai-edge-quantizer recipe realizing `spec`, or None for fp32."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops, granularity = qtyping.TFLOperationName, qtyping.QuantGranularity
    manager = recipe_manager.RecipeManager()
    if spec.weights == "fp32":
        return None
    if spec.weights == "fp16":      # weights stored as float16, dequantized once at load
        manager.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=16,
                                       algorithm_key=AlgorithmName.FLOAT_CASTING)
    elif spec.weights == "int8" and spec.activations == "dynamic":
        manager.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8)
    elif spec.weights == "int8" and spec.activations == "none":
        manager.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8)
    elif spec.weights == "int8" and spec.activations == "static":
        manager.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED,
                                  activation_num_bits=8, weight_num_bits=8)
        # The static policy leaves the embedding table float32 (4 bytes a weight, most of a small
        # model). Per-tensor int8 rows with a float output is the form TFLite Micro's
        # EMBEDDING_LOOKUP dequantizes (one scale, zero point 0); the next QUANTIZE makes it int8.
        manager.add_dynamic_config(regex=".*", operation_name=ops.EMBEDDING_LOOKUP, num_bits=8,
                                   granularity=granularity.TENSORWISE)
    elif spec.weights == "int4" and spec.activations == "dynamic":
        manager.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=4,
                                   granularity=granularity(f"BLOCKWISE_{spec.group_size}"))
    else:
        raise ExportError(f"LiteRT cannot realize quantization '{spec.name}'; it supports: {', '.join(SPECS)}")
    return manager.get_quantization_recipe()


def quantize(float_model: bytes, spec: QuantSpec, calibration=()) -> bytes:
    """Apply `spec`'s recipe to a float .tflite; static specs calibrate on `calibration`."""
    from ai_edge_quantizer import quantizer

    recipe = quantization_recipe(spec)
    if recipe is None:
        return float_model
    q = quantizer.Quantizer(bytearray(float_model), recipe)
    result = None
    if q.need_calibration:
        samples = [{"input_ids": _np(ids), "attention_mask": _np(mask)}
                   for ids, mask in list(calibration)[: spec.calibration_samples]]
        if not samples:
            raise ExportError(f"quantization '{spec.name}' needs calibration texts and got none; "
                              f"give the dataset a train split")
        result = q.calibrate({SIGNATURE: samples})
    try:
        data = bytes(q.quantize(result, enable_progress_bar=False, enable_progress_report=False).quantized_model)
    except ValueError as exc:  # e.g. a width that the int4 group size does not divide
        fix = "choose a smaller group (int4, int4-g64)" if spec.group_size else "choose another spec"
        raise ExportError(f"ai-edge-quantizer cannot apply '{spec.name}': "
                          f"{str(exc).splitlines()[0].rstrip('.')}; {fix}") from None
    if not model_summary(data)["quantized_tensors"]:
        raise ExportError(f"ai-edge-quantizer quantized no tensor for '{spec.name}'; "
                          f"use a spec of {', '.join(SPECS)}")
    return data


def export_litert(model, spec: QuantSpec, max_length: int, calibration, out_file: Path) -> dict:
    """Convert, quantize per `spec`, write `out_file`; return the op and tensor summary for the manifest."""
    wrapper = StaticInt8Wrapper if spec.activations == "static" else ExportWrapper
    data = quantize(convert_float(model, max_length, wrapper), spec, calibration)
    Path(out_file).write_bytes(data)
    # Flat, so export_artifact's warning about a quantized model not fully delegated applies here too.
    details = {**model_summary(data), **xnnpack_summary(out_file)}
    # fp32: proven against the PyTorch model. Blockwise int4: none; LiteRT's own CPU kernels (reference or
    # optimized, without XNNPACK) do not compute it (measured on a 2-layer student: logits of 0.08 where
    # XNNPACK and fp32 give 3, 26 % top-1 agreement), so the change against fp32 alone judges it.
    if spec.is_float or spec.weights == "int4":
        return details
    return {**details, "reference": reference_kernels(out_file)}


def reference_kernels(file: Path) -> Reference:
    """The same .tflite in LiteRT's reference kernels, single-threaded: what the artifact must compute."""
    return Reference("the same .tflite in LiteRT's reference kernels (no XNNPACK)",
                     LiteRTRunner(file, threads=1, reference_kernels=True), REFERENCE_TOLERANCE)


# model -> {(wrapper, max_length): float .tflite}: a model is converted once (10-30 s), then quantized per spec.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate_litert(model, spec: QuantSpec, max_length: int, calibration):
    """(runner, how): the .tflite that export_litert writes for `spec`, loaded in the LiteRT interpreter."""
    wrapper = StaticInt8Wrapper if spec.activations == "static" else ExportWrapper
    converted = _CONVERTED.setdefault(model, {})
    if (wrapper, max_length) not in converted:
        converted[wrapper, max_length] = convert_float(model, max_length, wrapper)
    data = quantize(converted[wrapper, max_length], spec, calibration)
    folder = tempfile.TemporaryDirectory(prefix="edgekd-eval-")
    file = Path(folder.name) / "model.tflite"
    file.write_bytes(data)
    runner = LiteRTRunner(file)
    runner.folder = folder  # the file lives as long as the interpreter that maps it
    return runner, "ai-edge-quantizer .tflite (the file the exporter writes), run in the LiteRT interpreter"


def _np(tensor) -> np.ndarray:
    return tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


def model_summary(data: bytes) -> dict:
    """Op counts, tensor dtypes, quantized tensors and boundary dtypes, read from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as fb

    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    model = fb.Model.GetRootAs(data, 0)
    ops, dtypes = collections.Counter(), collections.Counter()
    quantized, boundary, input_names = 0, {"inputs": [], "outputs": []}, []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = op_names[builtin] if builtin != fb.BuiltinOperator.CUSTOM else code.CustomCode().decode()
            ops[name] += 1
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            dtypes[type_names[tensor.Type()]] += 1
            q = tensor.Quantization()
            if tensor.Type() in (fb.TensorType.INT8, fb.TensorType.INT4, fb.TensorType.FLOAT16) or (
                    q is not None and q.ScaleLength()):
                quantized += 1
        if s == 0:
            for kind, count, index in (("inputs", graph.InputsLength(), graph.Inputs),
                                       ("outputs", graph.OutputsLength(), graph.Outputs)):
                for i in range(count):
                    boundary[kind].append(type_names[graph.Tensors(index(i)).Type()].lower())
            input_names = [graph.Tensors(graph.Inputs(i)).Name().decode() for i in range(graph.InputsLength())]
    return {"ops": dict(ops.most_common()), "op_count": sum(ops.values()), "tensor_dtypes": dict(dtypes),
            "quantized_tensors": quantized, "input_names": input_names, "input_dtypes": boundary["inputs"],
            "output_dtypes": boundary["outputs"]}


def xnnpack_summary(file: Path) -> dict:
    """Which ops LiteRT's default XNNPACK delegate takes, read from the loaded interpreter's nodes.

    A delegated op's outputs stay inside a DELEGATE node; walking back from the DELEGATE nodes'
    inputs and the graph outputs through ops that produce them finds the ops left to CPU kernels.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(file), num_threads=1)
    with native_stderr_filtered():
        interpreter.allocate_tensors()
    try:
        nodes = interpreter._get_ops_details()  # the execution plan has no public accessor
    except AttributeError:
        return {"observable": False}
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n for n in ops for t in n["outputs"]}
    from_delegate = {int(t) for d in delegates for t in d["outputs"]}
    frontier = ([int(t) for d in delegates for t in d["inputs"]] +
                [int(d["index"]) for d in interpreter.get_output_details()])
    on_cpu: dict[int, str] = {}
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node["index"] in on_cpu or set(map(int, node["outputs"])) & from_delegate:
            continue
        on_cpu[node["index"]] = node["op_name"]
        frontier.extend(int(t) for t in node["inputs"])
    if not delegates:
        on_cpu = {n["index"]: n["op_name"] for n in ops}
    return {"observable": True, "backend": "XNNPACK", "delegate_calls": len(delegates),
            "delegated_ops": len(ops) - len(on_cpu), "non_delegated_nodes": len(on_cpu),
            "non_delegated_ops": dict(collections.Counter(on_cpu.values()).most_common())}


class LiteRTRunner:
    """A loaded .tflite: call(ids, mask) -> float32 logits (int8 outputs dequantized). Records load time."""

    runtime = "litert"

    def __init__(self, file: Path, threads: int = 0, reference_kernels: bool = False):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        start = time.perf_counter()
        resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
        with native_stderr_filtered():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on fd 2
            self.interpreter = Interpreter(model_path=str(file), num_threads=threads or None,
                                           experimental_op_resolver_type=resolver)
            self.run = self.interpreter.get_signature_runner(SIGNATURE)
        self.load_ms = (time.perf_counter() - start) * 1e3
        output = self.interpreter.get_output_details()[0]
        self.scale, self.zero_point = output["quantization"]
        self.output_name = next(iter(self.interpreter.get_signature_list()[SIGNATURE]["outputs"]))

    def __call__(self, ids, mask) -> np.ndarray:
        out = self.run(input_ids=_np(ids).astype(np.int32), attention_mask=_np(mask).astype(np.int32))
        return dequantize(out[self.output_name], self.scale, self.zero_point)

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {name: metadata.version(name) for name in ("ai-edge-litert", "litert-torch", "ai-edge-quantizer")}


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if values.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (values.astype(np.float32) - zero_point) * np.float32(scale)
    return values.astype(np.float32)
