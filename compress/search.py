"""The budget search: the smallest or fastest student within N points of the teacher's (or the uncompressed
student's) validation accuracy.

Not the whole grid, but an order that stops early:
  1. every QuantSpec the target realizes, on the unpruned student, least aggressive first;
  2. pruning levels of growing strength (FFN neurons, then heads, then a layer), each recovered by
     distillation; an axis stops at its first level over budget; each level that passes is tried
     with the specs that passed one level before (quantization error adds to pruning error);
  3. every candidate within budget is exported with the target's own exporter and options, passed
     through the export stage's parity gate (a candidate that fails it is skipped, with its reason),
     and timed on its runtime here, interleaved (A B A B) so the machine's drift hits all alike;
  4. the Pareto front (accuracy against latency or size) is kept, and the best candidate for the
     objective is chosen and explained.

With a checkpoint folder (compress.py gives the stage's), every result is kept as it completes
(compress/search_state.py), so a killed search, rerun with the same command, picks up where it stopped.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgekd.benchmarks.stats import latency_stats
from edgekd.compress.prune import PruneSpec
from edgekd.compress.qat import qat_supported, quantization_aware
from edgekd.compress.quant import QuantSpec, get_spec
from edgekd.compress.search_state import SearchState
from edgekd.errors import EdgeKDError, ExportError, RecipeError
from edgekd.targets import RuntimeUnavailable
from edgekd.targets.export import artifact_size

# Pruning levels along each axis, weakest first. A level over budget ends its axis.
AXES = (
    (PruneSpec(ffn=0.25), PruneSpec(ffn=0.5), PruneSpec(ffn=0.5, heads=0.25), PruneSpec(ffn=0.75, heads=0.5)),
    (PruneSpec(layers=1), PruneSpec(layers=1, ffn=0.5)),
)
TIMING_ITERATIONS = 40


@dataclass
class Candidate:
    prune: PruneSpec
    quant: QuantSpec
    accuracy: float
    drop: float                      # accuracy points below the teacher
    model: object = field(repr=False, default=None)
    size_bytes: int | None = None
    latency_ms: dict | None = None
    qat: bool = False                # weights from quantization-aware distillation
    failed: str | None = None        # why its artifact was refused (export or parity gate): never chosen

    @property
    def name(self) -> str:
        return candidate_name(self.prune, self.quant) + ("+qat" if self.qat else "")

    def row(self) -> dict:
        return {"name": self.name, "prune": self.prune.to_dict(), "quant": self.quant.name, "qat": self.qat,
                "accuracy": self.accuracy, "drop_points": round(self.drop, 3), "size_bytes": self.size_bytes,
                "latency_p50_ms": self.latency_ms["p50"] if self.latency_ms else None,
                **({"skipped": self.failed} if self.failed else {})}


@dataclass
class SearchResult:
    model: object
    prune: PruneSpec
    quant: QuantSpec
    summary: dict
    qat: bool = False


def candidate_name(prune: PruneSpec, quant: QuantSpec) -> str:
    return f"prune-{prune.name}+{quant.name}" if not prune.is_noop else quant.name


def log(message: str) -> None:
    print(f"[edgekd] search: {message}", file=sys.stderr, flush=True)


def search(job, fmt, budget: float, objective: str, quant: list[str] | None = None,
           checkpoints: Path | None = None, qat_epochs: float = 0.0, budget_from: str = "teacher",
           options: dict | None = None) -> SearchResult:
    """Run the search for `job` (a compress.Compression) on target format `fmt`.

    `quant`: the QuantSpecs to try (default: every one `fmt` realizes), least aggressive first.
    `checkpoints`: the folder where results are kept as they complete, and read back on a rerun.
    `qat_epochs`: a spec over budget after post-training quantization is tried once more after this
    much quantization-aware distillation (0: never).
    `budget_from`: what the budget counts from, the teacher's validation accuracy or the uncompressed student's.
    `options`: the target's resolved export options (an iOS deployment target, dynamic_length), as the export
    stage will use them.
    """
    if fmt is None:
        raise EdgeKDError("the budget search measures latency on the target's runtime; name a target")
    names = [n for n in fmt.specs if not quant or n in quant]
    specs = [get_spec(name) for name in names if not get_spec(name).is_float]
    state = SearchState(checkpoints)
    done = sum("accuracy" in r for name, r in state.results.items() if name != "teacher")
    if done:
        most = (1 + len(specs)) * (1 + sum(len(axis) for axis in AXES))
        log(f"resuming search: {done} of at most {most} candidates done (kept in {checkpoints})")
    # "I can lose at most 1 point" counts from the model the user has: the teacher, or the student distilled
    teacher = state.remember("teacher", lambda: {"accuracy": job.teacher_accuracy()})["accuracy"]
    fp32 = get_spec("fp32")
    base = teacher if budget_from == "teacher" else state.remember(  # the fp32 candidate's own record
        candidate_name(PruneSpec(), fp32), lambda: {"accuracy": job.evaluate(job.student, [])["fp32"]["accuracy"]}
    )["accuracy"]
    tried: list[Candidate] = []

    def consider(model, prune: PruneSpec, spec: QuantSpec, qat: bool = False) -> Candidate:
        name = candidate_name(prune, spec) + ("+qat" if qat else "")

        def evaluate() -> dict:
            try:
                return {"accuracy": job.accuracy_of(model, spec)["accuracy"] if not spec.is_float else
                        job.evaluate(model, [])["fp32"]["accuracy"]}
            except RecipeError as exc:  # recorded, so that a rerun skips it without trying again
                return {"skipped": str(exc)}

        record = state.remember(name, evaluate)
        if "skipped" in record:
            raise RecipeError(record["skipped"])
        candidate = Candidate(prune, spec, record["accuracy"], 100 * (base - record["accuracy"]), model, qat=qat)
        tried.append(candidate)
        again = " (done before the rerun)" if name in state.reused else ""
        log(f"{candidate.name}: accuracy {100 * candidate.accuracy:.2f} % ({-candidate.drop:+.2f} points){again}")
        return candidate

    def fits(model, prune: PruneSpec, spec: QuantSpec) -> bool:
        try:
            if consider(model, prune, spec).drop <= budget:
                return True
            if not qat_epochs or not qat_supported(spec):
                return False
            name = f"{candidate_name(prune, spec)}+qat"
            log(f"{name}: {qat_epochs:g} epochs of quantization-aware distillation")
            trained = state.model(name, lambda resume: quantization_aware(job, model, spec, qat_epochs, resume))
            return consider(trained, prune, spec, qat=True).drop <= budget
        except RecipeError as exc:  # e.g. int4 groups of 128 on a 64-wide student
            log(f"{spec.name} after prune-{prune.name}: skipped ({exc})")
            return False

    consider(job.student, PruneSpec(), fp32)
    passing = [s for s in specs if fits(job.student, PruneSpec(), s)]
    for axis in AXES:
        quant_ok = passing
        for level in axis:
            try:
                model = state.model(f"prune-{level.name}", lambda resume, level=level: job.pruned(level, resume))
            except EdgeKDError as exc:  # e.g. a one-layer student cannot lose a layer
                log(f"prune-{level.name}: skipped ({exc})")
                break
            if consider(model, level, fp32).drop > budget:
                break
            quant_ok = [s for s in quant_ok if fits(model, level, s)]
    within = [c for c in tried if c.drop <= budget]
    measured = within or sorted(tried, key=lambda c: c.drop)[:3]
    _measure(measured, fmt, job, objective, state, options or {})
    for c in measured:
        if c.failed:
            log(f"{c.name}: skipped ({c.failed})")
    if within and all(c.failed for c in within):
        raise EdgeKDError(f"every candidate within {budget} points fails the export's gate: "
                          + "; ".join(f"{c.name}: {c.failed}" for c in within))
    within = [c for c in within if not c.failed]
    front = pareto_front([c for c in measured if not c.failed], objective)
    table = [c.row() for c in tried]
    if not within:
        for c in measured:
            log(f"best outside the budget: {c.name} {-c.drop:+.2f} points, {_cost(c, objective)}")
        raise EdgeKDError(f"no candidate stays within {budget} points of the {budget_from}'s validation accuracy "
                          f"({100 * base:.2f} %); the closest, {measured[0].name}, loses {measured[0].drop:.2f}: "
                          f"raise compress.budget or distill a larger student")
    key = (lambda c: c.latency_ms["p50"]) if objective == "latency" else (lambda c: c.size_bytes)
    chosen = min(within, key=lambda c: (key(c), c.drop))
    reference = next((c for c in measured if c.prune.is_noop and c.quant.is_float and not c.failed), None)
    versus = f", {_cost(reference, objective)} for the fp32 student" if reference else ""
    why = (f"{chosen.name}: {_cost(chosen, objective)}{versus}; "
           f"loses {chosen.drop:.2f} of the {budget} points allowed; the {objective}-best of {len(within)} "
           f"candidates within budget ({len(tried)} evaluated)")
    log(f"chosen {why}")
    summary = {"budget_points": budget, "budget_from": budget_from, "reference_accuracy": base,
               "teacher_accuracy": teacher, "objective": objective, "chosen": chosen.name,
               "explanation": why, "candidates": table, "front": [c.name for c in front],
               "measured": [c.row() for c in measured], "evaluated_by": dict(job.evaluated_by)}
    return SearchResult(chosen.model, chosen.prune, chosen.quant, summary, chosen.qat)


def _cost(candidate: Candidate, objective: str) -> str:
    if objective == "latency" and candidate.latency_ms:
        return f"p50 {candidate.latency_ms['p50']:.2f} ms"
    return f"{candidate.size_bytes / 1e6:.2f} MB"


def pareto_front(candidates: list[Candidate], objective: str) -> list[Candidate]:
    """Candidates no other beats on both accuracy and the objective (the report's front, same rule)."""
    from edgekd.report_render import pareto_front as front_of

    cost = (lambda c: c.latency_ms["p50"]) if objective == "latency" else (lambda c: c.size_bytes)
    return [candidates[i] for i in front_of([(cost(c), c.accuracy) for c in candidates])]


def _measure(candidates: list[Candidate], fmt, job, objective: str, state: SearchState, options: dict) -> None:
    """Export every candidate with the target's exporter and options, gate it as the export stage will, and time
    the ones that pass interleaved on its runtime. A candidate whose export or gate fails keeps its reason.

    A timing round is one interleaved session, so a round the kill cut short is run again in full;
    a complete one is kept, and reused by a rerun that measures the same candidates.
    """
    rows = state.measured([c.name for c in candidates])
    if rows is not None:
        log(f"reusing the sizes and timings of the {len(candidates)} candidates measured before the rerun")
        for c in candidates:
            c.size_bytes, c.latency_ms = rows[c.name]["size_bytes"], rows[c.name]["latency_ms"]
            c.failed = rows[c.name].get("failed")
        return
    dynamic = bool(options.get("dynamic_length"))
    # A dynamic-length artifact is timed on a text at its own length, as the benchmark stage will time it.
    ids, mask = job.timing_input(dynamic)
    with tempfile.TemporaryDirectory(prefix=".search-", dir=job.workdir) as tmp:
        runners = []
        for i, c in enumerate(candidates):
            log(f"export and time {c.name} ({i + 1}/{len(candidates)})")
            file = Path(tmp) / f"candidate{i}.{fmt.suffix}"
            try:
                details = fmt.export(c.model, c.quant, job.max_length, job.calibration, file, **options)
                reference = details.pop("reference", None) if isinstance(details, dict) else None
                c.size_bytes = artifact_size(file)
                runner = fmt.runner(file, 0)
                job.check_artifact(c.model, c.quant, runner, dynamic, c.name, reference)
            except RuntimeUnavailable as exc:  # e.g. Core ML on Linux: sizes only (export checked its structure)
                if objective == "latency":
                    raise EdgeKDError(f"the search times candidates on the target's runtime, and {exc}; "
                                      f"use --objective size here, or search on that platform") from None
                continue
            except ExportError as exc:  # the final export would refuse it too: never the winner
                c.failed = str(exc)
                continue
            for _ in range(5):
                runner(ids, mask)
            runners.append((c, runner, []))
        with torch.no_grad():
            for _ in range(TIMING_ITERATIONS):
                for _, runner, samples in runners:
                    start = time.perf_counter()
                    runner(ids, mask)
                    samples.append((time.perf_counter() - start) * 1e3)
        for c, _, samples in runners:
            c.latency_ms = {k: v for k, v in latency_stats(samples).items() if k != "samples"}
    state.save_measured({c.name: {"size_bytes": c.size_bytes, "latency_ms": c.latency_ms,
                                  **({"failed": c.failed} if c.failed else {})} for c in candidates})
