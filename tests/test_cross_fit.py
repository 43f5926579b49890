"""teacher.cross_fit: out-of-fold soft labels from K fold teachers, cached and resumable; the final teacher stays."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edgekd.data import load_dataset
from edgekd.distill import cross_fit
from edgekd.distill.cross_fit import folds
from edgekd.distill.distill import distill
from edgekd.distill.finetune import finetune
from edgekd.errors import DataError, RecipeError
from edgekd.recipe import recipe_from_dict
from edgekd.report_render import transfer_text

from conftest import make_rows, write_csv

K = 3


REAL = cross_fit.train_teacher, cross_fit.teacher_logits  # before any test wraps them


class Stopped(Exception):
    pass


def test_folds_are_stratified_whatever_the_order_of_the_file():
    labels = ["a"] * 30 + ["b"] * 30 + ["c"] * 15  # sorted, as real files come
    fold = folds([f"text {i}" for i in range(75)], labels, 5, seed=0)
    assert sorted(Counter(fold).values()) == [15] * 5
    for f in range(5):
        counts = Counter(label for label, g in zip(labels, fold) if g == f)
        assert abs(counts["a"] - 6) <= 1 and abs(counts["b"] - 6) <= 1 and abs(counts["c"] - 3) <= 1
    texts = [f"text {i}" for i in range(75)]
    assert folds(texts, labels, 5, seed=0) == fold and folds(texts, labels, 5, seed=1) != fold


def test_identical_texts_share_a_fold():
    texts = ["up", "down", "up", "flat", "down", "up"] + [f"other {i}" for i in range(20)]
    fold = folds(texts, ["a", "b"] * 13, 4, seed=0)
    assert fold[0] == fold[2] == fold[5] and fold[1] == fold[4]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir, small_data):
    root = tmp_path_factory.mktemp("cross-fit")
    unlabeled = write_csv(root / "unlabeled.csv", [{"text": r["text"]} for r in make_rows(12, 7)])
    base = {"teacher": {"model": str(tiny_teacher_dir), "epochs": 1, "batch_size": 16, "cross_fit": K},
            "data": {**{k: str(v) for k, v in small_data.items()}, "unlabeled": str(unlabeled)},
            "student": {"layers": [1, 3], "epochs": 1, "batch_size": 16, "augment": 1}}
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    finetune(recipe, dataset, root / "finetune")
    return root, recipe, dataset


def _spy(monkeypatch, fail_after: int | None = None):
    """Record each fold teacher's training texts and each labelling's texts, around the real functions."""
    trained, labelled = [], {}
    real_train, real_logits = REAL

    def train(recipe, dataset, tokenizer, texts, labels, max_length, checkpoints):
        if fail_after is not None and len(trained) == fail_after:
            raise Stopped  # the run stopped while this fold teacher trained
        trained.append(list(texts))
        return real_train(recipe, dataset, tokenizer, texts, labels, max_length, checkpoints)

    def logits(teacher, tokenizer, texts, max_length, digest, cache_dir):
        labelled[digest.rsplit("/", 1)[-1]] = list(texts)
        return real_logits(teacher, tokenizer, texts, max_length, digest, cache_dir)

    monkeypatch.setattr(cross_fit, "train_teacher", train)
    monkeypatch.setattr(cross_fit, "teacher_logits", logits)
    return trained, labelled


def test_every_training_text_is_labelled_by_a_teacher_that_never_saw_it(run, monkeypatch):
    root, recipe, dataset = run
    trained, labelled = _spy(monkeypatch)
    metrics = distill(recipe, dataset, root / "finetune", root / "distill", root / ".cache")
    train = set(dataset.train.texts)
    assert len(trained) == K and all(len(texts) < len(train) for texts in trained)
    assert sorted(labelled) == [f"fold-{f}" for f in range(K)]
    originals = [set(labelled[f"fold-{f}"]) & train for f in range(K)]
    assert set().union(*originals) == train and sum(map(len, originals)) == len(train)  # each text, once
    assert len(train) < len(dataset.train.texts)  # the data has duplicates: each copy went to the same fold
    for f in range(K):
        assert not originals[f] & set(trained[f])       # labelled by the teacher that did not see it
        assert set(trained[f]) == train - originals[f]  # which saw all the others
        assert not set(labelled[f"fold-{f}"]) & set(dataset.unlabeled)  # no fold teacher labels unlabelled text
    transfer = metrics["transfer_set"]
    cross = transfer["cross_fit"]
    assert cross["folds"] == K and cross["cache_hit"] is False
    assert cross["by_fold_teachers"] == sum(len(texts) for texts in labelled.values())
    assert cross["by_fold_teachers"] + cross["by_final_teacher"] == (
        transfer["labelled"] + transfer["unlabeled"] + transfer["augmented"])
    assert cross["by_final_teacher"] >= len(dataset.unlabeled)  # they and their copies
    assert 0 <= cross["accuracy"] <= 1 and 0 < cross["teacher_confidence"] <= 1
    line = transfer_text(transfer)
    assert f"{cross['by_fold_teachers']} by {K} fold teachers" in line
    assert f"; {cross['by_final_teacher']} (the unlabelled texts and their copies) by the teacher" in line


def test_the_fold_teachers_are_cached_and_a_stopped_run_resumes_at_its_fold(run, monkeypatch):
    root, recipe, dataset = run
    cache = root / ".cache-resume"
    trained, _ = _spy(monkeypatch, fail_after=1)
    with pytest.raises(Stopped):
        distill(recipe, dataset, root / "finetune", root / "stopped", cache)
    assert len(trained) == 1 and not (root / "stopped").exists()
    trained, _ = _spy(monkeypatch)
    first = distill(recipe, dataset, root / "finetune", root / "stopped", cache)
    assert len(trained) == K - 1  # fold 1's teacher came from the cache
    trained, _ = _spy(monkeypatch)
    longer = recipe_from_dict({**recipe.to_dict(), "student": {**recipe.to_dict()["student"], "epochs": 2}})
    again = distill(longer, dataset, root / "finetune", root / "again", cache)  # another student, the same labels
    assert trained == [] and again["transfer_set"]["cross_fit"]["cache_hit"] is True
    assert again["transfer_set"] == first["transfer_set"] | {"cross_fit": {**first["transfer_set"]["cross_fit"],
                                                                           "cache_hit": True}}


def test_without_cross_fit_the_final_teacher_labels_everything(run):
    root, recipe, dataset = run
    plain = recipe_from_dict({**recipe.to_dict(), "teacher": {**recipe.to_dict()["teacher"], "cross_fit": 0}})
    metrics = distill(plain, dataset, root / "finetune", root / "plain", root / ".cache")
    assert "cross_fit" not in metrics["transfer_set"]
    assert "fold teachers" not in transfer_text(metrics["transfer_set"])
    assert np.isfinite(metrics["transfer_set"]["teacher_confidence"])


@pytest.mark.parametrize("value", [1, 21, -2])
def test_cross_fit_takes_0_or_2_to_20_folds(value):
    with pytest.raises(RecipeError, match=rf"^teacher.cross_fit must be 0 \(off\) or a number of folds from 2 to "
                                          rf"20, not {value}$"):
        recipe_from_dict({"teacher": {"cross_fit": value}})


def test_too_few_training_rows_for_the_folds_is_caught_before_training(tmp_path, small_data):
    train = write_csv(tmp_path / "train.csv", make_rows(9, 0))
    recipe = recipe_from_dict({"teacher": {"cross_fit": 5}, "data": {"train": str(train), "validation": str(
        small_data["validation"]), "test": str(small_data["test"])}})
    with pytest.raises(DataError, match=r"^teacher.cross_fit: 5 needs at least 10 training rows \(2 per fold\)"):
        load_dataset(recipe)
