"""ExecuTorch: lower to a .pte with the XNNPACK delegate, and run it with the ExecuTorch runtime."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.quant import QuantSpec, quantize_for_xnnpack
from edgekd.targets import Reference
from edgekd.targets.native_log import native_stderr_filtered

# XNNPACK's int8 kernels are not bit-exact with the PT2E/torchao reference ops (requantization rounding,
# accumulation order, how dynamic activations are quantized). Measured, max |logit diff| / (1 + |logit|):
# a trained 2-layer, 64-wide student, 278 validation texts, 1 and 2 threads (identical): 0.030 int8 (PT2E
# dynamic), 0.006 int4 (8da4w), 0.012 int8-static, every top-1 equal; the default student (3 x 384, trained
# briefly), 200 texts: 0.215 int8, top-1 99.5 %; wrong biases planted in the lowered program: 458. The
# gate is for broken exports: 1.0 is about five times the worst correct figure and far below a broken one.
# (The accuracy an artifact loses is judged apart, by the budget, on the whole validation split.)
XNNPACK_TOLERANCE = 1.0


def lower_xnnpack(model, spec: QuantSpec, max_length: int, calibration, out_file: Path,
                  dynamic_length: bool = False) -> dict:
    """Quantize per `spec` (PT2E/torchao), lower to XNNPACK, write `out_file`; return the delegation summary
    and, for a quantized spec, the Reference the .pte is proven against: the very program lowered, in PyTorch.

    `dynamic_length`: the input length may be 1..max_length; memory is planned for max_length."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    program = quantize_for_xnnpack(model, spec, max_length, calibration, dynamic=dynamic_length)
    # Unlifted before lowering, which may rewrite the program in place.
    reference = None if spec.is_float else Reference("the PT2E/torchao program lowered, run in PyTorch",
                                                     _no_grad(program.module()), XNNPACK_TOLERANCE)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegation = delegation_summary(edge.exported_program().graph_module)
    # Constant propagation folds torchao's dequantize of quantized embeddings into
    # quantized_decomposed::embedding_byte, which has an out variant in the runtime.
    executorch_program = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    out_file.write_bytes(executorch_program.buffer)
    return {**delegation, "reference": reference} if reference else delegation


def _no_grad(module):
    def run(ids, mask):
        with torch.no_grad():
            return module(ids, mask).numpy()
    return run


def lower_portable(model, spec: QuantSpec, max_length: int, calibration, out_file: Path) -> dict:
    """A .pte with no delegate (ExecuTorch's portable kernels, for any CPU), and beside it
    `selected_operators.txt`: the operators a selective build of the runtime must keep
    (CMake: -DEXECUTORCH_SELECT_OPS_LIST="$(cat selected_operators.txt)")."""
    from executorch.exir import to_edge_transform_and_lower

    from edgekd.targets.graph import export_graph

    edge = to_edge_transform_and_lower(export_graph(model, max_length))
    program = edge.to_executorch()
    operators = sorted({_out_variant(node.target) for node in program.exported_program().graph.nodes
                        if node.op == "call_function" and hasattr(node.target, "_schema")})
    out_file.write_bytes(program.buffer)
    (out_file.parent / "selected_operators.txt").write_text(",".join(operators) + "\n")
    return {"backend": "portable", "delegated_nodes": 0, "non_delegated_nodes": len(operators),
            "selected_operators": operators}


def _out_variant(target) -> str:
    """`aten::mm.out` for an out-variant kernel: the names ExecuTorch's selective build takes."""
    schema = target._schema
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def delegation_summary(graph_module) -> dict:
    """How many nodes XNNPACK took and which ops fall back to portable CPU kernels."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    fallback = {op: row.non_delegated for op, row in info.delegation_by_operator.items() if row.non_delegated}
    return {
        "backend": "XnnpackBackend",
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "delegate_calls": sum(1 for n in graph_module.graph.nodes if "executorch_call_delegate" in str(n.target)),
        "non_delegated_ops": dict(sorted(fallback.items(), key=lambda kv: -kv[1])),
    }


def load_program(file: Path, threads: int = 0):
    """(program, its "forward" method, load ms): a .pte loaded with the ExecuTorch runtime, the quantized kernels
    registered. `threads`: XNNPACK's thread pool size (0: its default), set before load_method, the only time
    it takes effect."""
    with native_stderr_filtered():  # load_method prints cpuinfo's [cpuinfo_utils.cpp:...] probes to fd 2
        import executorch.kernels.quantized  # noqa: F401  registers embedding_byte & co.
        from executorch.runtime import Runtime

        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            _unsafe_reset_threadpool(threads)
        start = time.perf_counter()
        program = Runtime.get().load_program(Path(file))
        method = program.load_method("forward")
        return program, method, (time.perf_counter() - start) * 1e3


class ExecuTorchRunner:
    """A loaded .pte method: call(ids, mask) -> logits. Records the load time."""

    runtime = "executorch"

    def __init__(self, file: Path, threads: int = 0):
        self.program, self.method, self.load_ms = load_program(file, threads)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return self.method.execute([ids, mask])[0].numpy()

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {"executorch": metadata.version("executorch")}
