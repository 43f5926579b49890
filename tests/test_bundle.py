"""`edgekd bundle`: android (ExecuTorch) and embedded (TFLite Micro) bundles of a tiny trained student,
`--verify` simulating the app here (C tokenizer through ctypes, the host runtime, softmax/argmax), and
the refusals: wrong platform, tampered bundle, a tokenizer the C tokenizer does not implement.

The student is conftest's relu_student (trimmed vocabulary, 2 ReLU layers): one ExecuTorch int8 and
one TFLite Micro int8-static export, about 30 s together on 2 cores.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from edgekd.cli import main
from edgekd.ctokenizer import compiler

pytest.importorskip("executorch")
pytest.importorskip("tflite_micro")
pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def recipe_file(relu_student, small_data, tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": "tiny",
                                    "data": {k: str(v) for k, v in small_data.items()}}))
    return path


@pytest.fixture(scope="module")
def exports(relu_student, tmp_path_factory):
    """Export directories: android/executorch int8 and embedded/tflm int8-static."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    stage_dir, dataset = relu_student
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for key, (target, fmt, spec) in {"android": ("android", "executorch", "int8"),
                                     "embedded": ("embedded", "tflm", "int8-static")}.items():
        out[key] = root / key
        export_artifact(stage_dir, "distill", get_format(target, fmt), get_spec(spec), dataset, out[key],
                        role="compressed", model_name="student")
    return out


@pytest.fixture(scope="module")
def bundles(exports, recipe_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    for platform, export in exports.items():
        assert main(["bundle", str(export), "--platform", platform, "--recipe", str(recipe_file),
                     "--out", str(root / platform)]) == 0
    return root


@pytest.mark.parametrize("platform", ["android", "embedded"])
def test_bundle_verifies_folder_and_zip(bundles, exports, platform, capsys, small_data):
    from edgekd.manifest import verify_stage

    folder = bundles / platform
    manifest = verify_stage(folder, "bundle")
    files = set(manifest["files"])
    assert {"labels.json", "README.md", "verify/expected.json", "tokenizer/vocab.txt", "tokenizer/c/edgekd_tokenizer.c",
            "tokenizer/c/edgekd_tokenizer.h", "tokenizer/c/edgekd_tokenizer_tables.h", manifest["artifact"]} <= files
    expected = json.loads((folder / "verify/expected.json").read_text())
    assert len(expected["texts"]) == 30                          # the test split of small_data
    vocab = (folder / "tokenizer/vocab.txt").read_text().splitlines()
    assert len(vocab) == manifest["tokenizer"]["vocab_size"] < 30522  # the trimmed vocabulary
    with zipfile.ZipFile(bundles / f"{platform}.zip") as zf:
        assert {n.split("/", 1)[1] for n in zf.namelist()} == files | {"manifest.json"}
    for target in (folder, bundles / f"{platform}.zip"):
        capsys.readouterr()
        assert main(["bundle", "--verify", str(target), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["texts"] == 30 and result["tokenizer"] == "exact"
        # The figure comes from the labels it was computed from: the artifact's on the test texts (the export
        # stage recorded the same runtime's predictions) against the PyTorch student's.
        runtime, pytorch = expected["runtime_labels"], expected["pytorch_labels"]
        assert runtime == verify_stage(exports[platform], "export")["test_predictions"]
        differ = sum(a != b for a, b in zip(runtime, pytorch))
        assert result["labels_differing_from_pytorch"] == differ and result["pytorch_agreement"] == 1 - differ / 30


def test_android_bundle_holds_kotlin_jni_and_kernel_notes(bundles):
    folder = bundles / "android"
    code = set(json.loads((folder / "manifest.json").read_text())["calling_code"])
    assert code == {"android/EdgekdTokenizer.kt", "android/EdgekdClassifier.kt", "android/edgekd_jni.c",
                    "android/CMakeLists.txt"}
    kotlin = (folder / "android/EdgekdClassifier.kt").read_text()
    assert "Module.load" in kotlin and "{{" not in kotlin
    # The .pte takes a dynamic length (the default): the app passes the text's own tokens, as verify simulated
    assert "private val dynamicLength = true" in kotlin and "mask.count { it == 1 }" in kotlin
    assert json.loads((folder / "verify/expected.json").read_text())["dynamic_length"] is True
    readme = (folder / "README.md").read_text()
    assert "Dynamic length: the `.pte` also takes `[1, n]`" in readme
    # int8 embedding rows: the program calls the quantized embedding kernel, and the README says to link it.
    assert "quantized_decomposed::embedding_byte" in readme and "executorch-android:" in readme
    assert "not compiled" in readme


def test_a_fixed_length_pte_is_passed_padded():
    from edgekd.bundle import RESOURCES, _template_values, fill_template

    export = {"labels": ["a", "b"], "max_length": 16, "artifact": "student.pte", "dynamic_length": False}
    kotlin = fill_template((RESOURCES / "android/EdgekdClassifier.executorch.kt").read_text(),
                           _template_values(export, {}, Path(".")), "EdgekdClassifier.executorch.kt")
    assert "private val dynamicLength = false" in kotlin and "{{" not in kotlin


def test_embedded_bundle_ships_c_sources_and_cpp(bundles):
    folder = bundles / "embedded"
    assert (folder / "model/model_data.h").is_file() and (folder / "model/model_data.cc").is_file()
    cpp = (folder / "embedded/classifier.cc").read_text()
    assert "kOutputScale" in cpp and "RegisterModelOps(resolver)" in cpp and "{{" not in cpp


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_embedded_calling_code_compiles_with_the_c_tokenizer(bundles, tmp_path):
    """classifier.cc against stand-ins for the four TFLite Micro declarations it uses, linked with the real
    C tokenizer and model_data.cc: the generated code is valid C++ and agrees with the generated headers.
    (Stand-ins, not TFLite Micro: the real API is not checked here.)"""
    import subprocess

    folder = bundles / "embedded"
    stub = tmp_path / "tensorflow/lite/micro"
    stub.mkdir(parents=True)
    (tmp_path / "tensorflow/lite/schema").mkdir()
    (tmp_path / "tensorflow/lite/schema/schema_generated.h").write_text("#pragma once\n")
    (stub / "micro_mutable_op_resolver.h").write_text("#pragma once\n")
    (stub / "micro_interpreter.h").write_text("""#pragma once
#include <cstddef>
#include <cstdint>
enum TfLiteStatus { kTfLiteOk = 0 };
enum TfLiteType { kTfLiteFloat32 = 1, kTfLiteInt8 = 9 };
struct TfLiteTensor { TfLiteType type; union { int32_t* i32; float* f; int8_t* int8; } data; };
namespace tflite {
struct Model {};
inline const Model* GetModel(const void*) { static Model m; return &m; }
template <unsigned N> struct MicroMutableOpResolver {
#define ADD(name) int name() { return 0; }
""" + "\n".join(f"  ADD({name})" for name in _resolver_calls(folder)) + """
};
struct MicroInterpreter {
  template <class R> MicroInterpreter(const Model*, R&, uint8_t*, size_t) {}
  TfLiteStatus AllocateTensors() { return kTfLiteOk; }
  TfLiteStatus Invoke() { return kTfLiteOk; }
  TfLiteTensor* input(int) { return nullptr; }
  const TfLiteTensor* output(int) { return nullptr; }
};
}
""")
    for source in ("embedded/classifier.cc", "model/model_data.cc", "tokenizer/c/edgekd_tokenizer.c"):
        compiler_name = "g++" if source.endswith(".cc") else "cc"
        standard = "-std=c++17" if source.endswith(".cc") else "-std=c99"
        subprocess.run([compiler_name, standard, "-Wall", "-Werror", "-c", str(folder / source), f"-I{tmp_path}",
                        f"-I{folder / 'tokenizer/c'}", f"-I{folder / 'model'}", f"-I{folder / 'embedded'}",
                        "-o", str(tmp_path / (source.replace('/', '_') + ".o"))], check=True, capture_output=True)


def _resolver_calls(folder) -> list[str]:
    import re

    return re.findall(r"resolver\.(Add\w+)\(\);", (folder / "model/model_data.h").read_text())


# --- refusals -------------------------------------------------------------------------------------

def test_a_platform_whose_format_does_not_fit_is_one_line_and_writes_nothing(exports, recipe_file, tmp_path, capsys):
    out = tmp_path / "ios"
    assert main(["bundle", str(exports["android"]), "--platform", "ios", "--recipe", str(recipe_file),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "android/executorch" in err and "ios/coreml or ios/executorch-coreml" in err
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_bundle_fails_verify_on_its_checksums(bundles, tmp_path, capsys):
    copy = tmp_path / "android"
    shutil.copytree(bundles / "android", copy)
    table = copy / "tokenizer/c/edgekd_tokenizer_tables.h"
    table.write_text(table.read_text().replace("#define EKD_UNK_ID", "#define EKD_UNK_ID 1 +", 1))
    assert main(["bundle", "--verify", str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checksum mismatch" in err and "edgekd_tokenizer_tables.h" in err


def test_verify_names_the_count_of_texts_the_c_tokenizer_gets_wrong(bundles, tmp_path, capsys):
    """A bundle whose expectations disagree with its tokenizer (re-signed, so the checksums pass)."""
    from edgekd.manifest import DIGEST, MANIFEST, file_table, manifest_digest

    copy = tmp_path / "android"
    shutil.copytree(bundles / "android", copy)
    expected = json.loads((copy / "verify/expected.json").read_text())
    for i in (0, 3):
        expected["hf_ids"][i][1] += 1
    (copy / "verify/expected.json").write_text(json.dumps(expected))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"] = file_table(copy)
    manifest[DIGEST] = manifest_digest(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert main(["bundle", "--verify", str(copy)]) == 1
    assert "on 2 of 30 verification texts" in capsys.readouterr().err


def test_data_other_than_the_exports_is_refused(exports, tmp_path, capsys):
    assert main(["bundle", str(exports["embedded"]), "--platform", "embedded", "--out", str(tmp_path / "b")]) == 1
    assert "not the data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
