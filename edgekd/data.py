"""Labelled text data: CSV, TSV and JSONL with configurable columns and encoding.

Files are read as a stream, row by row, so a very large file is not held twice.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.errors import DataError
from edgekd.recipe import DataConfig, Recipe

RESOURCES = Path(__file__).parent / "resources"
csv.field_size_limit(1 << 24)  # long texts are data, not an error


@dataclass
class Split:
    texts: list[str]
    labels: list[str]

    def __len__(self):
        return len(self.texts)


@dataclass
class Dataset:
    train: Split
    validation: Split
    test: Split
    label_names: list[str]
    unlabeled: list[str] = field(default_factory=list)
    seed: int = 0  # the recipe's seed: what edgekd.sample draws calibration, parity and evaluation rows with

    def fingerprint(self) -> dict:
        """A stage-input entry for the data: changing any text or label changes every stage's key."""
        digest = hashlib.sha256()
        for split in (self.train, self.validation, self.test):
            digest.update(json.dumps([split.texts, split.labels]).encode())
        digest.update(json.dumps(self.unlabeled).encode())
        return {"sha256": digest.hexdigest(), "rows": [len(self.train), len(self.validation), len(self.test)]}

    def label_ids(self, split: Split) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in split.labels]


def resolve_path(value: str, recipe: Recipe | None = None) -> Path:
    if value.startswith("builtin:"):
        path = RESOURCES / value.removeprefix("builtin:")
        if not path.is_file():
            raise DataError(f"no built-in data file '{value}'")
        return path
    return Path(recipe.resolve(value) if recipe else value)


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return suffix[1:]
    if suffix == ".txt":
        return "tsv"
    raise DataError(f"{path}: cannot tell the format from the extension '{suffix}'; "
                    f"set data.format to csv, tsv or jsonl")


def _short(value, limit: int = 60) -> str:
    """A value as it goes into an error line: long ones cut, so the line stays readable."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _columns(row: dict) -> str:
    names = [_short(k, 40) for k in row if k is not None]
    return ", ".join(names[:10]) + (f", ... ({len(names)} columns)" if len(names) > 10 else "") or "none"


def _python_encoding(encoding: str) -> str:
    # utf-8-sig also reads UTF-8 files that start with a byte-order mark (Excel's "CSV UTF-8").
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _rows(path: Path, fmt: str, encoding: str):
    """Yield (line number, dict row) from a CSV, TSV or JSONL file, one row at a time."""
    handle = open(path, encoding=_python_encoding(encoding), newline="")
    with handle:
        if fmt == "jsonl":
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as exc:  # also: numbers too long, nesting too deep
                    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else _short(exc, 80)
                    raise DataError(f"{path}:{number}: not valid JSON ({reason}); each line must be one "
                                    f"JSON object") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: each JSONL line must be an object, "
                                    f"found {type(row).__name__}")
                yield number, row
        else:
            reader = csv.DictReader(handle, delimiter="," if fmt == "csv" else "\t")
            for row in reader:
                yield reader.line_num, row


def _decode_error_at(path: Path, encoding: str) -> tuple[int, int] | None:
    """(line, byte offset) of the first undecodable bytes, found by a streamed rescan of the file.

    The text reader decodes ahead in blocks, so its error offsets are relative to a block; this
    feeds the file to an incremental decoder and counts the bytes and newlines before the failure.
    """
    decoder = codecs.getincrementaldecoder(_python_encoding(encoding))()
    offset, lines = 0, 1
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                at = max(0, offset - pending + exc.start)
                head = block[:max(0, at - offset)]
                return lines + head.count(b"\n"), at
            offset += len(block)
            lines += block.count(b"\n")
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)  # a sequence cut off by the end of the file
        except UnicodeDecodeError:
            return lines, offset - pending
    return None


@contextlib.contextmanager
def _reading(path: Path, config: DataConfig, fmt: str):
    """Decoding, I/O and CSV-syntax errors of a data file, as one line that names the fix."""
    try:
        yield
    except UnicodeError as exc:  # UnicodeDecodeError, or e.g. a UTF-16 file without a byte-order mark
        where = _decode_error_at(path, config.encoding) if isinstance(exc, UnicodeDecodeError) else None
        place = f"{path}:{where[0]}: bytes at offset {where[1]}" if where else f"{path}: the bytes"
        reason = _short(getattr(exc, "reason", None) or exc, 60)
        raise DataError(f"{place} are not valid {config.encoding} ({reason}); set data.encoding "
                        f"(for example latin-1 or cp1252)") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed {fmt.upper()} ({_short(exc, 120)}); check quoting and delimiter") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc}); check the path and its permissions") from None


def _check_readable(path: Path, config: DataConfig, keys: str) -> None:
    """The file exists and the encoding is a text encoding, before any row is read."""
    try:
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
        raise DataError(f"data file {_short(path, 200)} cannot be opened ({getattr(exc, 'strerror', None) or exc}); "
                        f"check {keys} in the recipe") from None
    if not exists:
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what}; check {keys} in the recipe")
    try:
        info = codecs.lookup(config.encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # rot13, base64, zlib: codecs, not encodings
        raise DataError(f"unknown text encoding '{_short(config.encoding, 40)}' in data.encoding; "
                        f"try utf-8 or latin-1")


def read_split(path: Path, config: DataConfig) -> Split:
    """Read one labelled file; every problem is one DataError line naming file, row and fix."""
    _check_readable(path, config, "data.train/validation/test")
    fmt = _format_of(path, config.format)
    texts, labels, known = [], [], {}
    text_col, label_col = config.text_column, config.label_column
    with _reading(path, config, fmt):
        for number, row in _rows(path, fmt, config.encoding):
            for column in (text_col, label_col):
                if column not in row:
                    raise DataError(f"{path}: no column '{_short(column, 40)}' (found: {_columns(row)}); set "
                                    f"data.text_column / data.label_column{_delimiter_hint(row, fmt)}")
            text, label = row[text_col], row[label_col]
            if text is None or label is None:
                column = text_col if text is None else label_col
                raise DataError(f"{path}:{number}: no value for '{_short(column, 40)}'" +
                                ("" if fmt == "jsonl" else " (the row has fewer fields than the header)"))
            label = str(label).strip()
            if not label:
                raise DataError(f"{path}:{number}: empty label; every row needs a label in "
                                f"'{_short(label_col, 40)}'")
            texts.append(str(text))
            labels.append(known.setdefault(label, label))  # one string per distinct label, not per row
    if not texts:
        raise DataError(f"{path} has no data rows; it needs a header and at least one labelled row")
    return Split(texts, labels)


def read_texts(path: Path, config: DataConfig) -> list[str]:
    """The text column of an unlabelled file (a label column, if any, is ignored)."""
    _check_readable(path, config, "data.unlabeled")
    texts = []
    fmt = _format_of(path, config.format)
    with _reading(path, config, fmt):
        for number, row in _rows(path, fmt, config.encoding):
            if row.get(config.text_column) is None:
                raise DataError(f"{path}:{number}: no '{_short(config.text_column, 40)}' value (found: "
                                f"{_columns(row)}); set data.text_column{_delimiter_hint(row, fmt)}")
            texts.append(str(row[config.text_column]))
    return texts


def _delimiter_hint(row: dict, fmt: str) -> str:
    """A header read as one column that holds the other delimiter: the format is probably wrong."""
    names = [k for k in row if k is not None]
    if any("\x00" in str(name) for name in names):
        return " (NUL bytes between the letters: the file looks UTF-16, set data.encoding: utf-16)"
    if fmt != "jsonl" and len(names) == 1:
        other = {"csv": "\t", "tsv": ","}[fmt]
        if other in str(names[0]):
            return f" (the header looks {'tab' if other == chr(9) else 'comma'}-separated: check data.format)"
    return ""


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off `fraction` of each label (at least one row of each label with >= 2 rows)."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(split.labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    held = []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        take = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if len(rows) > 1 else 0
        held += rows[:take]
    held_set = set(held)
    keep = [i for i in range(len(split)) if i not in held_set]
    pick = lambda idx: Split([split.texts[i] for i in idx], [split.labels[i] for i in idx])  # noqa: E731
    return pick(keep), pick(sorted(held))


def load_dataset(recipe: Recipe) -> Dataset:
    config = recipe.data
    train = read_split(resolve_path(config.train, recipe), config)
    val_frac, test_frac = config.split_fractions
    if config.test:
        test = read_split(resolve_path(config.test, recipe), config)
    else:
        train, test = stratified_split(train, test_frac, recipe.seed)
    if config.validation:
        validation = read_split(resolve_path(config.validation, recipe), config)
    else:
        train, validation = stratified_split(train, val_frac / (1 - test_frac), recipe.seed + 1)
    counts = Counter(train.labels)
    if len(counts) < 2:
        raise DataError(f"the training data has {len(counts)} label(s); a classifier needs at least 2")
    folds = recipe.teacher.cross_fit
    if folds and len(train.texts) < 2 * folds:
        raise DataError(f"teacher.cross_fit: {folds} needs at least {2 * folds} training rows (2 per fold), and the "
                        f"training data has {len(train.texts)}; lower teacher.cross_fit or set it to 0")
    for name, split in (("validation", validation), ("test", test)):
        unseen = sorted(set(split.labels) - set(counts))
        if unseen:
            shown = ", ".join(repr(_short(label, 40)) for label in unseen[:5])
            raise DataError(f"the {name} data has label(s) the training data never has: {shown}; add training rows "
                            f"for them or fix the labels")
        if not split.texts:
            raise DataError(f"the {name} split is empty; give more rows or a separate {name} file")
    unlabeled = read_texts(resolve_path(config.unlabeled, recipe), config) if config.unlabeled else []
    return Dataset(train, validation, test, sorted(counts), unlabeled, recipe.seed)


def choose_max_length(tokenizer, texts: list[str], quantile: float = 0.99) -> int:
    """The fixed sequence length for export: the p99 token length, rounded up to a multiple of 8."""
    lengths = sorted(len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"])
    p = lengths[min(len(lengths) - 1, int(quantile * len(lengths)))]
    return min(512, max(8, -(-p // 8) * 8))


class Encoded:
    """Tokenized texts (+ label ids) as a torch Dataset the HF Trainer can batch with dynamic padding."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int] | None, max_length: int):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.rows = [{"input_ids": ids, "attention_mask": mask} for ids, mask in
                     zip(enc["input_ids"], enc["attention_mask"])]
        for i, row in enumerate(self.rows):
            row["index"] = i
            if labels is not None:
                row["labels"] = labels[i]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]
