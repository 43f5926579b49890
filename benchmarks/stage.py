"""Stage 5: measure export artifacts on a device and write the versioned result (edgekd.bench/2).

    edgekd bench ART... --device host|android[:SERIAL]|ios[:UDID] --out DIR

The result is the stage manifest's `metrics`: `results` (one row per variant: latency stats,
load time, memory, CPU time per inference where measured, runtime versions), `skipped`
(artifacts this device cannot run, with the reason), `ratios` (p50 speed-ups from this one run),
`complete` and `finished`. When the device fails mid-run, the variants measured so far are
written with `complete: false` and the command ends with one line and exit 1; a rerun of the same
command measures again (a partial stage is never taken as done).
"""
from __future__ import annotations

from pathlib import Path

from edgekd.benchmarks.devices import RESULT_SCHEMA, Artifact, Settings, parse_device, ratios
from edgekd.errors import BenchError
from edgekd.manifest import read_manifest, stage_input, stage_key, verify_stage, write_stage
from edgekd.targets import get_format


def load_artifacts(artifact_dirs: list[Path]) -> list[Artifact]:
    if not artifact_dirs:
        raise BenchError("no artifacts to measure; give one or more export directories")
    artifacts = []
    for path in artifact_dirs:
        manifest, source = stage_input(Path(path), "export")
        fmt = get_format(manifest["params"]["target"], manifest["params"]["format"])
        artifacts.append(Artifact(Path(path), manifest, source, fmt))
    names = [a.name for a in artifacts]
    if len(set(names)) != len(names):
        raise BenchError(f"two artifacts share the directory name '{next(n for n in names if names.count(n) > 1)}'; "
                         f"results are keyed by it: give each export directory its own name")
    return artifacts


def _done(out: Path, params: dict, inputs: dict) -> dict | None:
    try:
        manifest = verify_stage(out, "bench")
    except Exception:
        return None
    same = manifest.get("key") == stage_key(params, inputs)
    return manifest["metrics"] if same and manifest["metrics"].get("complete") else None


def bench(artifact_dirs: list[Path], out: Path, iterations: int = 100, warmup: int = 10, threads: int = 0,
          *, device: str = "host", settings: Settings | None = None, decoder: dict | None = None) -> dict:
    """Measure the artifacts on `device`; return the result (raises BenchError after writing a partial one).

    Decoder LM exports are measured in tokens per second instead (`decoder`: prompt_lengths, new_tokens, seed)."""
    settings = settings or Settings(iterations=iterations, warmup=warmup, threads=threads)
    device_class, ident = parse_device(device)
    dev = device_class(ident)       # a device that cannot work here (ios on Linux) says so before any work
    if _decoders(artifact_dirs):
        return bench_decoder_exports(dev, artifact_dirs, Path(out), settings, device, **(decoder or {}))
    artifacts = load_artifacts(artifact_dirs)
    params = {**settings.to_params(), "device": device}
    inputs = {a.manifest["params"]["model_name"] + "/" + a.quant + "/" + a.name: a.source for a in artifacts}
    out = Path(out)
    done = _done(out, params, inputs)
    if done:
        return done
    with write_stage(out, "bench", params, inputs) as stage:
        measured = dev.measure(artifacts, settings, out.parent / ".cache" / "baselines")
        # A variant finished when every run planned for it did (devices run each one `rounds` times).
        finished = [r["name"] for r in measured.results if r.get("runs_done", 1) == r.get("runs_planned", 1)]
        stage.metrics = {
            "schema": RESULT_SCHEMA, "results": measured.results, "skipped": measured.skipped,
            "ratios": ratios(measured.results), "complete": measured.error is None,
            "finished": finished, "expected": measured.expected or finished,
        }
        if measured.error:
            stage.metrics["error"] = measured.error
        stage.extra["machine"] = measured.machine
    if measured.error:
        kept = f"{len(finished)} of {len(measured.expected or finished)} variants" if finished else "no variant"
        raise BenchError(f"{measured.error}; {kept} finished, kept in {out} (complete: false)")
    return stage.metrics


def _decoders(artifact_dirs: list[Path]) -> bool:
    """Whether the artifacts are decoder LM exports (all of them; a mix is refused)."""
    from edgekd.benchmarks.llm import is_decoder_export

    # The manifests only (their checksums are verified once, by whichever path measures them)
    kinds = {is_decoder_export(read_manifest(Path(p), "export")) for p in artifact_dirs}
    if len(kinds) > 1:
        raise BenchError("these exports mix decoder LMs (tokens per second) and classifiers (latency per inference): "
                         "bench each kind with its own edgekd bench command and --out")
    return kinds == {True}


def bench_decoder_exports(dev, artifact_dirs: list[Path], out: Path, settings: Settings, device: str,
                          prompt_lengths=(64, 128, 512), new_tokens: int = 32, seed: int = 0) -> dict:
    """Decoder exports on `dev` (its `measure_decoders`): time to first token, prefill and decode tokens/s per
    prompt length, interleaved; the result schema edgekd.bench-llm/1 plus complete/finished as edgekd.bench/2."""
    from edgekd.benchmarks.llm import DecoderExport

    measure = getattr(dev, "measure_decoders", None)
    if measure is None:
        raise BenchError(f"--device {device.partition(':')[0]} does not run decoder LM exports yet; measure them "
                         f"with --device host or --device android")
    exports, inputs = [], {}
    for path in artifact_dirs:
        manifest, inputs[Path(path).name] = stage_input(Path(path), "export")
        exports.append(DecoderExport(Path(path), manifest))
    if len({e.name for e in exports}) != len(exports):
        raise BenchError("two exports share a directory name; results are keyed by it: give each its own name")
    if new_tokens < 2 or not prompt_lengths or min(prompt_lengths) < 1:
        raise BenchError(f"--new-tokens must be at least 2 and every --prompt-tokens length at least 1; got "
                         f"{new_tokens} and {list(prompt_lengths)}")
    params = {**settings.to_params(), "device": device, "prompt_lengths": sorted(set(prompt_lengths)),
              "new_tokens": new_tokens, "seed": seed}
    done = _done(out, params, inputs)
    if done:
        return done
    with write_stage(out, "bench", params, inputs) as stage:
        stage.metrics = measure(exports, settings, prompt_lengths, new_tokens, seed)
        stage.metrics.setdefault("complete", True)
        stage.extra["machine"] = stage.metrics["machine"]
    if not stage.metrics["complete"]:
        finished, expected = stage.metrics["finished"], stage.metrics["expected"]
        kept = f"{len(finished)} of {len(expected)} variants" if finished else "no variant"
        raise BenchError(f"{stage.metrics['error']}; {kept} finished, kept in {out} (complete: false)")
    return stage.metrics


def read_result(bench_dir: Path) -> dict:
    """A bench stage's result with its machine, for the report (schema 1 or 2)."""
    manifest = read_manifest(bench_dir, "bench")
    return {**manifest["metrics"], "machine": manifest.get("machine", {}), "params": manifest["params"]}
