"""Compression: structured pruning, every QuantSpec evaluated in PyTorch, and the budget search."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from edgekd.cli import main
from edgekd.compress.prune import HEADS_FIELD, PruneSpec, importance, kept_neurons, prune
from edgekd.compress.quant import SPECS, quantized_module
from edgekd.errors import EdgeKDError, ExportError, RecipeError
from edgekd.manifest import verify_stage
from edgekd.models import load_classifier
from edgekd.targets.graph import ExportWrapper, run_graph


def tiny_bert(layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def batches(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 120, (8, 12), generator=g),
             "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 3, (8,), generator=g)} for _ in range(n)]


def graph_inputs(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 120, (1, 12), generator=g, dtype=torch.int32), torch.ones(1, 12, dtype=torch.int32))
            for _ in range(n)]


def test_pruning_removes_units_physically_and_reloads_exactly(tmp_path):
    model = tiny_bert()
    pruned = prune(model, PruneSpec(heads=0.5, ffn=0.5, layers=1), importance(model, batches()))
    layers = pruned.bert.encoder.layer
    assert len(layers) == 2 and pruned.config.num_hidden_layers == 2
    assert all(layer.attention.self.query.out_features == 2 * 16 for layer in layers)      # 2 of 4 heads
    assert all(layer.intermediate.dense.out_features == 64 for layer in layers)             # half the FFN
    assert getattr(pruned.config, HEADS_FIELD) == [2, 2]
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())

    pruned.save_pretrained(tmp_path)
    reloaded = load_classifier(str(tmp_path))
    inputs = graph_inputs()
    assert torch.equal(run_graph(ExportWrapper(pruned), inputs), run_graph(ExportWrapper(reloaded), inputs))


def test_ffn_and_layer_pruning_loads_with_the_auto_classes(tmp_path):
    model = tiny_bert()
    pruned = prune(model, PruneSpec(ffn=0.5, layers=1), importance(model, batches()))
    pruned.save_pretrained(tmp_path)
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = graph_inputs()
    assert torch.allclose(run_graph(ExportWrapper(pruned), inputs), run_graph(ExportWrapper(auto), inputs))


def test_importance_ranks_a_dead_head_and_a_useless_layer_first():
    model = tiny_bert()
    attention = model.bert.encoder.layer[1].attention.self
    with torch.no_grad():  # head 2 of layer 1 outputs zeros: it cannot matter
        attention.value.weight[32:48] = 0
        attention.value.bias[32:48] = 0
    scores = importance(model, batches())
    assert scores.heads[1, 2] == 0 and scores.heads[1].argmin() == 2
    pruned = prune(model, PruneSpec(heads=0.25), scores)
    kept = pruned.bert.encoder.layer[1].attention.self
    assert torch.equal(kept.value.weight, torch.cat([attention.value.weight[:32], attention.value.weight[48:]]))


def test_pruning_amounts_that_cannot_work_are_refused():
    with pytest.raises(RecipeError, match="would remove every head of a layer"):
        PruneSpec(heads=1.0)
    with pytest.raises(RecipeError, match="fraction"):
        PruneSpec(ffn=-0.1)
    model = tiny_bert(layers=2)
    with pytest.raises(RecipeError, match="would remove every layer"):
        prune(model, PruneSpec(layers=2), importance(model, batches(1)))
    assert kept_neurons(1536, 0.5) == 768 and kept_neurons(1536, 0.3) % 32 == 0 and kept_neurons(100, 0.0) == 100


@pytest.mark.parametrize("name", sorted(SPECS.names()))
def test_every_quant_spec_is_evaluated_in_pytorch(name):
    if name == "palettize4":
        pytest.importorskip("coremltools")
    model = tiny_bert(layers=2)
    inputs = graph_inputs(16)
    reference = run_graph(ExportWrapper(model), inputs)
    spec = SPECS.get(name)
    if spec.group_size and 64 % spec.group_size:
        with pytest.raises(RecipeError, match="choose a group size"):
            quantized_module(model, spec, 12, inputs)
        return
    out = run_graph(quantized_module(model, spec, 12, inputs), inputs)
    assert out.shape == reference.shape and out.dtype == torch.float32
    difference = (out - reference).abs().max().item()
    assert difference == 0 if spec.is_float else 0 < difference < 0.1


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, tiny_teacher_dir, small_data):
    """finetune + distill of the tiny recipe, once for this module."""
    root = tmp_path_factory.mktemp("compress-run")
    recipe = {
        "name": "tiny", "teacher": {"model": str(tiny_teacher_dir), "epochs": 2, "batch_size": 16,
                                    "learning_rate": 1e-3},
        "data": {k: str(v) for k, v in small_data.items()},
        "student": {"layers": [1, 3], "epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "augment": 0},
        "compress": {"quant": ["int8"], "recovery_epochs": 1},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["finetune", "--recipe", str(path), "--out", str(root / "finetune")]) == 0
    assert main(["distill", "--recipe", str(path), "--teacher", str(root / "finetune"),
                 "--out", str(root / "distill")]) == 0
    return root, path


def test_compress_prunes_recovers_and_records_the_plan(distilled_run, capsys):
    root, recipe = distilled_run
    data = yaml.safe_load(recipe.read_text())
    data["compress"]["prune"] = {"heads": 0.5, "ffn": 0.5}
    pruned_recipe = root / "pruned.yaml"
    pruned_recipe.write_text(yaml.safe_dump(data))
    out = root / "compress-pruned"
    assert main(["compress", "--recipe", str(pruned_recipe), "--student", str(root / "distill"),
                 "--teacher", str(root / "finetune"), "--out", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["params"]["after"] < metrics["params"]["before"]
    assert set(metrics["validation"]) == {"fp32", "int8"}
    manifest = verify_stage(out, "compress")
    assert manifest["plan"]["pruning"] == {"heads": 0.5, "ffn": 0.5, "layers": 0}
    model = load_classifier(str(out))
    assert getattr(model.config, HEADS_FIELD) == [2, 2]

    # Pruning without a teacher to recover from: one line, nothing written.
    assert main(["compress", "--recipe", str(pruned_recipe), "--student", str(root / "distill"),
                 "--out", str(root / "no-teacher")]) == 1
    assert "give --teacher" in capsys.readouterr().err
    assert not (root / "no-teacher").exists()


def test_budget_search_keeps_a_front_and_explains_its_choice(distilled_run, capsys, monkeypatch):
    """The real search on the tiny student, cut to one pruning level and int8 so that CI stays fast."""
    from edgekd.compress import search as search_module

    monkeypatch.setattr(search_module, "AXES", ((PruneSpec(ffn=0.5),),))
    root, recipe = distilled_run
    data = yaml.safe_load(recipe.read_text())
    data["compress"]["search_quant"] = ["int8"]
    search_recipe = root / "search.yaml"
    search_recipe.write_text(yaml.safe_dump(data))
    out = root / "compress-search"
    assert main(["compress", "--recipe", str(search_recipe), "--student", str(root / "distill"), "--teacher",
                 str(root / "finetune"), "--budget", "100", "--objective", "size", "--out", str(out), "--json"]) == 0
    search = json.loads(capsys.readouterr().out)["search"]
    names = [c["name"] for c in search["candidates"]]
    assert names == ["fp32", "int8", "prune-ffn50+fp32", "prune-ffn50+int8"]
    measured = {c["name"]: c for c in search["measured"]}
    assert all(c["size_bytes"] > 0 and c["latency_p50_ms"] > 0 for c in measured.values())
    chosen = measured[search["chosen"]]
    assert chosen["size_bytes"] == min(c["size_bytes"] for c in measured.values())
    assert search["chosen"] in search["front"] and "within budget" in search["explanation"]
    plan = verify_stage(out, "compress")["plan"]
    assert plan["quant"][0]["name"] == chosen["quant"]
    assert not list(root.glob(".compress-search.*"))  # the search's checkpoints are gone with the stage complete


class FakeModel:
    def __init__(self, accuracy: float, size: int):
        self.accuracy, self.size = accuracy, size


class FakeJob:
    """What the search sees of a compression job; accuracy falls as more is pruned or quantized."""
    QUANT_COST = {"int8": 0.002, "int4": 0.02}
    QUANT_SIZE = {"fp32": 1.0, "int8": 0.25, "int4": 0.15}

    def __init__(self, workdir, student_accuracy=0.90, teacher_accuracy=0.904):
        self.student = FakeModel(student_accuracy, 1000)
        self.teacher, self.workdir, self.max_length, self.calibration = teacher_accuracy, workdir, 12, []
        self.eval_inputs = [(torch.zeros(1, 12, dtype=torch.int32), torch.ones(1, 12, dtype=torch.int32))]
        self.pruned_levels = []
        self.evaluated_by = {}
        self.refused = set()  # candidate names whose artifact fails the export gate

    def timing_input(self, dynamic):
        return self.eval_inputs[0]

    def check_artifact(self, model, spec, runner, dynamic, name, reference=None):
        if name in self.refused:
            raise ExportError(f"{name} fails parity: top-1 agreement 90.0% with PyTorch < 99%")
        return {"checked": "numerical"}

    def teacher_accuracy(self):
        return self.teacher

    def evaluate(self, model, specs):
        return {"fp32": {"accuracy": model.accuracy}}

    def accuracy_of(self, model, spec, reference=None):
        return {"accuracy": model.accuracy - self.QUANT_COST[spec.name]}

    def pruned(self, level, checkpoints=None):
        self.pruned_levels.append(level.name)
        removed = level.ffn / 2 + level.heads / 2 + 0.4 * level.layers
        return FakeModel(self.student.accuracy - 0.02 * removed, int(1000 * (1 - removed)))


class FakeFormat:
    target, name, suffix, specs = "android", "fake", "bin", ("fp32", "int8", "int4")

    @staticmethod
    def export(model, spec, max_length, calibration, file):
        file.write_bytes(b"x" * int(model.size * FakeJob.QUANT_SIZE[spec.name]))

    @staticmethod
    def runner(file, threads):
        return lambda ids, mask: None


def test_search_order_stops_each_axis_at_its_first_level_over_budget(tmp_path):
    from edgekd.compress.search import search

    job = FakeJob(tmp_path)
    result = search(job, FakeFormat, budget=1.0, objective="size")
    names = [c["name"] for c in result.summary["candidates"]]
    # unpruned specs first (least aggressive first), then the FFN/heads axis until a level fails
    assert names[:3] == ["fp32", "int8", "int4"]
    assert job.pruned_levels == ["ffn25", "ffn50", "heads25-ffn50", "layers1"]
    assert "prune-ffn50+int4" not in names  # int4 failed on the unpruned student: not retried after pruning
    within = [c for c in result.summary["candidates"] if c["drop_points"] <= 1.0]
    assert [c["name"] for c in within] == ["fp32", "int8", "prune-ffn25+fp32", "prune-ffn25+int8", "prune-ffn50+fp32"]
    assert result.summary["chosen"] == "prune-ffn25+int8"  # 875 weights x 0.25: the smallest within budget
    assert result.quant.name == "int8" and result.prune == PruneSpec(ffn=0.25)
    assert set(result.summary["front"]) <= {c["name"] for c in result.summary["measured"]}


def test_search_with_nothing_in_budget_reports_the_closest_and_fails(tmp_path, capsys):
    from edgekd.compress.search import search
    from edgekd.errors import EdgeKDError

    with pytest.raises(EdgeKDError, match="no candidate stays within 0.5 points.*the closest, fp32, loses 3.00"):
        search(FakeJob(tmp_path, student_accuracy=0.87, teacher_accuracy=0.90), FakeFormat, 0.5, "latency")
    assert "best outside the budget: fp32" in capsys.readouterr().err


def test_a_rerun_reads_the_search_back_from_its_checkpoints(tmp_path, monkeypatch, capsys):
    """Unpruned candidates only: every result, a skip and the timing round are read back by a rerun, which
    evaluates again only the one result it cannot read, and exports and times nothing again.
    (The SIGKILL test in tests/test_resume.py covers pruned levels and their recovery.)"""
    from edgekd.compress import search as search_module

    class CountingJob(FakeJob):
        def accuracy_of(self, model, spec, reference=None):
            self.evaluated.append(spec.name)
            if spec.group_size == 128:
                raise RecipeError("int4-g128: choose a group size that divides 64")
            return super().accuracy_of(model, spec, reference)

        def evaluate(self, model, specs):
            self.evaluated.append("fp32")
            return super().evaluate(model, specs)

        def teacher_accuracy(self):
            self.evaluated.append("teacher")
            return super().teacher_accuracy()

    exports = []
    export = FakeFormat.export
    monkeypatch.setattr(search_module, "AXES", ())
    monkeypatch.setattr(FakeFormat, "specs", (*FakeFormat.specs, "int4-g128"))
    monkeypatch.setattr(FakeFormat, "export", staticmethod(lambda *args: (exports.append(args[-1].name),
                                                                           export(*args))))
    folder = tmp_path / "checkpoints"
    runs = []
    for attempt in range(2):
        job = CountingJob(tmp_path)
        job.evaluated = []
        runs.append((search_module.search(job, FakeFormat, 1.0, "latency", checkpoints=folder), job.evaluated,
                     len(exports), capsys.readouterr().err))
        if attempt == 0:
            (folder / "results" / "int8.json").write_text("{")  # unreadable: evaluated again, not a failure
    (first, evaluated, exported, _), (again, reevaluated, exported_again, err) = runs
    assert evaluated == ["teacher", "fp32", "int8", "int4", "int4-g128"] and exported == 2
    assert reevaluated == ["int8"] and exported_again == exported
    assert "resuming search: 2 of at most 4 candidates done" in err
    assert "int4-g128 after prune-none: skipped (int4-g128: choose a group size" in err
    assert "reusing the sizes and timings of the 2 candidates" in err
    assert again.summary == first.summary and again.summary["measured"][0]["latency_p50_ms"] is not None


def test_a_negative_budget_is_refused(distilled_run, capsys):
    root, recipe = distilled_run
    assert main(["compress", "--recipe", str(recipe), "--student", str(root / "distill"), "--teacher",
                 str(root / "finetune"), "--budget", "-1", "--out", str(root / "neg")]) == 1
    assert "must be >= 0" in capsys.readouterr().err and not (root / "neg").exists()


def test_quantization_aware_distillation_trains_a_float_student_for_its_spec(distilled_run, capsys):
    """compress.qat_epochs with int4: the student trains under torchao's fake int4 quantization and is saved
    as a plain float model (no fake quantizers left) whose weights moved; the plan records it."""
    root, recipe = distilled_run
    data = yaml.safe_load(recipe.read_text())
    data["compress"].update({"quant": ["int4"], "qat_epochs": 1})
    qat_recipe = root / "qat.yaml"
    qat_recipe.write_text(yaml.safe_dump(data))
    out = root / "compress-qat"
    assert main(["compress", "--recipe", str(qat_recipe), "--student", str(root / "distill"),
                 "--teacher", str(root / "finetune"), "--out", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["validation"]) == {"fp32", "int4"}
    assert verify_stage(out, "compress")["plan"]["qat_epochs"] == 1
    trained = AutoModelForSequenceClassification.from_pretrained(out)  # plain modules: the Auto classes load it
    assert {type(m).__name__ for m in trained.modules()} & {"FakeQuantizedLinear", "FakeQuantizedEmbedding"} == set()
    student = load_classifier(str(root / "distill"))
    pairs = zip(student.state_dict().values(), trained.state_dict().values())
    moved = [not torch.equal(a, b) for a, b in pairs]
    assert sum(moved) > len(moved) / 2
    assert not list(root.glob(".compress-qat.*"))  # its training checkpoints are gone with the stage complete

    # One spec only, and a teacher to learn from: each refused in one line, nothing written.
    data["compress"]["quant"] = ["int8", "int4"]
    qat_recipe.write_text(yaml.safe_dump(data))
    assert main(["compress", "--recipe", str(qat_recipe), "--student", str(root / "distill"),
                 "--teacher", str(root / "finetune"), "--out", str(root / "qat-two")]) == 1
    assert "list exactly one" in capsys.readouterr().err and not (root / "qat-two").exists()
    data["compress"]["quant"] = ["int8-static"]
    qat_recipe.write_text(yaml.safe_dump(data))
    assert main(["compress", "--recipe", str(qat_recipe), "--student", str(root / "distill"),
                 "--teacher", str(root / "finetune"), "--out", str(root / "qat-static")]) == 1
    assert "not int8-static" in capsys.readouterr().err and not (root / "qat-static").exists()


def test_search_tries_quantization_aware_training_for_a_spec_over_budget(tmp_path, monkeypatch):
    """int4 misses the budget after post-training quantization; with qat_epochs it is tried once more after
    quantization-aware training (here a stand-in that wins back 80 % of the quantization loss) and can be chosen."""
    from edgekd.compress import search as search_module

    trained = []

    def fake_qat(job, model, spec, epochs, checkpoints=None):
        trained.append((spec.name, epochs))
        return FakeModel(model.accuracy + 0.8 * FakeJob.QUANT_COST[spec.name], model.size)

    monkeypatch.setattr(search_module, "quantization_aware", fake_qat)
    monkeypatch.setattr(search_module, "AXES", ())
    result = search_module.search(FakeJob(tmp_path), FakeFormat, budget=1.0, objective="size", qat_epochs=2)
    names = [c["name"] for c in result.summary["candidates"]]
    assert names == ["fp32", "int8", "int4", "int4+qat"] and trained == [("int4", 2)]
    assert result.summary["chosen"] == "int4+qat" and result.qat and result.quant.name == "int4"
    without = search_module.search(FakeJob(tmp_path), FakeFormat, budget=1.0, objective="size")
    assert without.summary["chosen"] == "int8" and not without.qat and len(trained) == 1


def test_the_budget_can_count_from_the_uncompressed_student(tmp_path):
    """A student already 2 points below the teacher: nothing is within 1 point of the teacher, but counted
    from the student (`budget_from: student`) its own fp32 loses nothing and int8 fits."""
    from edgekd.compress.search import search
    from edgekd.errors import EdgeKDError

    with pytest.raises(EdgeKDError, match="within 1.0 points of the teacher's"):
        search(FakeJob(tmp_path, student_accuracy=0.88, teacher_accuracy=0.90), FakeFormat, 1.0, "size")
    result = search(FakeJob(tmp_path, student_accuracy=0.88, teacher_accuracy=0.90), FakeFormat, 1.0, "size",
                    budget_from="student")
    drops = {c["name"]: c["drop_points"] for c in result.summary["candidates"]}
    assert drops["fp32"] == 0 and drops["int8"] == pytest.approx(0.2)
    assert result.summary["reference_accuracy"] == 0.88 and result.summary["teacher_accuracy"] == 0.90
    assert result.summary["budget_from"] == "student" and result.summary["chosen"].endswith("int8")


def test_a_changed_student_training_field_reruns_a_compress_that_retrains(distilled_run, capsys):
    """Recovery distillation reads student.temperature, alpha, learning_rate and batch_size: a change reruns it."""
    root, recipe = distilled_run
    data = yaml.safe_load(recipe.read_text())
    data["compress"].update({"prune": {"ffn": 0.5}, "recovery_epochs": 0.5})
    changed = root / "retrain.yaml"
    out = root / "compress-retrain"

    def compress_with(student: dict) -> dict:
        data["student"].update(student)
        changed.write_text(yaml.safe_dump(data))
        assert main(["compress", "--recipe", str(changed), "--student", str(root / "distill"),
                     "--teacher", str(root / "finetune"), "--out", str(out)]) == 0
        return verify_stage(out, "compress")

    first = compress_with({})
    assert compress_with({}) == first  # the same recipe: skipped as done, the manifest untouched
    for field, value in (("temperature", 4.0), ("alpha", 0.9), ("learning_rate", 5e-4), ("batch_size", 8)):
        again = compress_with({field: value})
        assert again["key"] != first["key"] and again["params"]["student"][field] == value, field
        first = again


def test_search_exports_with_the_target_options_and_never_chooses_a_candidate_its_gate_refuses(tmp_path, capsys):
    """The target's options reach every candidate's export, and the smallest candidate within budget, whose
    artifact fails the export stage's parity gate, is skipped with its reason: the next best is chosen."""
    from edgekd.compress.search import search

    seen = []

    class OptionsFormat(FakeFormat):
        @staticmethod
        def export(model, spec, max_length, calibration, file, **options):
            seen.append((spec.name, options))
            FakeFormat.export(model, spec, max_length, calibration, file)

    job = FakeJob(tmp_path)
    job.refused = {"prune-ffn25+int8"}  # the size winner of test_search_order_stops_each_axis_...
    result = search(job, OptionsFormat, budget=1.0, objective="size", options={"dynamic_length": True})
    assert seen and all(options == {"dynamic_length": True} for _, options in seen)
    rows = {c["name"]: c for c in result.summary["measured"]}
    assert "fails parity" in rows["prune-ffn25+int8"]["skipped"]
    assert result.summary["chosen"] == "int8" and "prune-ffn25+int8" not in result.summary["front"]
    assert "prune-ffn25+int8: skipped (prune-ffn25+int8 fails parity" in capsys.readouterr().err

    job.refused = {row["name"] for row in result.summary["measured"]}  # nothing passes: one line, no winner
    with pytest.raises(EdgeKDError, match="every candidate within 1.0 points fails the export's gate"):
        search(job, OptionsFormat, budget=1.0, objective="size")


def test_search_candidates_take_the_target_options_and_its_gate(distilled_run, tmp_path, monkeypatch):
    """The real search on android/executorch with `dynamic_length: true`: each candidate's .pte takes a short
    input, and an int8 candidate whose runtime output is wrong (logits shifted) fails the export's parity
    gate and is not chosen, though it is the smallest."""
    import dataclasses

    from edgekd.compress import search as search_module
    from edgekd.compress.compress import compress
    from edgekd.data import load_dataset
    from edgekd.recipe import load_recipe
    from edgekd.targets import get_format
    from edgekd.targets.executorch import ExecuTorchRunner

    monkeypatch.setattr(search_module, "AXES", ())
    root, recipe_path = distilled_run
    recipe = load_recipe(recipe_path)
    recipe.compress.budget, recipe.compress.objective, recipe.compress.search_quant = 100.0, "size", ["int8"]
    real = get_format("android", "executorch")
    quant_of, short = {}, {}

    def export(model, spec, max_length, calibration, file, **options):
        quant_of[file.name] = spec.name
        return real.export(model, spec, max_length, calibration, file, **options)

    def runner(file, threads):
        loaded = ExecuTorchRunner(file, threads)
        ids = torch.tensor([[101, 2054, 2003, 102]], dtype=torch.int32)  # 4 tokens, max_length is longer
        short[quant_of[file.name]] = loaded(ids, torch.ones_like(ids)).shape
        # int8: a broken export, as a wrong bias would make it (negating this untrained model's near-zero
        # logits would move them less than XNNPACK's own rounding does on a trained model)
        return loaded if quant_of[file.name] == "fp32" else lambda ids, mask: loaded(ids, mask) + 10.0

    fmt = dataclasses.replace(real, export=export, runner=runner)
    metrics = compress(recipe, load_dataset(recipe), root / "distill", tmp_path / "compress", root / "finetune",
                       fmt, {"dynamic_length": True})
    search = metrics["search"]
    assert short == {"fp32": (1, 3), "int8": (1, 3)}  # both took 4 tokens: exported with dynamic_length
    rows = {c["name"]: c for c in search["measured"]}
    assert "fails parity" in rows["int8"]["skipped"] and "skipped" not in rows["fp32"]
    assert rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"] and search["chosen"] == "fp32"
