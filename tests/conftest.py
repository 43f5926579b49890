"""Shared fixtures: a tiny random-weight BERT built from a config, and small labelled files."""
from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# CI (.ci/run) installs the `all` extra and sets EDGEKD_REQUIRE_OPTIONAL=1: there a missing optional package is
# a broken install, so `pytest.importorskip` fails (a collection error) instead of skipping the tests silently.
if os.environ.get("EDGEKD_REQUIRE_OPTIONAL") == "1":
    import importlib

    def _required(modname: str, *args, **kwargs):
        try:
            return importlib.import_module(modname)
        except ImportError as exc:
            pytest.fail(f"{modname} is missing, and EDGEKD_REQUIRE_OPTIONAL=1 says the `all` extra is installed: "
                        f"{exc}", pytrace=False)

    pytest.importorskip = _required

WORDS = {
    "positive": ["profit rose", "beat estimates", "raised its dividend", "shares jumped", "record sales",
                 "upgraded to buy", "margins improved", "strong demand"],
    "negative": ["profit fell", "missed estimates", "cut its dividend", "shares slumped", "weak sales",
                 "downgraded to sell", "margins shrank", "a profit warning"],
    "neutral": ["will report results", "holds its meeting", "appointed a director", "the bond matures",
                "published its calendar", "listed new shares", "moved its office", "kept guidance"],
}
COMPANIES = ["Brightwater Foods", "Kestrel Mining", "Norlund Bank", "Halvorsen Freight", "Arcadia Telecom",
             "Pinecrest Energy", "Solano Retail", "Vireo Pharma"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % 3]
        rows.append({"text": f"{rng.choice(COMPANIES)} {rng.choice(WORDS[label])} in the "
                             f"{rng.choice(['first', 'second', 'third', 'fourth'])} quarter, "
                             f"{rng.choice(['analysts said', 'the company said', 'a filing showed'])}.",
                     "label": label})
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer, 64-wide BERT with random weights and the built-in model's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edgekd.models import builtin_model_dir

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-teacher")
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(builtin_model_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_csv(root / "train.csv", make_rows(96, 1)),
            "validation": write_csv(root / "validation.csv", make_rows(30, 2)),
            "test": write_csv(root / "test.csv", make_rows(30, 3))}


STUDENT_LENGTH = 32  # max_length of relu_student


@pytest.fixture(scope="session")
def relu_student(tmp_path_factory, small_data):
    """A briefly trained 2-layer ReLU student (TFLite Micro has no GELU) with its vocabulary trimmed to the
    data, in a distill stage directory; and the dataset. Shared by the embedded and bundle tests."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edgekd.data import load_dataset
    from edgekd.distill.student import trim_vocabulary
    from edgekd.manifest import write_stage
    from edgekd.models import builtin_model_dir
    from edgekd.recipe import recipe_from_dict

    dataset = load_dataset(recipe_from_dict({"data": {k: str(v) for k, v in small_data.items()}}))
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    torch.manual_seed(0)
    labels = dataset.label_names
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=len(labels), hidden_act="relu",
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    texts = dataset.train.texts + dataset.validation.texts + dataset.test.texts
    model, tokenizer, _ = trim_vocabulary(BertForSequenceClassification(config), tokenizer, texts)
    model = _train_briefly(model, tokenizer, dataset)
    out = tmp_path_factory.mktemp("stage") / "student"
    with write_stage(out, "distill", {"test": "embedded"}) as stage:
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        stage.extra["max_length"] = STUDENT_LENGTH
    return out, dataset


def _train_briefly(model, tokenizer, dataset, epochs: int = 6, length: int = STUDENT_LENGTH, lr: float = 3e-3):
    """A few epochs on the training split: margins wide enough for int8 top-1 to be meaningful."""
    import torch

    enc = tokenizer(dataset.train.texts, truncation=True, max_length=length, padding="max_length",
                    return_tensors="pt")
    labels = torch.tensor(dataset.label_ids(dataset.train))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(labels), 16):
            batch = slice(start, start + 16)
            loss = model(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch],
                         labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture
def tiny_recipe_dict(tiny_teacher_dir, small_data) -> dict:
    """A recipe that runs every stage in well under a minute."""
    return {
        "version": 1, "name": "tiny", "seed": 0,
        "teacher": {"model": str(tiny_teacher_dir), "epochs": 2, "batch_size": 16, "learning_rate": 1e-3},
        "data": {"train": str(small_data["train"]), "validation": str(small_data["validation"]),
                 "test": str(small_data["test"])},
        "student": {"layers": [1, 3], "epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "augment": 1},
        "compress": {"quant": ["int8"]},
        "targets": [{"target": "android", "format": "executorch"}],
        "bench": {"iterations": 5, "warmup": 1},
    }


# Inputs tried by the fuzz tests (tests/test_fuzz.py), "category: outcome" -> count; printed at the end
# of the run so CI output shows how many inputs were tried and how each ended.
FUZZ_CASES: Counter = Counter()


# Lines a test wants in the CI log (e.g. how many texts the C tokenizer was compared on).
REPORT_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT_LINES:
        terminalreporter.section("edgekd checks")
        for line in REPORT_LINES:
            terminalreporter.write_line(line)
    if not FUZZ_CASES:
        return
    total = sum(FUZZ_CASES.values())
    terminalreporter.section("fuzzed inputs")
    terminalreporter.write_line(f"{total} inputs tried; outcomes: exit 1 with one `error:` line, or exit 0 for "
                                f"valid input (never a traceback, never a partial output)")
    for key, count in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"  {key:<44} {count:6d}")


def tiny_student_stage(root: Path, small_data, length: int, name: str):
    """A briefly trained 2-layer, 64-wide student with the built-in WordPiece tokenizer, in the distill stage
    directory root/distill; returns (stage dir, model, tokenizer, dataset)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edgekd.data import load_dataset
    from edgekd.manifest import write_stage
    from edgekd.models import builtin_model_dir
    from edgekd.recipe import recipe_from_dict

    dataset = load_dataset(recipe_from_dict({"data": {k: str(v) for k, v in small_data.items()}}))
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    labels = dataset.label_names
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}))
    # A few epochs so int8's top-1 parity gate compares clear decisions, not near-ties of random logits.
    model = _train_briefly(model, tokenizer, dataset, length=length)
    with write_stage(root / "distill", "distill", {"test": name}) as stage:
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        stage.extra["max_length"] = length
    return root / "distill", model, tokenizer, dataset


@pytest.fixture(scope="session")
def bench_exports(tmp_path_factory, small_data) -> dict[str, Path]:
    """A briefly trained 2-layer, 64-wide student in a distill stage directory and three real exports of it
    (ExecuTorch fp32 and int8, LiteRT fp32): the artifacts the benchmark tests measure (about 40 s)."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    root = tmp_path_factory.mktemp("bench-run")
    stage_dir, _, _, dataset = tiny_student_stage(root, small_data, length=24, name="bench")
    exports = {}
    for key, (target, fmt, quant) in {"et-fp32": ("android", "executorch", "fp32"),
                                      "et-int8": ("android", "executorch", "int8"),
                                      "litert-fp32": ("android", "litert", "fp32")}.items():
        out = root / "export" / f"student-{quant}-{target}-{fmt}"
        export_artifact(stage_dir, "distill", get_format(target, fmt), get_spec(quant), dataset, out,
                        role="student" if quant == "fp32" else "compressed", model_name="tiny-student")
        exports[key] = out
    return exports


def check_reported_test_metrics(export_dir: Path, dataset) -> dict:
    """An export's reported test accuracy is its artifact's predictions against the labels: rerun the artifact
    here on the test texts (as the manifest says it takes them), compare with the recorded predictions, and
    recompute the accuracy from those and the labels. Returns the manifest."""
    import numpy as np
    from transformers import AutoTokenizer

    from edgekd.manifest import verify_stage
    from edgekd.targets import get_format
    from edgekd.targets.graph import encode_fixed, encode_unpadded

    manifest = verify_stage(export_dir, "export")
    params = manifest["params"]
    runner = get_format(params["target"], params["format"]).runner(export_dir / manifest["artifact"])
    encode = encode_unpadded if manifest["dynamic_length"] else encode_fixed
    inputs = encode(AutoTokenizer.from_pretrained(export_dir), dataset.test.texts, manifest["max_length"])
    produced = [int(runner(ids, mask).argmax(-1)[0]) for ids, mask in inputs]
    labels = np.asarray(dataset.label_ids(dataset.test))
    assert manifest["test_predictions"] == produced
    test = manifest["metrics"]["test"]
    assert test["n"] == len(labels) and test["accuracy"] == (np.asarray(produced) == labels).mean()
    return manifest


FAKE_ADB = Path(__file__).parent / "fake_adb.py"
FAKE_ADB_SERIAL = "emulator-5554"


@pytest.fixture
def phone(tmp_path, monkeypatch):
    """The fake adb (tests/fake_adb.py) first on PATH; returns set_mode(mode, **config) -> its state folder."""
    bin_dir, state = tmp_path / "bin", tmp_path / "adb-state"
    bin_dir.mkdir()
    state.mkdir()
    shim = bin_dir / "adb"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_ADB}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_STATE", str(state))

    def set_mode(mode: str = "ok", **config):
        (state / "config.json").write_text(json.dumps({"mode": mode, "serial": FAKE_ADB_SERIAL, **config}))
        return state

    set_mode()
    return set_mode
