"""The host device: every artifact measured by its own runtime on this CPU, interleaved (A B A B ...).

Interleaving spreads the machine's drift (other load, frequency changes) evenly over the
variants, so ratios between them from one run are trustworthy even when absolute times are not.
Baselines (PyTorch eager, ONNX Runtime: benchmarks/runtimes.py) join the same loop.

Per variant it records: load time; p50/p90/p99/mean/std of wall time per call; CPU time per
call (the process's CPU time, all threads, during that variant's calls: what an inference costs
a server, not wall time x threads); the RSS added by loading it; and the process's RSS
high-water mark after its load and warm-up (VmHWM: cumulative over the variants loaded before it,
so it is an upper bound for one variant alone).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

from edgekd.benchmarks.devices import DEVICES, Artifact, Measurement, Settings
from edgekd.benchmarks.stats import latency_stats
from edgekd.targets import RuntimeUnavailable

# The vector extensions int8 and int4 kernels use. One name ("AMD EPYC") covered two machines here on which the demo's
# int8 student ran 3.9x and 2.3x faster than its fp32 teacher; the family, model and flags tell such CPUs apart.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "sve")


def cpu_model() -> str:
    """The CPU's name, with its family/model and the vector extensions above where /proc/cpuinfo has them."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    isa = [f for f in ISA_FLAGS if f in flags]
    if isa:
        details.append(" ".join(isa))
    return f"{name} ({'; '.join(details)})" if details else name


def rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark: VmHWM of /proc/self/status on Linux, else ru_maxrss (bytes on
    macOS). Not ru_maxrss on Linux: exec carries the forking parent's high-water mark into it, so a fresh process
    started by a bench holding 4 GB read 4 GB before it had loaded anything."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Variant:
    """A loaded runner and what the timed loop records for it."""

    def __init__(self, row: dict, runner, inputs):
        self.row, self.runner, self.inputs = row, runner, inputs
        self.samples: list[float] = []
        self.cpu_s = 0.0

    def call(self) -> None:
        cpu, start = time.process_time(), time.perf_counter()
        self.runner(*self.inputs)
        self.samples.append((time.perf_counter() - start) * 1e3)
        self.cpu_s += time.process_time() - cpu


def measure_interleaved(variants: list[Variant], iterations: int, seconds: float | None = None) -> int:
    """Call every variant once per round, A B A B ..., for `iterations` rounds or until `seconds` pass.

    Returns the number of rounds. A variant whose runner raises leaves the loop; its error is
    recorded in its row and the others go on.
    """
    rounds, started = 0, time.perf_counter()
    while variants and (rounds < iterations if seconds is None else
                        rounds == 0 or time.perf_counter() - started < seconds):
        for variant in list(variants):
            try:
                variant.call()
            except Exception as exc:  # a runtime that fails mid-run: keep the others, say which one
                variant.row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                variants.remove(variant)
        rounds += 1
    return rounds


def finish(variant: Variant) -> dict:
    row = variant.row
    row["latency_ms"] = latency_stats(variant.samples)
    row["cpu_ms_per_inference"] = round(variant.cpu_s * 1e3 / len(variant.samples), 4)
    return row


def sample_inputs(manifest: dict):
    import torch

    sample = manifest["sample_input"]
    return (torch.tensor([sample["input_ids"]], dtype=torch.int32),
            torch.tensor([sample["attention_mask"]], dtype=torch.int32))


class HostDevice:
    """This machine."""

    def __init__(self, ident: str | None = None):
        if ident:
            from edgekd.errors import BenchError
            raise BenchError(f"--device host takes no id (got 'host:{ident}')")

    def measure(self, artifacts: list[Artifact], settings: Settings, cache: Path) -> Measurement:
        from edgekd.benchmarks.runtimes import BASELINES, baseline_quant, source_model

        variants, skipped, built = [], [], {}

        def load(row: dict, make, inputs) -> None:
            before = rss_mb()
            try:
                runner = make()
            except RuntimeUnavailable as exc:  # e.g. Core ML off Apple hardware: measured on the device
                skipped.append({"name": row["name"], "reason": str(exc)})
                return
            row.update(runtime=type(runner).runtime, versions=runner.versions(), load_ms=round(runner.load_ms, 3),
                       threads=settings.threads or os.cpu_count())
            row.setdefault("quant", getattr(runner, "quant", None))
            row.setdefault("size_bytes", getattr(runner, "size_bytes", None))
            variant = Variant(row, runner, inputs)
            for _ in range(settings.warmup):
                runner(*inputs)
            row["rss_added_mb"] = round(rss_mb() - before, 1)
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            variants.append(variant)

        for art in artifacts:
            inputs = sample_inputs(art.manifest)
            load({"name": art.name, "kind": "artifact", "artifact": str(art.file), "quant": art.quant,
                  "size_bytes": art.manifest.get("size_bytes")},
                 lambda art=art: art.fmt.runner(art.file, settings.threads), inputs)
            for name in settings.baselines:
                baseline = BASELINES.get(name)
                quant = "fp32" if name == "torch" else baseline_quant(art.quant)
                key = (name, art.manifest["inputs"]["model"]["sha256"], quant)
                if key in built:  # one baseline serves every artifact of the same model and precision
                    built[key]["of"].append(art.name)
                    continue
                source = source_model(art.manifest)
                row = {"name": f"{art.manifest['params']['model_name']}-{quant}-{name}", "kind": "baseline",
                       "of": [art.name], "artifact": str(source), "quant": quant, "describe": baseline.describe}
                built[key] = row
                load(row, lambda b=baseline, s=source, q=quant, n=art.manifest["max_length"]: b.build(
                    s, q, n, settings.threads, cache), inputs)

        expected = [v.row["name"] for v in variants]
        measure_interleaved(list(variants), settings.iterations, settings.seconds)
        results = [finish(v) if "error" not in v.row else v.row for v in variants]
        failed = [r for r in results if "error" in r]
        machine = {"device": "host", "cpu": cpu_model(), "cores": os.cpu_count(),
                   "threads": settings.threads or os.cpu_count(), "os": platform.platform()}
        error = "; ".join(f"{r['name']} failed: {r['error']}" for r in failed) or None
        return Measurement([r for r in results if "error" not in r], skipped, machine, error, expected)

    def measure_decoders(self, exports: list, settings: Settings, prompt_lengths, new_tokens: int, seed: int) -> dict:
        """Decoder exports in the ExecuTorch runtime here (benchmarks/llm.py), `--baselines torch`: PyTorch eager fp32
        of each one's source model beside them, in the same interleaved run."""
        from edgekd.benchmarks.llm import DecoderVariant, bench_decoders
        from edgekd.benchmarks.runtimes import source_model
        from edgekd.errors import BenchError

        unknown = [b for b in settings.baselines if b != "torch"]
        if unknown:
            raise BenchError(f"decoder exports take only --baselines torch (PyTorch eager generate), not "
                             f"{', '.join(unknown)}")
        variants, eager = [e.variant() for e in exports], {}
        for export in exports if settings.baselines else ():
            source = source_model(export.manifest)  # verified: the folder the .pte was exported from
            eager.setdefault(source, DecoderVariant(f"{export.manifest['params']['model_name']}-fp32-eager",
                                                    str(source), "torch", model=export.model))
        return bench_decoders(variants + list(eager.values()), prompt_lengths, new_tokens, settings.rounds,
                              settings.threads, warmup=1 if settings.warmup else 0, seed=seed)


DEVICES.register("host")(HostDevice)
