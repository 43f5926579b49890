"""The task seam: a recipe names its task, which decides its sections; an unknown task is one line."""
import pytest
import yaml

from edgekd.errors import RecipeError
from edgekd.recipe import Recipe, builtin_recipe_text, recipe_from_dict
from edgekd.tasks import TASKS, get_task


def test_a_recipe_without_task_is_a_classification_recipe():
    recipe = recipe_from_dict({})
    assert isinstance(recipe, Recipe) and recipe.task == "text-classification"
    assert recipe_from_dict({"task": "text-classification"}) == recipe


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(RecipeError, match=r"task 'text-generaton' .*did you mean 'text-generation'.*known: "
                                          r"text-classification, text-generation"):
        recipe_from_dict({"task": "text-generaton"})


def test_every_task_module_provides_the_seam():
    for name in TASKS:
        task = get_task(name)
        assert task.RECIPE().task == name and callable(task.run)
        recipe = recipe_from_dict(yaml.safe_load(builtin_recipe_text(name)))
        assert type(recipe) is task.RECIPE and recipe.task == name


def test_a_task_checks_its_own_keys():
    # A classifier key in a generation recipe is unknown there, and the line lists the keys that are known.
    with pytest.raises(RecipeError, match=r"unknown key 'student.augment'.*known: layers"):
        recipe_from_dict({"task": "text-generation", "student": {"augment": 4}})
    with pytest.raises(RecipeError, match=r"student.loss must be forward-kl.*did you mean 'reverse-kl'"):
        recipe_from_dict({"task": "text-generation", "student": {"loss": "revers-kl"}})
    with pytest.raises(RecipeError, match=r"data.prompt_template must contain \{text\}"):
        recipe_from_dict({"task": "text-generation", "data": {"prompt_template": "no slot"}})
    # Decoder targets: android/executorch, android/litert, ios/coreml (each once, no options); others in one line.
    assert [t.format for t in recipe_from_dict({"task": "text-generation", "targets": ["android", "ios"]}).targets] \
        == ["executorch", "coreml"]
    with pytest.raises(RecipeError, match=r"exports to android/executorch, android/litert, ios/coreml, not "
                                          r"ios/executorch-coreml"):
        recipe_from_dict({"task": "text-generation", "targets": [{"target": "ios", "format": "executorch-coreml"}]})
    with pytest.raises(RecipeError, match=r"exports to .*, not embedded/its default"):
        recipe_from_dict({"task": "text-generation", "targets": ["embedded"]})
    with pytest.raises(RecipeError, match=r"targets lists android/executorch twice"):
        recipe_from_dict({"task": "text-generation", "targets": ["android", {"target": "android",
                                                                             "format": "executorch"}]})
    with pytest.raises(RecipeError, match=r"takes no options or quant of its own; list the specs in compress.quant"):
        recipe_from_dict({"task": "text-generation", "targets": [{"target": "android", "quant": ["int8"]}]})
    with pytest.raises(RecipeError, match=r"student.hidden must be a fraction in \[0, 1\) \(the share removed\)"):
        recipe_from_dict({"task": "text-generation", "student": {"hidden": 1.0}})
    with pytest.raises(RecipeError, match=r"student.init must be cut, fresh, not 'random'"):
        recipe_from_dict({"task": "text-generation", "student": {"init": "random"}})
    with pytest.raises(RecipeError, match=r"student.kd_tokens must be completion, all, not 'prompt'"):
        recipe_from_dict({"task": "text-generation", "student": {"kd_tokens": "prompt"}})
    with pytest.raises(RecipeError, match=r"a fresh student with student.hidden has no channels of the teacher's"):
        recipe_from_dict({"task": "text-generation", "student": {"init": "fresh", "hidden": 0.5,
                                                                 "state_weight": 1}})
    with pytest.raises(RecipeError, match=r"student.alpha 0 trains without the teacher: set student.alpha above 0"):
        recipe_from_dict({"task": "text-generation", "data": {"unlabeled": "more.csv"}, "student": {"alpha": 0}})
    with pytest.raises(RecipeError, match=r"text records have no prompt: add the text to data.train"):
        recipe_from_dict({"task": "text-generation", "data": {"unlabeled": "more.csv", "records": "text"}})
    with pytest.raises(RecipeError, match=r"data.max_unlabeled must be at least 2 records"):
        recipe_from_dict({"task": "text-generation", "data": {"unlabeled": "more.csv", "max_unlabeled": 1}})
    with pytest.raises(RecipeError, match=r"compress.budget_metric must be perplexity, task-accuracy"):
        recipe_from_dict({"task": "text-generation", "compress": {"budget": 5, "budget_metric": "ppl"}})
    with pytest.raises(RecipeError, match=r"compress.budget must be >= 0 percent"):
        recipe_from_dict({"task": "text-generation", "compress": {"budget": -1}})
    with pytest.raises(RecipeError, match=r"task-accuracy needs labelled records .*use budget_metric: perplexity"):
        recipe_from_dict({"task": "text-generation", "data": {"records": "text"},
                          "compress": {"budget": 2, "budget_metric": "task-accuracy"}})


def test_generation_model_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "teacher").mkdir()
    recipe = recipe_from_dict({"task": "text-generation", "teacher": {"model": "teacher"}}, tmp_path)
    assert recipe.teacher.model == str(tmp_path / "teacher")


def test_a_generation_recipe_is_checked_against_the_teacher_before_training(tmp_path):
    from edgekd.pipeline import run

    from lm_tiny import tiny_llama

    tiny_llama(layers=2).save_pretrained(tmp_path / "teacher")
    base = {"task": "text-generation", "teacher": {"model": "teacher"}}
    with pytest.raises(RecipeError, match=r"student.layers 10: the teacher has 2 layers; choose 1 to 2"):
        run(recipe_from_dict(base, tmp_path), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"max_seq_len 256 is longer than the teacher's context of 128"):
        run(recipe_from_dict({**base, "student": {"layers": 1}}, tmp_path), tmp_path / "run")
    fits = {**base, "student": {"layers": 1}, "max_seq_len": 128, "data": {"max_length": 128}}
    # A spec the decoder export cannot realize, or an int4 group wider than a Linear (64 wide here; the MLP's 128
    # neurons pruned to 64 by student.ffn 0.5): refused before any training, not by the export after it.
    with pytest.raises(RecipeError, match=r"compress.quant int8-static on android/executorch: ExecuTorch decoder "
                                          r"export realizes fp32"):
        run(recipe_from_dict({**fits, "compress": {"quant": ["int4", "int8-static"]}}, tmp_path), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"compress.quant int4-g128 on .*groups 128 input channels.*\[64, 128\]"):
        run(recipe_from_dict({**fits, "compress": {"quant": ["int4-g128"]}}, tmp_path), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"compress.quant int4-g128 on .*\[64\] wide"):
        run(recipe_from_dict({**fits, "student": {"layers": 1, "ffn": 0.5}, "compress": {"quant": ["int4-g128"]}},
                             tmp_path), tmp_path / "run")
    # A width cut that breaks grouped KV heads (2 KV heads of 2 query heads each here), and the int4 group checked
    # against the pruned widths (hidden 64 -> 32 channels with student.hidden 0.5).
    with pytest.raises(RecipeError, match=r"student: kv_groups 3: the model has 2 KV heads .*choose kv_groups from 1 "
                                          r"to 2"):
        run(recipe_from_dict({**fits, "student": {"layers": 1, "kv_groups": 3}}, tmp_path), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"student: heads 3: with 1 KV heads .*heads must be one of 1, 2"):
        run(recipe_from_dict({**fits, "student": {"layers": 1, "kv_groups": 1, "heads": 3}}, tmp_path),
            tmp_path / "run")
    with pytest.raises(RecipeError, match=r"compress.quant int4-g64 on .*\[32, 64, 128\] wide"):
        run(recipe_from_dict({**fits, "student": {"layers": 1, "hidden": 0.5}, "compress": {"quant": ["int4-g64"]}},
                             tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_generation_samples_of_train_and_eval_records_are_seeded_and_stratified(tmp_path):
    """max_train / max_eval cut the splits to seeded, stratified samples, never their first rows: real data
    arrives sorted by label."""
    from collections import Counter

    from edgekd.tasks.generation import load_records

    from conftest import write_csv

    for name, n in (("train", 90), ("validation", 60), ("test", 60)):  # sorted by label, as real data arrives
        write_csv(tmp_path / f"{name}.csv", [{"text": f"{name} text {i}", "label": ["negative", "neutral",
                                                                                    "positive"][i * 3 // n]}
                                             for i in range(n)])
    base = {"task": "text-generation", "data": {"train": "train.csv", "validation": "validation.csv",
                                                "test": "test.csv", "max_train": 30, "max_eval": 12}}
    data = load_records(recipe_from_dict(base, tmp_path))
    assert [len(data.train), len(data.validation), len(data.test)] == [30, 12, 12]
    for split, per_label in ((data.train, 10), (data.validation, 4), (data.test, 4)):
        assert Counter(r.label for r in split) == {"negative": per_label, "neutral": per_label, "positive": per_label}
    again = load_records(recipe_from_dict(base, tmp_path))
    assert [r.prompt for r in again.test] == [r.prompt for r in data.test]  # seeded
    other = load_records(recipe_from_dict({**base, "seed": 1}, tmp_path))
    assert [r.prompt for r in other.test] != [r.prompt for r in data.test]
    with pytest.raises(RecipeError, match="data.max_eval must be at least 2"):
        recipe_from_dict({"task": "text-generation", "data": {"max_eval": 1}})


def test_unlabeled_prompts_are_the_files_prompts_the_splits_do_not_hold(tmp_path):
    """data.unlabeled may be the training file itself, its labels unused: the texts outside the labelled sample
    are the prompts, the evaluation splits' never are; a file with nothing new is one line."""
    from edgekd.errors import DataError
    from edgekd.tasks.generation import load_records

    from conftest import write_csv

    for name, n in (("train", 90), ("validation", 12), ("test", 12)):
        write_csv(tmp_path / f"{name}.csv", [{"text": f"{name} text {i}", "label": ["negative", "neutral",
                                                                                    "positive"][i % 3]}
                                             for i in range(n)])
    write_csv(tmp_path / "more.csv", [{"text": t} for t in [f"train text {i}" for i in range(90)]
                                      + ["test text 1", "validation text 2", "new text", "new text"]])
    recipe = recipe_from_dict({"task": "text-generation", "data": {
        "train": "train.csv", "validation": "validation.csv", "test": "test.csv", "max_train": 30, "max_eval": 6,
        "unlabeled": "more.csv"}}, tmp_path)
    data = load_records(recipe)
    template = recipe.data.prompt_template
    labelled = {r.prompt for r in data.train}
    expected = [template.replace("{text}", f"train text {i}") for i in range(90)] + [template.replace("{text}",
                                                                                                      "new text")]
    assert [r.prompt for r in data.unlabeled] == [p for p in expected if p not in labelled]
    assert len(data.unlabeled) == 61 and all(r.completion == "" and r.label is None for r in data.unlabeled)
    assert data.transfer_fingerprint() != load_records(recipe_from_dict({"task": "text-generation", "data": {
        "train": "train.csv", "validation": "validation.csv", "test": "test.csv", "max_train": 30, "max_eval": 6,
        "unlabeled": "more.csv", "max_unlabeled": 20}}, tmp_path)).transfer_fingerprint()
    # prompt-completion records: the prompt column; every prompt already a split's is refused in one line
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)]
    for name, part in (("train", rows[:4]), ("test", rows[4:8]), ("validation", rows[8:])):
        write_csv(tmp_path / f"{name}-pc.csv", part)
    write_csv(tmp_path / "more-pc.csv", [{"prompt": "q1"}, {"prompt": "q5"}, {"prompt": " "}])
    spec = {"task": "text-generation", "data": {"records": "prompt-completion", "train": "train-pc.csv",
                                                "validation": "validation-pc.csv", "test": "test-pc.csv",
                                                "unlabeled": "more-pc.csv"}}
    with pytest.raises(DataError, match=r"more-pc.csv: none of its 3 prompts is new \(each is empty or already a "
                                        r"training, validation or test prompt\)"):
        load_records(recipe_from_dict(spec, tmp_path))


def test_a_decoder_target_without_its_packages_is_one_line_before_training(monkeypatch):
    """A recipe's target whose exporter or runtime is not installed: one line naming them and the pip command."""
    import edgekd.targets as targets
    from edgekd.tasks import generation

    monkeypatch.setattr(targets, "_importable", lambda module: module not in ("litert_lm", "coremltools"))
    with pytest.raises(RecipeError, match=r"targets android/litert needs litert_lm, which is not installed; run "
                                          r"`pip install .*\[litert\]"):
        generation.SPEC_CHECKS[("android", "litert")]()
    with pytest.raises(RecipeError, match=r"targets ios/coreml needs coremltools.*\[ios\]"):
        generation.SPEC_CHECKS[("ios", "coreml")]()
    assert generation.SPEC_CHECKS[("android", "executorch")]() is not None
