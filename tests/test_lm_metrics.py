"""Causal-LM metrics on tiny random-weight Llamas: perplexity, token agreement, task accuracy of greedy answers."""
from __future__ import annotations

import math

import pytest
import torch

from edgekd.data import Split
from edgekd.lm_data import Collator, Record, batches, encode, from_classification
from edgekd.lm_metrics import first_word, perplexity, score_records, task_accuracy, token_agreement

from conftest import make_rows
from lm_tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    rows = make_rows(9)
    records = from_classification(Split([r["text"] for r in rows], [r["label"] for r in rows]))
    encoded = encode(tokenizer, records, max_length=64)
    return tokenizer, tiny_llama(len(tokenizer)), records, encoded


def test_perplexity_is_exp_of_the_models_own_loss_on_one_unpadded_batch(setup):
    tokenizer, model, _, encoded = setup
    batch = Collator(tokenizer)(encoded[:1])
    with torch.no_grad():
        loss = model(**batch).loss.item()  # Hugging Face's shifted, -100-masked mean cross-entropy
    result = perplexity(model, [batch])
    assert result["tokens"] == sum(t != -100 for t in encoded[0]["labels"])
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["nll"] == pytest.approx(loss, rel=1e-5)


def test_perplexity_is_token_weighted_whatever_the_batching_and_padding(setup):
    tokenizer, model, _, encoded = setup
    one_by_one = perplexity(model, batches(encoded, Collator(tokenizer), batch_size=1))
    padded = perplexity(model, batches(encoded, Collator(tokenizer, pad_to_multiple_of=16), batch_size=4))
    assert padded["tokens"] == one_by_one["tokens"]
    assert padded["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)
    # Not the mean of per-row perplexities or of per-batch losses (rows of different completion lengths).
    per_row = [perplexity(model, [Collator(tokenizer)([row])]) for row in encoded]
    weighted = sum(r["nll"] * r["tokens"] for r in per_row) / sum(r["tokens"] for r in per_row)
    assert one_by_one["nll"] == pytest.approx(weighted, rel=1e-6)


def test_agreement_of_a_model_with_itself_is_one_and_with_another_less(setup):
    tokenizer, model, _, encoded = setup
    same = token_agreement(model, model, batches(encoded, Collator(tokenizer), 4))
    assert same["agreement"] == 1.0 and same["n"] == sum(t != -100 for row in encoded for t in row["labels"][1:])
    assert 0.6 < same["low"] < 1.0 and same["high"] == 1.0
    other = token_agreement(tiny_llama(len(tokenizer), seed=1), model, batches(encoded, Collator(tokenizer), 4))
    assert other["agreement"] < 1.0 and other["low"] <= other["agreement"] <= other["high"]


def planted(tokenizer, word: str):
    """A tiny Llama whose every next token is `word`: the LM head replaced by a bias on that token."""
    model = tiny_llama(len(tokenizer))
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tokenizer.convert_tokens_to_ids(word)] = 10.0
    model.lm_head = head
    return model


def test_task_accuracy_of_a_model_that_always_answers_positive(setup):
    tokenizer, _, records, _ = setup
    result = task_accuracy(planted(tokenizer, "positive"), tokenizer, records, max_new_tokens=2, batch_size=4)
    expected = [r.label == "positive" for r in records]
    assert result["correct"] == expected and result["n"] == len(records)
    assert result["accuracy"] == pytest.approx(sum(expected) / len(records))
    assert all(answer == "positive positive" for answer in result["answers"])
    assert result["low"] < result["accuracy"] < result["high"]
    none_right = task_accuracy(planted(tokenizer, "quarter"), tokenizer, records, max_new_tokens=1)
    assert none_right["accuracy"] == 0.0 and none_right["low"] == 0.0


def test_batched_greedy_answers_equal_one_at_a_time(setup):
    tokenizer, model, records, _ = setup  # prompts of different lengths: the left padding must not change answers
    assert len({len(r.prompt.split()) for r in records}) > 1
    batched = task_accuracy(model, tokenizer, records, max_new_tokens=3, batch_size=9)
    single = task_accuracy(model, tokenizer, records, max_new_tokens=3, batch_size=1)
    assert batched["answers"] == single["answers"]


def test_first_word_and_records_without_labels():
    assert first_word("  Positive.\nThe news is good") == "positive" and first_word("") == ""
    with pytest.raises(ValueError, match="records with a label"):
        task_accuracy(None, tiny_tokenizer(), [Record("profit fell", "negative")])


def test_one_scoring_pass_gives_what_the_three_metrics_give(setup):
    tokenizer, model, records, encoded = setup
    other = tiny_llama(len(tokenizer), seed=1)
    scores = score_records(model, tokenizer, records, max_length=64, teacher=other, max_new_tokens=3, batch_size=4)
    alone = perplexity(model, batches(encoded, Collator(tokenizer), 4))
    assert scores["perplexity"]["tokens"] == alone["tokens"]
    assert scores["perplexity"]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)
    assert scores["agreement"] == token_agreement(model, other, batches(encoded, Collator(tokenizer), 4))
    greedy = task_accuracy(model, tokenizer, records, max_new_tokens=3, batch_size=4)
    assert scores["task_accuracy"]["answers"] == greedy["answers"]
    assert scores["task_accuracy"]["correct"] == greedy["correct"]
    assert "agreement" not in score_records(model, tokenizer, records, max_length=64)


def answers_positive_then_stops(tokenizer):
    """A tiny Llama whose layers add nothing: after the token "positive" it says eos, after any other "positive"."""
    model = planted(tokenizer, "positive")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("positive"), 0] = 1.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 10.0  # the RMS norm makes that row 8 x 10 = 80
    return model


def test_a_completion_the_model_reproduces_is_not_decoded_again(setup):
    """Greedy decoding of a record whose completion and eos the model predicts teacher-forced gives that
    completion: those records skip generation, and the answers are those of decoding every record."""
    tokenizer, _, records, _ = setup
    model = answers_positive_then_stops(tokenizer)
    scores = score_records(model, tokenizer, records, max_length=64, max_new_tokens=3)
    greedy = task_accuracy(model, tokenizer, records, max_new_tokens=3)
    assert greedy["answers"] == ["positive"] * len(records)  # the model really stops after its word
    assert scores["task_accuracy"]["answers"] == greedy["answers"]
    assert scores["task_accuracy"]["correct"] == greedy["correct"] == [r.label == "positive" for r in records]
    assert scores["task_accuracy"]["decoded"] == sum(r.label != "positive" for r in records) < len(records)
    # A completion longer than max_new_tokens is decoded: greedy decoding would have stopped short of it.
    assert score_records(model, tokenizer, records, 64, max_new_tokens=1)["task_accuracy"]["decoded"] == len(records)
