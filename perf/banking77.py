"""Distillation quality on BANKING77 (77 intents, real customer messages): teacher vs students.

    python perf/banking77.py [--out runs/perf-banking77] [--teacher-epochs 8] [--teacher-lr 2e-4] [--student-epochs 4]

Fine-tunes the teacher (all-MiniLM-L6-v2 + head) once, then distills students of 1-4 layers cut
from it, with and without vocabulary trimming, with augmentation or intermediate losses, and the
same student trained on hard labels only (alpha 0); then prunes half of every FFN of the 2-layer
students (compress stage, recovery by distillation or, for the hard-label one, by hard labels). Prints a table and records perf/results/banking77.json row by row as each finishes.
Stages already done in --out are reused (wall times come from their manifests).
Needs ../shared/data/banking77 (not part of the project); exits 0 with a note when it is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
RESULTS = Path(__file__).parent / "results" / "banking77.json"

STUDENTS = {  # name -> student recipe overrides; the rows that decide the defaults first
    "student-1L-trim": {"layers": [5]},
    "student-1L-trim-hard-labels": {"layers": [5], "alpha": 0.0},
    "student-1L-trim-augment2": {"layers": [5], "augment": 2},
    "student-2L-trim": {"layers": [2, 5]},
    "student-2L-trim-hard-labels": {"layers": [2, 5], "alpha": 0.0},
    "student-1L-trim-intermediate": {"layers": [5], "hidden_weight": 1.0, "attention_weight": 1.0},
    "student-3L-trim": {"layers": [1, 3, 5]},
    "student-4L-trim": {"layers": [1, 2, 4, 5]},
    "student-2L-full-vocab": {"layers": [2, 5], "trim_vocab": False},
}
# Students pruned by the compress stage (half of every FFN, then 2 epochs of recovery) from a student
# above: 2 layers at half FFN width are under a quarter of the teacher's non-embedding parameters.
PRUNED = {  # name -> (source student, student overrides for the recovery, compress.prune)
    "student-2L-trim-ffn50": ("student-2L-trim", {"layers": [2, 5]}, {"ffn": 0.5}),
    "student-2L-trim-ffn50-hard-labels": ("student-2L-trim-hard-labels", {"layers": [2, 5], "alpha": 0.0},
                                          {"ffn": 0.5}),
}
ORDER = ["student-1L-trim", "student-1L-trim-hard-labels", "student-2L-trim", "student-2L-trim-hard-labels",
         "student-2L-trim-ffn50", "student-2L-trim-ffn50-hard-labels", "student-1L-trim-augment2",
         "student-3L-trim", "student-4L-trim", "student-2L-full-vocab", "student-1L-trim-intermediate"]


def non_embedding_params(model) -> int:
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return sum(p.numel() for p in model.parameters()) - embedding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/perf-banking77")
    parser.add_argument("--teacher-epochs", type=float, default=8)
    parser.add_argument("--teacher-lr", type=float, default=2e-4)
    parser.add_argument("--student-epochs", type=float, default=4)
    parser.add_argument("--only", nargs="*", help="student names to run (default: all)")
    args = parser.parse_args()
    if not (DATA / "train.csv").is_file():
        print(f"skipped: {DATA} is absent (BANKING77 is not part of the project)")
        return 0

    from edgekd.compress.compress import compress
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.models import load_classifier
    from edgekd.recipe import recipe_from_dict

    out = Path(args.out)
    base = {"name": "banking77",
            "teacher": {"epochs": args.teacher_epochs, "batch_size": 32, "learning_rate": args.teacher_lr},
            "data": {"train": str(DATA / "train.csv"), "validation": None, "test": str(DATA / "test.csv"),
                     "text_column": "text", "label_column": "category", "split_fractions": [0.1, 0.15]}}
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    teacher_metrics = finetune(recipe, dataset, out / "finetune")
    teacher = load_classifier(str(out / "finetune"))
    rows = [{"name": "teacher (MiniLM-L6, fine-tuned)", "wall_s": read_manifest(out / "finetune")["wall_s"],
             "params": teacher_metrics["params"], "non_embedding_params": non_embedding_params(teacher),
             "size_bytes": (out / "finetune" / "model.safetensors").stat().st_size,
             "accuracy": teacher_metrics["test"]["accuracy"], "macro_f1": teacher_metrics["test"]["macro_f1"]}]
    record(rows, dataset, args)
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        if name in PRUNED:
            source, student, pruning = PRUNED[name]
            recipe = recipe_from_dict(base | {"student": {"epochs": args.student_epochs, "augment": 0, **student},
                                              "compress": {"quant": [], "prune": pruning, "recovery_epochs": 2}})
            compress(recipe, dataset, out / source, out / name, out / "finetune")
            rows.append(pruned_row(name, out, source, dataset, teacher, pruning, student))
            record(rows, dataset, args)
            continue
        student = STUDENTS[name]
        recipe = recipe_from_dict(base | {"student": {"epochs": args.student_epochs, "augment": 0,
                                                      "vocab_margin": 3000, **student}})
        metrics = distill(recipe, dataset, out / "finetune", out / name, out / ".cache")
        model = load_classifier(str(out / name))
        rows.append({"name": name, "wall_s": read_manifest(out / name)["wall_s"], "params": metrics["params"],
                     "non_embedding_params": non_embedding_params(model),
                     "size_bytes": (out / name / "model.safetensors").stat().st_size,
                     "accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                     "agreement": metrics["test"]["agreement"], "vocabulary": metrics.get("vocabulary"),
                     "student": student})
        record(rows, dataset, args)
    return 0


def pruned_row(name: str, out: Path, source: str, dataset, teacher, pruning: dict, student: dict) -> dict:
    from edgekd.distill.training import predict_logits
    from edgekd.manifest import read_manifest
    from edgekd.metrics import classification_metrics
    from edgekd.models import load_classifier, load_tokenizer

    model = load_classifier(str(out / name))
    max_length = read_manifest(out / name)["max_length"]
    reference = predict_logits(teacher, load_tokenizer(str(out / "finetune")), dataset.test.texts, max_length)
    test = classification_metrics(predict_logits(model, load_tokenizer(str(out / name)), dataset.test.texts,
                                                 max_length), dataset.label_ids(dataset.test), reference)
    return {"name": name, "wall_s": read_manifest(out / source)["wall_s"] + read_manifest(out / name)["wall_s"],
            "params": sum(p.numel() for p in model.parameters()), "non_embedding_params": non_embedding_params(model),
            "size_bytes": (out / name / "model.safetensors").stat().st_size, "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"], "agreement": test["agreement"],
            "student": {**student, "from": source, "prune": pruning, "recovery_epochs": 2}}


def record(rows: list[dict], dataset, args) -> None:
    teacher = rows[0]
    print(f"\n{'model':<32} {'size MB':>8} {'params M':>9} {'non-emb M':>10} {'acc %':>6} {'F1':>6} "
          f"{'of teacher':>10} {'wall s':>7}")
    for row in rows:
        print(f"{row['name']:<32} {row['size_bytes'] / 1e6:8.2f} {row['params'] / 1e6:9.2f} "
              f"{row['non_embedding_params'] / 1e6:10.2f} {100 * row['accuracy']:6.2f} {row['macro_f1']:6.3f} "
              f"{100 * row['accuracy'] / teacher['accuracy']:9.1f}% {row['wall_s']:7.0f}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python perf/banking77.py " + " ".join(sys.argv[1:]),
        "data": {"train": len(dataset.train), "validation": len(dataset.validation), "test": len(dataset.test),
                 "labels": len(dataset.label_names)},
        "settings": {"teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr,
                     "student_epochs": args.student_epochs},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
