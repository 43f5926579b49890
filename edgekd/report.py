"""Stage 6: collect a run directory's measured numbers into one summary, and render it."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from edgekd.errors import StageError
from edgekd.manifest import atomic_write_text, read_manifest, verify_stage
from edgekd.report_render import SCHEMA, render_report

_TITLES = {"teacher": "Teacher (fine-tuned)", "student": "Student (distilled)"}


def _title(role: str, quant: str) -> str:
    base = _TITLES.get(role, "Student")
    return f"{base}, {quant}" if quant != "fp32" else base


def collect(run_dir: Path) -> dict:
    """The edgekd.report/1 summary of a run directory (every stage's manifest verified first)."""
    run_dir = Path(run_dir)
    exports = sorted(p for p in (run_dir / "export").glob("*") if p.is_dir()) if (run_dir / "export").is_dir() else []
    if not exports:
        raise StageError(f"{run_dir} has no export/ stage directories; run `edgekd run` or `edgekd export` first")
    bench = verify_stage(run_dir / "bench", "bench") if (run_dir / "bench").is_dir() else None
    latency = {Path(r["artifact"]).parent.name: r for r in bench["metrics"]["results"]} if bench else {}
    variants = []
    for path in exports:
        manifest = verify_stage(path, "export")
        role, quant = manifest["role"], manifest["quant"]["name"]
        measured = latency.get(path.name, {})
        test = manifest["metrics"]["test"]
        variants.append({
            "name": path.name, "role": role, "title": _title(role, quant),
            "artifact": str((path / manifest["artifact"]).relative_to(run_dir)),
            "size_bytes": manifest["size_bytes"], "params": manifest["metrics"]["params"], "quant": quant,
            "accuracy": (test or {}).get("accuracy"), "macro_f1": (test or {}).get("macro_f1"),
            "ece": (test or {}).get("ece"),
            "predictions": manifest.get("test_predictions"),
            "latency_ms": measured.get("latency_ms"), "runtime": measured.get("runtime"),
        })
    order = {"teacher": 0, "student": 1, "compressed": 2}
    variants.sort(key=lambda v: (order.get(v["role"], 3), v["name"]))
    reference = next((v["predictions"] for v in variants if v["role"] == "teacher"), None)
    for v in variants:  # top-1 agreement of each artifact with the teacher's artifact, text by text
        predictions = v.pop("predictions")
        v["agreement"] = (sum(a == b for a, b in zip(predictions, reference)) / len(reference)
                          if reference and predictions and len(predictions) == len(reference) else None)
    finetune = read_manifest(run_dir / "finetune", "finetune") if (run_dir / "finetune").is_dir() else None
    teacher = next((v for v in variants if v["role"] == "teacher"), None)
    machine = dict(bench["machine"]) if bench else {"os": platform.platform()}
    if bench and bench["metrics"]["results"]:
        first = bench["metrics"]["results"][0]
        machine["runtime"] = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    return {
        "schema": SCHEMA,
        "title": f"edgekd report: {run_dir.name}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "dataset": {"name": _recipe_name(run_dir), "labels": finetune["labels"] if finetune else None,
                    "test_size": finetune["metrics"]["test"]["n"] if finetune else None,
                    "max_length": finetune["max_length"] if finetune else None},
        "variants": variants,
        "ratios": [_ratio(teacher, v) for v in variants if teacher and v["role"] != "teacher"],
        "baseline": finetune["metrics"].get("baseline") if finetune else None,
        "stages": _stage_times(run_dir),
        "search": _search(run_dir),
        "notes": ([f"Latency: {bench['params']['iterations']} interleaved iterations per variant after "
                   f"{bench['params']['warmup']} warm-up, batch 1, fixed length; ratios are from this one run."]
                  + [f"{s['name']}: not run here ({s['reason']}); accuracy and latency come from the device"
                     for s in bench["metrics"].get("skipped", [])])
                 if bench else ["No bench stage: latency not measured."],
    }


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

    t_lat, v_lat = (teacher.get("latency_ms") or {}).get("p50"), (variant.get("latency_ms") or {}).get("p50")
    measured = variant["accuracy"] is not None and teacher["accuracy"] is not None
    return {"variant": variant["name"], "size_x": div(teacher["size_bytes"], variant["size_bytes"]),
            "latency_p50_x": div(t_lat, v_lat), "params_x": div(teacher["params"], variant["params"]),
            "accuracy_delta_points": round((variant["accuracy"] - teacher["accuracy"]) * 100, 2) if measured else None}


def _stage_times(run_dir: Path) -> list[dict]:
    """Wall time of each stage from its manifest (export: all variants added up)."""
    rows = []
    for name in ("finetune", "distill", "compress", "export", "bench"):
        path = run_dir / name
        if (path / "manifest.json").is_file():
            rows.append({"stage": name, "wall_s": read_manifest(path)["wall_s"]})
        elif path.is_dir():
            walls = [read_manifest(p)["wall_s"] for p in sorted(path.iterdir()) if (p / "manifest.json").is_file()]
            rows.append({"stage": f"{name} ({len(walls)} artifacts)", "wall_s": round(sum(walls), 2)})
    return rows


def write_report(run_dir: Path) -> dict:
    """Write report.md/.html/.json and plots into run_dir; return the summary."""
    summary = collect(run_dir)
    render_report(summary, Path(run_dir))
    atomic_write_text(Path(run_dir) / "report.json", json.dumps(summary, indent=2) + "\n")
    return summary


def machine_summary(summary: dict) -> dict:
    """The `--json` view: one object with a `variants` list (samples left out)."""
    keep = ("name", "role", "artifact", "size_bytes", "accuracy", "macro_f1", "agreement", "ece", "params",
            "quant", "runtime")
    variants = []
    for v in summary["variants"]:
        row = {k: v.get(k) for k in keep}
        lat = v.get("latency_ms") or {}
        row["latency_ms"] = {k: lat.get(k) for k in ("p50", "p90", "p99", "mean", "std")} if lat else None
        variants.append(row)
    return {"schema": summary["schema"], "variants": variants, "ratios": summary["ratios"],
            "baseline": summary["baseline"], "stages": summary["stages"], "machine": summary["machine"]}
