"""Stage 5 on the host: every artifact measured by its own runtime, interleaved (A B A B ...).

Interleaving spreads the machine's drift (other load, frequency changes) evenly over the
variants, so ratios between them from one run are trustworthy even when absolute times are not.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from edgekd.benchmarks.stats import latency_stats
from edgekd.errors import BenchError
from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
from edgekd.targets import RuntimeUnavailable, get_format

RESULT_SCHEMA = "edgekd.bench/1"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def bench(artifact_dirs: list[Path], out: Path, iterations: int = 100, warmup: int = 10,
          threads: int = 0) -> dict:
    if not artifact_dirs:
        raise BenchError("no artifacts to measure; give one or more export directories")
    artifacts = []
    for path in artifact_dirs:
        manifest, source = stage_input(path, "export")
        fmt = get_format(manifest["params"]["target"], manifest["params"]["format"])
        artifacts.append((Path(path), manifest, source, fmt))
    params = {"iterations": iterations, "warmup": warmup, "threads": threads, "device": "host"}
    inputs = {manifest["params"]["model_name"] + "/" + manifest["quant"]["name"]: source
              for _, manifest, source, _ in artifacts}
    if is_done(out, "bench", params, inputs):
        return read_manifest(out)["metrics"]
    with write_stage(out, "bench", params, inputs) as stage:
        runs, skipped = [], []
        for path, manifest, _, fmt in artifacts:
            rss = _rss_mb()
            try:
                runner = fmt.runner(path / manifest["artifact"], threads)
            except RuntimeUnavailable as exc:  # e.g. Core ML off Apple hardware: measured on the device
                skipped.append({"name": path.name, "reason": str(exc)})
                continue
            sample = manifest["sample_input"]
            ids = torch.tensor([sample["input_ids"]], dtype=torch.int32)
            mask = torch.tensor([sample["attention_mask"]], dtype=torch.int32)
            for _ in range(warmup):
                runner(ids, mask)
            runs.append({"path": path, "manifest": manifest, "runner": runner, "inputs": (ids, mask),
                         "samples": [], "load_ms": runner.load_ms, "rss_added_mb": _rss_mb() - rss})
        for _ in range(iterations):
            for run in runs:
                start = time.perf_counter()
                run["runner"](*run["inputs"])
                run["samples"].append((time.perf_counter() - start) * 1e3)
        results = [{
            "name": run["path"].name, "artifact": str(run["path"] / run["manifest"]["artifact"]),
            "runtime": type(run["runner"]).runtime, "versions": run["runner"].versions(),
            "load_ms": run["load_ms"], "rss_added_mb": round(run["rss_added_mb"], 1),
            "latency_ms": latency_stats(run["samples"]),
        } for run in runs]
        stage.metrics = {"schema": RESULT_SCHEMA, "results": results, "skipped": skipped, "complete": True}
        stage.extra["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads or os.cpu_count(),
                                  "os": platform.platform(), "device": "host"}
    return stage.metrics
