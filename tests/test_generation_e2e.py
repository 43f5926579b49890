"""The text-generation chain end to end on a tiny random decoder: fine-tune, prune + distill, three .pte
variants gated against their own references, bench, report; a rerun reuses every stage; the budget search."""
import contextlib
import csv
import io
import json

import pytest

from edgekd.cli import main
from edgekd.lm_data import FINSENT_TEMPLATE

from conftest import make_rows, write_csv
from lm_tiny import tiny_bpe_tokenizer, tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    splits = {name: make_rows(n, seed) for name, n, seed in (("train", 48, 1), ("validation", 12, 2), ("test", 12, 3))}
    for name, rows in splits.items():
        write_csv(root / f"{name}.csv", rows)
    texts = [FINSENT_TEMPLATE] + [r["text"] + " " + r["label"] for rows in splits.values() for r in rows]
    teacher = tiny_llama(vocab_size=320, layers=4)
    teacher.save_pretrained(root / "teacher")
    tiny_bpe_tokenizer(texts).save_pretrained(root / "teacher")
    recipe = {
        "task": "text-generation", "name": "tiny-lm",
        "teacher": {"model": "teacher", "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "lora_rank": 4},
        "data": {"train": "train.csv", "validation": "validation.csv", "test": "test.csv", "max_length": 112},
        "student": {"layers": 2, "ffn": 0.5, "kv_groups": 1, "hidden": 0.5, "calibration": 8, "top_k": 16,
                    "epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "compress": {"quant": ["fp32", "int4"]}, "max_seq_len": 128,
        "targets": ["android", {"target": "android", "format": "litert"}, "ios"],
        "bench": {"prompt_lengths": [8, 16], "new_tokens": 4, "rounds": 1, "prompts": 2, "threads": 1},
    }
    import yaml
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def lm_run(lm_recipe):
    """The chain run once for the module: (run folder, its --json summary)."""
    out, printed = lm_recipe / "run", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(lm_recipe / "recipe.yaml"), "--out", str(out), "--json"]) == 0
    return out, json.loads(printed.getvalue())


def test_the_generation_chain_runs_and_reports(lm_recipe, lm_run, capsys):
    out, summary = lm_run
    names = [v["name"] for v in summary["variants"]]
    assert names[0] == "teacher-fp32-android-executorch" and sorted(names[1:]) == [
        "student-fp32-android-executorch", "student-fp32-android-litert", "student-fp32-ios-coreml",
        "student-int4-android-executorch", "student-int4-android-litert", "student-int4-ios-coreml"]
    variants = {v["name"]: v for v in summary["variants"]}
    teacher, student, int4 = (variants[f"{n}-android-executorch"] for n in ("teacher-fp32", "student-fp32",
                                                                             "student-int4"))
    assert int4["size_bytes"] < student["size_bytes"] < teacher["size_bytes"]
    for v in summary["variants"]:  # a Core ML package runs on a Mac or an iPhone only: no speed measured here
        assert v["parity"]["passed"] and (v["format"] == "coreml-llm") == (v["decode_tokens_per_s"] is None)
        assert v["perplexity"] > 1 and 0 <= v["task_accuracy"]["accuracy"] <= 1
    distill = json.loads((out / "distill" / "manifest.json").read_text())
    finetune = json.loads((out / "finetune" / "manifest.json").read_text())
    # An fp32 .pte computes its model (the gate holds it to 1e-4): its quality is its source stage's, not remeasured.
    assert teacher["perplexity"] == finetune["metrics"]["test"]["perplexity"]["perplexity"]
    assert student["perplexity"] == distill["metrics"]["test"]["perplexity"]["perplexity"]
    # What int4 cost is measured against the same student on the same records, and the gate held to its own bound.
    assert int4["float_perplexity"] == student["perplexity"] and student["float_perplexity"] is None
    assert int4["parity"]["worst_logit_diff"] <= int4["parity"]["logit_tolerance"]
    assert distill["plan"]["layers"]["of"] == 4 and len(distill["plan"]["layers"]["kept"]) == 2
    assert distill["plan"]["mlp"]["kept"] == 64
    # Width pruned by the recipe's student.kv_groups and student.hidden, and the .pte files built from that shape.
    student_config = json.loads((out / "distill" / "config.json").read_text())
    assert (student_config["num_key_value_heads"], student_config["num_attention_heads"]) == (1, 2)
    assert student_config["hidden_size"] == 32 and {"attention", "hidden"} <= set(distill["plan"])
    ratios = {(r["variant"], r["over"]) for r in summary["ratios"]}
    assert ("student-int4-android-executorch", "teacher-fp32-android-executorch") in ratios
    report = (out / "report.md").read_text()
    assert "Decode tokens/s" in report and "Task accuracy" in report and "Stage wall times: finetune" in report
    assert "Perplexity change from quantization" in report and "Export gate" in report
    assert "data.unlabeled" not in report and summary["transfer_set"] is None  # no transfer set beyond the records
    pte = out / "export" / "student-int4-android-executorch"
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in pte.iterdir()}
    # android/litert: the .litertlm alone (its gate's .tflite and LiteRT-LM's weight cache not kept), gated in
    # LiteRT and checked in LiteRT-LM; its quality that of its own reference, its speed beside the .pte's.
    litert_fp32, litert_int4 = variants["student-fp32-android-litert"], variants["student-int4-android-litert"]
    assert litert_fp32["perplexity"] == litert_int4["float_perplexity"] == student["perplexity"]
    for quant in ("fp32", "int4"):
        folder = out / "export" / f"student-{quant}-android-litert"
        assert {p.suffix for p in folder.iterdir()} <= {".litertlm", ".json", ""}, list(folder.iterdir())
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["params"]["format"] == "litert-lm" and manifest["metrics"]["parity"]["litert_lm"]["passed"]
    runtime_ratios = {r["variant"]: r for r in summary["runtime_ratios"]}
    assert set(runtime_ratios) == {"student-fp32-android-litert", "student-int4-android-litert"}
    assert runtime_ratios["student-int4-android-litert"]["over"] == "student-int4-android-executorch"
    assert runtime_ratios["student-int4-android-litert"]["decode_speedup"] > 0
    assert "(LiteRT-LM over ExecuTorch: the same model and spec, interleaved in one run)" in report
    # ios/coreml: a stateful iOS 18 package, its wrapper proven and its structure checked; fp32 stored as fp16
    coreml = json.loads((out / "export" / "student-int4-ios-coreml" / "manifest.json").read_text())
    assert coreml["params"]["format"] == "coreml-llm" and all(coreml["metrics"]["parity"]["structural"].values())
    assert coreml["coreml"]["deployment_target"] == "iOS18" and coreml["artifact"].endswith(".mlpackage")
    assert variants["student-int4-ios-coreml"]["size_bytes"] < variants["student-fp32-ios-coreml"]["size_bytes"]
    assert "quality of a Core ML package is an estimate" in report

    # A rerun finds every stage done.
    assert main(["run", str(lm_recipe / "recipe.yaml"), "--out", str(out)]) == 0
    assert "finetune ..." in capsys.readouterr().err


def test_edgekd_bench_measures_decoder_exports_in_tokens_per_second_beside_eager(lm_run, tmp_path, capsys):
    """`edgekd bench` on the chain's decoder exports: the host's decoder bench, --baselines torch adding PyTorch
    eager fp32 of each export's source model, ratios from the same run."""
    out, _ = lm_run
    exports = [out / "export" / name for name in ("teacher-fp32-android-executorch",
                                                  "student-int4-android-executorch")]
    bench_dir = tmp_path / "bench"
    assert main(["bench", *map(str, exports), "--baselines", "torch", "--rounds", "1", "--threads", "1",
                 "--prompt-tokens", "8", "--new-tokens", "3", "--out", str(bench_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schema"] == "edgekd.bench-llm/1" and result["complete"] is True
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"teacher-fp32-android-executorch", "student-int4-android-executorch",
                         "tiny-lm-teacher-fp32-eager", "tiny-lm-student-fp32-eager"}
    assert rows["tiny-lm-student-fp32-eager"]["path"] == str((out / "distill").resolve())
    assert all(r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    kinds = {(r["variant"], r["over"]): r["kind"] for r in result["ratios"]}
    assert kinds[("student-int4-android-executorch", "tiny-lm-student-fp32-eager")] == "executorch over eager"
    assert main(["bench", str(exports[0]), "--baselines", "onnxruntime", "--out", str(tmp_path / "b2")]) == 1
    assert "decoder exports take only --baselines torch" in capsys.readouterr().err
    # `edgekd report` of the run is the generation report; of a decoder bench directory alone, one line.
    assert main(["report", str(out), "--out", str(tmp_path / "report"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "edgekd.report-llm/1"
    assert "Decode tokens/s" in (tmp_path / "report" / "report.md").read_text()
    assert main(["report", str(bench_dir)]) == 1
    assert "their report is their run's: `edgekd report RUN`" in capsys.readouterr().err


def test_a_decoder_bundle_verifies_as_the_app_would_run_it(lm_recipe, lm_run, tmp_path, capsys, monkeypatch):
    """`edgekd bundle` of the int4 and fp32 students: model, tokenizer.json, generation.json (the prompt format),
    Kotlin/Swift/C++ calling code; `--verify` feeds pytorch-tokenizers' ids to the .pte and compares its greedy
    tokens with its reference's."""
    out, _ = lm_run
    recipe = str(lm_recipe / "recipe.yaml")
    for quant, platform in (("int4", "android"), ("fp32", "ios")):
        bundle = tmp_path / f"bundle-{quant}"
        assert main(["bundle", str(out / "export" / f"student-{quant}-android-executorch"), "--platform", platform,
                     "--recipe", recipe, "--out", str(bundle)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
        code = {"android": "android/EdgekdGenerator.kt", "ios": "ios/EdgekdGenerator.swift"}[platform]
        assert {"tokenizer/tokenizer.json", "generation.json", code, "cpp/edgekd_generate.cpp",
                "verify/expected.json", "README.md"} <= files
        generation = json.loads((bundle / "generation.json").read_text())
        assert generation["eos_ids"] and generation["max_seq_len"] == 128
        assert "{{" not in (bundle / code).read_text()
        assert main(["bundle", "--verify", f"{bundle}.zip"]) == 0, capsys.readouterr().err
        line = capsys.readouterr().out
        assert "pytorch-tokenizers exact on 24 validation and test prompts" in line and "greedy tokens equal" in line
    expected = json.loads((tmp_path / "bundle-int4" / "verify" / "expected.json").read_text())
    assert expected["reference"] == "its torchao int4 reference in PyTorch" and len(expected["generations"]) == 16

    # A tokenizer library that encodes one prompt otherwise: one line, exit 1.
    import pytorch_tokenizers

    class Shifted(pytorch_tokenizers.CppHFTokenizer):
        def encode(self, text, bos=0, eos=0):
            ids = list(super().encode(text, bos, eos))
            return ids[:-1] + [ids[-1] + 1] if "rose" in text else ids

    monkeypatch.setattr(pytorch_tokenizers, "CppHFTokenizer", Shifted)
    assert main(["bundle", "--verify", str(tmp_path / "bundle-fp32")]) == 1
    assert "gives other ids than the model's tokenizer on" in capsys.readouterr().err


def test_a_litert_lm_bundle_verifies_in_litert_lm(lm_recipe, lm_run, tmp_path, capsys, monkeypatch):
    """`edgekd bundle` of the .litertlm students for android: the file, generation.json, Kotlin (LiteRT-LM's
    Session API); `--verify` runs it in LiteRT-LM: start token + tokenizer ids exact, greedy text the reference's.
    A Core ML package and a .litertlm for ios are refused in one line."""
    out, _ = lm_run
    recipe = str(lm_recipe / "recipe.yaml")
    for quant in ("fp32", "int4"):
        bundle = tmp_path / f"litert-{quant}"
        assert main(["bundle", str(out / "export" / f"student-{quant}-android-litert"), "--platform", "android",
                     "--recipe", recipe, "--out", str(bundle)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
        assert {"generation.json", "android/EdgekdLiteRtLmGenerator.kt", "verify/expected.json", "README.md"} <= files
        assert [f for f in files if f.startswith("model/")] == [f"model/tiny-lm-student_litert_{quant}.litertlm"]
        assert "{{" not in (bundle / "android" / "EdgekdLiteRtLmGenerator.kt").read_text()
        assert main(["bundle", "--verify", f"{bundle}.zip"]) == 0, capsys.readouterr().err
        line = capsys.readouterr().out
        assert "LiteRT-LM's own" in line and "greedy text equal" in line
        assert not [p for p in bundle.rglob("*xnnpack_cache*")]  # LiteRT-LM wrote no weight cache into it
    for export, platform, message in (("student-int4-android-litert", "ios", "bundle the .pte export for ios"),
                                      ("student-int4-ios-coreml", "ios", "edgekd does not bundle")):
        assert main(["bundle", str(out / "export" / export), "--platform", platform, "--recipe", recipe,
                     "--out", str(tmp_path / f"refused-{platform}")]) == 1
        assert message in capsys.readouterr().err

    # A tokenizer in the runtime that encodes prompts otherwise: one line, exit 1.
    from edgekd.targets.llm_litert import LiteRTLMRunner

    tokenize = LiteRTLMRunner.tokenize
    monkeypatch.setattr(LiteRTLMRunner, "tokenize", lambda self, text: tokenize(self, text)[:-1])
    assert main(["bundle", "--verify", str(tmp_path / "litert-fp32")]) == 1
    assert "tokenizer give other ids than the model's tokenizer" in capsys.readouterr().err


def test_the_budget_search_exports_the_first_spec_within_budget_and_refuses_in_one_line(lm_recipe, lm_run, capsys,
                                                                                        monkeypatch):
    import yaml

    import edgekd.tasks.generation as generation

    out, _ = lm_run
    recipe = yaml.safe_load((lm_recipe / "recipe.yaml").read_text())
    searched = lm_recipe / "budget.yaml"
    # int4 first (the most compressed), fp32 second; from the fp32 student, a budget int4 meets.
    recipe["compress"] = {"quant": ["int4", "fp32"], "budget": 1000, "budget_from": "student"}
    searched.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(searched), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    search = summary["search"]
    assert search["chosen"] == "int4" and [c["quant"] for c in search["candidates"]] == ["int4", "fp32"]
    student_val = json.loads((out / "distill" / "manifest.json").read_text())["metrics"]["validation"]
    assert search["baseline"]["perplexity"] == student_val["perplexity"]["perplexity"]
    int4, fp32 = search["candidates"]
    # every target's own reference scored; the fp32 .pte's is the fp32 student itself, Core ML's its float16 copy
    assert set(int4["by_target"]) == {"android/executorch", "android/litert", "ios/coreml"}
    assert fp32["by_target"]["android/executorch"]["cost"] == 0.0 and fp32["within"]
    assert int4["cost"] == max(t["cost"] for t in int4["by_target"].values())
    assert int4["cost"] == pytest.approx(100 * (int4["perplexity"] / search["baseline"]["perplexity"] - 1))
    # Only the chosen spec is exported (the run's plan); its export is the one the first run made.
    assert sorted(v["name"] for v in summary["variants"]) == [
        "student-int4-android-executorch", "student-int4-android-litert", "student-int4-ios-coreml",
        "teacher-fp32-android-executorch"]
    report = (out / "report.md").read_text()
    assert "Budget search: validation perplexity within 1000% of the student's" in report
    assert "- int4: " in report and ", chosen" in report

    # No spec within the budget: one line with every candidate's cost, exit 1, no search stage written over.
    def ten_percent_worse(model, tokenizer, records, max_length, teacher=None):
        return {"perplexity": {"perplexity": 1.1 * search["baseline"]["perplexity"]}}
    monkeypatch.setattr(generation, "_evaluate", ten_percent_worse)
    recipe["compress"] = {"quant": ["int4", "int8"], "budget": 5, "budget_from": "student"}
    searched.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(searched), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert ("no compress.quant spec stays within 5% of the student's validation perplexity" in err
            and "int4 +10.0%, int8 +10.0%; raise compress.budget" in err)
    assert json.loads((out / "compress" / "manifest.json").read_text())["params"]["budget"] == 1000


def test_a_fresh_student_distilled_on_every_token_with_hidden_states_matched(lm_recipe, lm_run, tmp_path):
    """The distill stage with student.init fresh, kd_tokens all and state_weight: a random init of the cut's
    shape, its layers matched to evenly spread teacher layers (it has none of its own), the manifest says so."""
    import yaml

    from edgekd.recipe import recipe_from_dict
    from edgekd.tasks.generation import distill, load_records

    out, _ = lm_run
    spec = yaml.safe_load((lm_recipe / "recipe.yaml").read_text())
    spec["student"].update(init="fresh", hidden=0.0, kd_tokens="all", state_weight=1.0, alpha=0.5)
    recipe = recipe_from_dict(spec, lm_recipe)
    metrics = distill(recipe, load_records(recipe), out / "finetune", tmp_path / "distill", tmp_path / "cache")
    manifest = json.loads((tmp_path / "distill" / "manifest.json").read_text())
    assert manifest["plan"]["init"] == "fresh"
    training = manifest["training"]["params"]
    assert training["kd_tokens"] == "all" and training["states"]["layer_map"] == [1, 3]
    config = json.loads((tmp_path / "distill" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 64)
    assert metrics["test"]["perplexity"]["perplexity"] > 1


def test_unlabeled_prompts_completed_by_the_teacher_join_the_transfer_set(lm_recipe, lm_run, tmp_path, monkeypatch):
    """data.unlabeled: the split's own prompts and repeats dropped, a seeded sample kept, each prompt completed by
    the teacher greedily (cached per prompt), and the student trained on them beside the labelled records."""
    import yaml

    from edgekd.distill import lm_cache
    from edgekd.lm_metrics import greedy_completions
    from edgekd.models import load_causal_lm, load_tokenizer
    from edgekd.recipe import recipe_from_dict
    from edgekd.tasks.generation import distill, load_records
    from edgekd.tasks.generation_report import transfer_lines

    out, _ = lm_run
    test_rows = [row for row in csv.DictReader(open(lm_recipe / "test.csv"))]
    new = [{"text": f"Company {i} reported results for the quarter {i}."} for i in range(9)]
    long = {"text": " ".join(["Results"] * 200)}   # no room for a completion in max_length: left out, counted
    write_csv(tmp_path / "more.csv", new + new[:2] + [{"text": r["text"]} for r in test_rows[:3]] + [long])
    spec = yaml.safe_load((lm_recipe / "recipe.yaml").read_text())
    spec["data"].update(unlabeled=str(tmp_path / "more.csv"))
    recipe = recipe_from_dict(spec, lm_recipe)
    data = load_records(recipe)
    template = recipe.data.prompt_template
    wanted = [template.replace("{text}", row["text"]) for row in new + [long]]
    assert [r.prompt for r in data.unlabeled] == wanted   # the splits' prompts and the repeats dropped
    spec["data"]["max_unlabeled"] = 7
    sampled = load_records(recipe_from_dict(spec, lm_recipe)).unlabeled
    assert len(sampled) == 7 and {r.prompt for r in sampled} < set(wanted)
    assert [r.prompt for r in load_records(recipe).unlabeled] == [r.prompt for r in data.unlabeled]  # seeded
    assert data.fingerprint() == load_records(recipe_from_dict(yaml.safe_load(
        (lm_recipe / "recipe.yaml").read_text()), lm_recipe)).fingerprint()  # the teacher's key is unchanged

    metrics = distill(recipe, data, out / "finetune", tmp_path / "distill", tmp_path / "cache")
    manifest = json.loads((tmp_path / "distill" / "manifest.json").read_text())
    teacher, tokenizer = load_causal_lm(str(out / "finetune")), load_tokenizer(str(out / "finetune"))
    new_tokens = manifest["transfer_set"]["max_new_tokens"]
    longest = max(len(tokenizer(r.completion, add_special_tokens=False)["input_ids"]) for r in data.train)
    assert new_tokens == longest + 1
    fits = data.unlabeled[:-1]
    answers = greedy_completions(teacher, tokenizer, fits, new_tokens, recipe.student.batch_size)  # as batched there
    completed = sum(bool(a.strip()) for a in answers)
    assert manifest["transfer_set"] == {"labelled": len(data.train), "unlabeled": 10, "teacher_completed": completed,
                                        "too_long": 1, "max_new_tokens": new_tokens}
    assert manifest["training"]["train_examples"] == len(data.train) + completed
    assert metrics["test"]["perplexity"]["perplexity"] > 1
    cached = json.loads(next((tmp_path / "cache").glob("teacher-completions-*.json")).read_text())
    assert [cached[r.prompt] for r in fits] == answers and long["text"] not in "".join(cached)
    # Another stage on the same prompts asks the teacher nothing: the completions come from the cache.
    monkeypatch.setattr("edgekd.lm_metrics.greedy_completions", lambda *a, **k: pytest.fail("not cached"))
    assert lm_cache.teacher_completions(teacher, tokenizer, [r.prompt for r in fits], new_tokens,
                                        manifest["inputs"]["teacher"]["sha256"], tmp_path / "cache") == answers
    empty = f", {9 - completed} the teacher answered with nothing" if completed < 9 else ""
    assert transfer_lines(manifest["transfer_set"]) == [
        f"The student was distilled on {len(data.train)} labelled records and {completed} prompts of data.unlabeled "
        f"completed by the teacher (left out: 1 too long for data.max_length{empty})"]
