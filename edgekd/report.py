"""Stage 6: collect a run directory's measured numbers into one summary, and render it."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from edgekd.errors import EdgeKDError, StageError
from edgekd.intervals import paired_difference, wilson
from edgekd.manifest import atomic_write_text, read_manifest, verify_stage
from edgekd.report_render import SCHEMA, render_report

_TITLES = {"teacher": "Teacher (fine-tuned)", "student": "Student (distilled)"}
# USD per CPU core-hour for the inference-cost row: about the on-demand price of one vCPU of a
# general-purpose cloud VM (2026). `edgekd report --price-per-core-hour` sets your own.
DEFAULT_PRICE_PER_CORE_HOUR = 0.05
PLAN = "plan.json"             # RUN/plan.json: this run's variants and their outcomes (edgekd run writes it)
PLAN_SCHEMA = "edgekd.run-plan/1"


def _title(role: str, quant: str, asked: str | None = None) -> str:
    base = _TITLES.get(role, "Student")
    shown = f"{quant} (for {asked})" if asked and asked != quant else quant  # the format's nearest realization
    return f"{base}, {shown}" if quant != "fp32" else base


def _decoder_run(path: Path) -> bool:
    """Whether `path` is a run, or a bench stage, of decoder LM exports. A bench stage of them alone has no report
    of its own: its run does (one line saying so)."""
    from edgekd.benchmarks.llm import is_decoder_export

    if _is_bench_dir(path):
        if read_manifest(path)["metrics"].get("schema", "").startswith("edgekd.bench-llm"):
            raise EdgeKDError(f"{path} measured decoder LM exports; their report is their run's: `edgekd report RUN` "
                              f"(the folder holding export/ and bench/), or read {path}/manifest.json")
        return False
    try:
        exports, _ = run_variants(path)
    except EdgeKDError:
        return False  # collect says what is missing
    return any(is_decoder_export(read_manifest(e)) for e in exports)


def _is_bench_dir(path: Path) -> bool:
    try:
        return read_manifest(path).get("stage") == "bench"
    except StageError:
        return False


def report_dir(path: Path, out: Path | None = None) -> Path:
    """Where the report goes: --out, else the run directory, else a bench directory's parent (a stage
    directory holds only what its manifest lists)."""
    if out is not None:
        return Path(out)
    return Path(path).parent if _is_bench_dir(Path(path)) else Path(path)


def collect(run_dir: Path, price_per_core_hour: float | None = None) -> dict:
    """The edgekd.report/1 summary of a run directory, or of a bench stage directory and the export
    directories it measured (every stage's manifest verified first)."""
    run_dir = Path(run_dir)
    price = DEFAULT_PRICE_PER_CORE_HOUR if price_per_core_hour is None else price_per_core_hour
    if price < 0:
        raise EdgeKDError("--price-per-core-hour must be 0 or more")
    failed = []
    if _is_bench_dir(run_dir):
        bench = verify_stage(run_dir, "bench")
        exports = [Path(entry["path"]) for entry in bench["inputs"].values()]
        root = run_dir.parent
    else:
        exports, failed = run_variants(run_dir)
        bench = verify_stage(run_dir / "bench", "bench") if (run_dir / "bench").is_dir() else None
        root = run_dir
    if not exports and not failed:
        raise StageError(f"{run_dir} has no export/ stage directories; run `edgekd run` or `edgekd export` first")
    results = bench["metrics"]["results"] if bench else []
    artifacts = [r for r in results if r.get("kind", "artifact") == "artifact"]
    latency = {Path(r["artifact"]).parent.name: r for r in artifacts}
    variants = []
    for path in exports:
        manifest = verify_stage(path, "export")
        role, quant = manifest["role"], manifest["quant"]["name"]
        measured = latency.get(path.name, {})
        test = manifest["metrics"]["test"]
        variants.append({
            "name": path.name, "role": role, "title": _title(role, quant, manifest.get("quant_asked")),
            "format": f"{manifest['params'].get('target')}/{manifest['params'].get('format')}",
            "artifact": _relative(path / manifest["artifact"], root),
            "size_bytes": manifest["size_bytes"], "params": manifest["metrics"]["params"], "quant": quant,
            "accuracy": (test or {}).get("accuracy"), "macro_f1": (test or {}).get("macro_f1"),
            "ece": (test or {}).get("ece"),
            "predictions": manifest.get("test_predictions"), "labels": manifest.get("test_labels"),
            # the tokens of the input a benchmark feeds: a dynamic-length artifact's own, else max_length
            "input_tokens": len((manifest.get("sample_input") or {}).get("input_ids", [])) or None,
            "dynamic_length": bool(manifest.get("dynamic_length")),
            "latency_ms": measured.get("latency_ms"), "runtime": measured.get("runtime"),
            "load_ms": measured.get("load_ms"), "peak_rss_mb": measured.get("peak_rss_mb"),
            **_cost(measured.get("cpu_ms_per_inference"), price),
        })
    order = {"teacher": 0, "student": 1, "compressed": 2}
    variants.sort(key=lambda v: (order.get(v["role"], 3), v["name"]))
    if len({v["format"] for v in variants}) > 1:  # several targets: a column's title must say which file it is
        for v in variants:
            v["title"] = f"{v['title']}, {v['format']}"
    reference = next((v["predictions"] for v in variants if v["role"] == "teacher"), None)
    for v in variants:  # top-1 agreement of each artifact with the teacher's artifact, text by text
        predictions = v["predictions"]
        v["agreement"] = (sum(a == b for a, b in zip(predictions, reference)) / len(reference)
                          if reference and predictions and len(predictions) == len(reference) else None)
        correct = _correct(v)
        v["accuracy_ci95"] = list(wilson(sum(correct), len(correct))) if correct else None
    teacher = next((v for v in variants if v["role"] == "teacher"), None)
    ratios = [_ratio(teacher, v) for v in variants if teacher and v["role"] != "teacher"]
    for v in variants:  # per-text lists stay in the export manifests
        del v["predictions"], v["labels"]
    finetune = read_manifest(root / "finetune", "finetune") if (root / "finetune").is_dir() else None
    machine = dict(bench["machine"]) if bench else {"os": platform.platform()}
    if artifacts:
        machine["runtime"] = ", ".join(sorted({f"{k} {v}" for r in artifacts for k, v in r["versions"].items()}))
    return {
        "schema": SCHEMA,
        "title": f"edgekd report: {root.name if not _is_bench_dir(run_dir) else run_dir.name}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "dataset": {"name": _recipe_name(root), "labels": finetune["labels"] if finetune else None,
                    "test_size": finetune["metrics"]["test"]["n"] if finetune else None,
                    "max_length": finetune["max_length"] if finetune else None},
        "variants": variants,
        "ratios": ratios,
        "failed": failed,
        "runtimes": _runtimes(results, bench, price) if bench else None,
        "price_per_core_hour": price,
        "baseline": finetune["metrics"].get("baseline") if finetune else None,
        "transfer_set": (read_manifest(root / "distill", "distill")["metrics"].get("transfer_set")
                         if (root / "distill").is_dir() else None),
        "stages": stage_times(root, exports),
        "search": _search(root),
        "notes": _notes(bench, price),
        "intervals": ("Accuracy intervals: Wilson 95 % score intervals over the test texts. Teacher-student "
                      "differences: Newcombe's paired 95 % interval on the same test texts (method 10, 1998)."),
    }


def write_plan(run_dir: Path, outcomes: dict[str, dict]) -> None:
    """RUN/plan.json, atomically: {variant name: {"status": pending | exported | failed, "reason"?}}."""
    atomic_write_text(Path(run_dir) / PLAN, json.dumps({"schema": PLAN_SCHEMA, "variants": outcomes}, indent=2) + "\n")


def run_variants(run_dir: Path) -> tuple[list[Path], list[dict]]:
    """This run's export directories and its failed variants ({name, reason}), from RUN/plan.json (written by
    `edgekd run`); without one (variants made by `edgekd export`), every stage directory in RUN/export/.
    Hidden directories (a killed export's .NAME.tmp-PID) are never variants."""
    export_dir = Path(run_dir) / "export"
    try:
        plan = json.loads((Path(run_dir) / PLAN).read_text(encoding="utf-8"))
    except FileNotFoundError:
        found = sorted(p for p in export_dir.glob("*") if p.is_dir() and not p.name.startswith(".")) \
            if export_dir.is_dir() else []
        return found, []
    except (OSError, ValueError) as exc:
        raise StageError(f"{run_dir / PLAN} cannot be read ({exc}); rerun `edgekd run`") from None
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA or not isinstance(plan.get("variants"), dict):
        raise StageError(f"{run_dir / PLAN} is not an edgekd run plan ({PLAN_SCHEMA}); rerun `edgekd run`")
    outcomes = plan["variants"]
    exported = [export_dir / name for name, o in outcomes.items() if o.get("status") == "exported"]
    failed = [{"name": name, "reason": o.get("reason") or "not exported: the run stopped before this variant"}
              for name, o in outcomes.items() if o.get("status") != "exported"]
    return sorted(exported), failed


def _correct(variant: dict) -> list[bool] | None:
    """Per test text, whether the variant got it right (from the manifest's predictions and labels)."""
    predictions, labels = variant.get("predictions"), variant.get("labels")
    if not predictions or not labels or len(predictions) != len(labels):
        return None
    return [p == y for p, y in zip(predictions, labels)]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _cost(cpu_ms: float | None, price: float) -> dict:
    """CPU time per inference, and what a million of them cost at `price` USD per core-hour."""
    if cpu_ms is None:
        return {"cpu_ms_per_inference": None, "cost_per_million_usd": None}
    # 1e6 inferences x cpu_ms / 3.6e6 ms per core-hour x price
    return {"cpu_ms_per_inference": cpu_ms, "cost_per_million_usd": round(cpu_ms * price / 3.6, 4)}


def _runtimes(results: list[dict], bench: dict, price: float) -> dict | None:
    """Every measured row of the bench (artifacts and baselines) and the run's speed-ups, when it has
    baselines or more than one runtime to compare."""
    rows = [{"name": r["name"], "kind": r.get("kind", "artifact"), "runtime": r.get("runtime"),
             "quant": r.get("quant"), "of": r.get("of"), "size_bytes": r.get("size_bytes"),
             "latency_ms": r.get("latency_ms"), "load_ms": r.get("load_ms"), "peak_rss_mb": r.get("peak_rss_mb"),
             **_cost(r.get("cpu_ms_per_inference"), price)} for r in results]
    if not any(r["kind"] == "baseline" for r in rows):
        return None
    return {"rows": rows, "ratios": bench["metrics"].get("ratios", [])}


def _notes(bench: dict | None, price: float) -> list[str]:
    if not bench:
        return ["No bench stage: latency not measured."]
    params, metrics, machine = bench["params"], bench["metrics"], bench.get("machine", {})
    runs = (f"{params['seconds']} s of interleaved runs" if params.get("seconds") else
            f"{params['iterations']} interleaved iterations per variant")
    notes = [f"Latency on {params.get('device', 'host')}: {runs} after {params['warmup']} warm-up, batch 1, "
             f"one validation text of median length (a dynamic-length artifact takes its own tokens, a fixed-length "
             f"one takes it padded to max length: the Input row); ratios are from this one run."]
    if machine.get("device", "host").startswith("android"):
        notes.append("On Android, executor_runner sizes a dynamic-length .pte's inputs at max length, so every "
                     ".pte there is timed padded to max length.")
    if machine.get("device", "host") == "host":
        notes.append(f"CPU time per inference: this process's CPU time (all threads) during a variant's calls, "
                     f"divided by its calls; cost per million inferences at {price} USD per core-hour "
                     f"(--price-per-core-hour).")
    else:
        notes.append("CPU time per inference: not measured on a device (the device tools report wall time only).")
    if not metrics.get("complete", True):
        notes.append(f"PARTIAL RUN: {len(metrics.get('finished', []))} of {len(metrics.get('expected', []))} "
                     f"variants finished ({metrics.get('error')}).")
    notes += [f"{s['name']}: not run here ({s['reason']}); accuracy and latency come from the device"
              for s in metrics.get("skipped", [])]
    return notes


def _search(run_dir: Path) -> dict | None:
    """The compression budget search of the run (candidates, front, choice), when there was one."""
    if not (run_dir / "compress" / "manifest.json").is_file():
        return None
    return read_manifest(run_dir / "compress", "compress")["metrics"].get("search")


def _recipe_name(run_dir: Path) -> str | None:
    """The name in the run's recipe.yaml (written by `edgekd run`), if there is one."""
    import yaml

    try:
        return (yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _ratio(teacher: dict, variant: dict) -> dict:
    def div(a, b):
        return round(a / b, 2) if a is not None and b else None

    def typical(v):  # p50; a device tool that keeps no per-run times gives only the mean
        lat = v.get("latency_ms") or {}
        return lat.get("p50") if lat.get("p50") is not None else lat.get("mean")

    t_lat, v_lat = typical(teacher), typical(variant)
    measured = variant["accuracy"] is not None and teacher["accuracy"] is not None
    ours, theirs = _correct(variant), _correct(teacher)
    paired = (ours and theirs and len(ours) == len(theirs) and variant["labels"] == teacher["labels"])
    interval = [round(100 * x, 2) for x in paired_difference(ours, theirs)[1:]] if paired else None
    return {"variant": variant["name"], "size_x": div(teacher["size_bytes"], variant["size_bytes"]),
            "latency_p50_x": div(t_lat, v_lat), "params_x": div(teacher["params"], variant["params"]),
            "accuracy_delta_points": round((variant["accuracy"] - teacher["accuracy"]) * 100, 2) if measured else None,
            "accuracy_delta_ci95_points": interval}


def stage_times(run_dir: Path, exports: list[Path]) -> list[dict]:
    """Wall time of each stage from its manifest (export: the time the reported variants' exports took together,
    the union of their [start, end] intervals: exports run side by side count once, one after the other add up)."""
    rows = []
    for name in ("finetune", "distill", "compress", "export", "bench"):
        path = run_dir / name
        if (path / "manifest.json").is_file():
            rows.append({"stage": name, "wall_s": read_manifest(path)["wall_s"]})
        elif name == "export" and exports:
            rows.append({"stage": f"{name} ({len(exports)} artifacts)",
                         "wall_s": round(_busy_seconds([read_manifest(p) for p in exports]), 2)})
    return rows


def _busy_seconds(manifests: list[dict]) -> float:
    """Length of the union of the stages' intervals, each ending at its manifest's "created" after "wall_s"."""
    from datetime import datetime

    intervals = sorted((end - m["wall_s"], end) for m in manifests
                       for end in [datetime.fromisoformat(m["created"]).timestamp()])
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def write_report(run_dir: Path, price_per_core_hour: float | None = None, out: Path | None = None) -> dict:
    """Write report.md/.html/.json and plots into `out` (default: report_dir(run_dir)); return the summary.
    A run of decoder LMs (task text-generation) gets the generation task's report."""
    if _decoder_run(Path(run_dir)):
        from edgekd.tasks.generation_report import write_report as write_generation_report
        return write_generation_report(Path(run_dir), out)
    summary = collect(run_dir, price_per_core_hour)
    out = report_dir(Path(run_dir), out)
    out.mkdir(parents=True, exist_ok=True)
    render_report(summary, out)
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    return summary


def machine_summary(summary: dict) -> dict:
    """The `--json` view: one object with a `variants` list (samples left out)."""
    keep = ("name", "role", "artifact", "size_bytes", "accuracy", "accuracy_ci95", "macro_f1", "agreement", "ece",
            "params",
            "quant", "runtime", "input_tokens", "dynamic_length", "load_ms", "peak_rss_mb", "cpu_ms_per_inference",
            "cost_per_million_usd")
    variants = []
    for v in summary["variants"]:
        row = {k: v.get(k) for k in keep}
        lat = v.get("latency_ms") or {}
        row["latency_ms"] = {k: lat.get(k) for k in ("p50", "p90", "p99", "mean", "std")} if lat else None
        variants.append(row)
    runtimes = summary.get("runtimes")
    if runtimes:
        runtimes = {"ratios": runtimes["ratios"], "rows": [
            {**{k: v for k, v in r.items() if k != "latency_ms"},
             "latency_ms": {k: (r["latency_ms"] or {}).get(k) for k in ("p50", "p90", "p99", "mean", "std")}}
            for r in runtimes["rows"]]}
    return {"schema": summary["schema"], "variants": variants, "ratios": summary["ratios"],
            "failed": summary.get("failed") or [], "runtimes": runtimes,
            "price_per_core_hour": summary.get("price_per_core_hour"),
            "baseline": summary["baseline"], "stages": summary["stages"], "machine": summary["machine"]}
