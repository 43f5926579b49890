"""Distillation quality on BANKING77 (77 intents, real customer messages): teacher vs students.

    python perf/banking77.py [--out runs/perf-banking77] [--teacher-epochs 8] [--teacher-lr 2e-4] [--student-epochs 4]
    python perf/banking77.py --sweep --seeds 0 1 2 [--budget-minutes 8] [--results perf/results/banking77.json]

Fine-tunes the teacher (all-MiniLM-L6-v2 + head) once, then distills students of 1-4 layers cut
from it, with and without vocabulary trimming, with augmentation or intermediate losses, and the
same student trained on hard labels only (alpha 0); then prunes half of every FFN of the 2-layer
students (compress stage, recovery by distillation or, for the hard-label one, by hard labels).
`--sweep` runs the distillation sweep instead (temperature/alpha, MiniLM losses, longer training, a
fresh student, each against hard labels), over several student seeds. Prints a table and records
the results row by row as each finishes. Stages already done in --out are reused (wall times come
from their manifests). Runs on a GPU when there is one (the recorded sweep did).
Needs ../shared/data/banking77 (not part of the project); exits 0 with a note when it is absent.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
RESULTS = Path(__file__).parent / "results" / "banking77.json"

T4 = {"temperature": 4.0, "alpha": 0.9}  # softer targets, mostly the teacher's: the sweep's KD setting
MINILM = {"attention_weight": 1.0, "value_weight": 1.0}  # MiniLM's self-attention + value-relation transfer
STUDENTS = {  # name -> student recipe overrides
    "student-1L-trim": {"layers": [5]},
    "student-1L-trim-hard-labels": {"layers": [5], "alpha": 0.0},
    "student-1L-trim-augment2": {"layers": [5], "augment": 2},
    "student-2L-trim": {"layers": [2, 5]},
    "student-2L-trim-hard-labels": {"layers": [2, 5], "alpha": 0.0},
    "student-1L-trim-intermediate": {"layers": [5], "hidden_weight": 1.0, "attention_weight": 1.0},
    "student-3L-trim": {"layers": [1, 3, 5]},
    "student-4L-trim": {"layers": [1, 2, 4, 5]},
    "student-2L-full-vocab": {"layers": [2, 5], "trim_vocab": False},
    # The distillation sweep: temperature/alpha, MiniLM's attention and value relations, longer training.
    "student-2L-trim-T4": {"layers": [2, 5], **T4},
    "student-2L-trim-T4-soft-only": {"layers": [2, 5], "temperature": 4.0, "alpha": 1.0},
    "student-1L-trim-T4": {"layers": [5], **T4},
    "student-2L-trim-T4-minilm": {"layers": [2, 5], **T4, **MINILM},
    "student-1L-trim-T4-minilm": {"layers": [5], **T4, **MINILM},
    "student-2L-trim-T4-10ep": {"layers": [2, 5], **T4, "epochs": 10},
    "student-2L-trim-hard-labels-10ep": {"layers": [2, 5], "alpha": 0.0, "epochs": 10},
    "student-1L-trim-T4-10ep": {"layers": [5], **T4, "epochs": 10},
    "student-1L-trim-hard-labels-10ep": {"layers": [5], "alpha": 0.0, "epochs": 10},
    # Teacher-labelled augmented copies (Tang et al., 2019): inputs hard labels cannot use.
    "student-1L-trim-T4-augment2": {"layers": [5], **T4, "augment": 2},
    # The same 1-layer student cut from the *pretrained* model instead of the fine-tuned teacher
    # (Sun et al., 2019, "Patient KD": BERT-k fine-tuned vs distilled, both from the pretrained layers):
    # hard labels here are what one gets without a teacher; with soft labels, what the teacher adds.
    "pretrained-1L-trim-hard-labels-10ep": {"pretrained_layers": [5], "alpha": 0.0, "epochs": 10},
    "pretrained-1L-trim-T4-10ep": {"pretrained_layers": [5], **T4, "epochs": 10},
    # A student not initialized from the teacher's layers (2 fresh 384-wide layers, FFN 768): where
    # soft targets are expected to matter most.
    "student-fresh-2x384-T4": {"config": {"num_hidden_layers": 2, "intermediate_size": 768}, **T4, "epochs": 10},
    "student-fresh-2x384-hard-labels": {"config": {"num_hidden_layers": 2, "intermediate_size": 768},
                                        "alpha": 0.0, "epochs": 10},
}
# Students pruned by the compress stage (half of every FFN, then 2 epochs of recovery) from a student
# above: 2 layers at half FFN width are under a quarter of the teacher's non-embedding parameters.
PRUNED = {  # name -> (source student, student overrides for the recovery, compress.prune)
    "student-2L-trim-ffn50": ("student-2L-trim", {"layers": [2, 5]}, {"ffn": 0.5}),
    "student-2L-trim-ffn50-hard-labels": ("student-2L-trim-hard-labels", {"layers": [2, 5], "alpha": 0.0},
                                          {"ffn": 0.5}),
    "student-2L-trim-T4-ffn50": ("student-2L-trim-T4", {"layers": [2, 5], **T4}, {"ffn": 0.5}),
}
ORDER = ["student-1L-trim", "student-1L-trim-hard-labels", "student-2L-trim", "student-2L-trim-hard-labels",
         "student-2L-trim-ffn50", "student-2L-trim-ffn50-hard-labels", "student-1L-trim-augment2",
         "student-3L-trim", "student-4L-trim", "student-2L-full-vocab", "student-1L-trim-intermediate"]
# What `--sweep` runs, most telling first (each with every --seeds seed), until --budget-minutes is spent.
SWEEP = ["student-2L-trim-hard-labels", "student-2L-trim-T4", "student-1L-trim-hard-labels", "student-1L-trim-T4",
         "student-2L-trim", "student-2L-trim-T4-minilm", "student-1L-trim-T4-minilm", "student-2L-trim-T4-soft-only",
         "student-2L-trim-ffn50-hard-labels", "student-2L-trim-T4-ffn50", "student-2L-trim-T4-10ep",
         "student-2L-trim-hard-labels-10ep", "student-1L-trim-T4-10ep", "student-1L-trim-hard-labels-10ep",
         "student-fresh-2x384-T4", "student-fresh-2x384-hard-labels", "student-3L-trim", "student-4L-trim"]


def base_recipe(data: Path, teacher_model: str, teacher_epochs: float = 8, teacher_lr: float = 2e-4) -> dict:
    """The BANKING77 recipe every perf script starts from: the teacher's settings and the data split
    (validation split from train by edgekd, the official test set)."""
    return {"name": "banking77",
            "teacher": {"model": teacher_model, "epochs": teacher_epochs, "batch_size": 32,
                        "learning_rate": teacher_lr},
            "data": {"train": str(data / "train.csv"), "validation": None, "test": str(data / "test.csv"),
                     "text_column": "text", "label_column": "category", "split_fractions": [0.1, 0.15]}}


def non_embedding_params(model) -> int:
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return sum(p.numel() for p in model.parameters()) - embedding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/perf-banking77")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train.csv and test.csv")
    parser.add_argument("--teacher-model", default="builtin:all-MiniLM-L6-v2")
    parser.add_argument("--teacher-epochs", type=float, default=8)
    parser.add_argument("--teacher-lr", type=float, default=2e-4)
    parser.add_argument("--student-epochs", type=float, default=4)
    parser.add_argument("--only", nargs="*",
                        help="student names to run, in this order (default: ORDER, or SWEEP with --sweep)")
    parser.add_argument("--sweep", action="store_true", help="run the distillation sweep (SWEEP) instead of ORDER")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (the data split keeps 0)")
    parser.add_argument("--budget-minutes", type=float, help="start no student after this many minutes")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="add this run to the 'runs' list of --results instead of replacing the file (one file "
                             "gathers runs made apart, e.g. one seed per core, each with its own command)")
    parser.add_argument("--labelled-fraction", type=float,
                        help="keep labels on this fraction of the training texts (stratified); the rest become "
                             "data.unlabeled, which distillation uses and hard-label training cannot")
    args = parser.parse_args()
    names = args.only or (SWEEP if args.sweep else ORDER)
    unknown = [n for n in names if n not in STUDENTS and n not in PRUNED]
    if unknown:  # before the teacher's fine-tuning, not after it
        parser.error(f"unknown student {unknown[0]}; the names are those of STUDENTS and PRUNED")
    if not (args.data / "train.csv").is_file():
        print(f"skipped: {args.data} is absent (BANKING77 is not part of the project)")
        return 0

    import time

    import torch

    from edgekd.compress.compress import compress
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.models import load_classifier
    from edgekd.recipe import recipe_from_dict

    started = time.monotonic()
    out = Path(args.out)
    base = base_recipe(args.data, args.teacher_model, args.teacher_epochs, args.teacher_lr)
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)  # one split (seed 0) for every row: seeds vary the students only
    if args.labelled_fraction:
        dataset = labelled_subset(dataset, args.labelled_fraction)
    teacher_metrics = finetune(recipe, dataset, out / "finetune")
    teacher = load_classifier(str(out / "finetune"))
    rows = [{"name": "teacher (MiniLM-L6, fine-tuned)", "wall_s": read_manifest(out / "finetune")["wall_s"],
             "params": teacher_metrics["params"], "non_embedding_params": non_embedding_params(teacher),
             "size_bytes": (out / "finetune" / "model.safetensors").stat().st_size,
             "accuracy": teacher_metrics["test"]["accuracy"], "macro_f1": teacher_metrics["test"]["macro_f1"],
             "validation_accuracy": teacher_metrics["validation"]["accuracy"]}]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record(rows, dataset, args, device)
    for seed in args.seeds:  # every row once before any row again: a spent budget still covers them all
        for name in names:
            if args.budget_minutes and time.monotonic() - started > 60 * args.budget_minutes:
                print(f"budget of {args.budget_minutes} minutes spent: {name} (seed {seed}) and later not run")
                return 0
            suffix = f"@seed{seed}" if seed else ""
            if name in PRUNED:
                source, student, pruning = PRUNED[name]
                recipe = recipe_from_dict(base | {"seed": seed, "student": {"epochs": args.student_epochs,
                                                                           "augment": 0, **student},
                                                  "compress": {"quant": [], "prune": pruning, "recovery_epochs": 2}})
                compress(recipe, dataset, out / (source + suffix), out / (name + suffix), out / "finetune")
                rows.append(pruned_row(name + suffix, out, source + suffix, dataset, teacher, pruning, student))
            else:
                student, data = STUDENTS[name], dataset
                epochs = student.get("epochs", args.student_epochs)
                if student.get("alpha") == 0.0 and dataset.unlabeled:
                    # Hard labels cannot use unlabelled text: the labelled texts alone, for as many steps.
                    data = dataclasses.replace(dataset, unlabeled=[])
                    epochs *= (len(dataset.train) + len(dataset.unlabeled)) / len(dataset.train)
                overrides = {"augment": 0, "vocab_margin": 3000, **student, "epochs": epochs}
                if "pretrained_layers" in overrides:
                    overrides["model"] = str(pretrained_cut(args.teacher_model, overrides.pop("pretrained_layers"),
                                                            dataset.label_names, out))
                recipe = recipe_from_dict(base | {"seed": seed, "student": overrides})
                metrics = distill(recipe, data, out / "finetune", out / (name + suffix), out / ".cache")
                model = load_classifier(str(out / (name + suffix)))
                rows.append({"name": name + suffix, "wall_s": read_manifest(out / (name + suffix))["wall_s"],
                             "params": metrics["params"], "non_embedding_params": non_embedding_params(model),
                             "size_bytes": (out / (name + suffix) / "model.safetensors").stat().st_size,
                             "accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                             "agreement": metrics["test"]["agreement"],
                             "validation_accuracy": metrics["validation"]["accuracy"],
                             "vocabulary": metrics.get("vocabulary"), "student": {**student, "epochs": epochs}})
            rows[-1]["seed"] = seed
            record(rows, dataset, args, device)
    return 0


def pretrained_cut(model: str, layers: list[int], label_names: list[str], out: Path) -> Path:
    """The pretrained `model` (not the fine-tuned teacher) cut to `layers`, with a fresh head, as a folder
    for student.model: the student one would fine-tune without a teacher."""
    from edgekd.distill.student import cut_layers
    from edgekd.models import load_classifier, load_tokenizer

    folder = out / f"pretrained-cut-{'-'.join(map(str, layers))}"
    if not (folder / "model.safetensors").is_file():
        import torch

        torch.manual_seed(0)  # the fresh head
        cut_layers(load_classifier(model, label_names), layers).save_pretrained(folder)
        load_tokenizer(model).save_pretrained(folder)
    return folder


def labelled_subset(dataset, fraction: float):
    """The dataset with labels kept on `fraction` of each class's training texts; the rest is unlabelled."""
    import random

    from edgekd.data import Split

    rng, keep = random.Random(0), set()
    for label in dataset.label_names:
        rows = [i for i, y in enumerate(dataset.train.labels) if y == label]
        keep.update(rng.sample(rows, max(1, round(fraction * len(rows)))))
    train = Split([t for i, t in enumerate(dataset.train.texts) if i in keep],
                  [y for i, y in enumerate(dataset.train.labels) if i in keep])
    rest = [t for i, t in enumerate(dataset.train.texts) if i not in keep]
    return dataclasses.replace(dataset, train=train, unlabeled=dataset.unlabeled + rest)


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
    validation = read_manifest(out / name)["metrics"]["validation"]["fp32"]["accuracy"]
    return {"name": name, "wall_s": read_manifest(out / source)["wall_s"] + read_manifest(out / name)["wall_s"],
            "validation_accuracy": validation,
            "params": sum(p.numel() for p in model.parameters()), "non_embedding_params": non_embedding_params(model),
            "size_bytes": (out / name / "model.safetensors").stat().st_size, "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"], "agreement": test["agreement"],
            "student": {**student, "from": source, "prune": pruning, "recovery_epochs": 2}}


def record(rows: list[dict], dataset, args, device: str) -> None:
    teacher = rows[0]
    print(f"\n{'model':<40} {'size MB':>8} {'params M':>9} {'non-emb M':>10} {'val %':>6} {'acc %':>6} {'F1':>6} "
          f"{'of teacher':>10} {'wall s':>7}")
    for row in rows:
        print(f"{row['name']:<40} {row['size_bytes'] / 1e6:8.2f} {row['params'] / 1e6:9.2f} "
              f"{row['non_embedding_params'] / 1e6:10.2f} {100 * row['validation_accuracy']:6.2f} "
              f"{100 * row['accuracy']:6.2f} {row['macro_f1']:6.3f} "
              f"{100 * row['accuracy'] / teacher['accuracy']:9.1f}% {row['wall_s']:7.0f}", flush=True)
    run = {
        "command": "python perf/banking77.py " + " ".join(sys.argv[1:]), "device": device,
        "data": {"train": len(dataset.train), "validation": len(dataset.validation), "test": len(dataset.test),
                 "labels": len(dataset.label_names)},
        "settings": {"teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr,
                     "student_epochs": args.student_epochs, "seeds": args.seeds,
                     "labelled_fraction": args.labelled_fraction, "unlabeled": len(dataset.unlabeled)},
        "rows": rows}
    if args.append:
        previous = json.loads(args.results.read_text()) if args.results.is_file() else {}
        run = {**previous, "runs": previous.get("runs", []) + [run]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(run, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
