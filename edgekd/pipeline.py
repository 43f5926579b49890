"""The pipeline: a chain of stages over one run directory.

    RUN/finetune -> RUN/distill -> RUN/compress -> RUN/export/<variant> -> RUN/bench -> RUN/report.*

Each stage skips itself when its directory already holds a verified result with the same
key (same parameters, same input checksums), so a rerun after a crash resumes where it stopped.
RUN/plan.json lists this run's variants and each one's outcome (exported, or failed with its reason);
the report reads exactly those, never whatever else sits in RUN/export/.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from edgekd.compress.quant import get_spec
from edgekd.data import load_dataset
from edgekd.errors import GateError
from edgekd.recipe import Recipe
from edgekd.targets import get_format


def log(message: str) -> None:
    print(f"[edgekd] {message}", file=sys.stderr, flush=True)


def variant_plan(recipe: Recipe, quant: list[str] | None = None) -> list[tuple[str, str, str, object, object, dict]]:
    """(variant name, source stage, role, QuantSpec, Format, options) for every artifact the recipe asks for.

    `quant`: the QuantSpecs to export (default: the recipe's; after a budget search: the chosen one).
    """
    plan = []
    specs = [get_spec(name) for name in (quant or recipe.compress.quant)]
    for i, target in enumerate(recipe.targets):
        fmt = get_format(target.target, target.format)
        options = fmt.resolve_options(target.options)
        tag = f"{fmt.target}-{fmt.name}"
        if i == 0:  # the teacher once, on the first target: the reference every student is compared with
            plan.append((f"teacher-fp32-{tag}", "finetune", "teacher", get_spec("fp32"), fmt, options))
        plan.append((f"student-fp32-{tag}", "compress", "student", get_spec("fp32"), fmt, options))
        plan += [(f"student-{s.name}-{tag}", "compress", "compressed", s, fmt, options)
                 for s in specs if not s.is_float]
    return plan


def run(recipe: Recipe, out: Path) -> dict:
    """Run every stage of `recipe` into `out`; return the report summary."""
    plan = variant_plan(recipe)  # a bad spec or target fails here, before hours of training
    dataset = load_dataset(recipe)  # and bad data, before the heavy imports below

    from edgekd.benchmarks.stage import bench
    from edgekd.compress.compress import compress
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.report import write_plan, write_report
    from edgekd.targets.export import export_artifact

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    def stage(label: str, target: Path, func, *args):
        started = time.time()
        log(f"{label} ...")
        func(*args)
        log(f"{label}: {time.time() - started:.0f} s")
        return target

    stage("finetune", out / "finetune", finetune, recipe, dataset, out / "finetune")
    stage("distill", out / "distill", distill, recipe, dataset, out / "finetune", out / "distill", out / ".cache")
    stage("compress", out / "compress", compress, recipe, dataset, out / "distill", out / "compress",
          out / "finetune", plan[0][4])
    if recipe.compress.budget is not None:  # export what the search chose
        chosen = read_manifest(out / "compress")["plan"]["quant"]
        plan = variant_plan(recipe, [spec["name"] for spec in chosen])
    outcomes = {name: {"status": "pending"} for name, *_ in plan}
    write_plan(out, outcomes)
    artifacts = []
    for name, source, role, spec, fmt, options in plan:
        model_name = f"{recipe.name}-{'teacher' if role == 'teacher' else 'student'}"
        try:
            artifacts.append(stage(f"export {name}", out / "export" / name, export_artifact, out / source, source,
                                   fmt, spec, dataset, out / "export" / name, role, model_name,
                                   recipe.bench.threads, options, recipe.compress.budget))
            outcomes[name] = {"status": "exported"}
        except GateError as exc:  # a variant that fails its gate does not throw the others away
            log(f"export {name}: failed: {exc}")
            outcomes[name] = {"status": "failed", "reason": str(exc)}
        write_plan(out, outcomes)
    if artifacts:
        stage("bench", out / "bench", bench, artifacts, out / "bench", recipe.bench.iterations,
              recipe.bench.warmup, recipe.bench.threads)
    summary = write_report(out)
    failed = [name for name, outcome in outcomes.items() if outcome["status"] == "failed"]
    if failed:
        raise GateError(f"{len(failed)} of {len(plan)} variants failed their gate ({', '.join(failed)}); the "
                        f"report of the others, with the reasons, is in {out / 'report.html'}")
    return summary
