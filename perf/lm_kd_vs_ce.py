"""The distilled decoder student against the same student trained without its teacher, over seeds.

    python perf/lm_kd_vs_ce.py --teacher-run runs/perf-lm-demo [--seeds 0,1,2] [--out runs/perf-lm-kd]
                               [--kd-alpha 1] [--set learning_rate=5e-4 ...] [--kd-set kd_tokens=all ...]
                               [--unlabeled FILE [--max-unlabeled N]] [--steps N] [--results FILE] [--resume]

The teacher is the fine-tuned one of a finished generation run (`--teacher-run`: its RUN/finetune stage, e.g.
from `python perf/lm_demo.py`), the recipe is that run's own (RUN/recipe.yaml). For each seed, the chain's
distill stage (edgekd.tasks.generation.distill: the same pruning plan from the teacher by measured importance,
then training) runs twice with everything else equal: student.alpha `--kd-alpha` (1, the recipe's default: forward
KL on the teacher's cached top-k alone; 0.5: half of it, half the completions' cross-entropy) and student.alpha 0
(cross-entropy on the completions alone: no teacher). `--set key=value` changes a student.* field for both arms,
`--kd-set key=value` for the distilled arm alone (e.g. kd_tokens=all: the KD term on prompt and completion).
`--unlabeled FILE` gives the distilled arm a transfer set beyond the labelled records (data.unlabeled: prompts the
teacher completes; e.g. builtin:finsent/train.csv, whose texts outside the labelled sample, their labels unused,
stand for unlabelled domain text), which the no-teacher arm cannot use. `--steps N` trains each arm N optimizer
steps (its epochs set from its own training set's size), so a larger transfer set is compared at equal compute.
The seed picks the training and evaluation samples, the calibration texts and the training order, the same for
both arms. A distill stage already in `--out` with the same key is reused (its own wall time is reported).
`--resume` keeps the rows `--results` already holds for the same recipe, changes and steps (and, where a row names
it, the same teacher stage key) and runs only the seeds it lacks: one seed pair can take an hour on a laptop's cores.
Reports test and validation perplexity of the completions and test task accuracy (greedy label word), per seed
and as means, with the paired per-seed difference (mean, standard error); records perf/results/lm_kd_vs_ce.json
(or `--results`) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lm_kd_vs_ce.json"


def main(argv=None) -> int:
    import yaml

    from edgekd.manifest import read_manifest
    from edgekd.recipe import recipe_from_dict
    from edgekd.tasks.generation import distill, load_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/perf-lm-kd"))
    parser.add_argument("--kd-alpha", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a student.* field for both arms, e.g. learning_rate=5e-4")
    parser.add_argument("--kd-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a student.* field for the distilled arm alone, e.g. kd_tokens=all")
    parser.add_argument("--unlabeled", help="data.unlabeled for the distilled arm (the teacher completes it)")
    parser.add_argument("--max-unlabeled", type=int, help="data.max_unlabeled for the distilled arm")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default: the recipe's epochs)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --results holds for this configuration; run only the seeds it lacks")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    base = recipe_from_dict(yaml.safe_load((args.teacher_run / "recipe.yaml").read_text()))
    changed, kd_changed = (dict(item.split("=", 1) for item in sets) for sets in (args.set, args.kd_set))
    base = _with(base, changed)
    arms = {f"distilled (alpha {args.kd_alpha:g})": args.kd_alpha, "no teacher (alpha 0)": 0.0}
    suffix = "".join(f"-{key}{value}" for key, value in changed.items()) + (f"-steps{args.steps}" if args.steps else "")
    if args.unlabeled:
        kd_changed["unlabeled"] = Path(args.unlabeled).name + (f"{args.max_unlabeled}" if args.max_unlabeled else "")
    kd_suffix = "".join(f"-{key}{value}" for key, value in kd_changed.items())
    finetune = read_manifest(args.teacher_run / "finetune")
    teacher = {"key": finetune["key"], "test_perplexity": finetune["metrics"]["test"]["perplexity"]["perplexity"]}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = _earlier_rows(args.results, base.to_dict(), changed, kd_changed, args.steps, arms, seeds,
                         teacher) if args.resume else []
    for seed in seeds:
        if any(r["seed"] == seed for r in rows):
            print(f"seed {seed}: kept from {args.results}", flush=True)
            continue
        for arm, alpha in arms.items():
            recipe = replace(base, seed=seed, student=replace(base.student, alpha=alpha))
            if alpha > 0:
                recipe = _with(recipe, {k: v for k, v in kd_changed.items() if k != "unlabeled"})
                if args.unlabeled:
                    recipe = replace(recipe, data=replace(recipe.data, unlabeled=args.unlabeled,
                                                          max_unlabeled=args.max_unlabeled))
            data = load_records(recipe)
            per_epoch = math.ceil((len(data.train) + len(data.unlabeled)) / recipe.student.batch_size)
            if args.steps:
                recipe = replace(recipe, student=replace(recipe.student, epochs=args.steps / per_epoch))
            stage = args.out / f"seed{seed}-alpha{alpha:g}{suffix}{kd_suffix if alpha > 0 else ''}"
            metrics = distill(recipe, data, args.teacher_run / "finetune", stage, args.out / ".cache")
            test, val = metrics["test"], metrics["validation"]
            rows.append({"seed": seed, "arm": arm, "alpha": alpha, "teacher": teacher,
                         "wall_s": read_manifest(stage)["wall_s"],
                         "train_records": len(data.train), "unlabeled_prompts": len(data.unlabeled),
                         "epochs": recipe.student.epochs, "steps": math.ceil(recipe.student.epochs * per_epoch),
                         "test_perplexity": test["perplexity"]["perplexity"],
                         "validation_perplexity": val["perplexity"]["perplexity"],
                         "test_task_accuracy": (test.get("task_accuracy") or {}).get("accuracy"),
                         "test_task_n": (test.get("task_accuracy") or {}).get("n"),
                         "test_agreement_with_teacher": test["agreement"]["agreement"]})
            print(json.dumps(rows[-1]), flush=True)
        _record(args, argv, rows, arms, seeds, base, changed, kd_changed)  # a killed run keeps this seed
    return 0


def _record(args, argv, rows, arms, seeds, base, changed, kd_changed) -> None:
    """Print the table and write `args.results` from the rows so far."""
    from edgekd.benchmarks.host import cpu_model

    rows.sort(key=lambda r: (seeds.index(r["seed"]), list(arms).index(r["arm"])))
    means = {arm: {key: sum(r[key] for r in rows if r["arm"] == arm) / sum(r["arm"] == arm for r in rows)
                   for key in ("test_perplexity", "validation_perplexity", "test_task_accuracy",
                               "test_agreement_with_teacher")} for arm in arms}
    kd, ce = arms
    wins = {key: sum(a[key] < b[key] if "perplexity" in key else a[key] > b[key]
                     for a, b in zip([r for r in rows if r["arm"] == kd], [r for r in rows if r["arm"] == ce]))
            for key in ("test_perplexity", "validation_perplexity", "test_task_accuracy")}
    print(f"\n{'seed':>4} {'arm':<22} {'test ppl':>9} {'val ppl':>9} {'test acc':>9} {'agree':>7}")
    for r in rows:
        print(f"{r['seed']:>4} {r['arm']:<22} {r['test_perplexity']:9.3f} {r['validation_perplexity']:9.3f} "
              f"{100 * r['test_task_accuracy']:8.1f}% {100 * r['test_agreement_with_teacher']:6.1f}%")
    for arm, m in means.items():
        print(f"mean {arm:<22} {m['test_perplexity']:9.3f} {m['validation_perplexity']:9.3f} "
              f"{100 * m['test_task_accuracy']:8.1f}% {100 * m['test_agreement_with_teacher']:6.1f}%")
    print(f"seeds where the distilled student is better: {wins} of {len(rows) // 2}")
    paired = {key: _paired([r for r in rows if r["arm"] == kd], [r for r in rows if r["arm"] == ce], key)
              for key in ("test_perplexity", "validation_perplexity", "test_task_accuracy")}
    for key, (mean, se) in paired.items():
        spread = "n/a" if se is None else f"{se:.4f}"
        print(f"distilled - no teacher, {key}: {mean:+.4f} (standard error {spread}, {len(rows) // 2} seeds)")
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps({
        "command": " ".join(["python perf/lm_kd_vs_ce.py", *argv]), "machine": {"cpu": cpu_model(),
                                                                                "os": platform.platform()},
        "teacher_run": str(args.teacher_run), "student_changes": changed, "distilled_arm_changes": kd_changed,
        "recipe": base.to_dict(), "rows": rows,
        "means": means,
        "distilled_better": wins,
        "paired_difference": {key: {"mean": m, "standard_error": se} for key, (m, se) in paired.items()}},
        indent=2) + "\n")
    print(f"recorded in {args.results}", flush=True)


def _earlier_rows(results: Path, recipe: dict, changed: dict, kd_changed: dict, steps: int | None, arms: dict,
                  seeds: list[int], teacher: dict) -> list[dict]:
    """The rows of an earlier `results` file for the same configuration and of `seeds` (both arms of a seed or none).

    A different recipe, change or step count is refused rather than mixed in; so is a row whose teacher stage key
    differs. Rows written before the teacher was recorded are kept, with a line saying so."""
    if not results.is_file():
        return []
    earlier = json.loads(results.read_text())
    configuration = (earlier["recipe"], earlier["student_changes"], earlier["distilled_arm_changes"])
    if configuration != (recipe, changed, kd_changed):
        raise SystemExit(f"{results} holds another recipe or other changes; drop --resume or give another --results")
    rows = [r for r in earlier["rows"] if r["seed"] in seeds and arms.get(r["arm"]) == r["alpha"]]
    for r in rows:
        if steps and r["steps"] != steps:
            raise SystemExit(f"{results}: seed {r['seed']} ran {r['steps']} steps, not {steps}; drop --resume")
        if "teacher" not in r:
            print(f"seed {r['seed']} ({r['arm']}): its teacher was not recorded; kept on the same recipe", flush=True)
        elif r["teacher"]["key"] != teacher["key"]:
            raise SystemExit(f"{results}: seed {r['seed']} used teacher {r['teacher']['key']}, not {teacher['key']}; "
                             f"drop --resume or pass that teacher's --teacher-run")
    complete = {s for s in seeds if sum(r["seed"] == s for r in rows) == len(arms)}
    return [r for r in rows if r["seed"] in complete]


def _with(recipe, changes: dict):
    """`recipe` with student.* fields set from strings, each converted to the field's type."""
    student = recipe.student
    return replace(recipe, student=replace(student, **{key: type(getattr(student, key))(value)
                                                       for key, value in changes.items()}))


def _paired(kd: list[dict], ce: list[dict], key: str) -> tuple[float, float | None]:
    """Mean and standard error of the per-seed difference kd - ce (same seed, same samples: a paired design)."""
    diffs = [a[key] - b[key] for a, b in zip(kd, ce)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None  # one seed has no spread
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, (variance / len(diffs)) ** 0.5


if __name__ == "__main__":
    raise SystemExit(main())
