"""Student-side levers on the demo: each arm's int8 student against the same teacher, per seed.

    python perf/student_levers.py --arm hidden student.hidden_weight=1 --arm long student.epochs=8 \
        [--seeds 0 1 2] [--out runs/perf-cross-fit] [--results student_levers.json]

The built-in demo recipe (finsent, MiniLM teacher, the 3-layer trimmed student, augment 4) with each seed:
the teacher is fine-tuned once (reused from --out when done there, e.g. perf/cross_fit.py's run), then the
student is distilled with the recipe as it is (arm "demo") and with each --arm's changes (dotted recipe keys,
values read as YAML). Each student is exported int8 for android/executorch (the demo's target) and its `.pte`
measured in the ExecuTorch runtime on the validation and test splits together (the export's `vs_fp32`),
against the teacher on the same texts (--quant: each spec in turn; the size ratio is against the teacher's fp32
`.pte`). Then every student `.pte` and the teacher's are timed by `edgekd bench`'s host device in one interleaved
run (--iterations, the runtime's default threads as the demo's bench), so each speed-up over the teacher comes from
one run. Records perf/results/<--results> after every seed (each arm's figures, its paired difference from "demo",
mean and standard error over the seeds) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from pathlib import Path

import yaml

RESULTS_DIR = Path(__file__).parent / "results"


def _pooled(metrics: dict, key: str = "accuracy") -> tuple[float, int]:
    """(accuracy on validation + test together, texts) from per-split {accuracy, n|texts} entries."""
    splits = [metrics["validation"], metrics["test"]]
    sizes = [s.get("n", s.get("texts")) for s in splits]
    return sum(s[key] * n for s, n in zip(splits, sizes)) / sum(sizes), sum(sizes)


def with_changes(base: dict, changes: dict[str, object]) -> dict:
    recipe = copy.deepcopy(base)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = recipe
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return recipe


def run_seed(seed: int, arms: dict[str, dict], quants: list[str], out: Path, iterations: int) -> dict:
    from edgekd.benchmarks.stage import bench
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.recipe import builtin_recipe, recipe_from_dict
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    base = builtin_recipe().to_dict()
    base["seed"] = seed
    root = out / f"seed{seed}"
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    teacher = finetune(recipe, dataset, root / "finetune")
    teacher_acc, texts = _pooled(teacher)
    # The teacher's fp32 .pte, the demo's reference size (the report's size_x), from the ExecuTorch exporter
    export_artifact(root / "finetune", "finetune", get_format("android", "executorch"),
                    get_spec("fp32"), dataset, root / "export-teacher", "teacher", "finsent")
    teacher_size = read_manifest(root / "export-teacher")["size_bytes"]
    row = {"seed": seed, "texts": texts, "teacher_accuracy": teacher_acc, "arms": {}}
    exports = {"teacher": root / "export-teacher"}
    for name, changes in arms.items():
        # "demo" shares perf/cross_fit.py's folder for the unchanged recipe, so its stage is reused.
        folder = "cf0" if name == "demo" else name
        distill(recipe_from_dict(with_changes(base, changes)), dataset, root / "finetune", root / f"distill-{folder}",
                root / ".cache")
        distill_s = read_manifest(root / f"distill-{folder}")["wall_s"]  # its own time, also when reused
        row["arms"][name] = arm = {"changes": changes, "distill_s": round(distill_s, 1)}
        for quant in quants:  # the first is the demo's int8: its folders are perf/cross_fit.py's
            suffix = "" if quant == "int8" else f"-{quant}"
            export = export_artifact(root / f"distill-{folder}", "distill", get_format("android", "executorch"),
                                     get_spec(quant), dataset, root / f"export-{folder}{suffix}", "student",
                                     f"finsent-{folder}")
            accuracy, _ = _pooled(export["vs_fp32"])
            arm["fp32_accuracy"], _ = _pooled(export["vs_fp32"], "fp32_accuracy")
            exports[(name, quant)] = root / f"export-{folder}{suffix}"
            size = read_manifest(exports[(name, quant)])["size_bytes"]
            arm[quant] = {"accuracy": accuracy, "size_bytes": size, "size_x": round(teacher_size / size, 2),
                          "minus_teacher_points": round(100 * (accuracy - teacher_acc), 2)}
            print(f"seed {seed} {name:<10} {quant:<5} {100 * accuracy:.2f} % ({100 * (accuracy - teacher_acc):+.2f} "
                  f"points from the teacher's {100 * teacher_acc:.2f}), {size / 1e6:.2f} MB "
                  f"({teacher_size / size:.1f}x smaller), distill {distill_s:.0f} s", flush=True)
    # One interleaved run for all of them (a rerun with the same exports reuses it: the stage key)
    timed = bench(list(exports.values()), root / "bench-levers", iterations=iterations)
    p50 = {r["name"]: r["latency_ms"]["p50"] for r in timed["results"]}  # keyed by the export folder's name
    teacher_p50 = row["teacher_p50_ms"] = p50[exports["teacher"].name]
    for (name, quant), folder in ((k, v) for k, v in exports.items() if k != "teacher"):
        student_p50 = p50[folder.name]
        row["arms"][name][quant].update(p50_ms=student_p50, faster_x=round(teacher_p50 / student_p50, 2))
    for arm in row["arms"].values():
        for quant in quants:
            arm[quant]["minus_demo_points"] = round(
                100 * (arm[quant]["accuracy"] - row["arms"]["demo"][quant]["accuracy"]), 2)
    return row


def summarize(rows: list[dict]) -> dict:
    def mean_se(values):
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        return {"mean": round(statistics.mean(values), 2), "se": None if se is None else round(se, 2)}

    quants = [q for q in rows[0]["arms"]["demo"] if q not in ("changes", "distill_s", "fp32_accuracy")]
    return {name: {quant: {"minus_teacher_points": mean_se([r["arms"][name][quant]["minus_teacher_points"]
                                                            for r in rows]),
                           "minus_demo_points": mean_se([r["arms"][name][quant]["minus_demo_points"] for r in rows]),
                           "size_x": rows[-1]["arms"][name][quant]["size_x"],
                           "faster_x": mean_se([r["arms"][name][quant]["faster_x"] for r in rows])}
                   for quant in quants}
            for name in rows[0]["arms"]}


def parse_arms(pairs: list[list[str]]) -> dict[str, dict]:
    arms = {"demo": {}}
    for name, *changes in pairs:
        if name in arms:
            raise SystemExit(f"arm '{name}' given twice")
        arms[name] = {}
        for change in changes:
            key, sep, value = change.partition("=")
            if not sep:
                raise SystemExit(f"arm '{name}': '{change}' is not key=value")
            arms[name][key] = yaml.safe_load(value)
    return arms


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="an arm: its name, then the recipe changes (e.g. student.hidden_weight=1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/perf-cross-fit")
    parser.add_argument("--results", default="student_levers.json")
    parser.add_argument("--base", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe changes for every arm, the demo arm too")
    parser.add_argument("--quant", nargs="+", default=["int8"], help="QuantSpecs each student is exported with")
    parser.add_argument("--iterations", type=int, default=300, help="interleaved rounds of the latency run")
    args = parser.parse_args(argv)
    arms = parse_arms(args.arm)
    shared = parse_arms([["base", *args.base]])["base"]
    arms = {name: {**shared, **changes} for name, changes in arms.items()}
    import torch

    record = {"command": " ".join(["python perf/student_levers.py", *argv]), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "arms": arms, "rows": []}
    results = RESULTS_DIR / args.results
    for seed in args.seeds:
        record["rows"].append(run_seed(seed, arms, args.quant, Path(args.out), args.iterations))
        record["summary"] = summarize(record["rows"])
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'arm':<10} {'quant':<6} {'- teacher (points)':>20} {'- demo arm (points)':>20} {'smaller':>8} "
          f"{'faster':>8}")
    for name, by_quant in record["summary"].items():
        for quant, s in by_quant.items():
            a, b = s["minus_teacher_points"], s["minus_demo_points"]
            print(f"{name:<10} {quant:<6} {a['mean']:>+13.2f} ± {a['se'] if a['se'] is not None else '-':<5}"
                  f"{b['mean']:>+13.2f} ± {b['se'] if b['se'] is not None else '-':<5} {s['size_x']:>7.1f}x "
                  f"{s['faster_x']['mean']:>7.2f}x")
    print(f"recorded in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
