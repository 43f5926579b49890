"""A decoder LM (Hugging Face `*ForCausalLM`) as an ExecuTorch .pte with a static KV cache, its runner and its parity.

    fp32 / torchao-quantized HF model ─▶ export_decoder() ─▶ .pte (XNNPACK) ─▶ DecoderRunner.generate() ─▶ parity

The path is transformers' own ExecuTorch integration (`TorchExportableModuleWithStaticCache`): it takes the HF
model object as it is, so a cut or pruned student exports with no weight remapping and no params.json, which
ExecuTorch's own LLM export (`export_llama_lib`, its own Llama-style Transformer) would need. The cache is a set
of mutable buffers in the program, updated in place. Attention is ExecuTorch's `llama::custom_sdpa` (registered
with transformers' AttentionInterface, as optimum-executorch does): causal over the cache up to the current
position, so the graph has no mask and no repeated KV heads: faster to lower and to decode than aten SDPA.

Program signature (recorded in the details as "signature"):
    forward(tokens [1, n] int64, input_pos [1] int64) -> logits [1, vocab] float32, of the last position
where n is 1..max_seq_len and input_pos the position of tokens[0, 0] in the cache: a prompt is prefilled at 0,
then each new token is fed at the next position. Constant methods carry what ExecuTorch's runners read:
get_bos_id (where the model has one), get_eos_ids, get_max_seq_len, get_max_context_len, get_vocab_size,
use_kv_cache, enable_dynamic_shape.

Beside the .pte: `tokenizer.json` (the HF fast tokenizer's file, read by ExecuTorch's text runner and
pytorch-tokenizers; checked to encode like the HF tokenizer) and `generation_config.json`.

Tied embeddings (SmolLM2): an fp32 .pte stores the shared matrix twice, as the constant the portable
aten.embedding reads and inside the XNNPACK blob of the LM head (XNNPACK has no gather to read its copy); measured
tied = untied size, perf/README.md. Undelegating the head would store it once at the price of a portable
vocab x hidden matmul per token, so it stays. int4 keeps two different tensors (int4 embedding, 8da4w head).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path

import torch

from edgekd.architecture import FAMILIES
from edgekd.compress.quant import QuantSpec, linear_config, quantize_embeddings
from edgekd.errors import ExportError
from edgekd.targets.executorch import delegation_summary, load_program
from edgekd.targets.native_log import native_stderr_filtered

_log = logging.getLogger("edgekd.export")

# The decoder families whose HF modules export through the static-cache wrapper: the architecture map's Llama
# layout (SmolLM2 is a LlamaForCausalLM).
DECODER_TYPES = next(f for f in FAMILIES if f.name == "llama").model_types

SIGNATURE = {"method": "forward",
             "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "n"], "n": "1..max_seq_len"},
                        {"name": "input_pos", "dtype": "int64", "shape": [1]}],
             "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "vocab"], "of": "the last position"}]}

# Parity rules, measured on tiny random-weight Llama and Qwen3 decoders (2 layers x 64, vocab 256), 16 random
# prompts of 2-23 tokens, 32 new tokens each. fp32: greedy tokens equal on every prompt (Llama 16/16), logits
# within FP32_LOGIT_TOLERANCE at every position of the path (measured max |diff| 2.4e-7). The rule asks the same
# next token only where the reference's top-2 margin exceeds twice that tolerance: at a closer tie rounding may
# pick the other token, and a free-running path then forks without the export being wrong (free-running equality
# is reported beside it). Both bounds scale with the position's largest |logit| (1 + max |logit|): float32 rounding
# grows with the logits' size and the depth, and an absolute 1e-4 refused a correct export of the fine-tuned
# 30-layer SmolLM2-135M (top-1 equal at every position, worst |diff| 1.09e-4); a broken export (wrong weights, a
# wrong cache position) is off by whole logits. Where every logit is within the tolerance, top-1 can only differ
# where the top-2 margin is under twice it, so the rule asks the same token wherever the margin exceeds that.
# Quantized (int4 8da4w g32): against the torchao-quantized model in PyTorch. XNNPACK's kernels round differently
# from torchao's reference ops, so where two logits nearly tie, free-running greedy paths fork and never rejoin
# (tiny Llama: 10/16 prompts equal, 78 % of tokens before the first fork); so the rule feeds the reference's greedy
# path to the .pte (teacher forcing) and compares logits at every position. How far XNNPACK's rounding carries
# grows with depth and width, so no fixed bound fits every model: on the tiny decoders the .pte was within
# 0.0046 / 0.0053 x (1 + max |logit|) of its reference (the fp32 model 0.08-0.10 away); on the built-in demo's
# student (SmolLM2-135M cut to 10 layers, fine-tuned) within 0.053 at worst, the fp32 model 0.26 at the median
# (perf/results/lm_quant_gate.json). The yardstick is the quantization error itself, measured on the same path:
# the .pte must sit within QUANT_ERROR_SHARE of the median distance between the reference and the fp32 model
# (a .pte that computes the fp32 model, or a broken one, is at least that far off), or within QUANT_LOGIT_FLOOR
# where quantization changes the logits too little for the share to be a bound XNNPACK's rounding can meet.
FP32_LOGIT_TOLERANCE = 1e-4
QUANT_ERROR_SHARE = 0.5
QUANT_LOGIT_FLOOR = 0.02


def check_decoder(model, max_seq_len: int, exporter: str = "ExecuTorch decoder export") -> None:
    """One ExportError line if `model` is not a decoder this path (or `exporter`, another decoder export) exports,
    or `max_seq_len` does not fit it."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in DECODER_TYPES or not type(model).__name__.endswith("ForCausalLM"):
        raise ExportError(f"{exporter} takes a Hugging Face *ForCausalLM of model type "
                          f"{', '.join(DECODER_TYPES)}; got {type(model).__name__} (model type {model_type!r}): "
                          f"load a supported decoder with AutoModelForCausalLM")
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_seq_len, int) or max_seq_len < 2 or (limit and max_seq_len > limit):
        raise ExportError(f"max_seq_len {max_seq_len!r} must be an integer from 2 to the model's "
                          f"max_position_embeddings ({limit}); pass a smaller max_seq_len")
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in (getattr(config, "layer_types", None) or ()) and max_seq_len > window:
        raise ExportError(f"this model has sliding-window layers of {window} tokens and the exported cache keeps "
                          f"every position; pass max_seq_len <= {window}")


def special_ids(model, tokenizer=None, eos_ids=None) -> tuple[int | None, list[int]]:
    """(bos id or None, eos ids): given, else the tokenizer's, else the generation config's, else the config's."""
    sources = [tokenizer, getattr(model, "generation_config", None), model.config]
    if eos_ids is None:
        found = next((getattr(s, "eos_token_id", None) for s in sources
                      if s is not None and getattr(s, "eos_token_id", None) is not None), None)
        eos_ids = [] if found is None else [found] if isinstance(found, int) else list(found)
    if not eos_ids:
        raise ExportError(f"{type(model).__name__} has no eos token in its tokenizer, generation config or config, "
                          f"so generation could never stop; set eos_token_id in the model's generation_config.json "
                          f"(or pass eos_ids=[...])")
    bos = next((getattr(s, "bos_token_id", None) for s in sources
                if s is not None and getattr(s, "bos_token_id", None) is not None), None)
    return bos, [int(i) for i in eos_ids]


def check_decoder_spec(spec: QuantSpec) -> None:
    """Refuses a spec the decoder export does not realize (checked by preflight before training, and here)."""
    if spec.weights in ("fp16", "lut4") or spec.activations == "static":
        raise ExportError(f"ExecuTorch decoder export realizes fp32, and int8/int4 weights with dynamic or no "
                          f"activation quantization; QuantSpec {spec.name} is not one: use fp32, int4 or int8")


def quantize_decoder(model, spec: QuantSpec):
    """A copy of `model` quantized per `spec` with torchao (8da4w / 8da8w / weight-only linears, weight-only
    embeddings): the reference a quantized .pte is proven against, and what export_decoder lowers."""
    check_decoder_spec(spec)
    quantized = copy.deepcopy(model).eval()
    if spec.weights in ("int8", "int4"):
        from torchao.quantization import quantize_

        config = linear_config(quantized, spec)
        quantize_(quantized, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    if spec.embeddings:
        quantize_embeddings(quantized, spec.embeddings)
    return quantized


CUSTOM_SDPA = "edgekd_custom_sdpa"


def _custom_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, scaling=None, **kwargs):
    """transformers' attention call, answered by `llama::custom_sdpa`: query [1, heads, n, dim] against the whole
    static cache (key/value [1, kv heads, max_seq_len, dim]), causal from position_ids[0, 0]."""
    start_pos = position_ids[0][0].item()
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      start_pos=start_pos, attn_mask=None, drpout_p=0.0, is_causal=True,
                                      scale=scaling)
    return out, None


def _use_custom_sdpa(model) -> None:
    """Point `model` at llama::custom_sdpa; no mask is built for it (the op is causal by itself)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama::custom_sdpa
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(CUSTOM_SDPA, _custom_sdpa_attention)
    AttentionMaskInterface.register(CUSTOM_SDPA, lambda *args, **kwargs: None)
    model.config._attn_implementation = CUSTOM_SDPA


class DecoderWithCache(torch.nn.Module):
    """forward(tokens [1, n], input_pos [1]) -> last-position logits [1, vocab], the cache updated in place.

    transformers' static-cache wrapper owns the cache buffers; the cache's write position is set from input_pos
    (its own forward takes a cache_position vector and returns every position's logits)."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        model.generation_config.use_cache = True
        model.generation_config.cache_implementation = "static"
        self.inner = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_seq_len,
                                                          device="cpu")

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cache = self.inner.static_cache
        for layer in cache.layers:
            layer.cumulative_length.copy_(input_pos[0])
        # logits_to_keep=1: the LM head runs on the last position only (a prefill of n tokens saves n-1 rows).
        out = self.inner.model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]


@contextlib.contextmanager
def _phase(timings: dict, name: str):
    """Record the seconds the block takes as timings[name] (and log it: a long export shows where it is)."""
    start = time.perf_counter()
    _log.info("export phase %s ...", name)
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    _log.info("export phase %s: %.1f s", name, timings[name])


def export_decoder(model, out_file: Path, spec: QuantSpec, max_seq_len: int, tokenizer=None,
                   eos_ids=None, verify_ir: bool = False, skip_dim_order: bool = True) -> dict:
    """Quantize a copy of `model` per `spec`, export it with a static KV cache of `max_seq_len` positions, lower
    it to XNNPACK and write `out_file`, and beside it `generation_config.json` and (given a fast `tokenizer`)
    `tokenizer.json`, all atomically. `model` itself is left as it was. `verify_ir` runs ExecuTorch's edge-dialect
    verifier after the lowering's passes (off by default, as in ExecuTorch's own LLM export; on, it names the pass
    that breaks a lowering). `skip_dim_order` leaves out the pass that turns every copy into a dim-order op, as
    ExecuTorch's own LLM export does for XNNPACK (its runtime reads contiguous tensors either way).

    Returns the details: size, signature, metadata, delegation summary, the seconds of each phase ("phases_s":
    quantize, torch_export, to_edge_transform_and_lower, to_executorch, save), the companion files, and for a
    quantized spec "reference": the torchao-quantized model in PyTorch the .pte is proven against."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    check_decoder(model, max_seq_len)
    bos, eos = special_ids(model, tokenizer, eos_ids)
    companions = companion_files(model, tokenizer)  # a slow tokenizer is refused here, before the export
    if "tokenizer.json" in companions:
        _check_tokenizer_text(companions["tokenizer.json"], tokenizer)
    phases = {}
    with _phase(phases, "quantize"):
        quantized = quantize_decoder(model, spec)
    exported = copy.deepcopy(quantized)  # the reference keeps transformers' own attention
    _use_custom_sdpa(exported)
    wrapper = DecoderWithCache(exported, max_seq_len).eval()
    tokens, input_pos = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    with _phase(phases, "torch_export"), torch.no_grad():
        # strict (dynamo): non-strict tracing lifts the cache tensors twice (as buffers and as constants), and
        # torch 2.13's run_decompositions then fails ("expected compiled_fn to be GraphModule").
        program = torch.export.export(wrapper, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=True)
    metadata = {"get_eos_ids": eos, "get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                "get_vocab_size": int(model.config.vocab_size), "use_kv_cache": True, "enable_dynamic_shape": True}
    if bos is not None:
        metadata["get_bos_id"] = bos
    with _phase(phases, "to_edge_transform_and_lower"):
        # The edge-dialect verifier re-runs the whole graph on fake tensors after passes; ExecuTorch's own LLM
        # export (extension/llm/export/builder.py) turns it off, and so does this one: the .pte is proven by the
        # parity gate instead (`perf/llm_export_time.py --compare verifier`: about 8 % of a 1-layer int4 lowering).
        config = EdgeCompileConfig(_check_ir_validity=verify_ir, _skip_dim_order=skip_dim_order)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
                                           compile_config=config)
    delegation = delegation_summary(edge.exported_program().graph_module)
    with _phase(phases, "to_executorch"):
        # Constant propagation folds torchao's dequantize of quantized embeddings into embedding_byte & co.
        buffer = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)).buffer
    out_file = Path(out_file)
    with _phase(phases, "save"):
        beside = {out_file.with_name(name): text.encode() for name, text in companions.items()}
        _write_atomically({out_file: buffer, **beside})
    details = {**delegation, "file": str(out_file), "size_bytes": out_file.stat().st_size, "spec": spec.to_dict(),
               "max_seq_len": max_seq_len, "signature": SIGNATURE, "metadata": metadata, "phases_s": phases,
               "export_s": round(phases["quantize"] + phases["torch_export"], 2),
               "lower_s": round(sum(phases.values()) - phases["quantize"] - phases["torch_export"], 2),
               "companions": sorted(companions)}
    if not spec.is_float:
        details["reference"] = quantized
    return details


def companion_files(model, tokenizer=None) -> dict[str, str]:
    """What goes beside the .pte: name -> text. `generation_config.json` always; `tokenizer.json` (the Hugging
    Face fast tokenizer's own file, which ExecuTorch's text runner and pytorch-tokenizers read) given a tokenizer."""
    files = {"generation_config.json": model.generation_config.to_json_string(use_diff=False)}
    if tokenizer is not None:
        if not getattr(tokenizer, "is_fast", False):
            raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast one, and the ExecuTorch "
                              f"runners read a tokenizer.json; load it with AutoTokenizer.from_pretrained(..., "
                              f"use_fast=True)")
        files["tokenizer.json"] = tokenizer.backend_tokenizer.to_str()
    return files


def _write_atomically(files: dict[Path, bytes]) -> None:
    """Each file written as a hidden partial sibling first, then all renamed: no half file under a final name."""
    partials = {path: path.with_name(f".{path.name}.partial") for path in files}
    try:
        for path, data in files.items():
            partials[path].write_bytes(data)
    except BaseException:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        raise
    for path, partial in partials.items():
        os.replace(partial, path)


# What the tokenizer check encodes: words, digits, punctuation, spaces, accents and a non-Latin script.
TOKENIZER_CHECK_TEXT = "Operating profit rose to EUR 13.1 mn,  up 51 % (Q3/2024): café, naïve — 利润增长。"


def _check_tokenizer_text(text_json: str, tokenizer) -> None:
    """check_tokenizer_json on the tokenizer.json about to be written (where pytorch-tokenizers is installed)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("pytorch_tokenizers") is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.json"
        file.write_text(text_json)
        check_tokenizer_json(file, tokenizer, TOKENIZER_CHECK_TEXT)


def check_tokenizer_json(file: Path, tokenizer, text: str) -> list[int]:
    """The ids pytorch-tokenizers' C++ HF tokenizer (what ExecuTorch apps link) gives `text` from `file`; an
    ExportError if they differ from `tokenizer`'s (no special tokens added by either)."""
    from pytorch_tokenizers import CppHFTokenizer

    with native_stderr_filtered():  # it logs its regex set-up to fd 2
        native = CppHFTokenizer()
        try:
            native.load(str(file))
        except RuntimeError as exc:  # e.g. a pre-tokenizer the C++ library does not implement
            raise ExportError(f"pytorch-tokenizers, the tokenizer library ExecuTorch apps link, cannot read this "
                              f"model's tokenizer.json ({exc}), so an app could not feed it text; use a model "
                              f"whose tokenizer is BPE, tiktoken or SentencePiece (Llama, Qwen, SmolLM are)") from None
        got = list(native.encode(text, 0, 0))
    want = tokenizer.encode(text, add_special_tokens=False)
    if got != want:
        fork = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ExportError(f"pytorch-tokenizers reads {file} differently from the Hugging Face tokenizer "
                          f"(ids differ from token {fork} of {len(want)} on {text[:40]!r}); an app using it would "
                          f"feed the model other tokens: export with a tokenizer whose tokenizer.json both read alike")
    return got


class DecoderRunner:
    """A loaded decoder .pte: prefill a prompt, then decode greedily token by token through its KV cache."""

    runtime = "executorch"

    def __init__(self, file: Path, threads: int = 0):
        with native_stderr_filtered():
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  the kernel of llama::custom_sdpa
        self.program, self.method, self.load_ms = load_program(file, threads)
        with native_stderr_filtered():
            self.metadata = {name: self.program.load_method(name).execute([])
                             for name in self.program.method_names if name != "forward"}
        self.max_seq_len = int(self.metadata["get_max_seq_len"][0])
        self.eos_ids = {int(i) for i in self.metadata.get("get_eos_ids", [])}

    def _check_length(self, n: int, what: str) -> None:
        if n > self.max_seq_len:
            raise ExportError(f"{what} is {n} tokens and this .pte's context holds {self.max_seq_len}; "
                              f"shorten the prompt or export with a larger max_seq_len")

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] after `tokens` [1, n] written into the cache from `position`."""
        return self.method.execute([tokens.to(torch.long), torch.tensor([position], dtype=torch.long)])[0]

    def prefill_logits(self, prompt_ids) -> torch.Tensor:
        prompt = _as_row(prompt_ids)
        self._check_length(prompt.shape[1], "the prompt")
        return self.step(prompt, 0)

    def generate(self, prompt_ids, max_new_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], dict]:
        """Greedy decoding: (the new tokens, timings). The prompt is prefilled in one call from position 0."""
        prompt = _as_row(prompt_ids)
        n = prompt.shape[1]
        self._check_length(n + max_new_tokens - 1, f"the prompt ({n} tokens) plus {max_new_tokens} new tokens")
        return greedy_generate(self, prompt, max_new_tokens, stop_at_eos)

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {"executorch": metadata.version("executorch")}


def _as_row(prompt_ids) -> torch.Tensor:
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    prompt = prompt.reshape(1, -1)
    if prompt.shape[1] == 0:
        raise ExportError("the prompt is empty; give at least one token (e.g. the bos token)")
    return prompt


@torch.no_grad()
def decisive_positions(logits: torch.Tensor, tolerance: float) -> list[bool]:
    """Per position of a greedy path's next-token logits [positions, vocab]: whether the top-2 margin exceeds twice
    `tolerance` x (1 + max |logit|), so that logits within the tolerance cannot pick another token there."""
    top2 = logits.topk(2, dim=1).values
    return ((top2[:, 0] - top2[:, 1]) > 2 * tolerance * (1 + logits.abs().amax(dim=1))).tolist()


def greedy_generate(runner, prompt: torch.Tensor, max_new_tokens: int, stop_at_eos: bool) -> tuple[list[int], dict]:
    """Greedy decoding through `runner.step` (a cache runner: .pte, .tflite): the prompt [1, n] from position 0,
    then one token a step; (the new tokens, timings: time to first token, prefill and decode tokens/s)."""
    n = prompt.shape[1]
    start = time.perf_counter()
    token = int(runner.step(prompt, 0).argmax())
    first = time.perf_counter()
    tokens = [token]
    while len(tokens) < max_new_tokens and not (stop_at_eos and token in runner.eos_ids):
        token = int(runner.step(torch.tensor([[token]]), n + len(tokens) - 1).argmax())
        tokens.append(token)
    end = time.perf_counter()
    decoded = len(tokens) - 1  # tokens from decode steps; the first came from the prefill
    return tokens, {"prompt_tokens": n, "new_tokens": len(tokens), "ttft_ms": (first - start) * 1e3,
                    "prefill_tokens_per_s": n / (first - start),
                    "decode_tokens_per_s": decoded / (end - first) if decoded else None}


def reference_generate(model, prompt_ids, max_new_tokens: int, eos_ids) -> list[int]:
    """PyTorch's greedy tokens (`generate(do_sample=False)` with its own dynamic cache), stopping at the same eos."""
    from transformers import GenerationConfig

    prompt = _as_row(prompt_ids)
    eos = sorted(eos_ids)
    # A config of its own: the model's may carry sampling or repetition settings that greedy parity must not use.
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
    return out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def forced_logits(runner: DecoderRunner, prompt, path_tokens: list[int], *models) -> tuple[torch.Tensor, ...]:
    """Teacher forcing: `prompt` then `path_tokens` fed to the .pte through its cache (the prompt in one prefill,
    then one token a step) and to each of `models` in one forward; the next-token logits of the .pte, then of each
    model, at every position from the prompt's last on, [len(path_tokens), vocab] each."""
    n = _as_row(prompt).shape[1]
    path = _as_row(list(_as_row(prompt)[0]) + list(path_tokens[:-1]))
    pte_logits = torch.cat([runner.step(path[:, :n], 0)]
                           + [runner.step(path[:, i:i + 1], i) for i in range(n, path.shape[1])]).float()
    return (pte_logits, *(model(path).logits[0, n - 1:].float() for model in models))


def decoder_parity(runner: DecoderRunner, reference, prompts, max_new_tokens: int, float_model=None) -> dict:
    """The .pte against `reference` on each prompt: the fp32 model, or (given `float_model`, the fp32 model it was
    quantized from) the torchao-quantized one.

    Free-running: the greedy tokens of both. Teacher-forced: the reference's greedy path fed to the .pte token by
    token through its cache, its logits at every position (prefill included) compared with the reference's over
    the same path in one forward. Returns the figures and "passed" by the rules above; the caller refuses a
    failure."""
    rows, positions, quant_error = [], [], []
    for prompt in prompts:
        want = reference_generate(reference, prompt, max_new_tokens, runner.eos_ids)
        got, _ = runner.generate(prompt, max_new_tokens)
        pte_logits, ref_logits, *float_logits = forced_logits(runner, prompt, want, reference,
                                                              *([float_model] if float_model is not None else []))
        scale = 1 + ref_logits.abs().amax(dim=1)  # rounding grows with the logits' size
        diff = (pte_logits - ref_logits).abs().amax(dim=1) / scale
        for logits in float_logits:
            quant_error += ((ref_logits - logits).abs().amax(dim=1) / scale).tolist()
        same = pte_logits.argmax(1) == ref_logits.argmax(1)
        fork = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        rows.append({"tokens_equal": got == want, "first_fork": fork, "length": max(len(got), len(want)),
                     "forced_equal": int(same.sum()), "forced_length": len(want),
                     "prefill_logit_diff": (diff[0] * scale[0]).item(), "worst_logit_diff": diff.max().item()})
        positions.append((ref_logits.topk(2, dim=1).values, scale, same))
    if float_model is None:
        tolerance = FP32_LOGIT_TOLERANCE
        rule = f"logits within {FP32_LOGIT_TOLERANCE} x (1 + max |logit|)"
        extra = {"logit_tolerance": tolerance}
    else:
        typical = torch.tensor(quant_error).median().item()
        tolerance = max(QUANT_LOGIT_FLOOR, QUANT_ERROR_SHARE * typical)
        rule = (f"logits within max({QUANT_LOGIT_FLOOR}, {QUANT_ERROR_SHARE} x the median quantization error "
                f"{typical:.3g}) = {tolerance:.3g} x (1 + max |logit|)")
        extra = {"median_quantization_error": typical, "logit_tolerance": tolerance}
    for r, (top2, scale, same) in zip(rows, positions):
        # A position is decisive when the reference's top-2 margin exceeds twice the tolerance: logits within it
        # cannot pick another token there; below it they may (a fork at a near-tie, not a bug).
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * tolerance * scale
        r["decisive_differ"] = int((decisive & ~same).sum())
    worst = max(r["worst_logit_diff"] for r in rows)
    passed = worst <= tolerance and not any(r["decisive_differ"] for r in rows)
    rule += (" at every position of the greedy path (teacher-forced), the same next token wherever the top-2 "
             "margin exceeds twice that")
    forced = sum(r["forced_equal"] for r in rows) / sum(r["forced_length"] for r in rows)
    return {"passed": passed, "rule": rule, "prompts": len(rows), "prompts_equal": sum(r["tokens_equal"] for r in rows),
            "free_running_agreement": sum(r["first_fork"] for r in rows) / sum(r["length"] for r in rows),
            "teacher_forced_agreement": forced, "worst_logit_diff": worst, **extra,
            "worst_prefill_logit_diff": max(r["prefill_logit_diff"] for r in rows), "per_prompt": rows}
