"""Seeded, stratified samples (edgekd/sample.py) and the stages that draw them from label-sorted data."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from edgekd.data import Dataset, Split
from edgekd.sample import Samples, checksum, stratified_order, stratified_sample

# --- the helper -------------------------------------------------------------------------------

HAND = ["a"] * 4 + ["b"] * 2 + ["c"]  # sorted by label, as many data files are


@pytest.mark.parametrize("n, counts", [
    (2, {"a": 1, "b": 1}),             # fewer rows than labels: the largest labels first
    (3, {"a": 1, "b": 1, "c": 1}),     # one of each as soon as n allows
    # then by position (j + 0.5) / size: a1 at 0.375, a2 at 0.625, b1 at 0.75, a3 at 0.875
    (4, {"a": 2, "b": 1, "c": 1}),
    (5, {"a": 3, "b": 1, "c": 1}),
    (6, {"a": 3, "b": 2, "c": 1}),
    (7, {"a": 4, "b": 2, "c": 1}),
    (50, {"a": 4, "b": 2, "c": 1}),    # n past the split: every row, once
])
def test_hand_checked_counts(n, counts):
    indices = stratified_sample(HAND, n, seed=0, purpose="calibration")
    assert len(set(indices)) == len(indices)
    assert Counter(HAND[i] for i in indices) == counts


def test_same_seed_same_indices_and_others_differ():
    labels = [f"intent{k:02d}" for k in range(20) for _ in range(15)]
    first = stratified_sample(labels, 60, seed=3, purpose="parity")
    assert first == stratified_sample(list(labels), 60, seed=3, purpose="parity")
    assert first != stratified_sample(labels, 60, seed=4, purpose="parity")
    assert first != stratified_sample(labels, 60, seed=3, purpose="calibration")


def test_indices_are_pinned_across_machines_and_python_versions():
    # SHA-256 keys, no RNG stream: these exact indices on any platform (a change here changes every sample).
    assert stratified_order(HAND, seed=0, purpose="calibration") == [3, 4, 6, 2, 1, 5, 0]
    assert checksum([0, 5, 6]) == checksum([0, 5, 6]) != checksum([0, 6, 5])


def test_a_smaller_sample_is_a_prefix_of_a_larger_one():
    labels = [str(k % 7) for k in range(300)]
    assert stratified_sample(labels, 200, 0, "calibration")[:100] == stratified_sample(labels, 100, 0, "calibration")


@pytest.mark.parametrize("n", [20, 100, 200, 333])
def test_every_prefix_is_proportional(n):
    sizes = [3, 5, 8, 13, 21, 34, 55, 89, 144]                 # very unequal labels, sorted
    labels = [f"L{k}" for k, size in enumerate(sizes) for _ in range(size)]
    counts = Counter(labels[i] for i in stratified_sample(labels, n, seed=1, purpose="evaluation"))
    assert set(counts) == set(labels)                          # every label
    for k, size in enumerate(sizes):                           # its share, within one row (and >= 1)
        assert abs(counts[f"L{k}"] - max(1.0, n * size / len(labels))) <= 1.5, (k, counts)


# --- the stages that sample -------------------------------------------------------------------

LABELS = [f"intent{k:02d}" for k in range(12)]


def _sorted_split(per_label) -> Split:
    """Rows grouped by label, as BANKING77's train.csv is sorted by intent."""
    rows = [(f"{label} request number {i}", label) for k, label in enumerate(LABELS) for i in range(per_label(k))]
    return Split([t for t, _ in rows], [label for _, label in rows])


@pytest.fixture(scope="module")
def sorted_dataset() -> Dataset:
    train = _sorted_split(lambda k: 10 + 5 * k)                # 12 labels of 10..65 rows: 450 rows
    return Dataset(train, _sorted_split(lambda k: 100), _sorted_split(lambda k: 2), LABELS, seed=7)


@pytest.fixture(scope="module")
def tiny_model_stage(tmp_path_factory):
    """An untrained 1-layer BERT over the 12 labels in a distill stage directory (no training: the test
    looks at which texts the stages feed, not at accuracy)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edgekd.manifest import write_stage
    from edgekd.models import builtin_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})).eval()
    root = tmp_path_factory.mktemp("sorted")
    with write_stage(root / "distill", "distill", {"test": "samples"}) as stage:
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        stage.extra.update({"max_length": 16, "labels": LABELS})
    return root / "distill", model, tokenizer


def _assert_proportional(labels: list[str], split: Split, n: int):
    counts = Counter(labels)
    assert set(counts) == set(LABELS), f"labels seen: {sorted(counts)}"
    share = Counter(split.labels)
    for label in LABELS:
        assert abs(counts[label] - n * share[label] / len(split)) <= 1.5, (label, counts[label])


def test_export_calibrates_and_checks_parity_on_every_label(sorted_dataset, tiny_model_stage, tmp_path):
    """The exporter gets a stratified calibration sample and parity runs on a stratified validation sample,
    both recorded in the artifact's manifest (before: the first rows, 5 of 12 labels and 2 of 12)."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import Format, Reference
    from edgekd.targets.export import PARITY_TEXTS, export_artifact
    from edgekd.targets.graph import ExportWrapper

    stage_dir, _, tokenizer = tiny_model_stage
    seen = {}
    by_ids = {tuple(tokenizer(t, padding="max_length", max_length=16, truncation=True)["input_ids"]): label
              for split in (sorted_dataset.train, sorted_dataset.validation, sorted_dataset.test)
              for t, label in zip(split.texts, split.labels)}

    def fake_export(model, spec, max_length, calibration, out_file, **options):  # stands in for a backend
        seen["calibration"] = [by_ids[tuple(ids[0].tolist())] for ids, _ in calibration]
        out_file.write_bytes(b"artifact")
        seen["model"] = ExportWrapper(model).eval()
        # Its own reference (as a backend's quantized graph would be): the gate's parity run uses the sample.
        return {"reference": Reference("the fake backend's graph", lambda ids, mask: seen["model"](ids, mask)
                                       .detach().numpy(), 1.0)}

    def runner(file, threads):
        def run(ids, mask):
            seen.setdefault("parity", []).append(by_ids[tuple(ids[0].tolist())])
            return seen["model"](ids, mask).detach().numpy()
        run.load_ms = 0.0
        return run

    runner.versions = lambda: {}
    fmt = Format("test", "fake", "fake", "bin", ("int8-static",), fake_export, runner)
    spec = get_spec("int8-static")
    export_artifact(stage_dir, "distill", fmt, spec, sorted_dataset, tmp_path / "art", "student", "m")

    _assert_proportional(seen["calibration"], sorted_dataset.train, spec.calibration_samples)
    parity = seen["parity"][:PARITY_TEXTS]               # then the test split, all of it
    _assert_proportional(parity, sorted_dataset.validation, PARITY_TEXTS)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    record = manifest["samples"]["calibration"]
    assert record["split"] == "train" and record["rows"] == spec.calibration_samples and record["of"] == 450
    assert record["seed"] == 7 and record["labels"] == 12
    expected = stratified_sample(sorted_dataset.train.labels, spec.calibration_samples, 7, "calibration")
    assert record["indices_sha256"] == checksum(expected)
    assert manifest["samples"]["parity"]["rows"] == PARITY_TEXTS and manifest["samples"]["parity"]["labels"] == 12


def test_compress_samples_every_label_and_calibrates_as_the_export_does(sorted_dataset, tiny_model_stage,
                                                                         tmp_path):
    from edgekd.compress.compress import EVAL_TEXTS, Compression
    from edgekd.recipe import recipe_from_dict
    from edgekd.targets.graph import encode_fixed

    _, model, tokenizer = tiny_model_stage
    job = Compression(recipe_from_dict({}), sorted_dataset, model, tokenizer, 16, None, tmp_path)
    _assert_proportional([LABELS[i] for i in job.eval_labels], sorted_dataset.validation,
                         min(EVAL_TEXTS, len(sorted_dataset.validation)))
    assert job.samples.records["calibration"]["labels"] == 12
    # The first 100 calibration texts are the export's int8-static calibration (same seed, same purpose).
    export_calibration = Samples(sorted_dataset).split("train", 100, "calibration").texts
    expected = encode_fixed(tokenizer, export_calibration, 16)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(job.calibration[:100], expected))
    batches = job._ranking_batches()                      # pruning importance: every label too
    ranked = [LABELS[int(i)] for b in batches for i in b["labels"]]
    _assert_proportional(ranked, sorted_dataset.validation, len(ranked))


def test_the_compress_manifest_records_its_samples(sorted_dataset, tiny_model_stage, tmp_path):
    from edgekd.compress.compress import EVAL_TEXTS, compress
    from edgekd.recipe import recipe_from_dict

    stage_dir, _, _ = tiny_model_stage
    recipe = recipe_from_dict({"seed": 7, "compress": {"quant": ["fp32"]}})
    compress(recipe, sorted_dataset, stage_dir, tmp_path / "compress")
    samples = json.loads((tmp_path / "compress" / "manifest.json").read_text())["samples"]
    assert set(samples) == {"evaluation", "calibration"}              # no pruning asked: no ranking sample
    evaluation = samples["evaluation"]
    assert (evaluation["split"], evaluation["rows"], evaluation["of"], evaluation["labels"]) == \
        ("validation", EVAL_TEXTS, 1200, 12)
    indices = stratified_sample(sorted_dataset.validation.labels, EVAL_TEXTS, 7, "evaluation")
    assert evaluation["indices_sha256"] == checksum(indices) and evaluation["seed"] == 7


def test_the_export_key_holds_the_parity_threads(sorted_dataset, tiny_model_stage, tmp_path):
    """A rerun with other parity threads is another export (issue 14, item 10: keys hash what the stage reads);
    the same threads find it done."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import Format, Reference
    from edgekd.targets.export import export_artifact
    from edgekd.targets.graph import ExportWrapper

    stage_dir, model, _ = tiny_model_stage
    wrapped = ExportWrapper(model).eval()
    exports = []

    def fake_export(model, spec, max_length, calibration, out_file, **options):
        exports.append(out_file)
        out_file.write_bytes(b"artifact")
        return {"reference": Reference("the fake backend's graph", lambda ids, mask: wrapped(ids, mask)
                                       .detach().numpy(), 1.0)}

    def runner(file, threads):
        run = lambda ids, mask: wrapped(ids, mask).detach().numpy()
        run.load_ms = 0.0
        return run

    runner.versions = lambda: {}
    fmt = Format("test", "fake", "fake", "bin", ("fp32",), fake_export, runner)
    for threads in (0, 0, 1, 1):
        export_artifact(stage_dir, "distill", fmt, get_spec("fp32"), sorted_dataset, tmp_path / "art", "student",
                        "m", threads=threads)
    assert len(exports) == 2  # threads 0 once, threads 1 once: each rerun with the same threads was skipped
