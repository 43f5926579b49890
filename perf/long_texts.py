"""Fine-tuning time on long texts of varied length: random batches against length-grouped ones.

    python perf/long_texts.py [--texts 384] [--rounds 2] [--max-length 256]

The texts are long ones made from BANKING77 (no long-text set is on this machine): each joins 2 to 14
messages of one intent, drawn seeded, so lengths spread from about 30 to about 220 tokens like a set of
support tickets. One epoch of the teacher's fine-tuning (built-in all-MiniLM-L6-v2 + a 77-label head,
the teacher defaults: batch 16, lr 5e-5) per variant, the variants interleaved round by round in one
process, each from the same initial weights:
  padded    every batch padded to max_length (what a fixed-shape pipeline does)
  random    random batches, each padded to its own longest text (edgekd before length grouping)
  grouped   batches of like length (training_args(length_grouped=True), edgekd's default now)
Records perf/results/long_texts.json with the epoch times and their ratios to `random` measured in
the same round. Needs ../shared/data/banking77; exits 0 with a note when it is absent.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
RESULTS = Path(__file__).parent / "results" / "long_texts.json"


def long_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    by_intent: dict[str, list[str]] = {}
    with open(DATA, newline="") as f:
        for row in csv.DictReader(f):
            by_intent.setdefault(row["category"], []).append(row["text"])
    rng, intents = random.Random(seed), sorted(by_intent)
    texts, labels = [], []
    for i in range(n):
        label = i % len(intents)  # stratified: every intent as often
        texts.append(" ".join(rng.sample(by_intent[intents[label]], rng.randint(2, 14))))
        labels.append(label)
    return texts, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"{DATA} is absent (not part of the project): nothing measured")
        return 0
    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from edgekd.data import Encoded
    from edgekd.distill.training import collator, training_args
    from edgekd.models import builtin_model_dir, load_classifier, load_tokenizer

    texts, labels = long_texts(args.texts)
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    lengths = sorted(len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"])
    torch.manual_seed(0)
    initial = load_classifier(str(builtin_model_dir()), label_names=[str(i) for i in range(77)]).state_dict()
    train = Encoded(tokenizer, texts, labels, args.max_length)
    variants = {
        "padded": (DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_length), False),
        "random": (collator(tokenizer), False),
        "grouped": (collator(tokenizer), True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (pad, grouped) in variants.items():
            model = load_classifier(str(builtin_model_dir()), label_names=[str(i) for i in range(77)])
            model.load_state_dict(initial)
            with tempfile.TemporaryDirectory() as tmp:
                targs = training_args(Path(tmp), epochs=1, learning_rate=5e-5, batch_size=16, seed=0,
                                      length_grouped=grouped, eval_strategy="no", save_strategy="no",
                                      load_best_model_at_end=False, disable_tqdm=True, logging_strategy="no")
                start = time.perf_counter()
                Trainer(model=model, args=targs, train_dataset=train, data_collator=pad).train()
                times[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
        for name in variants:
            ratios[name].append(times[name][-1] / times["random"][-1])
    rows = [{"variant": name, "epoch_s": [round(t, 1) for t in times[name]],
             "ratio_to_random": [round(r, 3) for r in ratios[name]],
             "mean_ratio_to_random": round(statistics.mean(ratios[name]), 3)} for name in variants]
    print(f"{'variant':<10}{'epoch s (per round)':>26}{'x random':>10}")
    for row in rows:
        print(f"{row['variant']:<10}{', '.join(f'{t:.1f}' for t in row['epoch_s']):>26}"
              f"{row['mean_ratio_to_random']:>10.3f}")
    record = {"command": "python perf/long_texts.py " + " ".join(sys.argv[1:]), "machine": platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "texts": len(texts),
              "tokens": {"median": lengths[len(lengths) // 2], "p99": lengths[int(0.99 * (len(lengths) - 1))],
                         "max": lengths[-1]},
              "max_length": args.max_length, "rounds": args.rounds, "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
