"""A decoder LM (Hugging Face `*ForCausalLM`) as a stateful Core ML ML Program (.mlpackage) for iOS 18 / macOS 15.

    fp32 HF model ─▶ StatefulDecoder (KV cache = 2 buffers) ─▶ wrapper_parity ─▶ torch.export ─▶ wrapper_parity
        of the exported graph ─▶ ct.convert(states) ─▶ coremltools.optimize.coreml (int4 per block / int8 per
        channel) ─▶ check_coreml_decoder ─▶ .mlpackage (renamed into place)

The recipe is coremltools' "Stateful Models" guide and Apple's "On Device Llama 3.1 with Core ML" post: the KV
cache is two registered buffers of the wrapper, keyCache and valueCache, [layers, 1, kv_heads, max_seq_len,
head_dim]; each layer's attention writes its new keys/values into them in place (a Cache subclass handed to the HF
model) and attends over positions 0..end. coremltools turns the mutated buffers into Core ML states (float16, the
only state type in iOS 18), so the cache stays inside Core ML between predictions (`MLModel.make_state()`).
torch.export, not torch.jit.trace: coremltools 9 makes states of an ExportedProgram's mutated buffers, and the
TorchScript path needs patches under numpy 2 (/work/shared/TOOLCHAIN.md).

Model signature (one function for prefill and decode; flexible shapes, ct.RangeDim):
    input_ids   [1, n]              int32    the new tokens, 1 <= n
    causal_mask [1, 1, n, past + n] float16  additive: 0 where token i may attend to position j, -inf where not
                                             (coreml_causal_mask(n, past) builds it); past + n <= max_seq_len
    logits      [1, n, vocab]       float16  every new position's next-token logits
    states      keyCache, valueCache float16 [layers, 1, kv_heads, max_seq_len, head_dim]
The number of cached positions `past` is read from the mask's shape (its last dim minus n), as in Apple's recipe, so
a prompt may be prefilled in one call or in chunks, then one token per call; a new conversation needs a new state.
`max_seq_len` is the cache's length: the most positions a conversation holds (prompt and generated tokens together)
and the upper bound of both flexible dims; Core ML refuses a mask wider than it. Feed int32 ids and a float16 mask.
Flexible shapes run on the CPU and GPU; the Neural Engine wants fixed or enumerated shapes (not offered here).

Quantization (coreml_decoder_quant): Core ML compresses weights only, with coremltools.optimize.coreml on the
converted program; activations and the cache stay float16. int4 specs (int4, int4-g64, int4-g128, int4-weights):
`linear_symmetric` int4 per block of the spec's group size (constexpr_blockwise_shift_scale, iOS 18); int8 specs
(int8, int8-weights): int8 per output channel; fp16: no compression. Weights under 2048 elements (norms) stay float.
fp32 is exported as fp16 with "quant_asked": "fp32" in the details: the states can only be float16 in iOS 18 and
the Neural Engine computes in float16 only, so a float32 package would be slower and no more exact where it matters
(the cache). Refused, one ExportError line each: int8-static (calibrated activations), int4-hqq (HQQ's scale search
is torchao's; coremltools chooses its own scales), palettize4.

ExecuTorch's Core ML delegate is not offered for decoders: its LLM export keeps the KV cache as mutable buffers,
coremltools makes Core ML states of them even with `take_over_mutable_buffer=False`, and the open-source ExecuTorch
runtime binds no MLState, so such .pte files fail at run time ("The input feature for ..._state must be an MLState,
but it was not"; pytorch/executorch#21855, open; the cause in coremltools: apple/coremltools#2826, `states=[]`
cannot say "no states"). A stateful .mlpackage run by Core ML itself is the path that keeps the cache resident.

On Linux nothing can run Core ML: export proves the torch wrapper against the HF model (wrapper_parity) and the
saved package structurally (check_coreml_decoder); coreml_decoder_parity runs the package where Core ML runs (macOS).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache

from edgekd.compress.quant import QuantSpec, get_spec
from edgekd.errors import ExportError
from edgekd.targets import RuntimeUnavailable

COREML_SUFFIX = ".mlpackage"
DEPLOYMENT_TARGET = "iOS18"
SPEC_VERSION = 9  # Core ML specification version of iOS 18 / macOS 15 (ct.target.iOS18)
INPUT_NAMES = ("input_ids", "causal_mask")
STATE_NAMES = ("keyCache", "valueCache")
MARKER = "com.github.edgekd.coreml_decoder"  # user-defined metadata: what export wrote, and that edgekd wrote it
# The wrapper in fp32 against the HF model's full forward, as the ExecuTorch export's fp32 rule: |diff| within
# 1e-4 x (1 + max |logit|) at every position; a wrong position or mask is off by whole logits.
WRAPPER_TOLERANCE = 1e-4
# The package in Core ML (float16 compute) against a PyTorch reference, |diff| / (1 + max |logit|) per position:
# a first bound for float16 rounding, not yet measured on a Mac.
COREML_TOLERANCE = 0.05
MIN_SHARE = 0.9  # the least share of weight parameters that must be stored as the spec asks (as targets/ios.py)
# coremltools' linear_quantize_weights leaves weights of no more elements as they are (its weight_threshold): they
# are not counted in that share (a tiny model's k/v projections; a real one's norms)
COMPRESS_THRESHOLD = 2048


# ---------------------------------------------------------------------------------------------- quantization

def coreml_decoder_quant(spec: QuantSpec | str) -> dict:
    """The weight compression export_coreml_decoder applies for `spec`; one ExportError line if it cannot."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    why = None
    if spec.activations == "static":
        why = "its activations are calibrated int8, and Core ML compresses weights only"
    elif spec.qparams == "hqq":
        why = "HQQ's scale search is torchao's; coremltools' linear quantizer chooses its own scales"
    elif spec.weights == "lut4":
        why = "palettization is not offered for decoders"
    if why:
        raise ExportError(f"Core ML decoder export cannot realize QuantSpec {spec.name} ({why}): use int4, int4-g64, "
                          f"int8-weights or fp16")
    # int8 / int4 with dynamic activations are realized weight-only: Core ML has no dynamic activation quantization
    quant = {"quant_asked": spec.name, "activations": "float16"}
    if spec.weights == "int4":
        return {**quant, "weights": "int4", "mode": "linear_symmetric", "granularity": "per_block",
                "block_size": spec.group_size}
    if spec.weights == "int8":
        return {**quant, "weights": "int8", "mode": "linear_symmetric", "granularity": "per_channel"}
    return {**quant, "weights": "fp16"}  # fp32 too: see the module docstring


def _compress(mlmodel, quant: dict):
    import coremltools.optimize.coreml as cto

    if quant["weights"] == "fp16":
        return mlmodel  # compute_precision FLOAT16 already stored every weight as float16
    config = cto.OpLinearQuantizerConfig(mode=quant["mode"], dtype=quant["weights"],
                                         granularity=quant["granularity"], block_size=quant.get("block_size"))
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))


# ---------------------------------------------------------------------------------------------- torch wrapper

class StatefulDecoder(torch.nn.Module):
    """forward(input_ids [1, n], causal_mask [1, 1, n, past + n]) -> logits [1, n, vocab]; the KV cache is the
    buffers keyCache / valueCache [layers, 1, kv_heads, max_seq_len, head_dim], updated in place."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        shape = cache_shape(model.config, max_seq_len)
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float32))

    def positions(self, n, past) -> torch.Tensor:
        return (torch.arange(n) + past).unsqueeze(0)  # [1, n]: the new tokens sit after the cached ones

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        past = causal_mask.shape[-1] - n  # a shape, not a value: the graph stays one for every n and past
        # a 4-D mask goes to attention as it is (transformers' masking_utils returns it unchanged)
        out = self.model(input_ids=input_ids, attention_mask=causal_mask, position_ids=self.positions(n, past),
                         cache=BufferCache(self, past), use_cache=True)
        return out.logits


class BufferCache(Cache):
    """The HF model's cache for one forward of StatefulDecoder: layer i's new keys/values go into the wrapper's
    buffers at positions past..past+n, and attention reads positions 0..past+n. The buffers are read through the
    wrapper on every call (never held as tensors), so torch.export sees the module's own buffers mutated."""

    def __init__(self, owner: StatefulDecoder, past):
        super().__init__(layers=[])  # no layer objects: update() below is the whole cache
        self.owner, self.past = owner, past

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        owner, i, past = self.owner, layer_idx, self.past
        end = past + key_states.shape[-2]
        # a slice on dim 0, not an index: torch.export then gives slice_scatter, which coremltools turns into
        # slice_update; an index gives select_scatter, lowered as a `where` over the whole cache per layer
        owner.keyCache[i:i + 1, :, :, past:end] = key_states.unsqueeze(0)
        owner.valueCache[i:i + 1, :, :, past:end] = value_states.unsqueeze(0)
        return owner.keyCache[i, :, :, :end], owner.valueCache[i, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0):
        return self.past


def cache_shape(config, max_seq_len: int) -> list[int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [config.num_hidden_layers, 1, config.num_key_value_heads, max_seq_len, head_dim]


def coreml_causal_mask(n: int, past: int, dtype=np.float16) -> np.ndarray:
    """The causal_mask input for `n` new tokens after `past` cached ones: [1, 1, n, past + n], 0 or -inf."""
    allowed = np.arange(past + n)[None, :] <= (past + np.arange(n))[:, None]
    return np.where(allowed, 0, -np.inf).astype(dtype)[None, None]


@contextlib.contextmanager
def _export_mode(model):
    """eval mode and transformers' sdpa attention for the export (coremltools converts aten SDPA); the model's
    own afterwards."""
    attention, training = model.config._attn_implementation, model.training
    model.config._attn_implementation = "sdpa"
    model.eval()
    try:
        yield
    finally:
        model.config._attn_implementation = attention
        model.train(training)


@torch.no_grad()
def wrapper_parity(wrapper: torch.nn.Module, model, prompt_len: int = 6, chunk: int = 4, steps: int = 3) -> dict:
    """`wrapper` (a StatefulDecoder, or the module of its ExportedProgram) against `model`'s full forward, in fp32
    PyTorch: a seeded prompt prefilled in two chunks (so n > 1 with past > 0 is covered), then `steps` greedy tokens
    one per call through the cache buffers; logits compared at every position. Leaves the buffers zeroed."""
    buffers = [wrapper.get_buffer(name) for name in STATE_NAMES]
    max_seq_len = buffers[0].shape[3]
    steps = max(1, min(steps, max_seq_len - prompt_len))
    prompt_len = min(prompt_len, max_seq_len - steps)
    chunk = max(1, min(chunk, prompt_len - 1))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator)
    for buffer in buffers:
        buffer.zero_()
    pieces, spans = [], [(0, chunk), (chunk, prompt_len)] if chunk < prompt_len else [(0, prompt_len)]
    for start, stop in spans:
        mask = torch.from_numpy(coreml_causal_mask(stop - start, start, np.float32))
        pieces.append(wrapper(ids[:, start:stop], mask))
    for _ in range(steps):
        token = pieces[-1][:, -1:].argmax(-1)
        mask = torch.from_numpy(coreml_causal_mask(1, ids.shape[1], np.float32))
        pieces.append(wrapper(token, mask))
        ids = torch.cat([ids, token], 1)
    for buffer in buffers:
        buffer.zero_()  # an empty cache for whatever runs next
    got, want = torch.cat(pieces, 1)[0], model(ids).logits[0]
    diff = ((got - want).abs().amax(-1) / (1 + want.abs().amax(-1))).max().item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"passed": diff <= WRAPPER_TOLERANCE and same, "worst_logit_diff": diff, "top1_equal": same,
            "positions": ids.shape[1], "prefill_chunks": len(spans), "decode_steps": steps,
            "rule": f"logits within {WRAPPER_TOLERANCE} x (1 + max |logit|) of the HF model's full forward at every "
                    f"position, fp32 PyTorch"}


def _check_decoder(model, max_seq_len: int, quant: dict) -> None:
    from edgekd.targets.llm_executorch import check_decoder

    check_decoder(model, max_seq_len, "Core ML decoder export")  # a decoder of the families mapped, a context
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ExportError(f"the model's weights are {dtype}; Core ML export converts from float32: load it with "
                          f"AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32)")
    block = quant.get("block_size")
    widths = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    if block and any(w % block for w in widths):
        raise ExportError(f"int4 blocks of {block} must divide every Linear's input width, and this model has "
                          f"{widths}; choose a QuantSpec whose group size divides them (int4: 32)")


# ---------------------------------------------------------------------------------------------- export

def coreml_decoder_expected(model, spec: QuantSpec | str, max_seq_len: int) -> dict:
    """What check_coreml_decoder must find in the package export_coreml_decoder writes for these arguments."""
    quant = coreml_decoder_quant(spec)
    return {"max_seq_len": max_seq_len, "vocab_size": int(model.config.vocab_size),
            "cache_shape": cache_shape(model.config, max_seq_len), "weights": quant["weights"],
            "block_size": quant.get("block_size")}


def export_coreml_decoder(model, out_path: Path, spec: QuantSpec | str, max_seq_len: int) -> dict:
    """Prove the stateful wrapper of `model` in PyTorch, convert it to an iOS 18 ML Program with the KV cache as
    state, compress its weights per `spec`, check the saved package and move it to `out_path` (a .mlpackage
    folder, built in a temporary sibling and renamed into place). `model` is left as it was. An `out_path` that
    exists is replaced only if edgekd wrote it. Returns the details (see the module docstring)."""
    import coremltools as ct

    spec = get_spec(spec) if isinstance(spec, str) else spec
    quant = coreml_decoder_quant(spec)
    _check_decoder(model, max_seq_len, quant)
    out_path = Path(out_path)
    _check_out_path(out_path)
    expected = coreml_decoder_expected(model, spec, max_seq_len)
    phases, start = {}, time.perf_counter()
    with _export_mode(model), torch.no_grad():
        wrapper = StatefulDecoder(model, max_seq_len).eval()
        parity = wrapper_parity(wrapper, model)
        phases["wrapper_parity"] = _lap(start)
        if not parity["passed"]:
            raise ExportError(f"the stateful torch wrapper differs from the HF model (worst logit difference "
                              f"{parity['worst_logit_diff']:.3g}, top-1 equal {parity['top1_equal']}): this model's "
                              f"attention does not fit the KV-cache wrapper; nothing written")
        program = _torch_export(wrapper, max_seq_len)
        phases["torch_export"] = _lap(start, phases)
        # the graph coremltools converts, run in PyTorch the same way: decompositions and all, decode (n = 1) too
        exported_parity = wrapper_parity(program.module(), model)
        phases["exported_parity"] = _lap(start, phases)
        if not exported_parity["passed"]:
            raise ExportError(f"the exported program differs from the HF model (worst logit difference "
                              f"{exported_parity['worst_logit_diff']:.3g}) though the wrapper matched: torch.export "
                              f"changed it; nothing written")
    seq = ct.RangeDim(lower_bound=1, upper_bound=max_seq_len, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=max_seq_len, default=1)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(expected["cache_shape"]), dtype=np.float16),
                           name=name) for name in STATE_NAMES]
    mlmodel = ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16, skip_model_load=True, states=states,
        inputs=[ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16)],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)])
    phases["convert"] = _lap(start, phases)
    mlmodel = _compress(mlmodel, quant)
    phases["compress"] = _lap(start, phases)
    mlmodel.user_defined_metadata[MARKER] = json.dumps({"quant": quant, "max_seq_len": max_seq_len,
                                                        "cache_shape": expected["cache_shape"]})
    mlmodel.input_description["input_ids"] = "new token ids [1, n]"
    mlmodel.input_description["causal_mask"] = "additive mask [1, 1, n, past + n]: 0 attend, -inf not"
    mlmodel.output_description["logits"] = "next-token logits of every new position [1, n, vocab]"
    check = _save_checked(mlmodel, out_path, expected)
    phases["save_check"] = _lap(start, phases)
    summary = check.pop("summary")
    return {"file": str(out_path), "size_bytes": summary["size_bytes"], "export_s": round(sum(phases.values()), 2),
            "phases_s": phases, "deployment_target": DEPLOYMENT_TARGET, "compute_precision": "float16",
            "spec": spec.to_dict(), "quant": quant, "quant_asked": spec.name, "max_seq_len": max_seq_len,
            "inputs": summary["inputs"], "states": summary["states"], "outputs": summary["outputs"],
            "weights": summary["weights"], "wrapper_parity": parity, "exported_parity": exported_parity, "check": check}


def _lap(start: float, phases: dict | None = None) -> float:
    return round(time.perf_counter() - start - sum((phases or {}).values()), 3)


def _torch_export(wrapper: StatefulDecoder, max_seq_len: int):
    """The ExportedProgram coremltools converts: n and past + n dynamic; the default decompositions but SDPA and
    linear kept (coremltools translates both; a decomposed Linear with a bias, Qwen2's q/k/v, became a matmul
    with its weight transposed); aten.alias dropped (coremltools 9 has no translation; it is a no-op here)."""
    past = 1 if max_seq_len > 2 else 0  # example sizes over 1: torch.export specializes a size of 1
    example = (torch.zeros(1, 2, dtype=torch.long), torch.from_numpy(coreml_causal_mask(2, past, np.float32)))
    # Dim.DYNAMIC, not named Dims: named ones fail on guards like n != max_seq_len that only concern strides
    dims = ({1: torch.export.Dim.DYNAMIC(min=1, max=max_seq_len)},
            {2: torch.export.Dim.DYNAMIC(min=1, max=max_seq_len), 3: torch.export.Dim.DYNAMIC(min=1, max=max_seq_len)})
    program = torch.export.export(wrapper, example, dynamic_shapes=dims, strict=False)
    table = torch.export.default_decompositions()
    for op in [op for op in table if "scaled_dot_product" in str(op) or op == torch.ops.aten.linear.default]:
        table.pop(op)
    program = program.run_decompositions(table)
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _written_by_edgekd(path: Path) -> bool:
    try:
        import coremltools as ct

        return MARKER in ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata
    except Exception:  # not a readable package: not one of ours
        return False


def _check_out_path(out_path: Path) -> None:
    if out_path.suffix != COREML_SUFFIX:
        raise ExportError(f"a Core ML package is a folder named *{COREML_SUFFIX}; got out_path {out_path}: "
                          f"name it {out_path.with_suffix(COREML_SUFFIX).name}")
    if out_path.exists() and not _written_by_edgekd(out_path):
        raise ExportError(f"{out_path} exists and edgekd did not write it, so it is left alone: remove it or "
                          f"choose another out_path")


def _save_checked(mlmodel, out_path: Path, expected: dict) -> dict:
    """Save into a temporary sibling, check it, then rename it into place (an old edgekd package there goes
    into the temporary folder and is removed with it); a failing package is removed and nothing is moved."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        built = scratch / out_path.name
        mlmodel.save(str(built))
        check = check_coreml_decoder(built, expected)
        if not check["passed"]:
            raise ExportError(f"the Core ML package fails its structural check: {'; '.join(check['failures'])}; "
                              f"nothing written")
        _check_out_path(out_path)  # again: something may have appeared there during the conversion
        if out_path.exists():
            os.replace(out_path, scratch / "replaced")
        try:
            os.replace(built, out_path)
        except OSError:
            if (scratch / "replaced").exists():
                os.replace(scratch / "replaced", out_path)  # put the old package back before scratch goes
            raise
        return check
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- structural check

def inspect_coreml_decoder(path: Path) -> dict:
    """What a saved .mlpackage holds, read from disk without the Core ML runtime: its interface (inputs with
    their shape ranges, states, the MIL program's output shape), the ops that write states, how weights are stored."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types
    from coremltools.proto import FeatureTypes_pb2

    from edgekd.targets.ios import _is_float_const, _weight_kind  # the classifier's storage reader, shared

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    dtype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def shape(array):
        ranges = array.shapeRange.sizeRanges
        if not ranges:
            return list(array.shape)
        return [r.lowerBound if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges]

    summary = {
        "specification_version": spec.specificationVersion, "program": spec.WhichOneof("Type"),
        "inputs": [{"name": f.name, "dtype": dtype_name(f.type.multiArrayType.dataType).lower(),
                    "shape": shape(f.type.multiArrayType)} for f in spec.description.input],
        "states": [{"name": f.name, "dtype": dtype_name(f.type.stateType.arrayType.dataType).lower(),
                    "shape": shape(f.type.stateType.arrayType)} for f in spec.description.state],
        "size_bytes": sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()),
        "metadata": dict(mlmodel.user_defined_metadata),
    }
    if summary["program"] != "mlProgram":
        return {**summary, "outputs": [], "state_writes": [], "weights": {}, "blocks": [], "nonfinite_constants": []}
    program = load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    main = program.functions["main"]
    summary["outputs"] = [{"name": v.name, "dtype": types.builtin_to_string(v.dtype),
                           "shape": [d if isinstance(d, int) else "n" for d in v.shape]} for v in main.outputs]
    weights, blocks, nonfinite, writes = {}, [], [], []
    for op in main.operations:
        kind = _weight_kind(op)
        if kind and np.prod(op.outputs[0].shape) <= COMPRESS_THRESHOLD:
            kind = f"{kind} (at most {COMPRESS_THRESHOLD} elements)"
        if kind:
            entry = weights.setdefault(kind, {"tensors": 0, "params": 0, "op": op.op_type})
            entry["tensors"] += 1
            entry["params"] += int(np.prod(op.outputs[0].shape))
        if op.op_type == "constexpr_blockwise_shift_scale":
            # elements per scale along each axis: [1, 32] int4 blocks of 32, [1, width] one scale per row
            data, scale = op.data.shape, op.scale.shape
            blocks.append({"dtype": kind, "blocks": [d // s for d, s in zip(data, scale)], "shape": list(data)})
        if op.op_type == "coreml_update_state":
            writes.append(op.state.name)
        if _is_float_const(op) and not np.isfinite(op.outputs[0].val).all():
            nonfinite.append(op.name)
    return {**summary, "weights": weights, "blocks": blocks, "state_writes": writes, "nonfinite_constants": nonfinite}


def check_coreml_decoder(path: Path, expected: dict) -> dict:
    """The saved package against `expected` (coreml_decoder_expected, or export's own): ML Program for iOS 18,
    inputs input_ids int32 [1, 1..S] and causal_mask float16 [1, 1, 1..S, 1..S], states keyCache / valueCache
    float16 of the cache shape and written by the program, logits [1, n, vocab], weights stored as asked (at
    least MIN_SHARE of their parameters; int4 in blocks of the asked size along the input axis, int8 one scale
    per output channel), no inf/NaN constants. Returns {"passed", "checks": {name: bool}, "failures": [lines],
    "summary"}."""
    summary = inspect_coreml_decoder(Path(path))
    span, vocab = f"1..{expected['max_seq_len']}", expected["vocab_size"]
    want_inputs = [{"name": "input_ids", "dtype": "int32", "shape": [1, span]},
                   {"name": "causal_mask", "dtype": "float16", "shape": [1, 1, span, span]}]
    want_states = [{"name": name, "dtype": "float16", "shape": list(expected["cache_shape"])} for name in STATE_NAMES]
    want_outputs = [{"name": "logits", "dtype": "fp16", "shape": [1, "n", vocab]}]
    kind, block = expected["weights"], expected.get("block_size")
    total = sum(entry["params"] for name, entry in summary["weights"].items() if "at most" not in name)
    share = summary["weights"].get(kind, {}).get("params", 0) / max(total, 1)
    # [out, in] (linear) or [rows, width] (embedding): int4 in blocks of `block` along the last axis, int8 one
    # scale per row; "blocks" counts the elements per scale along each axis
    def want_blocks(b):
        return [1] * (len(b["shape"]) - 1) + [block if kind == "int4" else b["shape"][-1]]

    bad_blocks = [b["blocks"] for b in summary["blocks"] if b["dtype"] == kind and b["blocks"] != want_blocks(b)]
    by_kind = {k: v["params"] for k, v in summary["weights"].items()}
    weights_line = f"{share:.0%} of the weight parameters are stored as {kind} (by kind: {by_kind})"
    if bad_blocks:
        weights_line += f"; elements per scale {bad_blocks[0]}, expected blocks of {block or 'a whole row'}"
    results = {
        "ml_program": (summary["program"] == "mlProgram", f"it is a {summary['program']}, not an ML Program"),
        "deployment_target": (summary["specification_version"] == SPEC_VERSION,
                              f"specification version {summary['specification_version']}, not {SPEC_VERSION} "
                              f"({DEPLOYMENT_TARGET})"),
        "inputs": (summary["inputs"] == want_inputs, f"inputs are {summary['inputs']}, expected {want_inputs}"),
        "states": (summary["states"] == want_states, f"states are {summary['states']}, expected {want_states}"),
        "states_written": (sorted(summary["state_writes"]) == sorted(STATE_NAMES),
                           f"the program writes states {summary['state_writes']}, expected {list(STATE_NAMES)}"),
        "logits": (summary["outputs"] == want_outputs,
                   f"outputs are {summary['outputs']}, expected {want_outputs}"),
        "weights": (share >= MIN_SHARE and not bad_blocks, weights_line),
        "finite_constants": (not summary["nonfinite_constants"],
                             f"constants hold inf/NaN: {', '.join(summary['nonfinite_constants'][:3])}"),
    }
    checks = {name: ok for name, (ok, _) in results.items()}
    return {"passed": all(checks.values()), "checks": checks,
            "failures": [f"{name}: {line}" for name, (ok, line) in results.items() if not ok], "summary": summary}


# ---------------------------------------------------------------------------------------------- run on macOS

def coreml_runtime_problem() -> str | None:
    """Why Core ML cannot run a stateful package here, or None (macOS 15+ with coremltools' runtime library)."""
    import coremltools as ct

    version = ct.utils._macos_version()
    if not version:
        return "Core ML runs only on macOS (and iOS); this machine can check the package only structurally"
    if version < (15, 0):
        return f"stateful Core ML models need macOS 15 or later; this is macOS {'.'.join(map(str, version))}"
    try:
        from coremltools import libcoremlpython  # noqa: F401  the runtime binding, absent from some wheels
    except ImportError:
        return "this coremltools install has no Core ML runtime binding (libcoremlpython); reinstall coremltools"
    return None


class CoreMLDecoder:
    """A loaded stateful package: step(state, tokens, past) -> logits [n, vocab] float32 (macOS 15+ only)."""

    def __init__(self, path: Path, compute_units: str = "CPU_ONLY"):
        problem = coreml_runtime_problem()
        if problem:
            raise RuntimeUnavailable(problem)
        import coremltools as ct

        start = time.perf_counter()
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.load_ms = (time.perf_counter() - start) * 1e3

    def new_state(self):
        return self.model.make_state()  # zeroed cache: one per conversation

    def step(self, state, tokens: list[int], past: int) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int32).reshape(1, -1)
        out = self.model.predict({"input_ids": ids, "causal_mask": coreml_causal_mask(ids.shape[1], past)},
                                 state=state)
        return np.asarray(out["logits"], dtype=np.float32)[0]


@torch.no_grad()
def coreml_decoder_parity(path: Path, model, prompts, new_tokens: int, tolerance: float = COREML_TOLERANCE) -> dict:
    """The package run by Core ML (make_state + predict(state=...)) against `model` (the fp32 model, or a reference
    quantized like the package) on each prompt (token ids): the reference's greedy path fed to the package, the
    prompt in one prefill and then a token per call (teacher forcing), logits compared at every position with the
    reference's full forward over the same path; free-running greedy tokens beside. RuntimeUnavailable off macOS."""
    runner = CoreMLDecoder(path)
    rows = []
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        tokens = list(prompt)
        for _ in range(new_tokens):  # the reference's greedy path, a full forward a token (no sampling settings)
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        greedy = tokens[len(prompt):]
        want = model(torch.tensor([tokens[:-1]])).logits[0, len(prompt) - 1:].float().numpy()
        state = runner.new_state()
        got = [runner.step(state, prompt, 0)[-1]]
        got += [runner.step(state, [t], len(prompt) + i)[-1] for i, t in enumerate(greedy[:-1])]
        got = np.stack(got)
        scale = 1 + np.abs(want).max(-1)
        diff = np.abs(got - want).max(-1) / scale
        top2 = np.sort(want, -1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * scale
        same = got.argmax(-1) == want.argmax(-1)
        state = runner.new_state()  # free-running: the package's own greedy tokens from a fresh cache
        free = [int(runner.step(state, prompt, 0)[-1].argmax())]
        while len(free) < new_tokens:
            free.append(int(runner.step(state, [free[-1]], len(prompt) + len(free) - 1)[-1].argmax()))
        rows.append({"tokens_equal": free == greedy, "forced_equal": int(same.sum()), "forced_length": len(same),
                     "decisive_differ": int((decisive & ~same).sum()), "worst_logit_diff": float(diff.max())})
    worst = max(r["worst_logit_diff"] for r in rows)
    return {"passed": worst <= tolerance and not any(r["decisive_differ"] for r in rows),
            "rule": f"logits within {tolerance} x (1 + max |logit|) at every position of the reference's greedy "
                    f"path (teacher-forced), the same next token wherever the top-2 margin exceeds twice that",
            "prompts": len(rows), "prompts_equal": sum(r["tokens_equal"] for r in rows),
            "teacher_forced_agreement": sum(r["forced_equal"] for r in rows) / sum(r["forced_length"] for r in rows),
            "worst_logit_diff": worst, "logit_tolerance": tolerance, "load_ms": runner.load_ms, "per_prompt": rows}


@torch.no_grad()
def coreml_reference(model, spec: QuantSpec | str):
    """A copy of `model` holding the weights the package stores: each Linear and embedding weight of more than 2048
    elements on coremltools' linear_symmetric grid (int4 per block of the spec's group size along a row, int8 per
    row: levels -qmax..qmax, scale max |w| / qmax in float16), every weight rounded to float16. An estimate of what
    the package computes: its float16 activations are not modelled (a Mac measures the package itself,
    coreml_decoder_parity). Tied weights are untied, as each is stored on its own."""
    import copy

    quant = coreml_decoder_quant(spec)
    reference = copy.deepcopy(model).eval()
    for module in reference.modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        weight = module.weight.detach().float()
        if quant["weights"] != "fp16" and weight.numel() > COMPRESS_THRESHOLD:
            qmax = 7 if quant["weights"] == "int4" else 127
            rows, columns = weight.shape
            block = quant.get("block_size") or columns
            grouped = weight.reshape(rows, columns // block, block)
            scale = (grouped.abs().amax(dim=2, keepdim=True) / qmax).half().float()
            levels = torch.where(scale > 0, grouped / scale.clamp(min=torch.finfo(torch.float16).tiny), 0)
            weight = (levels.round().clamp(-qmax, qmax) * scale).reshape(rows, columns)
        module.weight = torch.nn.Parameter(weight.half().to(module.weight.dtype), requires_grad=False)
    return reference
