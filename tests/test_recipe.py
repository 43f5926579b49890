"""The recipe: built-in defaults, round trips, unknown keys, types, value ranges and paths."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from edgekd.errors import RecipeError
from edgekd.recipe import RECIPE_VERSION, Recipe, builtin_recipe, builtin_recipe_text, load_recipe, recipe_from_dict


def _with(path: str, value) -> dict:
    """A recipe dict with one dotted key set, e.g. _with("student.alpha", 2)."""
    data: dict = {}
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _error(data) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return str(info.value)


# --- the built-in recipe ----------------------------------------------------------------------

def test_builtin_recipe_loads_with_typed_values():
    recipe = builtin_recipe()
    assert recipe.version == RECIPE_VERSION
    assert recipe.name == "finsent"
    assert recipe.teacher.model == "builtin:all-MiniLM-L6-v2"
    assert recipe.teacher.learning_rate == pytest.approx(5e-5) and isinstance(recipe.teacher.learning_rate, float)
    assert isinstance(recipe.teacher.epochs, float)          # written as the int 4
    assert recipe.student.layers is None  # half the teacher's: [1, 3, 5] of the built-in's 6 (test_student.py)
    assert recipe.data.max_length is None
    assert recipe.data.train == "builtin:finsent/train.csv"
    assert [(t.target, t.format) for t in recipe.targets] == [("android", "executorch")]
    assert recipe.compress.quant == ["int8"]
    assert Path(recipe.base_dir) == Path.cwd().resolve()


def test_builtin_recipe_matches_dataclass_defaults():
    """The shipped YAML and the dataclass defaults describe the same pipeline."""
    recipe = builtin_recipe()
    assert recipe.to_dict() == Recipe().to_dict()


def test_printed_recipe_round_trips_through_yaml(tmp_path, capsys):
    from edgekd.cli import main

    assert main(["demo", "--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == builtin_recipe_text().strip()
    file = tmp_path / "my.yaml"
    file.write_text(printed)
    loaded = load_recipe(file)
    expected = builtin_recipe()
    assert loaded.to_dict() == expected.to_dict()
    loaded.base_dir = expected.base_dir
    assert loaded == expected


def test_to_dict_round_trips_a_non_default_recipe(tmp_path):
    data = {
        "version": 1, "name": "tiny", "seed": 7,
        "teacher": {"model": "models/teacher", "epochs": 2, "batch_size": 16, "learning_rate": 1e-3},
        "data": {"train": "train.csv", "validation": None, "test": "test.jsonl", "encoding": "latin-1",
                 "format": "csv", "split_fractions": [0.1, 0.2], "max_length": 64},
        "student": {"layers": [1, 3], "temperature": 4.0, "alpha": 0.9, "trim_vocab": False, "vocab_margin": 100},
        "compress": {"quant": ["int8", "int8-static"]},
        "targets": [{"target": "android", "format": "executorch"}, {"target": "ios", "format": "coreml"}],
        "bench": {"iterations": 5, "warmup": 1, "threads": 2},
    }
    recipe = recipe_from_dict(data, tmp_path)
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), tmp_path)
    assert again == recipe
    assert "base_dir" not in recipe.to_dict()
    assert again.student.vocab_margin == 100 and again.data.split_fractions == [0.1, 0.2]


def test_empty_mapping_gives_defaults():
    assert recipe_from_dict({}).to_dict() == Recipe().to_dict()


# --- unknown keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("data, path, suggestion", [
    ({"studnet": {}}, "studnet", "student"),
    ({"student": {"temprature": 2.0}}, "student.temprature", "temperature"),
    ({"teacher": {"learning_rte": 1e-4}}, "teacher.learning_rte", "learning_rate"),
    ({"data": {"text_colum": "x"}}, "data.text_colum", "text_column"),
    ({"targets": [{"target": "android", "formt": "executorch"}]}, "targets[0].formt", "format"),
])
def test_unknown_key_names_path_and_suggests(data, path, suggestion):
    message = _error(data)
    assert f"unknown key '{path}'" in message
    assert f"did you mean '{suggestion}'" in message
    assert "known:" in message


def test_unknown_key_without_close_match_lists_known_keys():
    message = _error({"zzzzzz": 1})
    assert "did you mean" not in message
    assert "student" in message and "teacher" in message


def test_base_dir_is_not_a_recipe_key():
    assert "unknown key 'base_dir'" in _error({"base_dir": "/tmp"})


# --- wrong types -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, value, expected", [
    ("teacher.batch_size", "16", "teacher.batch_size must be int"),        # string for int
    ("seed", "0", "seed must be int"),
    ("data.text_column", ["text"], "data.text_column must be str"),       # list for str
    ("name", ["a"], "name must be str"),
    ("bench.iterations", True, "bench.iterations must be int"),            # bool for int
    ("student.batch_size", False, "student.batch_size must be int"),
    ("student.temperature", True, "student.temperature must be float"),     # bool for float
    ("teacher.learning_rate", "fast", "teacher.learning_rate must be float"),
    ("student.trim_vocab", 1, "student.trim_vocab must be bool"),           # int for bool
    ("student.trim_vocab", "yes please", "student.trim_vocab must be bool"),
    ("data.max_length", 64.0, "data.max_length must be int"),               # float for int
    ("data.validation", 3, "data.validation must be str"),                  # optional str
    ("student.layers", "2,5", "student.layers must be a list"),
    ("student.layers", [1, "3"], "student.layers[1] must be int"),
    ("data.split_fractions", [0.1, "x"], "data.split_fractions[1] must be float"),
    ("compress.quant", "int8", "compress.quant must be a list"),
    ("student", 5, "student must be a mapping"),
    ("targets", {"target": "android"}, "targets must be a list"),
])
def test_wrong_type_names_the_key_path(path, value, expected):
    assert expected in _error(_with(path, value))


def test_targets_item_must_be_mapping_or_a_name():
    assert "targets[1] must be a mapping, not int" in _error({"targets": [{"target": "android"}, 3]})


def test_bare_target_names_take_each_targets_default_format():
    from edgekd.tasks.classification import variant_plan

    recipe = recipe_from_dict({"targets": ["android", "ios", "embedded", {"target": "ios", "format": "coreml"}]})
    assert [(t.target, t.format) for t in recipe.targets] == [("android", None), ("ios", None), ("embedded", None),
                                                               ("ios", "coreml")]
    formats = {f"{v.fmt.target}/{v.fmt.name}" for v in variant_plan(recipe)}
    assert formats == {"android/executorch", "ios/coreml", "embedded/tflm"}


def test_empty_targets_is_refused_when_read():
    line = _error({"targets": []})
    assert line.startswith("targets is empty; list at least one")
    recipe_from_dict({"targets": ["android"]})  # the fix the line suggests


def test_top_level_must_be_mapping():
    assert "must be a mapping" in _error(["version", 1])


# --- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0, 0.0, -1.0])
def test_non_positive_temperature(temperature):
    assert "student.temperature must be > 0" in _error(_with("student.temperature", temperature))


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 5])
def test_alpha_outside_unit_interval(alpha):
    assert "student.alpha" in _error(_with("student.alpha", alpha))


@pytest.mark.parametrize("alpha", [0, 0.0, 1, 1.0, 0.25])
def test_alpha_bounds_are_allowed(alpha):
    assert recipe_from_dict(_with("student.alpha", alpha)).student.alpha == alpha


def test_empty_layers():
    assert "student.layers" in _error(_with("student.layers", []))


@pytest.mark.parametrize("path, value, expected", [
    ("teacher.epochs", 0, "teacher.epochs must be > 0"),
    ("teacher.batch_size", -4, "teacher.batch_size must be > 0"),
    ("student.learning_rate", 0.0, "student.learning_rate must be > 0"),
    ("bench.iterations", 0, "bench.iterations must be > 0"),
    ("data.max_length", 4, "data.max_length"),
    ("data.max_length", 1024, "data.max_length"),
    ("data.split_fractions", [0.15], "data.split_fractions"),
    ("data.split_fractions", [0.0, 0.2], "data.split_fractions"),
    ("data.split_fractions", [0.5, 0.2], "data.split_fractions"),
])
def test_out_of_range_values(path, value, expected):
    assert expected in _error(_with(path, value))


@pytest.mark.parametrize("fmt", ["xml", "CSV", "parquet", ""])
def test_bad_data_format(fmt):
    assert "data.format" in _error(_with("data.format", fmt))


@pytest.mark.parametrize("fmt", ["auto", "csv", "tsv", "jsonl"])
def test_good_data_format(fmt):
    assert recipe_from_dict(_with("data.format", fmt)).data.format == fmt


@pytest.mark.parametrize("version, expected", [(2, "version 2 is not supported"), (0, "version 0"),
                                               ("1", "version must be int"), (True, "version must be int")])
def test_bad_version(version, expected):
    assert expected in _error({"version": version})


# --- files and paths -------------------------------------------------------------------------

def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    (folder / "r.yaml").write_text(yaml.safe_dump({
        "teacher": {"model": "../models/teacher"},
        "data": {"train": "data/train.csv", "validation": "/abs/val.csv", "test": None}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(Path("..") / "project" / "recipes" / "r.yaml")
    assert Path(recipe.base_dir) == folder.resolve()
    assert recipe.resolve(recipe.data.train) == str((folder / "data" / "train.csv").resolve())
    assert recipe.resolve(recipe.teacher.model) == str((tmp_path / "project" / "models" / "teacher").resolve())
    assert recipe.resolve(recipe.data.validation) == str(Path("/abs/val.csv"))
    assert recipe.resolve(recipe.data.test) is None
    assert recipe.resolve("builtin:finsent/train.csv") == "builtin:finsent/train.csv"


def test_model_paths_are_resolved_when_read(tmp_path, monkeypatch):
    """teacher.model / student.model: a folder beside the recipe is found from any cwd; a hub id stays one."""
    (tmp_path / "recipes" / "models" / "student").mkdir(parents=True)
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump({
        "teacher": {"model": "org/model"}, "student": {"model": "models/student"}}))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("recipes/r.yaml")
    assert recipe.teacher.model == "org/model"
    assert recipe.student.model == str((tmp_path / "recipes" / "models" / "student").resolve())
    assert recipe_from_dict({"teacher": {"model": "./org/model"}}, tmp_path).teacher.model == \
        str(tmp_path.resolve() / "org" / "model")  # not a hub id: a path, even where nothing is yet
    assert recipe_from_dict({}).teacher.model == "builtin:all-MiniLM-L6-v2"


def test_a_recipe_that_is_a_folder_or_unreadable_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="is a folder, not a YAML file; give the recipe file itself"):
        load_recipe(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\n")
    real = Path.read_text

    def unreadable(self, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        if self == recipe:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert str(info.value) == (f"cannot read recipe {recipe}: Permission denied; make it readable "
                               f"(e.g. `chmod u+r {recipe}`)")
    monkeypatch.setattr(Path, "read_text", real)  # made readable, as the line says
    assert load_recipe(recipe).name == "mine"


def test_floats_in_exponent_notation_parse(tmp_path):
    file = tmp_path / "r.yaml"
    file.write_text("teacher:\n  learning_rate: 5e-5\nstudent:\n  learning_rate: 1E-3\n  temperature: 3\n"
                    "  alpha: 1e-1\n")
    assert yaml.safe_load(file.read_text())["teacher"]["learning_rate"] == "5e-5"  # why the parser helps
    recipe = load_recipe(file)
    assert recipe.teacher.learning_rate == 5e-5 and isinstance(recipe.teacher.learning_rate, float)
    assert recipe.student.learning_rate == 1e-3
    assert recipe.student.temperature == 3.0 and isinstance(recipe.student.temperature, float)
    assert recipe.student.alpha == pytest.approx(0.1)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_is_one_line_error(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("student:\n  layers: [1, 2\n  alpha: 0.5\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(file)
    assert "not valid YAML" in str(info.value)
    assert "\n" not in str(info.value)


def test_recipe_with_non_utf8_bytes(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(file)


# --- recipe keys named in messages ------------------------------------------------------------

_KEY = re.compile(r"(?<![\w./])(teacher|student|data|compress|bench)\.([a-z_]+(?:\.[a-z_]+)*)")
_NOT_KEYS = {"compress.py", "data.f", "data.int", "compress.lm_prune"}  # file and module names, generated C code


def _is_key(section: str, path: str) -> bool:
    """A key of some task's recipe (classification's Recipe, generation's GenerationRecipe, ...)."""
    from edgekd.tasks import TASKS, get_task

    return any(_is_key_of(get_task(name).RECIPE, section, path) for name in TASKS)


def _is_key_of(recipe_class, section: str, path: str) -> bool:
    import dataclasses
    import typing

    hint = typing.get_type_hints(recipe_class)[section]
    for part in path.split("."):
        options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        cls = next((a for a in options if dataclasses.is_dataclass(a)), None)
        if cls is None or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        hint = typing.get_type_hints(cls)[part]
    return True


def test_every_recipe_key_a_message_names_exists():
    """A fix that names a recipe key must name one the recipe takes (`set student.trim_vocab: false`)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    named = {}
    for folder in ("edgekd", "distill", "compress", "targets", "benchmarks"):
        for file in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    named.update({m.group(0): file.name for m in _KEY.finditer(node.value)})
    assert len(named) > 25  # the scan sees the messages
    unknown = {key: file for key, file in named.items() if key not in _NOT_KEYS and not _is_key(*key.split(".", 1))}
    assert unknown == {}
