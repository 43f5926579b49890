"""Throughput of one distillation epoch with the teacher-logit cache versus running the teacher.

    python perf/distill_cache.py [--rounds 3]

Built-in teacher (all-MiniLM-L6-v2 + head) and data; the demo recipe's student (2 layers cut from
the teacher, vocabulary trimmed as the distill stage does).
Epochs alternate cached / uncached (A B A B) so the machine's drift hits both; the ratio of the
median epoch times is the figure. Records perf/results/distill_cache.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distill_cache.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from edgekd.data import Encoded, choose_max_length, load_dataset
    from edgekd.distill.student import cut_layers, layers_to_keep, num_layers, trim_vocabulary
    from edgekd.distill.trainer import DistillationTrainer, Intermediate
    from edgekd.distill.training import collator, predict_logits, training_args
    from edgekd.models import load_classifier, load_tokenizer
    from edgekd.recipe import builtin_recipe

    recipe = builtin_recipe()
    dataset = load_dataset(recipe)
    teacher = load_classifier(recipe.teacher.model, dataset.label_names).eval()
    tokenizer = load_tokenizer(recipe.teacher.model)
    max_length = choose_max_length(tokenizer, dataset.train.texts)
    texts = dataset.train.texts
    layers = layers_to_keep(recipe.student.layers, num_layers(teacher))
    _, student_tok, kept = trim_vocabulary(cut_layers(teacher, layers), tokenizer, texts,
                                           recipe.student.vocab_margin)
    train = Encoded(student_tok, texts, dataset.label_ids(dataset.train), max_length)
    started = time.perf_counter()
    cached = torch.from_numpy(predict_logits(teacher, tokenizer, texts, max_length))
    fill_s = time.perf_counter() - started

    def epoch(use_cache: bool) -> float:
        student, _, _ = trim_vocabulary(cut_layers(teacher, layers), tokenizer, texts,
                                        recipe.student.vocab_margin)
        with tempfile.TemporaryDirectory() as tmp:
            targs = training_args(Path(tmp), epochs=1, learning_rate=2e-4, batch_size=32, seed=0,
                                  eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                                  disable_tqdm=True)
            trainer = DistillationTrainer(
                model=student, args=targs, train_dataset=train, data_collator=collator(student_tok),
                teacher_logits=cached if use_cache else None, temperature=2.0, alpha=0.5,
                intermediate=None if use_cache else Intermediate(teacher=teacher, layer_map=[],
                                                                 to_teacher_ids=torch.tensor(kept)))
            start = time.perf_counter()
            trainer.train()
            return time.perf_counter() - start

    times = {"cached": [], "uncached": []}
    for _ in range(args.rounds):
        times["cached"].append(epoch(True))
        times["uncached"].append(epoch(False))
    ratio = statistics.median(times["cached"]) / statistics.median(times["uncached"])
    print(f"{'mode':<10} {'epoch s (each round)':<28} median")
    for mode, values in times.items():
        print(f"{mode:<10} {', '.join(f'{v:.1f}' for v in values):<28} {statistics.median(values):.1f}")
    print(f"cached / uncached epoch time: {ratio:.2f} (cache filled once in {fill_s:.1f} s for {len(texts)} texts)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python perf/distill_cache.py", "texts": len(texts),
                                   "max_length": max_length, "epoch_s": times, "cache_fill_s": round(fill_s, 2),
                                   "cached_over_uncached": round(ratio, 3)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
