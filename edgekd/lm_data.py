"""Causal-LM data: prompt/completion records, plain text, or a labelled classification file phrased as prompts.

A record becomes one standard Hugging Face causal-LM row (`encode`): `input_ids`, `attention_mask` and `labels`
with -100 on the prompt tokens, so the loss (and perplexity) counts the completion only. With a chat template the
prompt is the user turn and the completion the assistant turn; the sequence ends with the eos token either way.
`Collator` right-pads rows into a batch: `input_ids` / `attention_mask` / `labels` [B, L] int64, labels -100 on
the padding. Every bad input is one DataError line, raised while encoding, before any training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgekd.data import Split, _check_readable, _columns, _format_of, _reading, _rows, _short
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

FINSENT_TEMPLATE = "Classify the sentiment of this financial news as negative, neutral or positive.\n{text}"


@dataclass(frozen=True)
class Record:
    """One training or evaluation example. `prompt` "" is plain text: the loss covers every token."""
    prompt: str
    completion: str
    label: str | None = None  # the label word of a classification row, for task accuracy
    where: str = ""           # file:line, for error messages


def _file_rows(path: Path, columns: tuple[str, ...], encoding: str, fmt: str, keys: str):
    """(file:line, row) of a CSV/TSV/JSONL file whose rows all have `columns`; one DataError line otherwise."""
    config = DataConfig(encoding=encoding, format=fmt)
    _check_readable(path, config, "the data file path")
    fmt = _format_of(path, fmt)
    with _reading(path, config, fmt):
        for number, row in _rows(path, fmt, encoding):
            for column in columns:
                if row.get(column) is None:
                    raise DataError(f"{path}:{number}: no '{_short(column, 40)}' value (found: {_columns(row)}); "
                                    f"set {keys}")
            yield f"{path}:{number}", row


def read_prompt_completion(path: Path, prompt_column: str = "prompt", completion_column: str = "completion",
                           encoding: str = "utf-8", fmt: str = "auto") -> list[Record]:
    """Records from a JSONL (or CSV/TSV) file with a prompt and a completion column."""
    rows = _file_rows(Path(path), (prompt_column, completion_column), encoding, fmt,
                      "the prompt / completion column names")
    records = [Record(str(row[prompt_column]), str(row[completion_column]), where=where) for where, row in rows]
    return _nonempty(records, path)


def read_text(path: Path, text_column: str = "text", encoding: str = "utf-8", fmt: str = "auto") -> list[Record]:
    """Plain-text records (loss on every token) from a JSONL (or CSV/TSV) file's text column."""
    rows = _file_rows(Path(path), (text_column,), encoding, fmt, "the text column name")
    return _nonempty([Record("", str(row[text_column]), where=where) for where, row in rows], path)


def read_column(path: Path, column: str, encoding: str = "utf-8", fmt: str = "auto") -> list[str]:
    """One column of a JSONL (or CSV/TSV) file as strings, e.g. the prompts of data.unlabeled."""
    return [str(row[column]) for _, row in _file_rows(Path(path), (column,), encoding, fmt, "data.prompt_column")]


def from_classification(split: Split, template: str = FINSENT_TEMPLATE, where: str = "") -> list[Record]:
    """A labelled split (edgekd.data.read_split) as prompts: `template` with {text} filled in, the label word
    as the completion; each record keeps its label for task accuracy."""
    if "{text}" not in template:
        raise DataError(f"the prompt template {_short(template)!r} has no {{text}} placeholder; add {{text}} "
                        f"where the row's text goes")
    # str.replace, not str.format: braces in the data or the template are text, not fields.
    return [Record(template.replace("{text}", text), label, label, f"{where}, row {i + 1}" if where else f"row {i + 1}")
            for i, (text, label) in enumerate(zip(split.texts, split.labels))]


def _nonempty(records: list[Record], path) -> list[Record]:
    if not records:
        raise DataError(f"{path} has no records; it needs at least one row")
    return records


def eos_id(tokenizer) -> int:
    """The tokenizer's eos token id; one line if it has none (a completion must end where generation stops)."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path or 'unnamed'}) has no "
                        f"eos token, so generation could not stop; use the model's own tokenizer, or set eos_token "
                        f"in its tokenizer_config.json")
    return tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids that ask for a completion of `prompt`: the chat template's user turn and the assistant
    header where the tokenizer has a template, else the prompt and a newline. Encoding and generation share it."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    return tokenizer(prompt + "\n")["input_ids"]


def encode_record(tokenizer, record: Record, max_length: int, index: int = 0) -> dict:
    """One record as lists `input_ids`, `attention_mask`, `labels` (-100 on prompt tokens), at most max_length long.

    A completion cut by max_length loses its tail (and its eos); a prompt that leaves no room is an error."""
    eos = eos_id(tokenizer)
    name = f"record {index + 1}" + (f" ({record.where})" if record.where else "")
    if not record.completion.strip():
        raise DataError(f"{name} has an empty completion; every record needs text to learn (drop the row or fill "
                        f"in its completion)")
    if record.prompt:
        head = prompt_ids(tokenizer, record.prompt)
        body = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
    else:  # plain text: the tokenizer's own special tokens (a bos, if it adds one) carry no loss
        head, body = [], tokenizer(record.completion)["input_ids"]
    if len(head) >= max_length:
        raise DataError(f"{name}: its prompt alone is {len(head)} tokens, and max_length is {max_length}; raise "
                        f"max_length above {len(head)} or shorten the prompt")
    body = (body + [eos])[:max_length - len(head)]
    return {"input_ids": head + body, "attention_mask": [1] * (len(head) + len(body)),
            "labels": [-100] * len(head) + body}


def encode(tokenizer, records: list[Record], max_length: int) -> list[dict]:
    """Every record encoded (see encode_record); the first bad one stops it with one DataError line."""
    eos_id(tokenizer)
    return [encode_record(tokenizer, record, max_length, i) for i, record in enumerate(records)]


class Collator:
    """Right-pads encoded rows into a batch of int64 tensors [B, L]: the pad id (the eos id where the tokenizer
    has no pad token) in input_ids, 0 in attention_mask, -100 in labels. Keys other than the three are dropped."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            pad = length - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * pad)
            batch["attention_mask"].append(list(row["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def batches(rows: list[dict], collator: Collator, batch_size: int = 16):
    """The rows in order as padded batches (for evaluation: perplexity, agreement)."""
    for start in range(0, len(rows), batch_size):
        yield collator(rows[start:start + batch_size])
