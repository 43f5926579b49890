"""The text-classification task: a BERT-style encoder with a classification head, `[1, labels]` logits.

    RUN/finetune -> RUN/distill -> RUN/compress -> RUN/export/<variant> -> RUN/bench -> RUN/report.*

Each stage skips itself when its directory already holds a verified result with the same
key (same parameters, same input checksums), so a rerun after a crash resumes where it stopped.
RUN/plan.json lists this run's variants and each one's outcome (exported, or failed with its reason);
the report reads exactly those, never whatever else sits in RUN/export/.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import NamedTuple

import yaml

from edgekd.compress.quant import QuantSpec, get_spec
from edgekd.data import load_dataset
from edgekd.errors import EdgeKDError, RecipeProblems
from edgekd.pipeline import export_variants, exported, raise_if_failed, timed
from edgekd.recipe import Recipe
from edgekd.targets import Format, get_format

RECIPE = Recipe
DEMO_RECIPE = "demo.yaml"


class Variant(NamedTuple):
    """One artifact of the plan: `spec` is what `fmt` realizes of the asked spec `asked` (int8 -> int8-weights)."""
    name: str
    source: str       # the stage it is exported from: finetune or compress
    role: str         # teacher, student, compressed
    spec: QuantSpec
    fmt: Format
    options: dict
    asked: str


def variant_plan(recipe: Recipe, quant: list[str] | None = None) -> list[Variant]:
    """Every artifact the recipe asks for; every target entry checked, all problems raised together.

    `quant`: the QuantSpecs to export on every target (default: each target's own `quant`, else
    `compress.quant`; after a budget search: the chosen one), each mapped to the format's realization.
    """
    plan, problems = [], []
    for target in recipe.targets:
        try:
            fmt = get_format(target.target, target.format)
            options = fmt.resolve_options(target.options)
        except EdgeKDError as exc:
            problems.append(str(exc))
            continue
        tag = f"{fmt.target}-{fmt.name}"
        if not plan:  # the teacher once, on the first target: the reference every student is compared with
            plan.append(Variant(f"teacher-fp32-{tag}", "finetune", "teacher", get_spec("fp32"), fmt, options, "fp32"))
        plan.append(Variant(f"student-fp32-{tag}", "compress", "student", get_spec("fp32"), fmt, options, "fp32"))
        for asked in quant or target.quant or recipe.compress.quant:
            try:
                spec = get_spec(fmt.realize(get_spec(asked).name))
            except EdgeKDError as exc:
                problems.append(str(exc))
                continue
            problem = fmt.spec_problem(spec, options)
            name = f"student-{spec.name}-{tag}"
            if problem:
                problems.append(problem)
            elif not spec.is_float and name not in {v.name for v in plan}:  # int8, int8-static: one int8-weights
                plan.append(Variant(name, "compress", "compressed", spec, fmt, options, asked))
    if problems:
        raise RecipeProblems(problems)
    return plan


def run(recipe: Recipe, out: Path) -> dict:
    """fine-tune -> distill -> compress -> export every variant -> bench -> report, into `out`."""
    from edgekd.manifest import claim_run_dir
    from edgekd.preflight import preflight

    plan = preflight(recipe)  # the whole recipe checked against the teacher's files, before hours of training
    dataset = load_dataset(recipe)  # and bad data, before the heavy imports below

    from edgekd.benchmarks.stage import bench
    from edgekd.compress.compress import compress
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.report import write_report
    from edgekd.targets.export import export_artifact

    out = Path(out)
    claim_run_dir(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    timed("finetune", finetune, recipe, dataset, out / "finetune")
    timed("distill", distill, recipe, dataset, out / "finetune", out / "distill", out / ".cache")
    timed("compress", compress, recipe, dataset, out / "distill", out / "compress",
          out / "finetune", plan[0].fmt, plan[0].options)  # the first target's format and options
    if recipe.compress.budget is not None:  # export what the search chose
        chosen = read_manifest(out / "compress")["plan"]["quant"]
        plan = variant_plan(recipe, [spec["name"] for spec in chosen])
    outcomes = export_variants(out, {
        name: partial(export_artifact, out / source, source, fmt, spec, dataset, out / "export" / name, role,
                      f"{recipe.name}-{'teacher' if role == 'teacher' else 'student'}", recipe.bench.threads,
                      options, asked, recipe.compress.budget)
        for name, source, role, spec, fmt, options, asked in plan})
    artifacts = exported(out, outcomes)
    if artifacts:
        timed("bench", bench, artifacts, out / "bench", recipe.bench.iterations, recipe.bench.warmup,
              recipe.bench.threads)
    summary = write_report(out)
    raise_if_failed(outcomes, out / "report.html")
    return summary
