"""Students: layer cutting, vocabulary trimming (exact logits), the KD loss and the metrics."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgekd.distill.losses import soft_label_kd
from edgekd.distill.student import (
    cut_layers,
    layers_to_keep,
    trim_vocabulary,
    uniform_layers,
    vocabulary_coverage,
)
from edgekd.errors import ModelError
from edgekd.metrics import classification_metrics

from conftest import make_rows


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


# --- cut_layers -----------------------------------------------------------------------------

LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


@pytest.mark.parametrize("keep", [[1, 3], [0], [3], [0, 2], [0, 1, 2, 3]])
def test_cut_layers_keeps_the_chosen_layers_weights(teacher, keep):
    student = cut_layers(teacher, keep)
    assert student.config.num_hidden_layers == len(keep)
    assert len(student.bert.encoder.layer) == len(keep)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    expected = {}
    for name in teacher_state:
        match = LAYER.search(name)
        if match is None:
            expected[name] = name                                  # embeddings, pooler, classifier
        elif int(match.group(1)) in keep:
            new = keep.index(int(match.group(1)))
            expected[LAYER.sub(f".encoder.layer.{new}.", name)] = name
    assert set(student_state) == set(expected)
    for name, source in expected.items():
        assert torch.equal(student_state[name], teacher_state[source]), name


def test_cut_layers_leaves_the_teacher_alone(teacher, tokenizer):
    inputs = tokenizer(["Norlund Bank profit rose."], return_tensors="pt")
    with torch.no_grad():
        before = teacher(**inputs).logits.clone()
        student = cut_layers(teacher, [1, 3])
        for p in student.parameters():
            p.add_(1.0)
        after = teacher(**inputs).logits
        assert student(**inputs).logits.shape == (1, 3)
    assert teacher.config.num_hidden_layers == 4 and len(teacher.bert.encoder.layer) == 4
    assert torch.equal(before, after)


def test_cut_student_saves_and_reloads(teacher, tokenizer, tmp_path):
    student = cut_layers(teacher, [0, 3]).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    inputs = tokenizer(["Kestrel Mining shares slumped."], return_tensors="pt")
    with torch.no_grad():
        # Equal up to float rounding: BLAS may sum in another order for differently aligned buffers.
        torch.testing.assert_close(student(**inputs).logits, reloaded(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [[0, 4], [-1, 2], [3, 1], [1, 1], [7]])
def test_cut_layers_rejects_bad_layer_lists(teacher, keep):
    with pytest.raises(ModelError, match="student.layers"):
        cut_layers(teacher, keep)


def test_cut_layers_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2,
                                                                 hidden_dim=32, max_position_embeddings=16))
    student = cut_layers(model, [2])
    assert student.config.n_layers == 1 and len(student.distilbert.transformer.layer) == 1
    for (name, value), (_, source) in zip(student.distilbert.transformer.layer[0].state_dict().items(),
                                          model.distilbert.transformer.layer[2].state_dict().items()):
        assert torch.equal(value, source), name


def test_cut_layers_unsupported_architecture():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                     n_positions=16))
    with pytest.raises(ModelError) as caught:
        cut_layers(model, [0])
    message = str(caught.value)  # one line: what failed, the known families, and a fix that works
    assert "\n" not in message and "'gpt2'" in message and "student.layers" in message
    assert all(name in message for name in ("bert", "roberta", "distilbert", "mpnet", "llama", "qwen3"))
    assert "give student.model" in message


# --- uniform_layers -------------------------------------------------------------------------

@pytest.mark.parametrize("total, count, expected", [(6, 2, [2, 5]), (6, 3, [1, 3, 5]), (12, 4, [2, 5, 8, 11]),
                                                    (12, 6, [1, 3, 5, 7, 9, 11]), (4, 4, [0, 1, 2, 3]),
                                                    (6, 1, [5]), (1, 1, [0])])
def test_uniform_layers_examples(total, count, expected):
    assert uniform_layers(total, count) == expected


def test_uniform_layers_properties():
    for total in range(1, 49):
        for count in range(1, total + 1):
            layers = uniform_layers(total, count)
            assert len(layers) == count, (total, count)
            assert len(set(layers)) == count
            assert layers == sorted(layers)
            assert layers[-1] == total - 1
            assert 0 <= layers[0]
            gaps = np.diff([-1] + layers)                      # spread evenly: gaps differ by at most 1
            assert gaps.max() - gaps.min() <= 1, (total, count, layers)


@pytest.mark.parametrize("total, count", [(6, 0), (6, 7), (0, 0), (4, -1)])
def test_uniform_layers_rejects_impossible_counts(total, count):
    with pytest.raises(ModelError):
        uniform_layers(total, count)


# --- trim_vocabulary ------------------------------------------------------------------------

CORPUS = [row["text"] for row in make_rows(120, seed=11)]
# New sentences built from the corpus' own words (so all their tokens are kept), in other
# combinations and casing; then one with words the corpus never uses.
COVERED = [
    "Kestrel Mining profit rose in the first quarter, analysts said.",
    "NORLUND BANK CUT ITS DIVIDEND IN THE THIRD QUARTER, A FILING SHOWED.",
    "Vireo Pharma kept guidance, the company said.",
    "shares jumped",
    "Arcadia Telecom the bond matures in the second quarter.",
]
UNSEEN = "Zebra Holdings announced a xylophone acquisition."


@pytest.fixture(scope="module")
def trimmed(teacher, tokenizer):
    return trim_vocabulary(teacher, tokenizer, CORPUS)


def _logits(model, tok, texts):
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits


def test_trim_keeps_used_special_and_alphabet_tokens_only(teacher, tokenizer, trimmed):
    model, tok, kept = trimmed
    used = {i for ids in tokenizer(CORPUS)["input_ids"] for i in ids}
    alphabet = {i for t, i in tokenizer.get_vocab().items() if len(t.removeprefix("##")) == 1}
    assert kept == sorted(used | set(tokenizer.all_special_ids) | alphabet)
    assert len(tok.get_vocab()) == len(kept) == model.config.vocab_size
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape == (len(kept), teacher.config.hidden_size)
    assert torch.equal(embeddings, teacher.get_input_embeddings().weight[torch.tensor(kept)])
    assert teacher.get_input_embeddings().weight.shape[0] == 30522          # the teacher is untouched
    assert model.config.pad_token_id == tok.pad_token_id == kept.index(tokenizer.pad_token_id)


def test_covered_texts_map_to_the_same_tokens_under_new_ids(tokenizer, trimmed):
    _, tok, kept = trimmed
    new_id = {old: new for new, old in enumerate(kept)}
    for text in CORPUS[:20] + COVERED:
        original = tokenizer(text)["input_ids"]
        assert set(original) <= set(kept), text                  # the test sentences really are covered
        assert tok(text)["input_ids"] == [new_id[i] for i in original], text


def test_trimmed_pair_gives_the_same_logits(teacher, tokenizer, trimmed):
    model, tok, _ = trimmed
    texts = CORPUS[:8] + COVERED
    expected = _logits(teacher, tokenizer, texts)
    got = _logits(model, tok, texts)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    for text in COVERED:                                          # unpadded, one by one
        assert torch.allclose(_logits(model, tok, [text]), _logits(teacher, tokenizer, [text]), atol=1e-6, rtol=0)


def test_text_with_unseen_words_gets_other_ids_but_runs(teacher, tokenizer, trimmed):
    model, tok, kept = trimmed
    original = tokenizer(UNSEEN)["input_ids"]
    assert not set(original) <= set(kept)
    ids = tok(UNSEEN)["input_ids"]
    new_id = {old: new for new, old in enumerate(kept)}
    assert ids != [new_id.get(i) for i in original]
    # The kept alphabet splits an unseen word into known pieces instead of [UNK].
    assert tok.unk_token_id not in ids
    assert max(ids) < len(kept)
    logits = _logits(model, tok, [UNSEEN, COVERED[0]])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert torch.allclose(logits[1], _logits(teacher, tokenizer, [COVERED[0]])[0], atol=1e-6, rtol=0)


def test_trimmed_pair_survives_save_and_reload(teacher, tokenizer, trimmed, tmp_path):
    model, tok, kept = trimmed
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.config.vocab_size == len(kept)
    texts = CORPUS[:4] + COVERED
    assert [reloaded_tok(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert torch.allclose(_logits(reloaded, reloaded_tok, texts), _logits(teacher, tokenizer, texts),
                          atol=1e-6, rtol=0)


def test_trim_margin_keeps_lowest_other_ids_but_no_unused_slots(teacher, tokenizer, trimmed):
    _, _, kept = trimmed
    _, tok, kept_margin = trim_vocabulary(teacher, tokenizer, CORPUS, margin=25)
    extra = sorted(set(kept_margin) - set(kept))
    assert len(extra) == 25
    vocab = tokenizer.get_vocab()
    others = sorted(i for t, i in vocab.items() if i not in set(kept) and not t.startswith("[unused"))
    assert extra == others[:25]
    assert not any(tokenizer.convert_ids_to_tokens(i).startswith("[unused") for i in extra)
    assert len(tok.get_vocab()) == len(kept) + 25


def test_vocabulary_coverage_hand_case(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "profit", "rose"])
    assert tokenizer.unk_token_id not in ids
    coverage = vocabulary_coverage(tokenizer, ids, ["profit rose", "profit fell", "Profit ROSE profit"])
    # [CLS] profit rose [SEP]: 4/4; [CLS] profit fell [SEP]: 3/4; [CLS] profit rose profit [SEP]: 5/5
    assert coverage == {"texts_fully_covered": pytest.approx(2 / 3), "tokens_covered": pytest.approx(12 / 13)}
    assert vocabulary_coverage(tokenizer, [], ["profit"]) == {"texts_fully_covered": 0.0, "tokens_covered": 0.0}


def test_vocabulary_coverage_of_trimmed_corpus_is_complete(tokenizer, trimmed):
    _, _, kept = trimmed
    assert vocabulary_coverage(tokenizer, kept, CORPUS) == {"texts_fully_covered": 1.0, "tokens_covered": 1.0}
    partial = vocabulary_coverage(tokenizer, kept, COVERED + [UNSEEN])
    assert partial["texts_fully_covered"] == pytest.approx(5 / 6)
    assert 0.5 < partial["tokens_covered"] < 1.0


def test_non_wordpiece_tokenizer_is_refused(teacher):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "p": 2, "r": 3, "o": 4, "pr": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("p", "r")], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    assert bpe("pro")["input_ids"] == [5, 4]                      # a working BPE tokenizer
    with pytest.raises(ModelError, match="WordPiece"):
        trim_vocabulary(teacher, bpe, ["pro"])


def test_tokenizer_without_backend_is_refused(teacher):
    class Slow:
        pass

    with pytest.raises(ModelError, match="WordPiece"):
        trim_vocabulary(teacher, Slow(), ["text"])


# --- soft_label_kd ---------------------------------------------------------------------------

def _batch(seed=0, b=6, c=4):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    return student, teacher, labels


def _kl_by_hand(student, teacher, t):
    p = torch.softmax(teacher / t, -1)
    log_q = student / t - torch.logsumexp(student / t, -1, keepdim=True)
    return (p * (torch.log(p) - log_q)).sum(-1).mean()


def _ce_by_hand(student, labels):
    log_q = student - torch.logsumexp(student, -1, keepdim=True)
    return -log_q[torch.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_alpha_one_is_t_squared_kl(temperature):
    student, teacher, labels = _batch()
    loss = soft_label_kd(student, teacher, labels, temperature, 1.0)
    expected = temperature ** 2 * _kl_by_hand(student, teacher, temperature)
    assert torch.allclose(loss, expected, atol=1e-10)
    assert torch.allclose(loss, soft_label_kd(student, teacher, (labels + 1) % 4, temperature, 1.0))  # no labels


def test_kd_alpha_zero_is_cross_entropy():
    student, teacher, labels = _batch(1)
    loss = soft_label_kd(student, teacher, labels, 3.0, 0.0)
    assert torch.allclose(loss, _ce_by_hand(student, labels), atol=1e-10)


def test_kd_mixes_both_terms():
    student, teacher, labels = _batch(2)
    t, alpha = 2.0, 0.3
    expected = alpha * t ** 2 * _kl_by_hand(student, teacher, t) + (1 - alpha) * _ce_by_hand(student, labels)
    assert torch.allclose(soft_label_kd(student, teacher, labels, t, alpha), expected, atol=1e-10)


def test_kd_is_zero_when_student_matches_teacher():
    _, teacher, labels = _batch(3)
    student = teacher.clone().requires_grad_()
    loss = soft_label_kd(student, teacher, labels, 2.0, 1.0)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert student.grad.abs().max() < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kd_gradient_flows_to_student_only(alpha):
    student, teacher, labels = _batch(4)
    teacher.requires_grad_()
    loss = soft_label_kd(student, teacher.detach(), labels, 2.0, alpha)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert torch.allclose(student.grad.sum(-1), torch.zeros(len(labels), dtype=torch.float64), atol=1e-12)


def test_kd_gradient_matches_softmax_difference():
    """d/dz_s of T^2 KL is T (softmax(z_s/T) - softmax(z_t/T)) / B."""
    student, teacher, labels = _batch(5)
    t = 3.0
    soft_label_kd(student, teacher, labels, t, 1.0).backward()
    expected = t * (torch.softmax(student.detach() / t, -1) - torch.softmax(teacher / t, -1)) / len(labels)
    assert torch.allclose(student.grad, expected, atol=1e-12)


def test_kd_matches_float32_kl_div():
    student, teacher, labels = _batch(6)
    loss32 = soft_label_kd(student.float(), teacher.float(), labels, 2.0, 1.0)
    assert loss32.dtype == torch.float32
    assert torch.allclose(loss32.double(), 4.0 * _kl_by_hand(student, teacher, 2.0), atol=1e-5)
    assert torch.allclose(F.cross_entropy(student, labels), _ce_by_hand(student, labels))  # sanity of the helper


# --- classification_metrics -----------------------------------------------------------------

def _one_hot_logits(pred, classes=3, scale=10.0):
    return np.eye(classes)[pred] * scale


def test_metrics_hand_case():
    labels = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    metrics = classification_metrics(_one_hot_logits(pred), labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0: P=1/2 R=1/2 -> 1/2; 1: P=2/3 R=1 -> 4/5; 2: P=1 R=1/2 -> 2/3
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    confidence = 1 / (1 + 2 * np.exp(-10.0))                      # every prediction in the top bin
    assert metrics["ece"] == pytest.approx(confidence - 4 / 6)
    assert metrics["n"] == 6
    assert "agreement" not in metrics


def test_metrics_accept_label_lists_and_arrays():
    logits = _one_hot_logits([2, 1, 0])
    assert classification_metrics(logits, [2, 1, 0]) == classification_metrics(logits, np.array([2, 1, 0]))


def test_ece_zero_for_confident_correct_predictions():
    labels = [0, 1, 2, 1, 0, 2]
    metrics = classification_metrics(_one_hot_logits(labels, scale=100.0), labels)
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model():
    # confidence 0.8 on every prediction, half of them right: ECE = |0.5 - 0.8|
    logit = np.log(0.8 / 0.1)
    logits = np.array([[logit, 0, 0], [0, logit, 0], [logit, 0, 0], [0, 0, logit]])
    metrics = classification_metrics(logits, [0, 1, 2, 1])
    assert metrics["ece"] == pytest.approx(0.3)


def test_ece_is_bin_weighted():
    # two bins: conf 0.95 all right (gap 0.05), conf 0.55 all wrong (gap 0.55); half the rows each
    high, low = np.log(0.95 / 0.05), np.log(0.55 / 0.45)
    logits = np.array([[high, 0], [0, high], [low, 0], [0, low]])
    metrics = classification_metrics(logits, [0, 1, 1, 0])
    assert metrics["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.55)


def test_agreement_with_reference():
    pred = [0, 1, 1, 1, 2, 0]
    reference = _one_hot_logits([0, 1, 1, 0, 2, 2], scale=1.0)
    metrics = classification_metrics(_one_hot_logits(pred), [0, 0, 1, 1, 2, 2], reference)
    assert metrics["agreement"] == pytest.approx(4 / 6)
    assert classification_metrics(_one_hot_logits(pred), pred, _one_hot_logits(pred))["agreement"] == 1.0


def test_macro_f1_of_perfect_predictions_on_a_subset_of_classes():
    labels = [0, 1, 0, 1]
    assert classification_metrics(_one_hot_logits(labels), labels)["macro_f1"] == 1.0


def test_layers_left_out_keep_half_the_teachers_evenly_ending_at_the_last():
    assert layers_to_keep(None, 6) == [1, 3, 5] and layers_to_keep(None, 12) == [1, 3, 5, 7, 9, 11]
    assert layers_to_keep(None, 1) == [0] and layers_to_keep([0, 2], 6) == [0, 2]
