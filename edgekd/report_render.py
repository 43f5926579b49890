"""Render an ``edgekd.report/1`` summary dict into report.md, report.html and PNG plots.

All numbers come from the summary (measured by earlier stages); nothing is
estimated here.  A missing value (None or absent key) renders as "—" and is
left out of the plots.  Only stdlib, numpy and matplotlib are used so the
module can be imported on its own.
"""
from __future__ import annotations

import base64
import html
import io
import os
import uuid
from functools import partial
from pathlib import Path

SCHEMA = "edgekd.report/1"
DASH = "—"
# Colour by role so teacher vs. student is visible at a glance in every plot.
ROLE_COLORS = {"teacher": "#4C72B0", "student": "#55A868", "compressed": "#DD8452"}
DPI = 120

__all__ = ["render_report", "pareto_front", "SCHEMA"]


# ---------------------------------------------------------------- formatting
def _d(v):
    return DASH if v is None else str(v)


def _fmt_size(b):
    # Decimal MB (1e6) to match how file sizes are usually quoted; exact bytes for audits.
    return DASH if b is None else f"{b / 1e6:.2f} MB ({int(b):,} B)"


def _fmt_ms(v):
    # Keep ~3 significant digits: sub-ms student latencies would vanish at one decimal.
    if v is None:
        return DASH
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def _fmt(v, spec, scale=1.0, unit=""):
    return DASH if v is None else f"{v * scale:{spec}}{unit}"


_fmt_pct = partial(_fmt, spec=".1f", scale=100, unit=" %")  # 0.861 -> "86.1 %"
_fmt_f1 = partial(_fmt, spec=".3f")  # 0.85 -> "0.850"
_fmt_params = partial(_fmt, spec=".2f", scale=1e-6, unit=" M")  # 22714755 -> "22.71 M"
_fmt_x = partial(_fmt, spec=".1f", unit="x")  # 22.3 -> "22.3x"


def _fmt_ci(ci):
    # [0.81, 0.89] -> "81.0 to 89.0 %"
    return DASH if not ci else f"{ci[0] * 100:.1f} to {ci[1] * 100:.1f} %"


def _lat(v, key):
    return (v.get("latency_ms") or {}).get(key)


def _name(v):
    return str(v.get("name") or v.get("title") or "?")


def _samples(v):
    return [float(s) for s in (_lat(v, "samples") or []) if s is not None]


# ---------------------------------------------------------------- pareto
def pareto_front(points):
    """Indices of the non-dominated (latency, accuracy) points, sorted by latency.

    Lower latency and higher accuracy are better.  Points with a None
    coordinate are ignored; exact duplicates are both kept.
    """
    valid = [(i, p) for i, p in enumerate(points) if p[0] is not None and p[1] is not None]
    front = []
    for i, (lat, acc) in valid:
        dominated = any(
            l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc) for j, (l2, a2) in valid if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# ---------------------------------------------------------------- plots
def _figure(width=7.0, height=3.8):
    # Figure + Agg canvas directly: no pyplot global state, so nothing leaks and the
    # caller's interactive backend (if any) is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")  # keeps legends below the axes
    fig.clear()  # release artists now rather than at garbage collection
    return buf.getvalue()


def _color(v):
    return ROLE_COLORS.get(v.get("role"), "#8172B3")


def _set_xticks(ax, positions, labels):
    # Rotate when the names would not fit side by side under vertical bars/boxes.
    crowded = sum(len(lb.split("\n")[0]) for lb in labels) > 12 * len(labels)
    ax.set_xticks(list(positions), labels, rotation=25 if crowded else 0,
                  ha="right" if crowded else "center", rotation_mode="anchor")


def _plot_size(variants):
    vs = [v for v in variants if v.get("size_bytes") is not None]
    if not vs:
        return None
    mb = [v["size_bytes"] / 1e6 for v in vs]
    fig, ax = _figure(7.0, 0.6 * len(vs) + 1.4)
    # Numeric positions (not names as categories) so duplicate names stay separate bars.
    bars = ax.barh(range(len(vs)), mb, color=[_color(v) for v in vs])
    ax.set_yticks(range(len(vs)), [_name(v) for v in vs])
    ax.bar_label(bars, labels=[f"{m:.2f} MB" for m in mb], padding=4)
    ax.invert_yaxis()  # first variant on top, as in the table
    ax.set_xlim(0, max(mb) * 1.25 or 1.0)  # room for the value labels
    ax.set_xlabel("Model size (MB)")
    ax.set_title("Model size")
    return _png(fig)


def _plot_latency(variants):
    vs = [v for v in variants if _lat(v, "p50") is not None]
    if not vs:
        return None
    p50 = [_lat(v, "p50") for v in vs]
    up = [max((_lat(v, "p90") or p) - p, 0.0) for v, p in zip(vs, p50)]
    fig, ax = _figure(max(5.0, 1.4 * len(vs) + 2), 4.0 if len(vs) <= 4 else 4.8)
    x = range(len(vs))
    ax.bar(x, p50, color=[_color(v) for v in vs], yerr=[[0.0] * len(vs), up], capsize=6)
    top = max(p + u for p, u in zip(p50, up)) or 1.0
    for i, (p, u) in enumerate(zip(p50, up)):  # label above the p90 whisker so they don't overlap
        ax.text(i, p + u + top * 0.02, f"{_fmt_ms(p)} ms", ha="center", va="bottom")
    ax.set_ylim(0, top * 1.18)
    _set_xticks(ax, x, [_name(v) for v in vs])
    ax.set_ylabel("Latency (ms)")
    ax.set_title("Latency: p50 bar, whisker to p90")
    return _png(fig)


def _plot_acc_lat(variants, baseline):
    vs = [v for v in variants if _lat(v, "p50") is not None and v.get("accuracy") is not None]
    if not vs:
        return None
    lat = [_lat(v, "p50") for v in vs]
    acc = [v["accuracy"] * 100 for v in vs]
    fig, ax = _figure(7.0, 4.2)
    # Points carry a number and the legend names them: long variant names next to the
    # points overlapped each other and the axes whenever two variants were close.
    for k, v in enumerate(vs):
        ax.scatter(lat[k], acc[k], s=60, color=_color(v), zorder=3, label=f"{k + 1}. {_name(v)}")
        ax.annotate(str(k + 1), (lat[k], acc[k]), xytext=(5, 5), textcoords="offset points", fontsize=9,
                    fontweight="bold")
    front = pareto_front(list(zip(lat, acc)))
    if len(front) > 1:
        ax.plot([lat[i] for i in front], [acc[i] for i in front], drawstyle="steps-post",
                color="grey", lw=1.2, zorder=2, label="Pareto front")
    if baseline and baseline.get("accuracy") is not None:
        ax.axhline(baseline["accuracy"] * 100, ls="--", color="#C44E52", lw=1.2,
                   label=f"{baseline.get('name') or 'baseline'}")
    if min(lat) > 0 and max(lat) / min(lat) > 10:
        ax.set_xscale("log")
    # Pad both axes so the numbers are not clipped at the edges.
    ax.margins(x=0.15, y=0.2)
    if ax.get_xscale() == "log":
        ax.set_xlabel("p50 latency (ms, log scale)")
    else:
        ax.set_xlim(left=0)  # margins would otherwise push the axis below 0 ms
        ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title("Accuracy vs. latency (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, ncol=1, frameon=False)
    return _png(fig)


def _plot_distribution(variants):
    vs = [(v, _samples(v)) for v in variants]
    vs = [(v, s) for v, s in vs if s]
    if not vs:
        return None
    fig, ax = _figure(max(5.0, 1.4 * len(vs) + 2), 4.0 if len(vs) <= 4 else 4.8)
    ax.boxplot([s for _, s in vs], showfliers=True)
    # Set tick labels ourselves: boxplot's labels= kwarg was renamed across matplotlib versions.
    _set_xticks(ax, range(1, len(vs) + 1), [f"{_name(v)}\n(n={len(s)})" for v, s in vs])
    lo, hi = min(min(s) for _, s in vs), max(max(s) for _, s in vs)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    ax.set_ylabel("Latency (ms, log scale)" if ax.get_yscale() == "log" else "Latency (ms)")
    ax.set_title("Latency distribution")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _plot_runtimes(runtimes):
    """p50 of every artifact and baseline of the bench, grouped by artifact, whisker to p90."""
    rows = [r for r in (runtimes or {}).get("rows") or [] if _lat(r, "p50") is not None]
    if not any(r.get("kind") == "baseline" for r in rows):
        return None
    groups = []  # (artifact row, [its baselines])
    for art in (r for r in rows if r.get("kind") == "artifact"):
        groups.append((art, [r for r in rows if r.get("kind") == "baseline" and art["name"] in (r.get("of") or [])]))
    runtimes_seen = list(dict.fromkeys(f"{r.get('runtime')} {r.get('quant')}" for g in groups for r in [g[0], *g[1]]))
    palette = ["#55A868", "#4C72B0", "#DD8452", "#8172B3", "#C44E52", "#937860", "#DA8BC3", "#8C8C8C",
               "#CCB974", "#64B5CD"]  # one colour per runtime and precision (10 before any repeats)
    colors = {name: palette[i % len(palette)] for i, name in enumerate(runtimes_seen)}
    width = 0.8 / max(1 + max(len(b) for _, b in groups), 1)
    fig, ax = _figure(max(6.0, 2.2 * len(groups) + 2), 4.4)
    top, labelled = 0.0, set()
    for g, (art, bases) in enumerate(groups):
        for k, r in enumerate([art, *bases]):
            key = f"{r.get('runtime')} {r.get('quant')}"
            p50, p90 = _lat(r, "p50"), _lat(r, "p90") or _lat(r, "p50")
            x = g + (k - len(bases) / 2) * width
            ax.bar(x, p50, width * 0.92, color=colors[key], yerr=[[0.0], [max(p90 - p50, 0.0)]], capsize=3,
                   label=None if key in labelled else key)
            labelled.add(key)
            ax.text(x, p90 * 1.02, _fmt_ms(p50), ha="center", va="bottom", fontsize=8)
            top = max(top, p90)
    ax.set_ylim(0, top * 1.2 or 1.0)
    _set_xticks(ax, range(len(groups)), [_name(a) for a, _ in groups])
    ax.set_ylabel("Latency p50 (ms), whisker to p90")
    ax.set_title("Each artifact against the same model in other runtimes")
    # Beside the axes: below them it collided with the rotated artifact names.
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="runtime")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------- document model
# One neutral list of blocks feeds both renderers so md and html can't drift apart.
def _plot_search(search):
    """Accuracy against the search objective for every measured candidate, front joined, choice ringed."""
    if not search or not search.get("measured"):
        return None
    by_size = search.get("objective") == "size"
    rows = [c for c in search["measured"] if (c.get("size_bytes") if by_size else c.get("latency_p50_ms"))]
    if not rows:
        return None
    x = [c["size_bytes"] / 1e6 if by_size else c["latency_p50_ms"] for c in rows]
    y = [c["accuracy"] * 100 for c in rows]
    # The legend names every candidate: beside the axes, with the figure as tall as the list needs.
    fig, ax = _figure(10.0, max(4.2, 1.2 + 0.27 * (len(rows) + 2)))
    for k, c in enumerate(rows):
        chosen = c["name"] == search.get("chosen")
        ax.scatter(x[k], y[k], s=90 if chosen else 50, zorder=3, color="#C44E52" if chosen else "#4C72B0",
                   label=f"{k + 1}. {c['name']}" + (" (chosen)" if chosen else ""))
        ax.annotate(str(k + 1), (x[k], y[k]), xytext=(5, 5), textcoords="offset points", fontsize=9)
    front = pareto_front(list(zip(x, y)))
    if len(front) > 1:
        ax.plot([x[i] for i in front], [y[i] for i in front], drawstyle="steps-post", color="grey", lw=1.2,
                zorder=2, label="Pareto front")
    reference = search.get("reference_accuracy", search.get("teacher_accuracy"))
    if reference is not None and search.get("budget_points") is not None:
        ax.axhline(reference * 100 - search["budget_points"], ls="--", color="#C44E52", lw=1.0,
                   label=f"budget: {search.get('budget_from', 'teacher')} - {search['budget_points']} points")
    ax.margins(x=0.15, y=0.2)
    ax.set_xlabel("artifact size (MB)" if by_size else "p50 latency on this machine (ms)")
    ax.set_ylabel("Validation accuracy (%)")
    ax.set_title("Compression search (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, ncol=1, frameon=False)
    return _png(fig)


def _search_blocks(search):
    rows = [[c["name"], _fmt_pct(c.get("accuracy")), f"{-c['drop_points']:+.2f}",
             _fmt_size(c.get("size_bytes")), _fmt_ms(c.get("latency_p50_ms"))]
            for c in search.get("measured") or []]
    tried = len(search.get("candidates") or [])
    return [("h2", "Compression search"),
            ("p", f"Budget: {search['budget_points']} points of validation accuracy below the "
                  f"{search.get('budget_from', 'teacher')} "
                  f"({_fmt_pct(search.get('reference_accuracy', search.get('teacher_accuracy')))}); "
                  f"objective: {search['objective']}; "
                  f"{tried} candidates evaluated, {len(rows)} exported and timed."),
            ("p", f"Chosen: {search.get('explanation') or search.get('chosen')}"),
            ("table", ["Candidate", "Accuracy (val)", f"Points vs {search.get('budget_from', 'teacher')}", "Size",
                       "p50 (ms)"], rows)]


def _input(variant) -> str:
    tokens = variant.get("input_tokens")
    if tokens is None:
        return DASH
    return f"{tokens}, {'dynamic length' if variant.get('dynamic_length') else 'padded'}"


def _blocks(summary, plots):
    variants = summary.get("variants") or []
    m = summary.get("machine") or {}
    ds = summary.get("dataset") or {}
    cores, threads = m.get("cores"), m.get("threads")
    ct = None if cores is None and threads is None else f"{_d(cores)} cores / {_d(threads)} threads"
    machine = ", ".join(str(x) for x in (m.get("cpu"), ct, m.get("os"), m.get("runtime"))
                        if x is not None) or DASH
    b = [("h1", summary.get("title") or "edgekd report"),
         ("p", f"Created: {_d(summary.get('created'))}"),
         ("p", f"Machine: {machine}")]
    if ds:
        labels = ds.get("labels") or []
        b.append(("p", f"Dataset: {_d(ds.get('name'))}; {len(labels)} labels "
                       f"({', '.join(map(str, labels)) or DASH}); test size "
                       f"{_d(ds.get('test_size'))}; max length {_d(ds.get('max_length'))}"))

    def acc_f1(v):
        a, f = v.get("accuracy"), v.get("macro_f1")
        return DASH if a is None and f is None else f"{_fmt_pct(a)} / {_fmt_f1(f)}"

    def p50_p90(v):
        a, c = _lat(v, "p50"), _lat(v, "p90")
        return DASH if a is None and c is None else f"{_fmt_ms(a)} / {_fmt_ms(c)}"

    b.append(("h2", "Summary"))
    b.append(("table", ["Metric"] + [v.get("title") or v.get("name") or DASH for v in variants], [
        ["Model size"] + [_fmt_size(v.get("size_bytes")) for v in variants],
        ["Latency p50 / p90 (ms)"] + [p50_p90(v) for v in variants],
        ["Input (tokens)"] + [_input(v) for v in variants],
        ["Accuracy / macro-F1 (test)"] + [acc_f1(v) for v in variants],
        ["Accuracy, 95 % interval (test)"] + [_fmt_ci(v.get("accuracy_ci95")) for v in variants],
        ["Parameters"] + [_fmt_params(v.get("params")) for v in variants],
        ["Agreement with the teacher (test, top-1)"] + [_fmt_pct(v.get("agreement")) for v in variants],
        ["Calibration error (ECE, test)"] + [_fmt(v.get("ece"), ".3f") for v in variants],
        ["Load time (ms)"] + [_fmt_ms(v.get("load_ms")) for v in variants],
        ["CPU time per inference (ms)"] + [_fmt_ms(v.get("cpu_ms_per_inference")) for v in variants],
        [f"Cost per million inferences (USD at {_d(summary.get('price_per_core_hour'))}/core-hour)"]
        + [_fmt(v.get("cost_per_million_usd"), ".4f") for v in variants],
    ]))
    ratios = summary.get("ratios") or []
    if ratios:
        b.append(("h3", "Teacher / student"))
        lines = []
        for r in ratios:
            d, ci = r.get("accuracy_delta_points"), r.get("accuracy_delta_ci95_points")
            paired = f" (paired 95 % interval {ci[0]:+.1f} to {ci[1]:+.1f})" if ci else ""
            # What was not measured (Core ML latency and accuracy off Apple hardware) is left out, not dashed.
            parts = [f"{_fmt_x(r.get('size_x'))} smaller"]
            if r.get("latency_p50_x") is not None:
                parts.append(f"{_fmt_x(r['latency_p50_x'])} faster at p50")
            if d is not None:
                parts.append(f"accuracy {d:+.1f} points{paired}")
            parts.append(f"{_fmt_x(r.get('params_x'))} fewer parameters")
            lines.append(f"{r.get('variant') or DASH}: {', '.join(parts)}")
        b.append(("ul", lines))
    if summary.get("intervals"):
        b.append(("p", summary["intervals"]))
    failed = summary.get("failed") or []
    if failed:
        b.append(("h2", "Failed variants"))
        b.append(("p", "Not exported: each failed its gate, and nothing of it was written. The others are above."))
        b.append(("ul", [f"{f.get('name')}: {f.get('reason')}" for f in failed]))
    bl = summary.get("baseline")
    if bl:
        b.append(("p", f"{bl.get('name') or 'Baseline'} on the same split: accuracy "
                       f"{_fmt_pct(bl.get('accuracy'))}, macro-F1 {_fmt_f1(bl.get('macro_f1'))}"))
    if summary.get("transfer_set"):
        b.append(("p", transfer_text(summary["transfer_set"])))

    if variants:
        b.append(("h2", "Latency details (ms)"))
        b.append(("table", ["Variant", "p50", "p90", "p99", "mean", "std", "n samples"], [
            [_name(v)] + [_fmt_ms(_lat(v, k)) for k in ("p50", "p90", "p99", "mean", "std")]
            + [str(len(_samples(v)) or DASH)] for v in variants]))
    if summary.get("runtimes"):
        b.extend(_runtime_blocks(summary["runtimes"]))
    stages = summary.get("stages") or []
    if stages:
        rows = [[s.get("stage") or DASH, DASH if s.get("wall_s") is None else f"{s['wall_s']:.1f}"]
                for s in stages]
        walls = [s.get("wall_s") for s in stages]
        if len(stages) > 1 and None not in walls:
            rows.append(["Total", f"{sum(walls):.1f}"])
        b.append(("h2", "Stage wall times"))
        b.append(("table", ["Stage", "Wall time (s)"], rows))
    if summary.get("search"):
        b.extend(_search_blocks(summary["search"]))
    notes = [str(n) for n in (summary.get("notes") or [])]
    if notes:
        b.append(("h2", "Notes"))
        b.append(("ul", notes))
    if plots:
        b.append(("h2", "Plots"))
        b.extend(("img", alt, name, data) for name, alt, data in plots)
    return b


def transfer_text(transfer):
    """What the student learned from, and which teacher labelled it."""
    texts = [f"{transfer['labelled']} labelled"] + [f"{transfer[k]} {k}" for k in ("unlabeled", "augmented")
                                                     if transfer.get(k)]
    confidence = transfer.get("teacher_confidence")
    cross = transfer.get("cross_fit")
    if not cross:
        return (f"Distilled on {', '.join(texts)} texts, soft labels by the teacher"
                + (f" (mean top probability on the training texts {confidence:.3f})" if confidence is not None else ""))
    final = cross["by_final_teacher"]
    return (f"Distilled on {', '.join(texts)} texts. Soft labels (teacher.cross_fit): {cross['by_fold_teachers']} by "
            f"{cross['folds']} fold teachers, each training text and its copies by the one fine-tuned without it"
            + (f"; {final} (the unlabelled texts and their copies) by the teacher" if final else "")
            + f". On the training texts the fold teachers' accuracy is {_fmt_pct(cross['accuracy'])} and their "
              f"mean top probability {cross['teacher_confidence']:.3f}"
            + (f", the teacher's {confidence:.3f}" if confidence is not None else ""))


def _runtime_blocks(runtimes):
    """Each artifact beside the same model in the runtimes a user would otherwise ship (--baselines)."""
    rows = []
    for r in runtimes.get("rows") or []:
        lat = r.get("latency_ms") or {}
        rows.append([r["name"], f"{_d(r.get('runtime'))} {_d(r.get('quant'))}", _fmt_ms(lat.get("p50")),
                     _fmt_ms(lat.get("p90")), _fmt_ms(lat.get("mean")), _fmt_ms(r.get("cpu_ms_per_inference")),
                     _fmt_ms(r.get("load_ms")), _fmt_size(r.get("size_bytes"))])
    lines = [f"{x['variant']} is {x['speedup_p50']:.2f}x as fast as {x['reference']} at p50"
             + (" (slower)" if x["speedup_p50"] < 1 else "") for x in runtimes.get("ratios") or []]
    blocks = [("h2", "Runtimes compared (same model, same run, interleaved)"),
              ("table", ["Variant", "Runtime", "p50 (ms)", "p90 (ms)", "mean (ms)", "CPU ms / inference",
                         "Load (ms)", "Size"], rows)]
    if lines:
        blocks.append(("ul", lines))
    return blocks


def _md_cell(s):
    # Keep tables intact and stop markdown viewers from interpreting raw HTML in names.
    return str(s).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _to_md(blocks):
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_cell(rest[0]))
        elif kind == "p":
            out.append(_md_cell(rest[0]))
        elif kind == "ul":
            out.append("\n".join(f"- {_md_cell(x)}" for x in rest[0]))
        elif kind == "table":
            head, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |",
                     "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_cell(rest[0])}](plots/{rest[1]})")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1000px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #4C72B0;padding-bottom:.2em}h2{margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ccc;padding:.35em .7em}
th{background:#f0f3f8;text-align:left}td{text-align:right;font-variant-numeric:tabular-nums}
td:first-child{text-align:left;font-weight:600}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;display:block;margin:1em 0}p.meta{color:#555;margin:.2em 0}
"""


def _to_html(blocks, title):
    e = html.escape
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p class=\"meta\">{e(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in rest[0]) + "</ul>")
        elif kind == "table":
            head, rows = rest
            t = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            t += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<table>{t}</table>")
        elif kind == "img":
            # Inline as data URI so the single html file can be mailed on its own.
            data = base64.b64encode(rest[2]).decode("ascii")
            out.append(f'<img alt="{e(rest[0])}" src="data:image/png;base64,{data}">')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(out) + "\n</body></html>\n")


# ---------------------------------------------------------------- io
def _atomic_write(path: Path, data: bytes) -> Path:
    # Temp file in the same directory, then os.replace: readers never see a partial file.
    # os.open with 0o666 (not mkstemp's 0600) so the umask decides, as for any shared file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def render_report(summary: dict, out_dir: Path) -> list[Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png.

    Returns the written paths (plots first, then report.md, report.html).
    Plots without data are skipped and not referenced.
    """
    schema = summary.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise ValueError(f"unsupported report schema {schema!r}, expected {SCHEMA!r}")
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    variants = summary.get("variants") or []
    specs = [
        ("size.png", "Model size per variant", lambda: _plot_size(variants)),
        ("latency.png", "Latency p50 with whisker to p90", lambda: _plot_latency(variants)),
        ("accuracy_latency.png", "Accuracy vs. p50 latency with Pareto front",
         lambda: _plot_acc_lat(variants, summary.get("baseline"))),
        ("latency_distribution.png", "Latency sample distribution",
         lambda: _plot_distribution(variants)),
        ("search_front.png", "Compression search: accuracy against the objective, with the Pareto front",
         lambda: _plot_search(summary.get("search"))),
        ("runtimes.png", "Each artifact against the same model in other runtimes (p50, whisker to p90)",
         lambda: _plot_runtimes(summary.get("runtimes"))),
    ]
    written, plots = [], []
    for name, alt, make in specs:
        data = make()
        if data is not None:
            written.append(_atomic_write(plot_dir / name, data))
            plots.append((name, alt, data))
    blocks = _blocks(summary, plots)
    written.append(_atomic_write(out_dir / "report.md", _to_md(blocks).encode("utf-8")))
    title = summary.get("title") or "edgekd report"
    written.append(_atomic_write(out_dir / "report.html", _to_html(blocks, title).encode("utf-8")))
    return written
