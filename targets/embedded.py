"""Embedded: a .tflite for TFLite Micro plus the C source pair that links it into firmware.

    LiteRT .tflite (targets/litert.py) --inline, 16-byte aligned--> op-set check --> arena measured
    in the TFLite Micro interpreter --> model_data.h / model_data.cc --> parity vs LiteRT recorded

int8-static is full int8 (not for GELU models: see check_spec): int8 weights, int8 activations, int8
logits (the header carries their scale and zero point; the runner dequantizes). Two tensors stay int32 by necessity:
input_ids, because EMBEDDING_LOOKUP indexes rows with int32 and a vocabulary has more than 127
rows, and attention_mask, which is cast and quantized in the graph (128 bytes more as int32 than
int8 at length 32; not worth a second input convention). fp32 is offered too, for boards with an
FPU and as the exact baseline of the int8 file.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekd.compress.quant import QuantSpec
from edgekd.errors import ExportError, RecipeError
from edgekd.targets import FORMATS, Format
from edgekd.targets.executorch import ExecuTorchRunner, lower_portable
from edgekd.targets.graph import without_gelu
from edgekd.targets.litert import (
    LiteRTRunner,
    StaticInt8Wrapper,
    convert_float,
    dequantize,
    evaluate_litert,
    model_summary,
    quantize,
    reference_kernels,
)

SPECS = ("fp32", "int8-static")
HEADER, SOURCE = "model_data.h", "model_data.cc"
PROBE_INPUTS = 16        # inputs compared between TFLite Micro and LiteRT at export

# The builtin ops of TFLite Micro's Python interpreter (python/tflite_micro/python_ops_resolver.cc,
# the resolver the `tflite-micro` package runs), as BuiltinOperator names. Each is registered in
# firmware by MicroMutableOpResolver::Add<CamelCase name> (see resolver_call). Loading the model in
# that interpreter re-checks this list at every export.
TFLM_OPS = frozenset("""
ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND
BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION CONV_2D COS CUMSUM DEPTH_TO_SPACE
DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR
FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL HARD_SWISH IF
L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGICAL_NOT LOGICAL_OR
LOGISTIC LOG_SOFTMAX MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD
PADV2 PRELU QUANTIZE READ_VARIABLE REDUCE_MAX RELU RELU6 RESHAPE RESIZE_BILINEAR
RESIZE_NEAREST_NEIGHBOR ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX SPACE_TO_BATCH_ND
SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF
TANH TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK VAR_HANDLE WHILE ZEROS_LIKE
""".split())
# Add* names that are not the plain CamelCase of the BuiltinOperator name.
_ADD_NAMES = {"BATCH_MATMUL": "AddBatchMatMul", "CUMSUM": "AddCumSum", "PADV2": "AddPadV2",
              "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM"}
# How to get rid of an op TFLite Micro lacks, for the ops a transformer classifier produces. GELU, ERF and
# POW reach the check only from a GELU that graph.without_gelu cannot see: one computed by a function call.
_GELU_FIX = ("compute GELU in a module edgekd rewrites in ops TFLite Micro has (torch.nn.GELU, or hidden_act "
             "gelu, gelu_new or gelu_pytorch_tanh in the model's config), not by a function call in forward")
FIXES = {
    "GELU": _GELU_FIX, "ERF": _GELU_FIX, "POW": _GELU_FIX,
    "SELECT": "export through ExportWrapper, whose additive float mask needs no select",
    "GATHER_ND": "export through ExportWrapper, whose additive float mask needs no boolean gather",
}


def resolver_call(op: str) -> str:
    """The MicroMutableOpResolver method that registers builtin `op` (AVERAGE_POOL_2D -> AddAveragePool2D)."""
    camel = "".join(part.capitalize() for part in op.split("_"))
    return _ADD_NAMES.get(op, "Add" + re.sub(r"(\d)d$", r"\1D", camel))


def check_ops(ops: dict[str, int]) -> list[str]:
    """The resolver calls for `ops` ({name: count}); one ExportError line naming any op TFLite Micro lacks."""
    missing = [op for op in ops if op not in TFLM_OPS]
    if missing:
        fixes = "; ".join(f"{op}: {FIXES.get(op, 'replace the layer that produces it')}" for op in missing)
        raise ExportError(f"TFLite Micro has no kernel for {', '.join(missing)} in this model ({fixes})")
    return sorted(resolver_call(op) for op in ops)


def model_problem(spec: QuantSpec, config) -> str | None:
    """What keeps TFLite Micro from realizing `spec` for a model of `config`, or None (checked before training).

    Full int8 of a GELU model is refused, measured: the rewritten GELU (ABS, EXP, DIV, MUL in int8) on the
    3-layer all-MiniLM-L6-v2 student agreed with PyTorch on 76 % of 100 texts (72 % with the GELU kept
    float), and TFLite Micro differed from LiteRT on the same file by up to 199 output steps.
    """
    if spec.activations == "static" and "gelu" in str(getattr(config, "hidden_act", "")):
        return (f"embedded/tflm cannot realize '{spec.name}' for a model with hidden_act {config.hidden_act}: "
                f"full int8 GELU agreed with PyTorch on 76 % of texts (MiniLM student; TFLite Micro and LiteRT "
                f"disagree on the same file); export it in fp32: give the target its own specs, "
                f"{{target: embedded, format: tflm, quant: [fp32]}}")
    return None


def check_spec(spec: QuantSpec, config) -> None:
    if spec.name not in SPECS:
        raise ExportError(f"embedded/tflm cannot realize quantization '{spec.name}'; it supports: {', '.join(SPECS)}")
    problem = model_problem(spec, config)
    if problem:
        raise ExportError(problem)


def export_tflm(model, spec: QuantSpec, max_length: int, calibration, out_file: Path,
                arena_margin: float = 0.25) -> dict:
    """Write the .tflite, model_data.h and model_data.cc beside it; return ops, arena and LiteRT parity.

    `arena_margin`: fraction added to the arena measured with the reference kernels, for the scratch
    buffers that optimized kernels (CMSIS-NN, ESP-NN) request and the reference ones do not.
    """
    check_spec(spec, model.config)
    if check_arena_margin(arena_margin):
        raise RecipeError(f"embedded/tflm option {check_arena_margin(arena_margin)}")
    graph_model = without_gelu(model)  # TFLite Micro has no GELU or ERF kernel: GELU in ops it has
    if spec.activations == "static":
        data = quantize(convert_float(graph_model, max_length, StaticInt8Wrapper), spec, calibration)
    else:
        data = convert_float(graph_model, max_length)
    data = inline_and_align(data)
    summary = model_summary(data)
    calls = check_ops(summary["ops"])

    used = measure_arena(data)
    arena = -(-int(used * (1 + arena_margin)) // 1024) * 1024   # whole KiB
    out_file = Path(out_file)
    out_file.write_bytes(data)
    runner = TFLMRunner(out_file, arena_size=arena)             # proves the arena we ship suffices
    parity = litert_parity(runner, out_file, probe_inputs(calibration, model.config.vocab_size, max_length))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    write_c_sources(out_file, data, calls, arena, used, arena_margin, runner, spec, max_length, labels)
    # A full-int8 file's own reference: the same file in LiteRT's reference kernels (fp32: the PyTorch model).
    reference = {} if spec.is_float else {"reference": reference_kernels(out_file)}
    return {**summary, "resolver": calls, "arena": {"used_bytes": used, "margin": arena_margin, "size": arena},
            "output_quantization": {"scale": runner.scale, "zero_point": runner.zero_point} if runner.scale else None,
            "litert_parity": parity, "c_sources": [HEADER, SOURCE], **reference}


def check_arena_margin(value) -> str | None:
    """The problem with an arena_margin option value, or None: checked when the recipe is read."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 4:
        return f"arena_margin must be a fraction between 0 and 4, such as 0.25; got {value!r}"
    return None


def evaluate_tflm(model, spec: QuantSpec, max_length: int, calibration):
    """(runner, how): the .tflite that export_tflm starts from for `spec`, run in the LiteRT interpreter.

    Inlining and aligning the buffers changes no number, and export checks TFLite Micro against LiteRT;
    LiteRT's optimized kernels score the 1,000 validation texts far faster than TFLite Micro's reference ones.
    """
    if spec.name not in SPECS:
        raise RecipeError(f"embedded/tflm cannot realize quantization '{spec.name}'; it supports: {', '.join(SPECS)}")
    runner, _ = evaluate_litert(without_gelu(model), spec, max_length, calibration)
    return runner, ("ai-edge-quantizer .tflite (the model the TFLite Micro file holds), run in the LiteRT "
                    "interpreter")


def inline_and_align(data: bytes) -> bytes:
    """The model with every buffer inside the flatbuffer, 16-byte aligned.

    ai-edge-quantizer writes models past 256 KB with buffers appended after the flatbuffer
    (offset/size); TFLite Micro reads those as zeros, so the int8 model outputs one constant
    (measured). TFLite Micro's own aligner then puts each buffer on the 16-byte boundary that
    int32/float reads on a Cortex-M need.
    """
    from ai_edge_litert.tools import flatbuffer_utils
    from tflite_micro.tensorflow.lite.micro.tools import tflite_flatbuffer_align_wrapper

    inline = flatbuffer_utils.convert_object_to_bytearray(flatbuffer_utils.read_model_from_bytearray(bytearray(data)))
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.tflite").write_bytes(bytes(inline))
        tflite_flatbuffer_align_wrapper.align_tflite_model(f"{tmp}/in.tflite", f"{tmp}/out.tflite")
        return Path(tmp, "out.tflite").read_bytes()


@contextlib.contextmanager
def _native_output(log: list):
    """Collect what the TFLite Micro C++ code prints on stdout/stderr (its only error and arena report)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            sink.seek(0)
            log.append(sink.read().decode(errors="replace"))


def _load(data: bytes, arena_size: int):
    """A TFLite Micro interpreter; its refusal (missing op, arena too small) as one ExportError line."""
    from tflite_micro import runtime

    log: list[str] = []
    try:
        with _native_output(log):
            return runtime.Interpreter.from_bytes(data, arena_size=arena_size)
    except RuntimeError as exc:
        lines = [line.strip() for line in "".join(log).splitlines() if line.strip()]
        raise ExportError(f"TFLite Micro cannot load the model: {lines[0] if lines else exc} "
                          f"(arena {arena_size} bytes)") from None


def measure_arena(data: bytes) -> int:
    """Bytes of tensor arena the model takes in TFLite Micro, as its RecordingMicroAllocator reports them."""
    interpreter = _load(data, max(16 << 20, 10 * len(data)))
    details = [interpreter.get_input_details(i) for i in range(2)]
    for i, d in enumerate(details):
        interpreter.set_input(np.zeros(d["shape"], dtype=d["dtype"]), i)
    log: list[str] = []
    with _native_output(log):
        interpreter.invoke()
        interpreter.print_allocations()
    found = re.search(r"Arena allocation total (\d+) bytes", "".join(log))
    if not found:
        raise ExportError("TFLite Micro did not report its arena use; the tflite-micro package may have "
                          "changed: pip install the version in pyproject's extra 'embedded'")
    return int(found.group(1))


def probe_inputs(calibration, vocab_size: int, max_length: int, n: int = PROBE_INPUTS) -> list:
    """Real texts where there are some (the calibration set), then seeded random ids of varied lengths."""
    probes = [(np.asarray(ids, np.int32), np.asarray(mask, np.int32)) for ids, mask in list(calibration)[:n]]
    rng = np.random.default_rng(0)
    while len(probes) < n:
        length = int(rng.integers(2, max_length + 1))
        ids, mask = np.zeros((1, max_length), np.int32), np.zeros((1, max_length), np.int32)
        ids[0, :length], mask[0, :length] = rng.integers(0, vocab_size, length), 1
        probes.append((ids, mask))
    return probes


def litert_parity(runner: TFLMRunner, file: Path, inputs) -> dict:
    """TFLite Micro vs LiteRT on the same file; refuses the one failure parity alone would explain badly."""
    litert = LiteRTRunner(file, threads=1)
    micro = np.concatenate([runner(ids, mask) for ids, mask in inputs])
    reference = np.concatenate([litert(ids, mask) for ids, mask in inputs])
    if len(inputs) > 1 and np.ptp(micro, axis=0).max() == 0 and np.ptp(reference, axis=0).max() > 0:
        raise ExportError("TFLite Micro outputs the same logits for every input while LiteRT does not; "
                          "the .tflite is broken for TFLite Micro (re-export with this edgekd version)")
    parity = {"inputs": len(inputs), "max_abs_diff": float(np.abs(micro - reference).max()),
              "top1_agreement": float((micro.argmax(-1) == reference.argmax(-1)).mean())}
    if runner.scale:  # int8 logits: the difference in output steps says more than in floats
        parity["max_diff_steps"] = int(round(parity["max_abs_diff"] / runner.scale))
    return parity


def write_c_sources(out_file: Path, data: bytes, calls: list[str], arena: int, used: int, margin: float,
                    runner: TFLMRunner, spec: QuantSpec, max_length: int, labels: list[str]) -> None:
    """model_data.cc: the model as an aligned byte array; model_data.h: its length, arena, op list, I/O."""
    folder = out_file.parent
    if runner.scale:
        output = f"int8 [1, {len(labels)}]; logit = (value - kOutputZeroPoint) * kOutputScale"
        output_constants = (f"constexpr float kOutputScale = {runner.scale!r}f;\n"
                            f"constexpr int kOutputZeroPoint = {runner.zero_point};\n")
    else:
        output, output_constants = f"float32 [1, {len(labels)}]", ""
    registrations = "\n".join(f"  status |= resolver.{call}();" for call in calls)
    label_list = ", ".join(_c_string(label) for label in labels)
    (folder / HEADER).write_text(f"""\
// Generated by edgekd from {out_file.name} ({spec.name}, {len(data)} bytes) for TFLite Micro. Do not edit.
//
// Inputs, in this order: input_ids int32 [1, {max_length}] (token ids), attention_mask int32 [1, {max_length}]
// (1 = token, 0 = padding). Output: logits {output}.
#ifndef EDGEKD_MODEL_DATA_H_
#define EDGEKD_MODEL_DATA_H_

#include <cstddef>

extern const unsigned char g_model_data[];
extern const unsigned int g_model_data_len;

constexpr int kMaxLength = {max_length};
constexpr int kNumLabels = {len(labels)};
constexpr const char* kLabels[kNumLabels] = {{{label_list}}};
{output_constants}
// Tensor arena: {used} bytes measured with TFLite Micro's reference kernels (RecordingMicroAllocator),
// plus {margin:.0%} for the scratch buffers of optimized kernels, rounded up to whole KiB.
constexpr size_t kTensorArenaSize = {arena};

// The ops this model uses, and only those:
//   static tflite::MicroMutableOpResolver<kModelOpCount> resolver;
//   if (RegisterModelOps(resolver) != kTfLiteOk) {{ /* resolver too small */ }}
constexpr int kModelOpCount = {len(calls)};
template <typename Resolver>
inline int RegisterModelOps(Resolver& resolver) {{
  int status = 0;  // kTfLiteOk
{registrations}
  return status;
}}

#endif  // EDGEKD_MODEL_DATA_H_
""")
    rows = ",\n".join("  " + ", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12))
    (folder / SOURCE).write_text(f"""\
// Generated by edgekd from {out_file.name}. Do not edit.
#include "{HEADER}"

// 16-byte aligned: TFLite Micro reads tensor data in place, from buffers aligned to 16 bytes
// within the flatbuffer.
alignas(16) const unsigned char g_model_data[] = {{
{rows}
}};
const unsigned int g_model_data_len = {len(data)};
""")


def _c_string(text: str) -> str:
    """A C string literal of `text`: printable ASCII as is, every other UTF-8 byte as an octal escape."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03o}"
                         for b in text.encode()) + '"'


def _header_arena(file: Path) -> int | None:
    header = Path(file).parent / HEADER
    found = header.is_file() and re.search(r"kTensorArenaSize = (\d+);", header.read_text())
    return int(found.group(1)) if found else None


class TFLMRunner:
    """The TFLite Micro Python interpreter: call(ids, mask) -> float32 logits (int8 ones dequantized).

    It runs with the arena the header ships (else one measured now), so parity also proves that
    arena is large enough. TFLite Micro is single-threaded: `threads` is accepted and ignored.
    """

    runtime = "tflite-micro"

    def __init__(self, file: Path, threads: int = 0, arena_size: int | None = None):
        data = Path(file).read_bytes()
        arena_size = arena_size or _header_arena(file) or int(measure_arena(data) * 1.25)
        # The interpreter addresses inputs by position: which of (ids, mask) goes to each.
        self.slots = [int("attention_mask" in name) for name in model_summary(data)["input_names"]]
        start = time.perf_counter()
        self.interpreter = _load(data, arena_size)
        self.load_ms = (time.perf_counter() - start) * 1e3
        self.arena_size = arena_size
        quant = self.interpreter.get_output_details(0)["quantization_parameters"]
        self.scale = float(quant["scales"][0]) if len(quant["scales"]) else 0.0
        self.zero_point = int(quant["zero_points"][0]) if len(quant["zero_points"]) else 0

    def __call__(self, ids, mask) -> np.ndarray:
        values = (np.asarray(ids, np.int32), np.asarray(mask, np.int32))
        for position, which in enumerate(self.slots):
            self.interpreter.set_input(values[which], position)
        self.interpreter.invoke()
        return dequantize(self.interpreter.get_output(0).copy(), self.scale, self.zero_point)

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {name: metadata.version(name) for name in ("tflite-micro", "ai-edge-litert", "litert-torch",
                                                          "ai-edge-quantizer")}


FORMATS.register("embedded/tflm")(Format(
    target="embedded", name="tflm", backend="tflm", suffix="tflite", specs=SPECS, export=export_tflm,
    runner=TFLMRunner, requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "tflite_micro"),
    extra="embedded", options={"arena_margin": 0.25}, option_checks={"arena_margin": check_arena_margin},
    nearest={"int8": "int8-static"},  # TFLite Micro runs integer kernels only: int8 is the calibrated full int8
    evaluate=evaluate_tflm, model_check=model_problem,
))

# ExecuTorch without a delegate, for any CPU ExecuTorch builds for; the manifest and
# selected_operators.txt list the kernels a selective build of the runtime must keep.
FORMATS.register("embedded/executorch-portable")(Format(
    target="embedded", name="executorch-portable", backend="portable", suffix="pte", specs=("fp32",),
    export=lower_portable, runner=ExecuTorchRunner, requires=("executorch",), extra="android",
))
