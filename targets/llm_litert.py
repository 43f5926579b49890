"""A decoder LM (Hugging Face `*ForCausalLM`) as a LiteRT-LM bundle (.litertlm), its runners and its parity.

    HF model folder ─▶ litert-torch export_hf (+ ai-edge-quantizer) ─▶ model.tflite ─▶ .litertlm
                                         │                                │             │
                      litert_reference() (PyTorch)      LiteRTDecoderRunner (LiteRT)   LiteRTLMRunner (LiteRT-LM)

litert-torch's generic exporter for Hugging Face decoders (`litert_torch.generative.export_hf.export`) writes a
.tflite with `prefill_<n>` and `decode` signatures over an external KV cache and packs it, the tokenizer and the
prompt template into the .litertlm that LiteRT-LM (Android, iOS, desktop) runs. Quantization is ai-edge-quantizer's
own recipe applied by the exporter (RECIPES). Its default when no recipe is given is dynamic int8, so an fp32 export
passes "none" explicitly.

Two checks, each in its own runtime:
  - the export gate: the very .tflite packed into the bundle, run by LiteRT's interpreter (LiteRTDecoderRunner:
    logits at every step), against its PyTorch reference with targets/llm_executorch.py's decoder_parity rules:
    fp32 against the model; quantized against `litert_reference`, the model with each weight quantized and
    dequantized by ai-edge-quantizer's own parameter rule (symmetric min-max per block or channel, scales rounded as
    it rounds them) and, for the dynamic recipes, each Linear's input quantized per row to int8 as XNNPACK does
    on the fly (on a 4-layer cut of SmolLM2 at int4: worst logit difference 0.034 with it, 0.061 without, against
    a bound of 0.065);
  - the bundle in LiteRT-LM (LiteRTLMRunner: text in, text out, the runtime an app links): its start token and
    tokenizer must give the Hugging Face ids of every prompt, and its greedy text must be LiteRT's greedy path's
    (litert_lm_check).
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.quant import QuantSpec
from edgekd.errors import ExportError
from edgekd.targets.llm_executorch import decisive_positions
from edgekd.targets.native_log import native_stderr_filtered

ARTIFACT_SUFFIX = ".litertlm"

# QuantSpec -> ai-edge-quantizer recipe (ai_edge_quantizer.recipe): "dynamic" is int8 activations quantized on the
# fly with int8/int4 compute (XNNPACK), "weight_only" dequantizes the weights to float.
RECIPES = {("fp32", None, "none"): "none",
           ("int8", None, "dynamic"): "dynamic_wi8_afp32",       # per output channel
           ("int8", None, "none"): "weight_only_wi8_afp32",
           ("int4", 32, "dynamic"): "dynamic_wi4b32_afp32",      # per block of 32 input channels
           ("int4", 64, "dynamic"): "dynamic_wi4b64_afp32"}

# LiteRT-LM's CPU executor runs the same .tflite with XNNPACK as LiteRT's interpreter does: on a 4-layer cut of
# SmolLM2, fp32 and int4, its greedy text equalled the interpreter's on every prompt (its start token counted, see
# litert_lm_prompt), so the tolerance is the fp32 gate's (targets/llm_executorch.py), for thread-count rounding.
LITERT_LM_TOLERANCE = 1e-4
# LiteRT-LM writes an XNNPACK weight cache of the model's size beside the file unless told not to: never into an
# export or a bundle edgekd has checksummed
NO_CACHE = ":nocache"


def litert_recipe(spec: QuantSpec) -> str:
    """The ai-edge-quantizer recipe realizing `spec`; one ExportError line for a spec it has none for."""
    key = (spec.weights, spec.group_size, spec.activations)
    embeddings_match = spec.embeddings in (None, spec.weights) and (spec.embeddings is None) == (spec.weights == "fp32")
    if key not in RECIPES or spec.qparams != "affine" or not embeddings_match:
        raise ExportError(f"LiteRT decoder export realizes fp32, int8 (dynamic or weight-only) and int4 per group of "
                          f"32 or 64 (ai-edge-quantizer's min-max recipes, the embedding quantized alike); QuantSpec "
                          f"{spec.name} is not one: use fp32, int8, int4 or int4-g64")
    return RECIPES[key]


def _quantized_dequantized(weight: torch.Tensor, bits: int, block: int | None) -> torch.Tensor:
    """`weight` [rows, columns] as ai-edge-quantizer stores it, dequantized: symmetric, scale = max |w| / qmax per
    block of `block` columns (None: per row), blockwise scales rounded to bfloat16 (its own tensor_zp_scale_from_
    min_max computes them)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize.uniform_quantize_tensor import tensor_zp_scale_from_min_max

    w = weight.detach().float().numpy()
    rows, columns = w.shape
    grouped = w.reshape(rows, columns // block, block) if block else w.reshape(rows, 1, columns)
    granularity = (getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}") if block
                   else qtyping.QuantGranularity.CHANNELWISE)
    low, high = grouped.min(axis=2, keepdims=True), grouped.max(axis=2, keepdims=True)
    _, scale = tensor_zp_scale_from_min_max(low, high, bits, True, granularity)
    qmax = 2 ** (bits - 1) - 1
    # an all-zero block's scale underflows to 0 in the float16 rounding (the quantizer's own too): it stays 0
    q = np.clip(np.rint(np.divide(grouped, scale, out=np.zeros_like(grouped), where=scale > 0)), -qmax - 1, qmax)
    return torch.from_numpy((q * scale).reshape(rows, columns).astype(np.float32)).to(weight.dtype)


@torch.no_grad()
def litert_reference(model, spec: QuantSpec):
    """A copy of `model` whose Linear and embedding weights hold what the quantized .tflite holds, its Linear inputs
    quantized as the dynamic recipes quantize them (the reference a quantized LiteRT export is proven against);
    tied weights are untied, as the .tflite keeps two tensors."""
    litert_recipe(spec)
    reference = copy.deepcopy(model).eval()
    if spec.is_float:
        return reference
    bits, block = (8, None) if spec.weights == "int8" else (4, spec.group_size)
    for module in reference.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight = torch.nn.Parameter(_quantized_dequantized(module.weight, bits, block),
                                               requires_grad=False)
        if isinstance(module, torch.nn.Linear) and spec.activations == "dynamic":
            module.register_forward_pre_hook(_int8_per_row)
    return reference


def _int8_per_row(module, args):
    """A dynamic-range Linear's input as XNNPACK's qd8 kernels see it: each row (token) quantized to int8 on the
    fly, asymmetric over its own min and max (zero kept exact)."""
    x = args[0]
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(x.dtype).tiny)
    zero = (-128 - torch.round(low / scale)).clamp(-128, 127)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale, *args[1:]


def export_litert_decoder(model_dir: Path, out_file: Path, spec: QuantSpec, max_seq_len: int,
                          prefill_lengths: list[int], work_dir: Path) -> dict:
    """Export the HF model folder `model_dir` with litert-torch: `out_file` (.litertlm) and, in `work_dir`, the
    .tflite packed into it (for the gate: LiteRTDecoderRunner). Returns the details."""
    recipe = litert_recipe(spec)
    lengths = sorted({n for n in prefill_lengths if 1 < n < max_seq_len}) or [min(32, max_seq_len - 1)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        try:  # its progress lines, and its import's, go to stderr: stdout is edgekd's own (--json)
            with contextlib.redirect_stdout(sys.stderr):
                export_hf = _import_exporter()
                export_hf.export(model=str(model_dir), output_dir=tmp, task="text_generation",
                                 prefill_lengths=lengths, cache_length=max_seq_len, quantization_recipe=recipe,
                                 bundle_litert_lm=True, keep_temporary_files=True)
        except Exception as exc:  # the exporter's own errors are many kinds; the line names it
            raise ExportError(f"litert-torch could not export {model_dir} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
        tflite = Path(tmp) / ("model.tflite" if recipe == "none" else "model_quantized.tflite")
        bundle = Path(tmp) / "model.litertlm"
        if not bundle.is_file() or not tflite.is_file():
            raise ExportError(f"litert-torch wrote no {bundle.name} and {tflite.name} for {model_dir}; "
                              f"its files: {sorted(p.name for p in Path(tmp).iterdir())}")
        gate_file = Path(work_dir) / "model.tflite"
        shutil.move(str(tflite), gate_file)
        partial = out_file.with_name(f".{out_file.name}.partial")
        shutil.move(str(bundle), partial)
        partial.replace(out_file)
    return {"file": str(out_file), "size_bytes": out_file.stat().st_size, "tflite": str(gate_file),
            "tflite_size_bytes": gate_file.stat().st_size, "recipe": recipe, "prefill_lengths": lengths,
            "max_seq_len": max_seq_len, "export_s": round(time.perf_counter() - start, 2), "spec": spec.to_dict()}


def _import_exporter():
    """litert-torch's exporter module. Its `patches` module, on import, swaps transformers'
    `use_kernel_forward_from_hub` for its own, so every modeling module imported after it builds its RMSNorm from
    litert-torch's, sized at construction (a width-pruned student's norm then fails), and decorates functions
    without the mark that the `kernels` package (a dependency of transformers 5.25) checks: gemma3's import fails.
    So that module is imported alone and the swap put back before the exporter imports the modeling modules it
    names: edgekd loads the model itself, and the export never used the swap."""
    import transformers
    from litert_torch.generative.export_hf.core import patches

    transformers.integrations.use_kernel_forward_from_hub = patches.original_use_kernel_forward_from_hub
    from litert_torch.generative.export_hf import export as export_hf

    return export_hf


class LiteRTDecoderRunner:
    """A decoder .tflite of litert-torch's exporter in LiteRT's interpreter: prefill_<n> / decode signatures over
    an external KV cache that this runner holds; the DecoderRunner interface (step, generate, eos_ids), so
    decoder_parity proves it as it proves a .pte."""

    runtime = "litert"

    def __init__(self, file: Path, eos_ids, threads: int = 0):
        from ai_edge_litert.interpreter import Interpreter

        start = time.perf_counter()
        with native_stderr_filtered():
            self.interpreter = Interpreter(model_path=str(file), num_threads=threads or None)
        self.load_ms = (time.perf_counter() - start) * 1e3
        signatures = self.interpreter.get_signature_list()
        self.decode = self.interpreter.get_signature_runner("decode")
        self.prefills = {int(name.split("_")[1]): self.interpreter.get_signature_runner(name)
                         for name in signatures if name.startswith("prefill_")}
        inputs = self.decode.get_input_details()
        self.cache_shapes = {k: (v["shape"], v["dtype"]) for k, v in inputs.items() if k.startswith("kv_cache")}
        self.mask = inputs.get("mask")
        # K is [1, kv heads, positions, dim]; the position axis is the one the decode mask spans
        self.max_seq_len = int(self.mask["shape"][-1]) if self.mask else int(
            next(iter(self.cache_shapes.values()))[0][2])
        self.vocab_size = int(self.decode.get_output_details()["logits"]["shape"][-1])
        self.eos_ids = {int(i) for i in eos_ids}
        self.cache = {}

    def _mask(self, positions: list[int]) -> np.ndarray:
        dtype = self.mask["dtype"]
        allowed = np.arange(self.max_seq_len)[None, :] <= np.array(positions)[:, None]
        if dtype == np.bool_:
            return allowed[None, None]
        return np.where(allowed, 0, np.finfo(dtype).min).astype(dtype)[None, None]

    def _run(self, signature, ids: list[int], positions: list[int]) -> dict:
        feed = {"tokens": np.array([ids], np.int32), "input_pos": np.array(positions, np.int32), **self.cache}
        if self.mask is not None:
            feed["mask"] = self._mask(positions)
        out = signature(**feed)
        self.cache = {k: out[k] for k in self.cache_shapes}
        return out

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] after `tokens` [1, n] written into the cache from `position` (all but the last token
        through a prefill signature, padded to its length where it fits, the last through decode)."""
        ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1)]
        if position == 0:
            self.cache = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.cache_shapes.items()}
        if position + len(ids) > self.max_seq_len:
            raise ExportError(f"{position + len(ids)} positions exceed this .tflite's cache of {self.max_seq_len}; "
                              f"shorten the prompt or export with a larger max_seq_len")
        head, at = ids[:-1], position
        while head:
            length = next((n for n in sorted(self.prefills) if n >= len(head)), max(self.prefills, default=0))
            if not length or at + length > self.max_seq_len:  # no padded prefill fits: one token at a time
                self._run(self.decode, head[:1], [at])
                head, at = head[1:], at + 1
                continue
            chunk = head[:length]
            # padding rows write positions the next steps overwrite before any mask lets them be read
            self._run(self.prefills[length], chunk + [0] * (length - len(chunk)), list(range(at, at + length)))
            head, at = head[length:], at + len(chunk)
        logits = self._run(self.decode, ids[-1:], [at])["logits"]
        return torch.from_numpy(np.array(logits)).reshape(1, -1)

    def generate(self, prompt_ids, max_new_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], dict]:
        """Greedy decoding: (the new tokens, timings), as DecoderRunner.generate."""
        from edgekd.targets.llm_executorch import greedy_generate

        prompt = torch.as_tensor(prompt_ids).reshape(1, -1)
        if not prompt.numel():
            raise ExportError("the prompt is empty; give at least one token (e.g. the bos token)")
        return greedy_generate(self, prompt, max_new_tokens, stop_at_eos)

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {name: metadata.version(name) for name in ("ai-edge-litert", "litert-torch", "ai-edge-quantizer")}


class LiteRTLMRunner:
    """A .litertlm in the LiteRT-LM runtime (pip litert-lm-api, the C++ engine apps link): text in, greedy text
    out, and LiteRT-LM's own benchmark (`generate`, for benchmarks/llm.py's bench_decoders). Not its text scoring:
    after a prefill it rewinds the KV cache twice and scores wrong (LiteRT-LM issue #3561, reported on 0.17, open)."""

    runtime = "litert-lm"

    def __init__(self, file: Path, threads: int = 0, max_seq_len: int | None = None):
        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        self.file, self.threads = Path(file), threads
        self.backend = litert_lm.Backend.CPU(thread_count=threads or None)
        start = time.perf_counter()
        with native_stderr_filtered():  # no XNNPACK weight cache written beside the file (its default)
            self.engine = litert_lm.Engine(str(file), backend=self.backend, cache_dir=NO_CACHE)
        self.load_ms = (time.perf_counter() - start) * 1e3
        # stop sequences: litert-torch adds the template's end of turn ("<|im_end|>\n") and punctuation before it
        self.stop_sequences = [list(ids) for ids in self.engine.eos_token_ids]
        self.eos_ids = {ids[0] for ids in self.stop_sequences if len(ids) == 1}
        self.bos_id = self.engine.bos_token_id  # its start token: prefill puts it before the text
        self.max_seq_len = max_seq_len  # the export's (the engine does not say it)
        self.vocab_size = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenize(text))

    def _session(self, **kwargs):
        return self.engine.create_session(apply_prompt_template=False, **kwargs)

    def generate_text(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy (top-k 1) text after `prompt`, up to `max_new_tokens` tokens or an eos."""
        import litert_lm

        with native_stderr_filtered(), self._session(sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0),
                                                     max_output_tokens=max_new_tokens) as session:
            session.run_prefill([prompt])
            return session.run_decode().texts[0]

    def generate(self, prompt_ids, max_new_tokens: int, stop_at_eos: bool = False) -> tuple[list[int], dict]:
        """LiteRT-LM's benchmark mode: a prompt of len(prompt_ids) tokens prefilled, `max_new_tokens` decoded, in a
        fresh engine (its own timer; the tokens are not returned, the ids only set the length)."""
        import litert_lm

        n = len(list(prompt_ids))
        with native_stderr_filtered():
            info = litert_lm.Benchmark(model_path=str(self.file), backend=self.backend, prefill_tokens=n,
                                       decode_tokens=max_new_tokens, cache_dir=NO_CACHE).run()
        return [], {"prompt_tokens": info.last_prefill_token_count, "new_tokens": info.last_decode_token_count,
                    "ttft_ms": info.time_to_first_token_in_second * 1e3,
                    "prefill_tokens_per_s": info.last_prefill_tokens_per_second,
                    "decode_tokens_per_s": info.last_decode_tokens_per_second}

    @staticmethod
    def versions() -> dict:
        from importlib import metadata
        return {"litert-lm-api": metadata.version("litert-lm-api")}


def greedy_agreement(text: str, prefix_texts: list[str], stopped: bool, decisive: list[bool]) -> dict:
    """A runtime's greedy `text` against a reference's greedy path: `prefix_texts[k]` the text of its first k + 1
    tokens (eos dropped), `stopped` whether it ended at an eos, `decisive` per position whether its top-2 margin is
    decisive. Equal; or forked where the margin is not decisive (a near-tie rounding may break either way); or
    forked where it is (the runtime computes another model). Compared as text (a runtime gives text; re-encoding
    it need not give the same ids). The runtime is asked for more tokens than the path has, as its detokenizer
    may hold back a trailing piece: a path cut by its length is compared but for its last token, a path that
    ended at an eos must end the text there."""
    compared = prefix_texts if stopped else prefix_texts[:-1]
    fork, unconfirmed = None, None
    for k, prefix in enumerate(compared):
        if prefix.endswith("\ufffd"):  # a token ending inside a UTF-8 character: checked with the next one
            unconfirmed = k if unconfirmed is None else unconfirmed
            continue
        if not text.startswith(prefix):
            fork = k if unconfirmed is None else unconfirmed  # the first token that may differ
            break
        unconfirmed = None
    if fork is None and stopped and text.rstrip() != (prefix_texts[-1] if prefix_texts else "").rstrip():
        fork = len(prefix_texts)  # the reference stopped at its eos; the runtime went on
    if fork is None:
        return {"equal": True, "fork": None, "decisive_fork": False}
    return {"equal": False, "fork": fork, "decisive_fork": bool(decisive[fork])}


def prefix_texts(tokenizer, path: list[int], stop_sequences: list[list[int]]) -> tuple[list[str], bool]:
    """(the text of each prefix of `path` as LiteRT-LM shows it, whether it stopped): cut where the first of its
    stop sequences begins, which it leaves out of its text (litert-torch adds the eos with punctuation before it,
    e.g. "." + eos, so a final "." before an eos is not shown either). greedy_agreement's input."""
    ends = [i for i in range(len(path)) for stop in stop_sequences if stop and path[i:i + len(stop)] == stop]
    kept = path[:min(ends)] if ends else path
    return [tokenizer.decode(kept[:k + 1], clean_up_tokenization_spaces=False) for k in range(len(kept))], bool(ends)


def litert_lm_prompt(ids: list[int], bos_id: int | None, tokenizer) -> str:
    """The text LiteRT-LM is given for the token ids `ids`: without their leading bos where the bundle has a start
    token, which LiteRT-LM's prefill puts before the text itself (SmolLM2's chat template begins with its bos,
    <|im_start|>: given as text too, it would be there twice)."""
    return tokenizer.decode(ids[1:] if bos_id is not None and ids[:1] == [bos_id] else ids,
                            clean_up_tokenization_spaces=False)


def litert_lm_check(runner: LiteRTLMRunner, litert: LiteRTDecoderRunner, tokenizer, prompts: list[list[int]],
                    max_new_tokens: int) -> dict:
    """The bundle in LiteRT-LM against the same .tflite in LiteRT, on each prompt (token ids, as the model is fed
    in PyTorch): LiteRT-LM's start token and tokenizer give those ids from the prompt's text, and its greedy text is
    LiteRT's but where LiteRT's top-2 margin is within 2 x LITERT_LM_TOLERANCE (greedy_agreement)."""
    rows = []
    for ids in prompts:
        ids = [int(t) for t in ids]
        prompt = litert_lm_prompt(ids, runner.bos_id, tokenizer)
        start = [] if runner.bos_id is None else [runner.bos_id]
        path, _ = litert.generate(ids, max_new_tokens)
        logits = torch.cat([litert.step(torch.tensor([ids]), 0)]
                           + [litert.step(torch.tensor([[t]]), len(ids) + i) for i, t in enumerate(path[:-1])])
        texts, stopped = prefix_texts(tokenizer, path, runner.stop_sequences)
        agreement = greedy_agreement(runner.generate_text(prompt, max_new_tokens + 2), texts, stopped,
                                     decisive_positions(logits, LITERT_LM_TOLERANCE))
        rows.append({"tokens_equal": start + runner.tokenize(prompt) == ids, **agreement})
    passed = all(r["tokens_equal"] and not r["decisive_fork"] for r in rows)
    return {"passed": passed, "prompts": len(rows), "tokens_equal": sum(r["tokens_equal"] for r in rows),
            "texts_equal": sum(r["equal"] for r in rows),
            "near_tie_forks": sum(not r["equal"] and not r["decisive_fork"] for r in rows),
            "decisive_forks": sum(r["decisive_fork"] for r in rows),
            "rule": f"LiteRT-LM's start token and token ids equal the Hugging Face tokenizer's on every prompt, and "
                    f"its greedy text is LiteRT's greedy path but at a near-tie (top-2 margin within "
                    f"{2 * LITERT_LM_TOLERANCE} x (1 + max |logit|))",
            "per_prompt": rows}
