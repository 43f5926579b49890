"""Labelled data files: formats, columns, encodings, error messages and the stratified split."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edgekd.data import load_dataset, read_split, stratified_split
from edgekd.errors import DataError
from edgekd.recipe import DataConfig, recipe_from_dict

from conftest import make_rows, write_csv

TRICKY = ['Plain text', 'Commas, "quotes" and\ttabs', 'Two\nlines', "Ünïcödé – ok € 10", "  padded  "]


def _unique_rows(n: int, seed: int = 0) -> list[dict]:
    """make_rows with a running number, so that every text is unique (overlap checks use texts)."""
    return [{"text": f"{row['text']} #{i}", "label": row["label"]} for i, row in enumerate(make_rows(n, seed))]


def _recipe(tmp_path: Path, **data):
    return recipe_from_dict({"data": data}, tmp_path)


def _write_jsonl(path: Path, rows: list, encoding: str = "utf-8") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding=encoding)
    return path


def _error(call, *args) -> str:
    with pytest.raises(DataError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message                                     # the CLI prints it as one line
    return message


# --- formats and columns ---------------------------------------------------------------------

def _custom_rows(texts, labels) -> list[dict]:
    return [{"id": str(i), "sentence": t, "sentiment": y} for i, (t, y) in enumerate(zip(texts, labels))]


@pytest.mark.parametrize("suffix, fmt, delimiter", [(".csv", "auto", ","), (".tsv", "auto", "\t"),
                                                    (".txt", "auto", "\t"), (".data", "csv", ","),
                                                    (".data", "tsv", "\t")])
def test_delimited_files_with_custom_columns(tmp_path, suffix, fmt, delimiter):
    texts = TRICKY
    labels = ["pos", "neg", "pos", "neu", "neg"]
    path = write_csv(tmp_path / f"train{suffix}", _custom_rows(texts, labels), delimiter=delimiter)
    split = read_split(path, DataConfig(text_column="sentence", label_column="sentiment", format=fmt))
    assert split.texts == texts
    assert split.labels == labels


def test_jsonl_with_custom_columns(tmp_path):
    rows = [{"body": t, "y": y, "extra": [1, 2]} for t, y in zip(TRICKY, ["a", "b", "a", "c", "b"])]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n   \n"
                    + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")  # blank lines are skipped
    split = read_split(path, DataConfig(text_column="body", label_column="y"))
    assert split.texts == TRICKY
    assert split.labels == ["a", "b", "a", "c", "b"]


def test_jsonl_numeric_labels_become_strings(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert read_split(path, DataConfig()).labels == ["0", "1"]


def test_labels_are_stripped(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": "x", "label": " pos "}, {"text": "y", "label": "neg\t"}])
    assert read_split(path, DataConfig()).labels == ["pos", "neg"]


def test_load_dataset_with_custom_columns_and_label_ids(tmp_path):
    train = [{"headline": f"text {i}", "cls": c} for i, c in enumerate("bacbca")]
    for name in ("train", "validation", "test"):
        write_csv(tmp_path / f"{name}.csv", train)
    recipe = _recipe(tmp_path, train="train.csv", validation="validation.csv", test="test.csv",
                     text_column="headline", label_column="cls")
    dataset = load_dataset(recipe)
    assert dataset.label_names == ["a", "b", "c"]
    assert dataset.train.texts == [r["headline"] for r in train]
    assert dataset.label_ids(dataset.train) == [1, 0, 2, 1, 2, 0]


def test_unknown_extension_asks_for_data_format(tmp_path):
    path = write_csv(tmp_path / "train.data", make_rows(3))
    assert "data.format" in _error(read_split, path, DataConfig())


def test_missing_file(tmp_path):
    assert "does not exist" in _error(read_split, tmp_path / "nope.csv", DataConfig())


# --- encodings -------------------------------------------------------------------------------

LATIN = [{"text": "Société Générale résultats", "label": "positive"},
         {"text": "Müller AG verfehlt Prognose", "label": "negative"},
         {"text": "plain ascii", "label": "neutral"}]


def test_latin1_file_with_latin1_encoding(tmp_path):
    path = write_csv(tmp_path / "train.csv", LATIN, encoding="latin-1")
    split = read_split(path, DataConfig(encoding="latin-1"))
    assert split.texts == [r["text"] for r in LATIN]


def test_latin1_file_read_as_utf8_names_data_encoding(tmp_path):
    path = write_csv(tmp_path / "train.csv", LATIN, encoding="latin-1")
    message = _error(read_split, path, DataConfig(encoding="utf-8"))
    assert "data.encoding" in message and str(path) in message


def test_latin1_jsonl_read_as_utf8(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", LATIN, encoding="latin-1")
    assert "data.encoding" in _error(read_split, path, DataConfig())
    assert read_split(path, DataConfig(encoding="latin-1")).texts[0] == LATIN[0]["text"]


def test_unknown_encoding(tmp_path):
    path = write_csv(tmp_path / "train.csv", LATIN)
    assert "data.encoding" in _error(read_split, path, DataConfig(encoding="klingon-8"))


def test_utf8_file_with_byte_order_mark(tmp_path):
    path = write_csv(tmp_path / "train.csv", LATIN, encoding="utf-8-sig")
    assert read_split(path, DataConfig()).texts == [r["text"] for r in LATIN]


# --- missing columns, empty files and labels ------------------------------------------------

def test_missing_column_lists_found_columns(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"sentence": "x", "sentiment": "a", "id": "1"}])
    message = _error(read_split, path, DataConfig())
    assert "no column 'text'" in message
    assert "found: sentence, sentiment, id" in message
    message = _error(read_split, path, DataConfig(text_column="sentence"))
    assert "no column 'label'" in message


def test_missing_column_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"body": "x", "label": "a"}])
    message = _error(read_split, path, DataConfig())
    assert "no column 'text'" in message and "found: body, label" in message


@pytest.mark.parametrize("name, content", [("empty.csv", ""), ("header.csv", "text,label\n"),
                                           ("header.tsv", "text\tlabel\n"), ("empty.jsonl", ""),
                                           ("blank.jsonl", "\n\n  \n")])
def test_file_without_data_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert "no data rows" in _error(read_split, path, DataConfig())


def test_empty_label_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\nfirst,a\n"second\nspans two lines",b\nthird,   \nfourth,a\n')
    message = _error(read_split, path, DataConfig())
    assert f"{path}:5:" in message and "empty label" in message


def test_empty_label_jsonl_names_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "  "}])
    message = _error(read_split, path, DataConfig())
    assert f"{path}:2:" in message and "empty label" in message


def test_row_with_too_few_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfirst,a\nno label here\n")
    assert f"{path}:3:" in _error(read_split, path, DataConfig())


def test_null_label_jsonl_names_the_column(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    message = _error(read_split, path, DataConfig())
    assert message.startswith(f"{path}:2:")
    assert "label" in message.removeprefix(f"{path}:2:")          # the path itself may contain "label"


@pytest.mark.parametrize("which", ["validation", "test"])
def test_label_unseen_in_train(tmp_path, which):
    rows = _unique_rows(12)
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "other.csv", rows[:3] + [{"text": "odd one", "label": "mixed"}])
    files = {"validation": "train.csv", "test": "train.csv", which: "other.csv"}
    message = _error(load_dataset, _recipe(tmp_path, train="train.csv", **files))
    assert f"the {which} data" in message and "mixed" in message


def test_single_label_training_data(tmp_path):
    write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": "only"} for i in range(5)])
    recipe = _recipe(tmp_path, train="train.csv", validation="train.csv", test="train.csv")
    assert "at least 2" in _error(load_dataset, recipe)


# --- splitting a single train file ----------------------------------------------------------

def _split_only_train(tmp_path, seed=0, rows=None):
    rows = rows or _unique_rows(96)
    write_csv(tmp_path / "all.csv", rows)
    recipe = recipe_from_dict({"seed": seed, "data": {"train": "all.csv", "validation": None, "test": None}},
                              tmp_path)
    return rows, load_dataset(recipe)


def test_only_train_gives_stratified_disjoint_splits(tmp_path):
    rows, dataset = _split_only_train(tmp_path)
    splits = {"train": dataset.train, "validation": dataset.validation, "test": dataset.test}
    labels = {r["label"] for r in rows}
    for split in splits.values():
        assert set(split.labels) == labels                       # every label in each split
        assert len(set(split.texts)) == len(split.texts)
    texts = [set(s.texts) for s in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert set().union(*texts) == {r["text"] for r in rows}      # nothing lost
    by_text = {r["text"]: r["label"] for r in rows}
    for split in splits.values():                                # labels stay with their texts
        assert all(by_text[t] == y for t, y in zip(split.texts, split.labels))
    # 0.15 of each label for test, 0.15 of the whole for validation (32 rows per label)
    for name in ("validation", "test"):
        assert all(4 <= n <= 6 for n in Counter(splits[name].labels).values()), name
    assert dataset.label_names == sorted(labels)


def test_split_is_deterministic_with_the_seed(tmp_path):
    folders = [tmp_path / name for name in "abc"]
    for folder in folders:
        folder.mkdir()
    rows, first = _split_only_train(folders[0])
    _, again = _split_only_train(folders[1], rows=rows)
    _, other = _split_only_train(folders[2], seed=1, rows=rows)
    assert first == again
    assert first.test.texts != other.test.texts


def test_only_test_missing_is_split_from_train(tmp_path):
    rows = _unique_rows(60)
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "val.csv", _unique_rows(9, seed=5))
    dataset = load_dataset(_recipe(tmp_path, train="train.csv", validation="val.csv", test=None))
    assert len(dataset.validation) == 9
    assert len(dataset.train) + len(dataset.test) == 60
    assert not set(dataset.train.texts) & set(dataset.test.texts)
    assert set(dataset.test.labels) == {r["label"] for r in rows}


def test_stratified_split_properties():
    from edgekd.data import Split

    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 2 + ["d"]
    split = Split([f"t{i}" for i in range(len(labels))], labels)
    keep, held = stratified_split(split, 0.3, seed=3)
    assert sorted(keep.texts + held.texts, key=lambda t: int(t[1:])) == split.texts
    assert Counter(held.labels) == {"a": 3, "b": 1, "c": 1}       # rounds, >= 1, never all, never a singleton
    assert Counter(keep.labels) == {"a": 7, "b": 2, "c": 1, "d": 1}
    assert stratified_split(split, 0.3, seed=3) == (keep, held)


# --- size and malformed input ---------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_one_megabyte_line_loads(tmp_path, suffix):
    long_text = "revenue grew " * 80_000                           # ~1 MB on one line
    rows = [{"text": "short", "label": "a"}, {"text": long_text, "label": "b"}, {"text": "end", "label": "a"}]
    path = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    else:
        write_csv(path, rows, delimiter="," if suffix == ".csv" else "\t")
    assert path.stat().st_size > 1_000_000
    split = read_split(path, DataConfig())
    assert split.texts[1] == long_text and split.labels == ["a", "b", "a"]


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "broken", "label": \n{"text": "x", "label": "b"}\n')
    message = _error(read_split, path, DataConfig())
    assert f"{path}:2:" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n["text", "label"]\n')
    message = _error(read_split, path, DataConfig())
    assert f"{path}:2:" in message and "object" in message


def test_builtin_data_loads():
    from edgekd.recipe import builtin_recipe

    dataset = load_dataset(builtin_recipe())
    assert dataset.label_names == ["negative", "neutral", "positive"]
    assert len(dataset.train) > 1000 and len(dataset.validation) > 100 and len(dataset.test) > 100


def test_fingerprint_follows_every_text_and_label(tmp_path):
    """Stages key their results by this: any edit to the data must change it."""
    rows = make_rows(60, 5)
    write_csv(tmp_path / "train.csv", rows)
    recipe = recipe_from_dict({"data": {"train": "train.csv", "validation": None, "test": None}}, tmp_path)
    first = load_dataset(recipe).fingerprint()
    assert first == load_dataset(recipe).fingerprint()
    rows[7]["label"] = "neutral" if rows[7]["label"] != "neutral" else "positive"
    write_csv(tmp_path / "train.csv", rows)
    assert load_dataset(recipe).fingerprint()["sha256"] != first["sha256"]


def test_unlabeled_text_file_joins_the_dataset(tmp_path):
    write_csv(tmp_path / "train.csv", make_rows(60, 5))
    (tmp_path / "more.jsonl").write_text('{"text": "Brightwater Foods opened a plant."}\n\n{"text": "Rates held."}\n')
    base = {"train": "train.csv", "validation": None, "test": None}
    with_text = load_dataset(recipe_from_dict({"data": base | {"unlabeled": "more.jsonl"}}, tmp_path))
    assert with_text.unlabeled == ["Brightwater Foods opened a plant.", "Rates held."]
    plain = load_dataset(recipe_from_dict({"data": base}, tmp_path))
    assert plain.unlabeled == [] and plain.fingerprint() != with_text.fingerprint()
    (tmp_path / "bad.csv").write_text("body\nhello\n")
    with pytest.raises(DataError, match="no 'text' value"):
        load_dataset(recipe_from_dict({"data": base | {"unlabeled": "bad.csv"}}, tmp_path))
