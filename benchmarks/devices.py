"""Devices a benchmark runs on, registered like the export targets: `--device NAME[:ID]`.

    host               this machine, each artifact in its own Python runtime (benchmarks/host.py)
    android[:SERIAL]   a phone over adb: executor_runner, benchmark_model or the minibench app (android.py)
    ios[:UDID]         an iPhone through xcodebuild and ExecuTorch's Benchmark XCTest app (ios.py)

Each device module registers a class whose `measure(artifacts, settings)` returns a Measurement.
A device fault (device gone, runner crashed or hung) does not lose the variants already measured:
the device returns them with `error` set, the stage is written with `complete: false`, and the
command then exits 1 with that one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekd.errors import BenchError
from edgekd.registry import Registry

RESULT_SCHEMA = "edgekd.bench/2"  # 2: kind/of rows, cpu_ms_per_inference, peak_rss_mb, ratios, complete/finished

DEVICES: Registry[type] = Registry("device")


class DeviceFault(BenchError):
    """The device went away or a command on it did not answer in time: the run stops here and keeps
    what it measured so far."""


@dataclass
class Artifact:
    """One export stage directory to measure."""
    path: Path
    manifest: dict
    source: dict          # {"path", "sha256"} of the export stage, for the bench stage key
    fmt: object           # edgekd.targets.Format

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def file(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def quant(self) -> str:
        return self.manifest["quant"]["name"]


@dataclass
class Settings:
    """What the user asked for; every device reads the fields that apply to it."""
    iterations: int = 100
    warmup: int = 10
    threads: int = 0                # 0: the runtime's default
    seconds: float | None = None    # a time budget instead of a fixed iteration count (host)
    baselines: tuple[str, ...] = ()
    cooldown: float = 0.0           # seconds of idle between runs on a device (thermal)
    timeout: float = 600.0          # seconds any one device command may take
    rounds: int = 1                 # device runs per artifact, interleaved A B A B (devices)
    options: dict = field(default_factory=dict)  # device-specific: runner paths, xctestrun

    def __post_init__(self):
        if self.iterations < 1 or self.warmup < 0 or self.threads < 0:
            raise BenchError("--iterations must be at least 1, --warmup and --threads at least 0")
        if self.seconds is not None and self.seconds <= 0:
            raise BenchError("--seconds must be positive")
        if self.timeout <= 0 or self.cooldown < 0 or self.rounds < 1:
            raise BenchError("--timeout must be positive, --cooldown at least 0, --rounds at least 1")

    def to_params(self) -> dict:
        return {"iterations": None if self.seconds else self.iterations, "seconds": self.seconds,
                "warmup": self.warmup, "threads": self.threads, "baselines": list(self.baselines),
                "cooldown": self.cooldown, "rounds": self.rounds,
                "options": {k: str(v) for k, v in sorted(self.options.items()) if v is not None}}


@dataclass
class Measurement:
    """What a device produced: rows of results, skipped artifacts, the machine, and the fault if any."""
    results: list[dict]
    skipped: list[dict]
    machine: dict
    error: str | None = None
    expected: list[str] = field(default_factory=list)   # every variant the run meant to measure


def parse_device(text: str) -> tuple[type, str | None]:
    """'android:R58M12345' -> (the android device class, 'R58M12345')."""
    name, _, ident = (text or "host").partition(":")
    return DEVICES.get(name), (ident or None)


def ratios(results: list[dict]) -> list[dict]:
    """p50 speed-ups from one interleaved run: each artifact against the first, and against its baselines.

    `speedup_p50` = reference p50 / variant p50: above 1 the variant is faster.
    """
    def p50(row):
        lat = row.get("latency_ms") or {}
        return lat.get("p50") if lat.get("p50") is not None else lat.get("mean")

    artifacts = [r for r in results if r.get("kind", "artifact") == "artifact"]
    pairs = [(a, artifacts[0]) for a in artifacts[1:]]
    pairs += [(a, b) for a in artifacts for b in results if b.get("kind") == "baseline" and a["name"] in b["of"]]
    out = []
    for variant, reference in pairs:
        if p50(variant) and p50(reference):
            out.append({"variant": variant["name"], "reference": reference["name"],
                        "speedup_p50": round(p50(reference) / p50(variant), 3)})
    return out


def _register_builtin_devices():
    from edgekd.benchmarks import android, host, ios  # noqa: F401


_register_builtin_devices()
