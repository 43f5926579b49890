"""Decoder LMs measured in tokens per second: ExecuTorch .pte files and PyTorch eager `generate`, interleaved.

    bench_decoders([DecoderVariant("teacher-fp32", "teacher/model.pte", "executorch", model="teacher"),
                    DecoderVariant("teacher-eager", "teacher/", "torch", model="teacher"), ...])

Per variant: load time and peak RSS, each measured in a fresh process that loads only that variant and runs one
short generation (ru_maxrss, as the host bench reads it: one process per variant, so it is that variant's alone,
the interpreter and imports included, whose share `peak_rss_before_load_mb` gives); then, every variant loaded in
this process, for each prompt length and round, every variant once in turn (A B A B ..., as benchmarks/host.py
does: the machine's drift spreads evenly over the variants) on the same seeded random prompt: time to first token
(the prefill's wall time), prefill tokens/s, decode tokens/s (greedy, eos ignored, `new_tokens` tokens). A length
that does not fit a variant's context (prompt + new tokens > max_seq_len) is skipped for that variant and listed.
Figures are medians with their spread (benchmarks/stats.py); ratios are computed from the medians of this one run,
at the shortest prompt length every variant measured.

Runtimes: "executorch": targets/llm_executorch.py's DecoderRunner (prefill in one call, then one call per token).
"litert-lm": a .litertlm in LiteRT-LM's own benchmark (targets/llm_litert.py's LiteRTLMRunner: its prompt is that
many tokens of its own, its clock its own; the ids only set the length).
"torch": the Hugging Face model folder in PyTorch eager fp32, `generate(do_sample=False)` with its default
dynamic cache, the first token and each next one timed by a streamer.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekd.benchmarks.host import cpu_model, peak_rss_mb
from edgekd.benchmarks.stats import latency_stats
from edgekd.errors import BenchError

SCHEMA = "edgekd.bench-llm/1"
RUNTIMES = ("executorch", "litert-lm", "torch")
FIGURES = ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s")


@dataclass(frozen=True)
class DecoderVariant:
    """One thing to measure: `path` is a .pte (runtime "executorch"), a .litertlm ("litert-lm") or a Hugging Face
    model folder ("torch"). `model` names which model it is ("teacher", "student"): ratios pair variants by it.
    `max_seq_len`: the context of a .litertlm (its engine does not say it; the export manifest does)."""

    name: str
    path: str
    runtime: str
    model: str = ""
    quant: str = "fp32"
    max_seq_len: int | None = None

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise BenchError(f"variant {self.name!r}: unknown runtime {self.runtime!r}; "
                             f"use one of {', '.join(RUNTIMES)}")
        if not Path(self.path).exists():
            raise BenchError(f"variant {self.name!r}: {self.path} does not exist; "
                             f"give the .pte file or the model folder")
        if self.runtime == "litert-lm" and not self.max_seq_len:
            raise BenchError(f"variant {self.name!r}: a .litertlm needs its max_seq_len (its export manifest has it)")

    def open(self, threads: int = 0):
        """The loaded runner: .generate(prompt_ids, max_new_tokens, stop_at_eos) -> (tokens, timings)."""
        if self.runtime == "executorch":
            from edgekd.targets.llm_executorch import DecoderRunner
            return DecoderRunner(Path(self.path), threads)
        if self.runtime == "litert-lm":
            from edgekd.targets.llm_litert import LiteRTLMRunner
            return LiteRTLMRunner(Path(self.path), threads, max_seq_len=self.max_seq_len)
        return EagerDecoderRunner(Path(self.path), threads)

    def footprint(self, threads: int = 0) -> dict:
        """Load time and peak RSS of this variant alone, in a fresh Python process."""
        command = [sys.executable, "-m", "edgekd.benchmarks.llm", json.dumps(asdict(self)), str(threads)]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise BenchError(f"variant {self.name!r} failed to load in a fresh process: {tail}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def size_bytes(self) -> int:
        path = Path(self.path)
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


# the export formats of a decoder LM (edgekd.tasks.generation.export) and the runtime each is measured in on a host
# (None: none here; a Core ML package runs on a Mac or an iPhone)
DECODER_RUNTIMES = {"executorch-llm": "executorch", "litert-lm": "litert-lm", "coreml-llm": None}


@dataclass(frozen=True)
class DecoderExport:
    """One decoder export stage directory, as `edgekd bench` takes it."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def file(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def model(self) -> str:
        return "teacher" if self.manifest.get("role") == "teacher" else "student"

    @property
    def quant(self) -> str:
        return self.manifest["quant"]["name"]

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    @property
    def runtime(self) -> str | None:
        return DECODER_RUNTIMES[self.manifest["params"]["format"]]

    def variant(self) -> DecoderVariant:
        if self.runtime is None:
            raise BenchError(f"{self.path} is a Core ML package, which runs on a Mac or an iPhone only (Xcode's "
                             f"performance report measures it); bench its .pte or .litertlm exports here")
        return DecoderVariant(self.name, str(self.file), self.runtime, model=self.model, quant=self.quant,
                              max_seq_len=self.max_seq_len)


def is_decoder_export(manifest: dict) -> bool:
    return manifest.get("params", {}).get("format") in DECODER_RUNTIMES


class _Clock:
    """A generate() streamer: the time of each put() (the prompt first, then one per new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class EagerDecoderRunner:
    """A Hugging Face causal LM folder in PyTorch eager fp32: greedy `generate` with timings."""

    runtime = "torch"

    def __init__(self, folder: Path, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)  # process-wide, like the classifier bench's torch baseline
        start = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.load_ms = (time.perf_counter() - start) * 1e3
        self.max_seq_len = int(self.model.config.max_position_embeddings)
        self.vocab_size = int(self.model.config.vocab_size)

    def generate(self, prompt_ids, max_new_tokens: int, stop_at_eos: bool = False) -> tuple[list[int], dict]:
        """Greedy tokens and timings, the same keys as DecoderRunner.generate. `prompt_ids`: [n] or [1, n]."""
        import torch
        from transformers import GenerationConfig

        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
        eos = self.model.generation_config.eos_token_id if stop_at_eos else None
        greedy = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=None if stop_at_eos else max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=0)
        clock = _Clock()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy,
                                      streamer=clock)
        first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, put before any forward
        n, new = prompt.shape[1], len(clock.times) - 1
        timings = {"prompt_tokens": n, "new_tokens": new, "ttft_ms": (first - start) * 1e3,
                   "prefill_tokens_per_s": n / (first - start),
                   "decode_tokens_per_s": (new - 1) / (last - first) if new > 1 else None}
        return out[0, n:].tolist(), timings


def _vocab_size(runner) -> int:
    size = getattr(runner, "vocab_size", None)
    return int(size if size is not None else runner.metadata["get_vocab_size"][0])


def seeded_prompts(lengths, vocab_size: int, seed: int = 0) -> dict[int, list[int]]:
    """One random prompt per length, token ids drawn uniformly from the vocabulary with a seeded generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths}


def bench_decoders(variants: list[DecoderVariant], prompt_lengths=(64, 128, 512), new_tokens: int = 32,
                   rounds: int = 5, threads: int = 0, warmup: int = 1, seed: int = 0,
                   teacher: str = "teacher") -> dict:
    """Measure every variant (see the module docstring); returns the JSON-serializable result.

    `threads`: XNNPACK's pool for the .pte files and torch's intra-op threads (0: each runtime's default).
    `teacher`: the `model` label the others are compared with in the same runtime and precision."""
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise BenchError(f"give one or more variants with distinct names (got {names}); results are keyed by them")
    if new_tokens < 2 or rounds < 1 or not prompt_lengths or min(prompt_lengths) < 1:
        raise BenchError(f"new_tokens must be >= 2 (one decode step past the prefill), rounds >= 1 and every prompt "
                         f"length >= 1; got new_tokens={new_tokens}, rounds={rounds}, lengths={list(prompt_lengths)}")
    lengths = sorted(set(prompt_lengths))
    rows = {v.name: {"name": v.name, "model": v.model, "runtime": v.runtime, "quant": v.quant, "path": str(v.path),
                     "size_bytes": v.size_bytes(), **v.footprint(threads)} for v in variants}
    runners = {v.name: v.open(threads) for v in variants}
    # LiteRT-LM's benchmark brings its own prompt (no vocabulary to draw from)
    vocab = min((_vocab_size(r) for r in runners.values() if getattr(r, "runtime", None) != "litert-lm"), default=2)
    prompts = seeded_prompts(lengths, vocab, seed)
    skipped, fits = [], {}
    for name, runner in runners.items():
        fits[name] = [n for n in lengths if n + new_tokens - 1 <= runner.max_seq_len]
        skipped += [{"name": name, "prompt_tokens": n, "reason": f"{n} prompt + {new_tokens} new tokens exceed its "
                     f"context of {runner.max_seq_len}"} for n in lengths if n not in fits[name]]
        rows[name]["max_seq_len"] = runner.max_seq_len
    for name, runner in runners.items():
        for _ in range(warmup if fits[name] else 0):  # first-call allocations and thread pools
            runner.generate(prompts[fits[name][0]], 2, stop_at_eos=False)
    samples = {name: {n: [] for n in fits[name]} for name in runners}
    for _ in range(rounds):
        for n in lengths:
            for name, runner in runners.items():  # round-robin: every variant once per round and length
                if n in fits[name]:
                    samples[name][n].append(runner.generate(prompts[n], new_tokens, stop_at_eos=False)[1])
    for name, by_length in samples.items():
        rows[name]["by_prompt_tokens"] = {str(n): {f: latency_stats([t[f] for t in runs]) for f in FIGURES}
                                          for n, runs in by_length.items()}
    common = [n for n in lengths if all(n in fits[name] for name in runners)]
    return {"schema": SCHEMA, "results": list(rows.values()), "skipped": skipped, **headline(list(rows.values()),
                                                                                           common, teacher),
            "prompt_lengths": lengths, "new_tokens": new_tokens,
            "rounds": rounds, "warmup": warmup, "threads": threads or os.cpu_count(),
            "prompts": {"kind": "seeded random token ids", "seed": seed, "vocab_size": vocab},
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform()},
            "versions": versions()}


def headline(rows: list[dict], common: list[int], teacher: str = "teacher") -> dict:
    """Each row's figures at the shortest prompt length every row measured (set on the rows), and the ratios
    from them: {"ratios", "ratios_at_prompt_tokens"}."""
    at = common[0] if common else None
    for row in rows:
        figures = row["by_prompt_tokens"].get(str(at), {})
        row.update({f: figures[f]["p50"] for f in FIGURES if f in figures})
    return {"ratios": decoder_ratios(rows, teacher) if at is not None else [], "ratios_at_prompt_tokens": at}


def decoder_ratios(rows: list[dict], teacher: str = "teacher") -> list[dict]:
    """From one run's medians: each export over PyTorch eager of the same model, LiteRT-LM over ExecuTorch for the
    same model and precision, and each other model over the teacher in the same runtime and precision. Speed-ups
    > 1 mean `variant` is faster (or smaller)."""
    pairs = [(a, b, f"{a['runtime']} over eager") for a in rows for b in rows
             if a["runtime"] != "torch" and b["runtime"] == "torch" and a["model"] == b["model"]]
    pairs += [(a, b, "litert-lm over executorch") for a in rows for b in rows
              if (a["runtime"], b["runtime"]) == ("litert-lm", "executorch")
              and (a["model"], a["quant"]) == (b["model"], b["quant"])]
    pairs += [(a, b, "student over teacher") for a in rows for b in rows
              if b["model"] == teacher != a["model"] and (a["runtime"], a["quant"]) == (b["runtime"], b["quant"])]
    def ratio(top, bottom):  # a figure a device could not read (a phone's RSS) leaves its ratio unknown
        return round(top / bottom, 3) if top and bottom else None

    return [{"variant": a["name"], "over": b["name"], "kind": kind,
             "decode_speedup": ratio(a.get("decode_tokens_per_s"), b.get("decode_tokens_per_s")),
             "prefill_speedup": ratio(a.get("prefill_tokens_per_s"), b.get("prefill_tokens_per_s")),
             "ttft_speedup": ratio(b.get("ttft_ms"), a.get("ttft_ms")),
             "size_ratio": ratio(b["size_bytes"], a["size_bytes"]),
             "peak_rss_ratio": ratio(b.get("peak_rss_mb"), a.get("peak_rss_mb")),
             # the iPhone's Benchmark app times whole generations (prefill included): its one speed figure
             **({"generate_speedup": ratio(a["generate_tokens_per_s"], b["generate_tokens_per_s"])}
                if "generate_tokens_per_s" in a and "generate_tokens_per_s" in b else {})}
            for a, b, kind in pairs]


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "executorch", "transformers", "litert-lm-api"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _footprint_child(variant: dict, threads: int) -> dict:
    """In the fresh process: load one variant, generate 2 tokens from a 4-token prompt, read the RSS peak."""
    before = peak_rss_mb()
    runner = DecoderVariant(**variant).open(threads)
    runner.generate([1, 2, 3, 4], 2, stop_at_eos=False)
    return {"load_ms": round(runner.load_ms, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_before_load_mb": round(before, 1)}


if __name__ == "__main__":  # the fresh process DecoderVariant.footprint starts
    import torch  # noqa: F401  imported before the peak is read, as the bench's own process has it

    print(json.dumps(_footprint_child(json.loads(sys.argv[1]), int(sys.argv[2]))))
