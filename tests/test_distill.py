"""Distillation stage on tiny random-weight models: students of every kind, intermediate losses, cache."""
from __future__ import annotations

import numpy as np
import pytest

from edgekd.data import load_dataset
from edgekd.distill.distill import distill
from edgekd.distill.finetune import finetune
from edgekd.distill.training import predict_logits
from edgekd.errors import ModelError, RecipeError
from edgekd.manifest import verify_stage
from edgekd.models import load_classifier, load_tokenizer
from edgekd.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_teacher_dir, small_data):
    root = tmp_path_factory.mktemp("distill")
    base = {"teacher": {"model": str(tiny_teacher_dir), "epochs": 1, "batch_size": 16},
            "data": {k: str(v) for k, v in small_data.items()}}
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    finetune(recipe, dataset, root / "finetune")
    return root, base, dataset


def _recipe(base, **student):
    return recipe_from_dict(base | {"student": {"epochs": 1, "batch_size": 16, "augment": 1, **student}})


def test_cut_student_with_every_intermediate_loss(teacher_run):
    root, base, dataset = teacher_run
    recipe = _recipe(base, layers=[1, 3], hidden_weight=1.0, attention_weight=1.0, value_weight=1.0)
    metrics = distill(recipe, dataset, root / "finetune", root / "cut", root / ".cache")
    assert metrics["layer_map"] == [1, 3]                     # auto: the kept layers
    assert verify_stage(root / "cut", "distill")
    student = load_classifier(str(root / "cut"))
    assert student.config.num_hidden_layers == 2
    assert student.config._attn_implementation == "sdpa"      # eager only while training
    # The reported figures are the saved student's and teacher's predictions, recomputed here from the stage dirs.
    manifest = verify_stage(root / "cut", "distill")
    assert manifest["metrics"] == metrics
    teacher = load_classifier(str(root / "finetune"))
    texts, labels = dataset.test.texts, np.asarray(dataset.label_ids(dataset.test))
    length = manifest["max_length"]
    ours = predict_logits(student, load_tokenizer(str(root / "cut")), texts, length).argmax(-1)
    theirs = predict_logits(teacher, load_tokenizer(str(root / "finetune")), texts, length).argmax(-1)
    assert metrics["test"]["n"] == len(texts)
    assert metrics["test"]["accuracy"] == pytest.approx((ours == labels).mean(), abs=1e-12)
    assert metrics["test"]["agreement"] == pytest.approx((ours == theirs).mean(), abs=1e-12)


def test_fresh_narrow_student_learns_a_projection(teacher_run):
    root, base, dataset = teacher_run
    recipe = _recipe(base, config={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                   "intermediate_size": 64}, hidden_weight=1.0, layer_map="uniform")
    metrics = distill(recipe, dataset, root / "finetune", root / "fresh", root / ".cache")
    assert metrics["layer_map"] == [1, 3]
    student = load_classifier(str(root / "fresh"))
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 2
    assert metrics["teacher_cache_hit"] is True  # same teacher, same transfer set as the test above


def test_attention_transfer_needs_equal_heads(teacher_run):
    root, base, dataset = teacher_run
    recipe = _recipe(base, config={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                   "intermediate_size": 64}, attention_weight=1.0)
    with pytest.raises(ModelError, match="heads"):
        distill(recipe, dataset, root / "finetune", root / "bad-heads", root / ".cache")
    assert not (root / "bad-heads").exists()


@pytest.mark.parametrize("layer_map", [[0, 9], [0]])
def test_layer_map_out_of_range_is_refused(teacher_run, layer_map):
    root, base, dataset = teacher_run
    recipe = _recipe(base, layers=[1, 3], hidden_weight=1.0, layer_map=layer_map)
    with pytest.raises(ModelError, match="layer_map"):
        distill(recipe, dataset, root / "finetune", root / "bad-map", root / ".cache")
    assert not (root / "bad-map").exists()


def test_student_layers_out_of_range_is_refused(teacher_run):
    root, base, dataset = teacher_run
    with pytest.raises(ModelError, match="student.layers"):
        distill(_recipe(base, layers=[1, 7]), dataset, root / "finetune", root / "bad", root / ".cache")
    assert not (root / "bad").exists()


def test_temperature_must_be_positive(teacher_run):
    _, base, _ = teacher_run
    with pytest.raises(RecipeError, match="temperature"):
        _recipe(base, temperature=0)


def test_labels_must_match_the_teacher(teacher_run, tmp_path):
    from conftest import make_rows, write_csv

    root, base, _ = teacher_run
    rows = [r | {"label": "up" if r["label"] == "positive" else r["label"]} for r in make_rows(60, 9)]
    other = recipe_from_dict(base | {"data": {"train": str(write_csv(tmp_path / "t.csv", rows)),
                                              "validation": None, "test": None}})
    with pytest.raises(ModelError, match="labels"):
        distill(other, load_dataset(other), root / "finetune", root / "bad-labels", root / ".cache")


@pytest.fixture(scope="module")
def other_student_dir(tmp_path_factory):
    """A different, tiny BERT whose own small WordPiece vocabulary differs from the teacher's."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from conftest import COMPANIES, WORDS

    words = sorted({w.lower().strip(",.") for p in WORDS.values() for t in p for w in t.split()} |
                   {w.lower() for c in COMPANIES for w in c.split()} |
                   {"in", "the", "first", "second", "third", "fourth", "quarter", "analysts", "said", "company",
                    "a", "filing", "showed", ",", "."})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    out = tmp_path_factory.mktemp("other-student")
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(out)
    BertTokenizer(vocab=vocab).save_pretrained(out)
    return out


def test_any_hf_student_distills_across_tokenizers(teacher_run, other_student_dir):
    root, base, dataset = teacher_run
    recipe = _recipe(base, model=str(other_student_dir), trim_vocab=False)
    metrics = distill(recipe, dataset, root / "finetune", root / "other", root / ".cache")
    student = load_classifier(str(root / "other"))
    assert student.config.hidden_size == 32
    assert student.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert metrics["test"]["n"] == 30


def test_layer_losses_refuse_a_student_with_another_tokenizer(teacher_run, other_student_dir):
    root, base, dataset = teacher_run
    recipe = _recipe(base, model=str(other_student_dir), trim_vocab=False, hidden_weight=1.0)
    with pytest.raises(ModelError, match="tokenizes differently"):
        distill(recipe, dataset, root / "finetune", root / "other-bad", root / ".cache")
    assert not (root / "other-bad").exists()


def _train_quietly(tmp_path, rows: int, batch_size: int, **args) -> None:
    """A 1-layer BERT trained one epoch on `rows` 3-token rows through quiet_progress."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    from edgekd.distill.training import quiet_progress, training_args

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    data = [{"input_ids": torch.tensor([1, 5 + i % 7, 2]), "attention_mask": torch.ones(3, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(rows)]
    args = training_args(tmp_path, epochs=1, learning_rate=1e-3, batch_size=batch_size, seed=0, eval_strategy="no",
                         save_strategy="no", load_best_model_at_end=False, **args)
    quiet_progress(Trainer(model=model, args=args, train_dataset=data)).train()


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_training_shows_bars_but_not_the_trainers_log_dicts(tmp_path, capfd, disable_tqdm):
    """Progress on the terminal is edgekd's lines and the bars; the Trainer's {'loss': ...} dicts (its
    ProgressCallback writes them with a bar, its PrinterCallback without) stay off it."""
    _train_quietly(tmp_path, 8, 4, logging_strategy="steps", logging_steps=1, disable_tqdm=disable_tqdm)
    out, err = capfd.readouterr()
    assert "'loss'" not in out + err and "train_runtime" not in out + err
    assert "[edgekd] epoch 1: loss " in err  # edgekd's own line per logged step/epoch
    assert ("it/s" in err or "s/it" in err) != disable_tqdm  # the bar, with its rate, unless turned off


def test_without_bars_a_line_each_tenth_of_the_steps_says_how_long_is_left(tmp_path, capfd):
    """An LLM epoch on a CPU takes minutes: where the Trainer's bars are off, edgekd says where it is."""
    import re

    _train_quietly(tmp_path, 40, 2, disable_tqdm=True)
    steps = re.findall(r"\[edgekd\] step (\d+)/20: [\d.]+ s a step, about \d+ s left", capfd.readouterr().err)
    assert steps == [str(s) for s in range(2, 20, 2)]  # every tenth of 20 steps, none at the end


def test_length_grouped_batches_pad_less_and_see_every_text_once(tmp_path, tiny_teacher_dir):
    """The classifier stages batch texts of like length (training_args(length_grouped=True)): the padded tokens of
    an epoch fall against random batches of the same texts, every text is seen once, and a seed repeats it."""
    import random

    import torch
    from transformers import Trainer

    from edgekd.data import Encoded
    from edgekd.distill.training import collator, training_args

    rng = random.Random(0)
    texts = [" ".join(["word"] * rng.choice([2, 4, 40, 90])) for _ in range(200)]
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    model = load_classifier(str(tiny_teacher_dir))

    def epoch(grouped: bool):
        args = training_args(tmp_path, epochs=1, learning_rate=1e-3, batch_size=8, seed=0, eval_strategy="no",
                             save_strategy="no", load_best_model_at_end=False, length_grouped=grouped)
        trainer = Trainer(model=model, args=args, train_dataset=Encoded(tokenizer, texts, [0] * 200, 128),
                          data_collator=collator(tokenizer))
        torch.manual_seed(0)
        batches = list(trainer.get_train_dataloader())
        padding = sum(int((1 - b["attention_mask"]).sum()) for b in batches)
        return padding, sorted(int(i) for b in batches for i in b["index"]), [b["index"].tolist() for b in batches]

    random_padding, random_seen, _ = epoch(False)
    grouped_padding, grouped_seen, order = epoch(True)
    assert grouped_seen == random_seen == list(range(200))
    assert grouped_padding < random_padding / 3
    assert epoch(True)[2] == order


def test_the_teachers_new_head_is_drawn_from_the_recipes_seed(teacher_run, monkeypatch, tmp_path):
    """The classification head is created before the Trainer seeds itself: whatever the process drew before, one
    seed gives one initial teacher (it did not: the demo's teacher differed from run to run)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig, BertModel

    from edgekd.distill.finetune import train_teacher

    _, base, dataset = teacher_run
    encoder = tmp_path / "encoder"  # a pretrained encoder without a classification head, like the built-in one
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(base["teacher"]["model"]).save_pretrained(encoder)
    recipe = recipe_from_dict({**base, "teacher": {**base["teacher"], "model": str(encoder)}})
    heads = []

    class Captured(Exception):
        pass

    def capture(*args, model=None, **kwargs):
        heads.append(model.classifier.weight.detach().clone())
        raise Captured

    monkeypatch.setattr(transformers, "Trainer", capture)
    tokenizer = load_tokenizer(recipe.teacher.model)
    for draws in (1, 1000):
        torch.rand(draws)  # the process's random stream, somewhere else
        with pytest.raises(Captured):
            train_teacher(recipe, dataset, tokenizer, dataset.train.texts, dataset.label_ids(dataset.train), 32,
                          tmp_path / "checkpoints")
    assert torch.equal(heads[0], heads[1])
