"""The pre-flight: the whole recipe checked against the teacher's config and tokenizer files before any
training, one line per problem; each fix a line suggests, followed, passes the check."""
from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml

from edgekd.cli import main
from edgekd.errors import RecipeProblems
from edgekd.preflight import preflight
from edgekd.recipe import load_recipe, recipe_from_dict
from edgekd.tasks.classification import variant_plan


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _problems(data: dict) -> list[str]:
    with pytest.raises(RecipeProblems) as info:
        preflight(recipe_from_dict(data))
    return info.value.problems


def _follow(data: dict, line: str) -> dict:
    """The recipe with the fix the line suggests ("set KEY: VALUE", "use KEY: VALUE", "e.g. KEY: VALUE") applied."""
    found = re.search(r"(?:set|use|e\.g\.) ([a-z_]+\.[a-z_.]+): (\[[^\]]*\]|[^\s;,)]+)", line)
    assert found, f"no followable fix in: {line}"
    return _set(data, found.group(1), yaml.safe_load(found.group(2)))


@pytest.fixture
def base(tiny_recipe_dict) -> dict:
    """The tiny recipe with a student the tiny (4-layer, 4-head) teacher can give."""
    return _set(tiny_recipe_dict, "student.layers", [1, 3])


# --- one problem at a time: the line, then the line's fix followed ------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("student.layers", [0, 9], "student.layers [0, 9] must be increasing, distinct teacher layers in 0..3"),
    ("compress.prune.heads", 0.1, "compress.prune.heads 0.1 removes no head of the student's 4"),
    ("compress.qat_epochs", 1.0, "compress.qat_epochs trains the student for one QuantSpec"),
    ("student.attention_weight", 1.0, None),  # fine as it is: the cut student has the teacher's heads
])
def test_student_and_compression_problems_are_found_and_their_fixes_work(base, key, value, expected):
    data = _set(base, key, value)
    if key == "compress.qat_epochs":
        data = _set(data, "compress.quant", ["int8-static"])
        expected = "not int8-static; set compress.quant: [int8]"
    if expected is None:
        preflight(recipe_from_dict(data))
        return
    (line,) = _problems(data)
    assert expected in line
    preflight(recipe_from_dict(_follow(data, line)))


def test_head_counts_of_a_fresh_student_against_the_teacher(base):
    data = _set(base, "student.config", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                         "intermediate_size": 128})
    data = _set(data, "student.attention_weight", 1.0)
    data = _set(data, "student.value_weight", 1.0)
    lines = _problems(data)
    assert len(lines) == 2
    assert "student.value_weight needs as many attention heads in the student (2) as in the teacher (4)" in lines[0]
    assert "student.attention_weight needs as many attention heads" in lines[1]
    for line in lines:
        data = _follow(data, line)
    preflight(recipe_from_dict(data))


def test_prune_layers_and_arena_margin_and_unknown_option(base):
    data = _set(base, "compress.prune.layers", 2)
    data["targets"] = [{"target": "android", "format": "executorch", "options": {"dynamic_lenght": True}},
                       {"target": "embedded", "options": {"arena_margin": 9}, "quant": ["fp32"]}]
    lines = _problems(data)
    assert any("android/executorch has no option 'dynamic_lenght' (did you mean 'dynamic_length'?)" in x for x in lines)
    assert any("embedded/tflm option arena_margin must be a fraction between 0 and 4, such as 0.25; got 9" in x
               for x in lines)
    assert any("compress.prune.layers 2 would remove every layer (the student has 2); use at most 1" in x
               for x in lines)
    assert len(lines) == 3
    data["targets"] = [{"target": "android", "format": "executorch", "options": {"dynamic_length": True}},
                       {"target": "embedded", "options": {"arena_margin": 0.25}, "quant": ["fp32"]}]
    preflight(recipe_from_dict(_set(data, "compress.prune.layers", 1)))


# --- the spec each format realizes ---------------------------------------------------------------

FOUR_TARGETS = [{"target": "android", "format": "executorch"}, {"target": "android", "format": "litert"},
                {"target": "ios", "format": "coreml"}, {"target": "embedded", "format": "tflm"}]


def test_int8_means_each_formats_int8(base):
    """compress.quant [int8] on four formats: each exports its own int8, and the plan records what was asked."""
    plan = variant_plan(recipe_from_dict({**base, "targets": FOUR_TARGETS}))
    compressed = {v.name: (v.spec.name, v.asked) for v in plan if v.role == "compressed"}
    assert compressed == {"student-int8-android-executorch": ("int8", "int8"),
                          "student-int8-android-litert": ("int8", "int8"),
                          "student-int8-weights-ios-coreml": ("int8-weights", "int8"),
                          "student-int8-static-embedded-tflm": ("int8-static", "int8")}
    assert [v.name for v in plan if v.role == "teacher"] == ["teacher-fp32-android-executorch"]


def test_a_target_lists_its_own_specs(base):
    data = {**base, "targets": [{"target": "android"}, {"target": "ios", "format": "coreml", "quant": ["palettize4"]}]}
    plan = variant_plan(recipe_from_dict(data))
    assert [v.name for v in plan if v.role == "compressed"] == ["student-int8-android-executorch",
                                                                "student-palettize4-ios-coreml"]


def test_a_spec_no_target_format_realizes_is_one_line_and_its_fix_works(base):
    data = {**base, "compress": {"quant": ["palettize4"]}, "targets": FOUR_TARGETS}
    lines = _problems(data)
    assert len(lines) == 3  # executorch, litert and tflm; Core ML realizes palettize4
    assert lines[0].startswith("android/executorch cannot realize quantization 'palettize4'; it realizes ")
    targets = copy.deepcopy(FOUR_TARGETS)
    for line, target in zip(lines, [targets[0], targets[1], targets[3]]):
        own = re.search(r"quant: (\[[^\]]*\])", line).group(1)  # the suggestion: this target's own specs
        target["quant"] = yaml.safe_load(own)
    # tflm's suggestion, int8-static, is refused for this GELU teacher, with that line's own fix
    (line,) = _problems({**data, "targets": targets})
    targets[3] = yaml.safe_load(re.search(r"(\{target: embedded, format: tflm, quant: \[fp32\]\})", line).group(1))
    preflight(recipe_from_dict({**data, "targets": targets}))


def test_the_compress_stage_takes_int8_for_a_first_target_that_realizes_it_as_int8_weights(base, tmp_path):
    """It evaluates int8 in PyTorch; Core ML exports its int8-weights. It reaches its input, not a refusal."""
    from edgekd.compress.compress import compress
    from edgekd.errors import StageError
    from edgekd.targets import get_format

    recipe = recipe_from_dict({**base, "targets": ["ios", "android"]})
    assert [v.name for v in preflight(recipe) if v.role == "compressed"] == ["student-int8-weights-ios-coreml",
                                                                            "student-int8-android-executorch"]
    with pytest.raises(StageError, match="no manifest.json"):
        compress(recipe, None, tmp_path / "no-student", tmp_path / "out", None, get_format("ios", "coreml"))


def test_int4_on_ios17_is_caught_up_front_and_the_fix_works(base):
    data = {**base, "targets": [{"target": "ios", "quant": ["int4"]}]}
    (line,) = _problems(data)
    assert "int4-weights needs Core ML per-block int4, which starts with iOS18" in line
    assert "`options: {deployment_target: iOS18}`" in line
    data["targets"][0]["options"] = {"deployment_target": "iOS18"}
    preflight(recipe_from_dict(data))


def test_a_search_spec_another_target_cannot_realize(base):
    tflm_fp32 = {**FOUR_TARGETS[3], "quant": ["fp32"]}  # a GELU teacher: no full int8 on TFLite Micro
    data = {**base, "compress": {"budget": 1.0}, "targets": FOUR_TARGETS[:1] + [tflm_fp32]}
    (line,) = _problems(data)
    assert ("the budget search may choose int4, int4-g64, int4-g128 on android/executorch, which targets[1] "
            "embedded/tflm cannot realize; set compress.search_quant: [int8, int8-static]") in line
    preflight(recipe_from_dict(_follow(data, line)))


# --- tokenizer and model family: read from the files, no weights ---------------------------------

@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 config (no separate value projection) with a word-level tokenizer without a mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("gpt2-teacher")
    GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64).save_pretrained(out)
    words = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "profit", "rose", "fell"])}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(out)
    return out


def test_tokenizer_and_family_problems_all_reported_and_fixed(base, gpt2_teacher, tiny_teacher_dir):
    data = _set(base, "teacher.model", str(gpt2_teacher))
    data = _set(data, "student.value_weight", 1.0)
    lines = _problems(data)
    assert len(lines) == 3, lines  # augment needs no mask token: without one it drops words (distill/augment.py)
    assert "student.layers cuts layers from the families of edgekd's architecture map" in lines[0]
    assert "not a gpt2 teacher" in lines[0]
    assert "student.trim_vocab supports WordPiece (BERT-family) tokenizers only" in lines[1]
    assert "the teacher's gpt2 family is not in edgekd's architecture map; set student.value_weight: 0" in lines[2]
    data = _set(data, "student.model", str(tiny_teacher_dir))  # lines[0]: a student.model instead
    for line in lines[1:]:
        data = _follow(data, line)
    preflight(recipe_from_dict(data))


# --- through the CLI: every line, before anything is written or loaded ---------------------------

def test_run_reports_every_problem_on_its_own_line_before_training(tmp_path, base, capsys, monkeypatch):
    import edgekd.distill.finetune as finetune
    import edgekd.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(models, "load_classifier", no_loading)
    monkeypatch.setattr(finetune, "load_classifier", no_loading)
    data = _set(base, "student.layers", [2, 7])
    data = _set(data, "compress.prune.heads", 0.2)
    data["targets"] = [{"target": "android", "options": {"threads": 2}}, "ios"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, captured.err
    assert "android/executorch has no option 'threads'" in errors[0]
    assert "student.layers [2, 7]" in errors[1] and "compress.prune.heads 0.2" in errors[2]
    assert captured.out == "" and "Traceback" not in captured.err
    assert not (tmp_path / "run").exists()


def test_finetune_stage_is_refused_before_any_work(tmp_path, base, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_set(base, "student.layers", [0, 4])))
    assert main(["finetune", "--recipe", str(recipe), "--out", str(tmp_path / "ft")]) == 1
    assert "student.layers [0, 4]" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_relative_teacher_folder_is_read_from_the_recipe_folder_by_the_stage(tmp_path, tiny_teacher_dir, small_data,
                                                                              capsys, monkeypatch):
    """teacher.model ../models/teacher, the recipe in project/recipes, the cwd elsewhere: finetune loads it."""
    from edgekd.manifest import read_manifest

    project = tmp_path / "project"
    shutil.copytree(tiny_teacher_dir, project / "models" / "teacher")
    (project / "recipes" / "data").mkdir(parents=True)
    for path in small_data.values():
        shutil.copyfile(path, project / "recipes" / "data" / path.name)
    (project / "recipes" / "r.yaml").write_text(yaml.safe_dump({
        "teacher": {"model": "../models/teacher", "epochs": 1, "batch_size": 32},
        "data": {s: f"data/{p.name}" for s, p in small_data.items()},
        "student": {"layers": [1, 3]}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe("../project/recipes/r.yaml").teacher.model == str((project / "models" / "teacher").resolve())
    assert main(["finetune", "--recipe", "../project/recipes/r.yaml", "--out", "ft"]) == 0, capsys.readouterr().err
    model = read_manifest(elsewhere / "ft")["inputs"]["model"]
    assert model["path"] == str((project / "models" / "teacher").resolve()) and "sha256" in model


def test_the_export_manifest_records_the_asked_spec_and_its_realization(tiny_teacher_dir, tmp_path):
    """ios/coreml realizes int8 as int8-weights: the manifest says both, the variant name the realized one."""
    from edgekd.data import Dataset, Split
    from edgekd.manifest import read_manifest, write_stage
    from edgekd.report import collect
    from edgekd.targets.export import export_artifact

    from conftest import make_rows

    stage_dir = tmp_path / "stage" / "finetune"
    with write_stage(stage_dir, "finetune", {}) as stage:
        for file in Path(tiny_teacher_dir).iterdir():
            shutil.copyfile(file, stage.path / file.name)
        stage.extra["max_length"] = 16
    rows = {n: make_rows(8, seed) for n, seed in (("train", 1), ("validation", 2), ("test", 3))}
    dataset = Dataset(*(Split([r["text"] for r in rows[n]], [r["label"] for r in rows[n]]) for n in rows),
                      ["negative", "neutral", "positive"])
    recipe = recipe_from_dict({"teacher": {"model": str(tiny_teacher_dir)}, "targets": ["ios"]})
    (variant,) = [v for v in variant_plan(recipe) if v.role == "compressed"]
    assert (variant.name, variant.spec.name, variant.asked) == ("student-int8-weights-ios-coreml", "int8-weights",
                                                                "int8")
    out = tmp_path / "run" / "export" / variant.name
    export_artifact(stage_dir, "finetune", variant.fmt, variant.spec, dataset, out, "compressed", "tiny",
                    options=variant.options, asked=variant.asked)
    manifest = read_manifest(out)
    assert manifest["quant"]["name"] == "int8-weights" and manifest["quant_asked"] == "int8"
    assert manifest["artifact"] == "tiny_coreml_int8weights.mlpackage"
    (shown,) = collect(tmp_path / "run")["variants"]  # the report names both
    assert shown["name"] == variant.name and shown["title"].endswith(", int8-weights (for int8)")
    # A second target in the same run: every column's title says which target and format its file is for.
    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format

    export_artifact(stage_dir, "finetune", get_format("android", "executorch"), get_spec("fp32"), dataset,
                    tmp_path / "run" / "export" / "teacher-fp32-android-executorch", "teacher", "tiny")
    titles = {v["name"]: v["title"] for v in collect(tmp_path / "run")["variants"]}
    assert titles == {variant.name: "Student, int8-weights (for int8), ios/coreml",
                      "teacher-fp32-android-executorch": "Teacher (fine-tuned), android/executorch"}


def test_full_int8_of_a_gelu_model_on_tflite_micro_is_refused_before_training_and_the_fix_works(base):
    """compress.quant int8 means embedded/tflm's int8-static, which a GELU model cannot have: the pre-flight
    says so from the teacher's config.json (hidden_act), and the fix it names passes."""
    data = _set(_set(base, "compress.quant", ["int8"]), "targets", [{"target": "embedded"}])
    lines = _problems(data)
    assert len(lines) == 1 and "embedded/tflm cannot realize 'int8-static' for a model with hidden_act gelu" in lines[0]
    fix = re.search(r"(\{target: embedded, format: tflm, quant: \[fp32\]\})", lines[0]).group(1)
    plan = preflight(recipe_from_dict(_set(data, "targets", [yaml.safe_load(fix)])))
    assert [v.name for v in plan] == ["teacher-fp32-embedded-tflm", "student-fp32-embedded-tflm"]
