"""Each target format scores its QuantSpecs with its own backend, and each pip extra alone runs its target.

The subprocess tests hide packages the way a venv holding one extra lacks them: a `sys.meta_path` finder,
installed before edgekd is imported, raises ImportError for every module of the named distributions
(and `importlib.util.find_spec` finds none of them).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from edgekd.errors import install_command

from conftest import tiny_student_stage

# Modules each extra does not install: [litert] and [embedded] lack ExecuTorch (litert-torch brings torchao);
# [ios] has coremltools only.
NOT_IN = {
    "litert": ["executorch"],
    "ios": ["executorch", "torchao", "litert_torch", "ai_edge_litert", "ai_edge_quantizer", "tflite_micro"],
}

CLI = textwrap.dedent("""
    import importlib.util
    import sys

    hidden = set(sys.argv[1].split(","))

    class Hidden:  # modules of packages this venv lacks: importing them fails as if they were absent
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hidden())
    # and a probe finds nothing, as in a venv without them (transformers probes optional packages so)
    probe = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (
        None if name.split(".")[0] in hidden else probe(name, package))
    from edgekd.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def edgekd_without(hidden: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, ",".join(hidden), *args], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def student(tmp_path_factory, small_data):
    from edgekd.manifest import write_stage

    root = tmp_path_factory.mktemp("backends")
    _, model, tokenizer, dataset = tiny_student_stage(root, small_data, length=16, name="backends")
    with write_stage(root / "student", "distill", {"test": "backends"}) as stage:  # as distill writes it
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        stage.extra.update({"max_length": 16, "labels": dataset.label_names})
    return root, root / "student"


def write_recipe(root, small_data, name: str, targets: list[dict], quant: list[str], **extra) -> str:
    recipe = {"name": name, "data": {k: str(v) for k, v in small_data.items()}, "targets": targets,
              "compress": {"quant": quant}, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("extra, target, fmt, quant, backend", [
    ("litert", "android", "litert", ["int8", "int8-static"], "LiteRT interpreter"),
    ("litert", "embedded", "tflm", ["int8-static"], "LiteRT interpreter"),
    ("ios", "ios", "coreml", ["int8-weights", "int4-weights", "palettize4"], "coremltools.optimize.torch"),
])
def test_compress_runs_with_only_its_targets_extra(student, small_data, extra, target, fmt, quant, backend):
    """Without ExecuTorch (and, for iOS, without torchao and LiteRT), compress scores every spec of the format
    with that format's backend, and the manifest says which backend scored each."""
    root, stage_dir = student
    entry = {"target": target, "format": fmt}
    if "int4-weights" in quant:  # Core ML per-block int4 starts with iOS18 (the pre-flight says so otherwise)
        entry["options"] = {"deployment_target": "iOS18"}
    recipe = write_recipe(root, small_data, f"{target}-{fmt}", [entry], quant)
    out = root / f"compress-{target}-{fmt}"
    done = edgekd_without(NOT_IN[extra], "compress", "--recipe", recipe, "--student", str(stage_dir),
                          "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)
    assert set(metrics["validation"]) == {"fp32", *quant}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["evaluated_by"]) == set(quant)
    assert all(backend in how for how in manifest["evaluated_by"].values()), manifest["evaluated_by"]
    if target == "ios":
        assert all("estimate" in how for how in manifest["evaluated_by"].values())
    for spec in quant:  # a quantized model, not the fp32 one again: its logits (so its calibration) differ
        assert metrics["validation"][spec]["ece"] != metrics["validation"]["fp32"]["ece"]


def test_litert_specs_are_scored_on_the_tflite_the_exporter_writes(student, small_data, tmp_path):
    """android/litert int8: the accuracy compress reports is the LiteRT interpreter's on ai-edge-quantizer's
    .tflite (as export_litert writes it), not the PT2E graph's."""
    import numpy as np

    from edgekd.compress.compress import Compression
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.models import load_classifier, load_tokenizer
    from edgekd.recipe import recipe_from_dict
    from edgekd.targets import get_format
    from edgekd.targets.litert import LiteRTRunner, export_litert

    root, stage_dir = student
    recipe = recipe_from_dict({"data": {k: str(v) for k, v in small_data.items()}})
    model, tokenizer = load_classifier(str(stage_dir)).eval(), load_tokenizer(str(stage_dir))
    spec = get_spec("int8")
    job = Compression(recipe, load_dataset(recipe), model, tokenizer, 16, None, tmp_path,
                      get_format("android", "litert"))
    scored = job.accuracy_of(model, spec)
    export_litert(model, spec, 16, job.calibration, tmp_path / "m.tflite")
    runner = LiteRTRunner(tmp_path / "m.tflite")
    logits = np.concatenate([runner(ids, mask) for ids, mask in job.eval_inputs])
    assert scored["accuracy"] == float((logits.argmax(-1) == np.asarray(job.eval_labels)).mean())
    pytorch = Compression(recipe, load_dataset(recipe), model, tokenizer, 16, None, tmp_path).accuracy_of(model, spec)
    assert job.evaluated_by["int8"] != "PyTorch" and scored != pytorch  # not the PT2E graph's figures


def test_without_executorch_an_executorch_target_fails_in_one_line_before_training(student, small_data):
    """Every target of the recipe is checked before any training: the second one here needs ExecuTorch."""
    root, _ = student
    targets = [{"target": "android", "format": "litert"}, {"target": "android", "format": "executorch"}]
    recipe = write_recipe(root, small_data, "two-targets", targets, ["int8"])
    out = root / "run-without-executorch"
    done = edgekd_without(NOT_IN["litert"], "run", recipe, "--out", str(out))
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "android/executorch needs executorch" in lines[0]
    assert install_command("android") in lines[0]
    assert "Traceback" not in done.stderr and not (out / "finetune").exists()
