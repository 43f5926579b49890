"""The report of a text-generation run: teacher and students side by side, size, speed and quality.

Reads only what the stages wrote (RUN/plan.json, each export manifest, RUN/bench) and writes report.md,
report.html and report.json into the run folder. Every ratio is taken from one bench run.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from edgekd.manifest import atomic_write_text, read_manifest, verify_stage
from edgekd.report import run_variants, stage_times

SCHEMA = "edgekd.report-llm/1"
_TITLES = {"teacher": "Teacher (fine-tuned)", "student": "Student (distilled)"}
FORMATS = {"executorch-llm": "ExecuTorch", "litert-lm": "LiteRT-LM", "coreml-llm": "Core ML"}


def _title(role: str, quant: str, fmt: str, formats: set[str]) -> str:
    """"Student, int4", and the format where the run has more than one."""
    title = _TITLES.get(role, "Student") + ("" if quant == "fp32" else f", {quant}")
    return title + (f" ({FORMATS.get(fmt, fmt)})" if len(formats) > 1 else "")


def collect(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    exports, failed = run_variants(run_dir)
    bench = read_manifest(run_dir / "bench", "bench")["metrics"] if (run_dir / "bench").is_dir() else None
    measured = {row["name"]: row for row in (bench or {}).get("results", [])}
    variants = []
    manifests = {path: verify_stage(path, "export") for path in exports}
    formats = {m["params"]["format"] for m in manifests.values()}
    for path, manifest in manifests.items():
        test, row = manifest["metrics"]["test"], measured.get(path.name, {})
        accuracy = test.get("task_accuracy")
        fmt = manifest["params"]["format"]
        variants.append({
            "name": path.name, "role": manifest["role"], "quant": manifest["quant"]["name"], "format": fmt,
            # Core ML stores an fp32 spec as float16 (its states and compute are float16)
            "title": _title(manifest["role"], "fp16" if fmt == "coreml-llm" and manifest["quant"]["name"] == "fp32"
                            else manifest["quant"]["name"], fmt, formats),
            "artifact": str((path / manifest["artifact"]).relative_to(run_dir)),
            "size_bytes": manifest["size_bytes"], "params": manifest["metrics"]["params"],
            "perplexity": test["perplexity"]["perplexity"],
            "task_accuracy": accuracy and {k: accuracy[k] for k in ("accuracy", "low", "high", "n")},
            "parity": manifest["metrics"]["parity"],
            "float_perplexity": manifest["metrics"].get("float_test_perplexity"),
            **{k: row.get(k) for k in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb",
                                       "load_ms")},
        })
    variants.sort(key=lambda v: ({"teacher": 0, "student": 1}.get(v["role"], 2), -v["size_bytes"]))
    eager = {row["model"]: row for row in measured.values() if row["runtime"] == "torch"}
    summary = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "run": str(run_dir), "variants": variants, "failed": failed, "eager": eager,
               "ratios": _ratios(variants, eager), "search": _search(run_dir),
               "runtime_ratios": [r for r in (bench or {}).get("ratios", [])
                                  if r["kind"] == "litert-lm over executorch"],
               "transfer_set": _transfer_set(run_dir),
               "stages": stage_times(run_dir, exports),
               "bench": bench and {k: bench.get(k) for k in ("ratios_at_prompt_tokens", "new_tokens", "rounds",
                                                              "threads", "machine", "versions", "skipped")}}
    return summary


def _search(run_dir: Path) -> dict | None:
    """The budget search's candidates and choice (RUN/compress), where this run's recipe has a budget."""
    import yaml

    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file() or not (run_dir / "compress" / "manifest.json").is_file():
        return None
    if (yaml.safe_load(recipe.read_text()).get("compress") or {}).get("budget") is None:  # 0 is a budget
        return None
    return verify_stage(run_dir / "compress", "compress")["metrics"]


def _transfer_set(run_dir: Path) -> dict | None:
    """What the student was distilled on beyond the labelled records (data.unlabeled), where it was."""
    if not (run_dir / "distill" / "manifest.json").is_file():
        return None
    return read_manifest(run_dir / "distill", "distill").get("transfer_set")


def transfer_lines(transfer: dict | None) -> list[str]:
    if not transfer:
        return []
    too_long = transfer.get("too_long", 0)
    empty = transfer["unlabeled"] - transfer["teacher_completed"] - too_long
    left_out = [f"{too_long} too long for data.max_length"] * bool(too_long) + [
        f"{empty} the teacher answered with nothing"] * bool(empty)
    return [f"The student was distilled on {transfer['labelled']} labelled records and {transfer['teacher_completed']} "
            f"prompts of data.unlabeled completed by the teacher" + (f" (left out: {', '.join(left_out)})"
                                                                     if left_out else "")]


def search_lines(search: dict | None) -> list[str]:
    if not search:
        return []
    unit = "%" if search["metric"] == "perplexity" else " points"
    base = search["baseline"]
    lines = [f"Budget search: validation {search['metric']} within {search['budget']:g}{unit} of the "
             f"{base['from']}'s ({base[search['metric']]:.4g}), specs in the order listed:"]
    for c in search["candidates"]:
        mark = "chosen" if c["quant"] == search["chosen"] else ("within" if c["within"] else "over budget")
        worst = f" on {c['worst_target']}, the worst of {len(c['by_target'])} targets" if len(
            c.get("by_target", {})) > 1 else ""
        lines.append(f"{c['quant']}: {c[search['metric']]:.4g} ({c['cost']:+.1f}{unit}{worst}), {mark}")
    return lines


def _ratios(variants: list[dict], eager: dict) -> list[dict]:
    """Each student .pte over the teacher's fp32 .pte (size, decode and prefill speed), and over PyTorch eager
    fp32 of the same student: the done-when figures, all from one bench run."""
    teacher = next((v for v in variants if v["role"] == "teacher"), None)
    found = []
    for v in variants:
        if v["role"] == "teacher" or v.get("decode_tokens_per_s") is None:
            continue
        if teacher and teacher.get("decode_tokens_per_s"):
            found.append({"variant": v["name"], "over": teacher["name"],
                          "size_ratio": teacher["size_bytes"] / v["size_bytes"],
                          "decode_speedup": v["decode_tokens_per_s"] / teacher["decode_tokens_per_s"],
                          "prefill_speedup": v["prefill_tokens_per_s"] / teacher["prefill_tokens_per_s"]})
        base = eager.get("student")
        if base and base.get("decode_tokens_per_s"):
            found.append({"variant": v["name"], "over": base["name"],
                          "decode_speedup": v["decode_tokens_per_s"] / base["decode_tokens_per_s"]})
    return found


def _fmt(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _accuracy(acc: dict | None) -> str:
    return "—" if not acc else f"{acc['accuracy']:.1%} ({acc['low']:.1%} to {acc['high']:.1%})"


def _quantization_change(variant: dict) -> str:
    before = variant.get("float_perplexity")
    return "—" if not before else f"{100 * (variant['perplexity'] / before - 1):+.1f} %"


def _gate(parity: dict) -> str:
    """The .pte's worst scaled logit difference from its own reference, and the bound it met."""
    bound = parity.get("logit_tolerance")
    return f"{parity['worst_logit_diff']:.2g}" + ("" if bound is None else f" (≤ {bound:.2g})")


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    variants = summary["variants"]
    at = (summary.get("bench") or {}).get("ratios_at_prompt_tokens")
    header = ["Metric"] + [v["title"] for v in variants]
    rows = [
        ["Model size"] + [_fmt(v["size_bytes"] / 1e6, ".1f", " MB") for v in variants],
        ["Parameters"] + [_fmt(v["params"] / 1e6, ".1f", " M") for v in variants],
        [f"Time to first token ({at} prompt tokens)"] + [_fmt(v["ttft_ms"], ".0f", " ms") for v in variants],
        ["Prefill tokens/s"] + [_fmt(v["prefill_tokens_per_s"], ".0f") for v in variants],
        ["Decode tokens/s"] + [_fmt(v["decode_tokens_per_s"], ".1f") for v in variants],
        ["Peak memory (RSS)"] + [_fmt(v["peak_rss_mb"], ".0f", " MB") for v in variants],
        ["Perplexity (test completions)"] + [_fmt(v["perplexity"], ".3f") for v in variants],
        ["Perplexity change from quantization"] + [_quantization_change(v) for v in variants],
        ["Task accuracy (test, 95 % CI)"] + [_accuracy(v["task_accuracy"]) for v in variants],
        ["Export gate: worst logit difference (bound)"] + [_gate(v["parity"]) for v in variants],
    ]
    return header, rows


def ratio_lines(summary: dict) -> list[str]:
    lines = []
    for r in summary["ratios"]:
        if "size_ratio" in r:
            lines.append(f"{r['variant']}: {r['size_ratio']:.1f}x smaller than {r['over']}, "
                         f"{r['decode_speedup']:.1f}x its decode tokens/s, {r['prefill_speedup']:.1f}x its prefill")
        else:
            lines.append(f"{r['variant']}: {r['decode_speedup']:.1f}x the decode tokens/s of {r['over']}")
    for r in summary.get("runtime_ratios", []):
        lines.append(f"{r['variant']}: {_fmt(r['decode_speedup'], '.2f', 'x')} the decode tokens/s of {r['over']} "
                     f"(LiteRT-LM over ExecuTorch: the same model and spec, interleaved in one run), "
                     f"{_fmt(r['prefill_speedup'], '.2f', 'x')} its prefill")
    return lines


def coreml_lines(summary: dict) -> list[str]:
    if not any(v["format"] == "coreml-llm" for v in summary["variants"]):
        return []
    return ["The quality of a Core ML package is an estimate (the model with the package's weights in PyTorch; its "
            "float16 compute not modelled) and its speed is not measured: Core ML runs on macOS and iOS only, so "
            "here its torch wrapper and exported graph are proven against the model and the package is checked "
            "structurally."]


def render_markdown(summary: dict) -> str:
    header, rows = table_rows(summary)
    out = ["# edgekd report: text generation", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += [""] + [f"- {line}" for line in ratio_lines(summary) + transfer_lines(summary.get("transfer_set"))]
    search = search_lines(summary.get("search"))
    if search:
        out += ["", search[0]] + [f"- {line}" for line in search[1:]]
    eager = summary["eager"]
    if eager:
        out += ["", "PyTorch eager fp32 (`generate`, same run): " + ", ".join(
            f"{name} {row['decode_tokens_per_s']:.1f} decode tokens/s" for name, row in eager.items())]
    for failure in summary["failed"]:
        out += ["", f"**{failure['name']} failed its gate**: {failure['reason']}"]
    out += [x for line in coreml_lines(summary) for x in ("", line)]
    if summary["stages"]:
        out += ["", "Stage wall times: " + ", ".join(f"{s['stage']} {s['wall_s']:.0f} s" for s in summary["stages"])]
    bench = summary.get("bench")
    if bench:
        out += ["", f"Measured on {bench['machine']['cpu']} ({bench['machine']['cores']} cores, {bench['threads']} "
                    f"threads): medians of {bench['rounds']} interleaved rounds, {bench['new_tokens']} new tokens, "
                    f"executorch {bench['versions'].get('executorch')}, torch {bench['versions'].get('torch')}"
                    + (f", litert-lm-api {bench['versions'].get('litert-lm-api')}" if any(
                        v["format"] == "litert-lm" for v in summary["variants"]) else "")
                    + ". Perplexity and task accuracy of a quantized artifact are its PyTorch reference's, which "
                      "the export gate matched."]
    return "\n".join(out) + "\n"


def render_html(summary: dict) -> str:
    header, rows = table_rows(summary)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    lines = (ratio_lines(summary) + transfer_lines(summary.get("transfer_set")) + search_lines(summary.get("search"))
             + coreml_lines(summary))
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    failed = "".join(f"<p><b>{html.escape(f['name'])} failed its gate</b>: {html.escape(f['reason'])}</p>"
                     for f in summary["failed"])
    return (f"<!doctype html><meta charset='utf-8'><title>edgekd report</title>"
            f"<style>body{{font-family:sans-serif}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style>"
            f"<h1>edgekd report: text generation</h1><table><tr>{cells}</tr>{body}</table><ul>{notes}</ul>{failed}")


def write_report(run_dir: Path, out: Path | None = None) -> dict:
    """report.md/.html/.json of a generation run into `out` (default: the run directory)."""
    summary = collect(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", render_markdown(summary))
    atomic_write_text(out / "report.html", render_html(summary))
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    return summary
