"""Causal-LM data: records from files, encoding with a loss mask on the completion only, right padding, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from edgekd import lm_data
from edgekd.data import read_split, resolve_path
from edgekd.errors import DataError, ModelError
from edgekd.lm_data import Collator, Record, encode, from_classification, read_prompt_completion, read_text
from edgekd.recipe import DataConfig

from lm_tiny import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from edgekd import models

    try:
        return models.load_tokenizer(models.BUILTIN_LLM)
    except ModelError as exc:
        pytest.skip(f"the built-in LLM is not available: {exc}")


def completion_part(row):
    """The label tokens (the positions that carry loss) and their positions."""
    return [t for t in row["labels"] if t != -100], [i for i, t in enumerate(row["labels"]) if t != -100]


def test_prompt_completion_jsonl_without_a_chat_template(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Kestrel Mining profit fell .", "answer": "negative"},
                                                 {"question": "Norlund Bank record sales", "answer": "positive"}])
    records = read_prompt_completion(path, prompt_column="question", completion_column="answer")
    assert records[1] == Record("Norlund Bank record sales", "positive", where=f"{path}:2")
    rows = encode(tokenizer, records, max_length=32)
    for record, row in zip(records, rows):
        labels, positions = completion_part(row)
        assert tokenizer.decode(labels[:-1]) == record.completion and labels[-1] == tokenizer.eos_token_id
        assert positions == list(range(len(row["input_ids"]) - len(labels), len(row["input_ids"])))  # the tail
        assert row["input_ids"][positions[0]:] == labels and row["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["input_ids"][:positions[0]]) == record.prompt  # prompt and newline, no loss
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_the_chat_template_is_applied_and_the_mask_covers_exactly_the_assistant_answer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    record = Record("Classify the sentiment: Kestrel Mining profit fell.", "negative")
    row = encode(tokenizer, [record], max_length=128)[0]
    labels, positions = completion_part(row)
    start = positions[0]
    assert positions == list(range(start, len(row["input_ids"])))
    assert tokenizer.decode(labels) == "negative<|im_end|>" and labels[-1] == tokenizer.eos_token_id
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": record.prompt}], tokenize=False,
                                                    add_generation_prompt=True)
    assert tokenizer.decode(row["input_ids"][:start]) == expected_prompt
    assert expected_prompt.endswith("<|im_start|>assistant\n") and record.prompt in expected_prompt


def test_plain_text_carries_loss_on_every_token(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "Vireo Pharma shares jumped in the third quarter ."}])
    (row,) = encode(tokenizer, read_text(path), max_length=64)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][:-1]) == "Vireo Pharma shares jumped in the third quarter ."


def test_a_classification_file_becomes_prompts_with_the_label_word_as_completion():
    split = read_split(resolve_path("builtin:finsent/train.csv"), DataConfig())
    records = from_classification(split)
    assert len(records) == len(split)
    for record, text, label in zip(records[:20], split.texts, split.labels):
        assert record.prompt == lm_data.FINSENT_TEMPLATE.replace("{text}", text)
        assert record.completion == record.label == label
    assert set(r.label for r in records) == {"negative", "neutral", "positive"}
    braces = from_classification(type(split)(["a {b} c"], ["x"]), "Q: {text} {other}")
    assert braces[0].prompt == "Q: a {b} c {other}"  # braces are text, not format fields
    with pytest.raises(DataError, match="no {text} placeholder"):
        from_classification(split, "Classify this.")


def test_the_collator_right_pads_with_minus_100_labels_on_padding():
    tokenizer = tiny_tokenizer()
    rows = encode(tokenizer, [Record("profit fell", "negative"), Record("Kestrel Mining shares jumped in the first "
                                                                       "quarter", "positive")], max_length=32)
    batch = Collator(tokenizer)(rows + [{**rows[0], "index": 3}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (3, len(rows[1]["input_ids"])) for t in batch.values())
    n = len(rows[0]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == rows[0]["input_ids"]
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1].tolist() == rows[1]["labels"]
    assert Collator(tokenizer, pad_to_multiple_of=8)(rows)["input_ids"].shape[1] % 8 == 0


def test_a_completion_longer_than_max_length_is_cut_and_the_prompt_kept():
    tokenizer = tiny_tokenizer()
    (row,) = encode(tokenizer, [Record("profit fell", "negative " * 30)], max_length=10)
    head = len(lm_data.prompt_ids(tokenizer, "profit fell"))
    assert head == 2 and len(row["input_ids"]) == 10
    assert row["labels"][:head] == [-100] * head and -100 not in row["labels"][head:]


def test_bad_input_is_one_line_each(tmp_path):
    tokenizer = tiny_tokenizer()
    long_prompt = [Record("profit fell", "negative"), Record("Kestrel Mining " * 20, "positive", where="f.jsonl:2")]
    with pytest.raises(DataError) as caught:
        encode(tokenizer, long_prompt, max_length=16)
    assert str(caught.value) == ("record 2 (f.jsonl:2): its prompt alone is 40 tokens, and max_length is 16; "
                                 "raise max_length above 40 or shorten the prompt")
    assert len(encode(tokenizer, long_prompt, max_length=41)) == 2  # the fix, followed
    with pytest.raises(DataError, match="no eos token"):
        encode(tiny_tokenizer(eos=False), [Record("profit fell", "negative")], max_length=16)
    with pytest.raises(DataError, match=r"record 1 \(x:1\) has an empty completion"):
        encode(tokenizer, [Record("profit fell", "  ", where="x:1")], max_length=16)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError) as caught:
        read_prompt_completion(path)
    assert str(caught.value) == (f"{path}:2: no 'completion' value (found: prompt); "
                                 f"set the prompt / completion column names")
    with pytest.raises(DataError, match="does not exist; check the data file path"):
        read_text(tmp_path / "missing.jsonl")
