"""Stage 6: a bundle for apps. An export directory becomes what an app project adds: the model, the
C tokenizer generated for its vocabulary, the calling code of the platform, labels, a README, and a
verification set; as a folder and a zip. `verify_bundle` simulates the app on this machine.

    export dir --check platform/format--> model file(s) + tokenizer/c (generated) + calling code
               --test split: HF ids, PyTorch labels, runtime labels--> verify/expected.json --> DIR, DIR.zip

The verification set is the export's test split (the recipe's data must be the data the artifact
was exported with): for each text the Hugging Face tokenizer's ids, the PyTorch student's label
(the model directory the export manifest names, checksum-verified) and, where this machine runs the
artifact, its label under the Hugging Face ids. `--verify` needs nothing but the bundle. A decoder LM export is
bundled and verified by edgekd/tasks/generation_bundle.py (ExecuTorch's LLM runners, pytorch-tokenizers).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edgekd import ctokenizer
from edgekd.errors import EdgeKDError, StageError

RESOURCES = Path(__file__).parent / "resources" / "bundle"
PLATFORMS = {
    "android": ("android/executorch", "android/litert"),
    "ios": ("ios/coreml", "ios/executorch-coreml"),
    "embedded": ("embedded/tflm", "embedded/executorch-portable"),
}
EXPECTED = "verify/expected.json"


class BundleError(EdgeKDError):
    """A bundle cannot be made from this input, or a bundle fails its verification."""


# --------------------------------------------------------------------------------------- bundle

def make_bundle(artifact_dir: Path, platform: str, out: Path, recipe=None) -> dict:
    """Write the bundle folder `out` and `out`.zip for `platform` from export directory `artifact_dir`
    (`recipe` None: the built-in recipe of the export's task)."""
    from edgekd.data import load_dataset
    from edgekd.manifest import check_out, check_zip_out, stage_input, write_stage

    artifact_dir, out = Path(artifact_dir), Path(out)
    check_out(out, "bundle")  # neither a user's folder nor a zip edgekd did not write is replaced
    check_zip_out(_zip_path(out), out.name)
    if platform not in PLATFORMS:
        raise BundleError(f"unknown platform '{platform}'; known: {', '.join(PLATFORMS)}")
    export, export_input = stage_input(artifact_dir, "export")
    from edgekd.benchmarks.llm import is_decoder_export
    if is_decoder_export(export):  # a decoder LM: the generation task's bundle (LLM runners, its own verify)
        from edgekd.recipe import builtin_recipe
        from edgekd.tasks.generation_bundle import make_decoder_bundle
        return make_decoder_bundle(artifact_dir, platform, out, recipe or builtin_recipe("text-generation"), export,
                                   export_input)
    recipe = recipe or builtin_recipe_for_classifier()
    fmt = f"{export['params']['target']}/{export['params']['format']}"
    if fmt not in PLATFORMS[platform]:
        fits = " or ".join(PLATFORMS[platform])
        raise BundleError(f"{artifact_dir} holds a {fmt} artifact; a {platform} bundle takes {fits} "
                          f"(export one with `edgekd export --target {platform} --format "
                          f"{PLATFORMS[platform][0].split('/')[1]}`)")
    tokenizer = _tokenizer(artifact_dir)
    ctokenizer.describe(tokenizer)  # refuse another tokenizer family before any work
    dataset = load_dataset(recipe)
    if dataset.fingerprint()["sha256"] != export["inputs"]["data"]["sha256"]:
        raise BundleError(f"the recipe's data is not the data {artifact_dir} was exported with; pass that "
                          f"export's recipe with --recipe (its test split becomes the bundle's verification set)")
    max_length = export["max_length"]
    expected = _expected(export, artifact_dir, tokenizer, dataset.test.texts, max_length)
    params = {"platform": platform, "format": fmt, "artifact": export["artifact"]}
    with write_stage(out, "bundle", params, {"export": export_input}) as stage:
        root = stage.path
        model_files = _copy_model(artifact_dir, export, root / "model")
        (root / "tokenizer").mkdir()
        _write_vocab(tokenizer, root / "tokenizer" / "vocab.txt")
        for name in export.get("tokenizer", []):
            shutil.copyfile(artifact_dir / name, root / "tokenizer" / name)
        tables = ctokenizer.write_sources(tokenizer, max_length, root / "tokenizer" / "c")
        (root / "labels.json").write_text(json.dumps(export["labels"], indent=2, ensure_ascii=False) + "\n")
        values = _template_values(export, expected, root / "model")
        code = _write_calling_code(platform, fmt, values, root)
        (root / "verify").mkdir()
        (root / EXPECTED).write_text(json.dumps(expected, ensure_ascii=False) + "\n")
        copy_licenses(artifact_dir, root)
        kernels = _kernels(export, root / "model" / export["artifact"])
        (root / "README.md").write_text(bundle_readme(platform, fmt, export, values, kernels, tables, code))
        stage.extra.update({"platform": platform, "format": fmt, "artifact": f"model/{export['artifact']}",
                            "model_files": model_files, "labels": export["labels"], "max_length": max_length,
                            "dynamic_length": bool(export.get("dynamic_length")),
                            "quant": export["quant"], "runtime": export.get("runtime", {}), "kernels": kernels,
                            "tokenizer": {k: v for k, v in tables.items() if k != "normalizer"},
                            "calling_code": code, "verify_texts": len(expected["texts"])})
    return {**finish_bundle(out), "verify_texts": len(expected["texts"]),
            "tokenizer": {k: v for k, v in tables.items() if k != "normalizer"}}


def _expected(export: dict, artifact_dir: Path, tokenizer, texts: list[str], max_length: int) -> dict:
    """The verification set: texts, Hugging Face ids, PyTorch labels, and the runtime's labels where it runs here."""
    import torch

    from edgekd.manifest import stage_input
    from edgekd.models import load_classifier
    from edgekd.targets import RuntimeUnavailable, get_format
    from edgekd.targets.graph import ExportWrapper, encode_fixed, encode_unpadded, run_graph

    if not texts:
        raise BundleError("the recipe's test split is empty; the bundle needs test texts to verify against")
    source = export["inputs"]["model"]
    try:
        _, found = stage_input(Path(source["path"]), _stage_of(Path(source["path"])))
    except StageError as exc:
        raise BundleError(f"the model {artifact_dir} was exported from cannot be read back to compute the "
                          f"PyTorch labels ({exc})") from None
    if found["sha256"] != source["sha256"]:
        raise BundleError(f"the model at {source['path']} changed since {artifact_dir} was exported from it; "
                          f"re-export, then bundle")
    # A dynamic-length artifact gets each text at its own length, as its calling code passes it
    dynamic = bool(export.get("dynamic_length"))
    inputs = (encode_unpadded if dynamic else encode_fixed)(tokenizer, texts, max_length)
    with torch.no_grad():
        pytorch = run_graph(ExportWrapper(load_classifier(source["path"]).eval()), inputs).argmax(-1).tolist()
    fmt = get_format(export["params"]["target"], export["params"]["format"])
    try:
        runner = fmt.runner(artifact_dir / export["artifact"], 1)
        runtime = [int(np.argmax(runner(ids, mask))) for ids, mask in inputs]
        runtime_note = None
    except RuntimeUnavailable as exc:
        runtime, runtime_note = None, str(exc)
    return {"format": f"{fmt.target}/{fmt.name}", "max_length": max_length, "dynamic_length": dynamic,
            "quant": export["quant"]["name"],
            "float": export["quant"]["weights"] in ("fp32", "fp16") and export["quant"]["activations"] == "none",
            "texts": texts, "hf_ids": [[int(i) for i, m in zip(ids[0], mask[0]) if m] for ids, mask in inputs],
            "pytorch_labels": pytorch, "runtime_labels": runtime, "runtime_note": runtime_note}


def builtin_recipe_for_classifier():
    from edgekd.recipe import builtin_recipe
    return builtin_recipe(None)


def _tokenizer(artifact_dir: Path):
    """The tokenizer files the export copied beside the artifact, as the Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(artifact_dir))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BundleError(f"the tokenizer in {artifact_dir} cannot be loaded ({first}); re-export the model") from None


def _stage_of(path: Path) -> str:
    from edgekd.manifest import read_manifest
    return read_manifest(path)["stage"]


def _copy_model(artifact_dir: Path, export: dict, dest: Path) -> list[str]:
    """The artifact and what ships beside it (TFLite Micro's C sources, the selective-build op list)."""
    dest.mkdir()
    names = [export["artifact"]] + [n for n in ("model_data.h", "model_data.cc", "selected_operators.txt")
                                     if (artifact_dir / n).is_file()]
    for name in names:
        source = artifact_dir / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, dest / name)
    return names


def _write_vocab(tokenizer, path: Path) -> None:
    """vocab.txt, one token a line in id order: the (possibly trimmed) vocabulary the model has."""
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise BundleError("the vocabulary's ids are not 0..n-1; vocab.txt cannot express it")
    path.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")


def _template_values(export: dict, expected: dict, model_dir: Path) -> dict:
    labels = export["labels"]
    values = {"MAX_LENGTH": str(export["max_length"]), "NUM_LABELS": str(len(labels)),
              "ARTIFACT": export["artifact"], "MODEL_STEM": Path(export["artifact"]).stem,
              "LABELS": ", ".join(json.dumps(label, ensure_ascii=False) for label in labels),
              "C_LABELS": ", ".join(_c_string(label) for label in labels),
              "OUTPUT_SCALE": "0", "OUTPUT_ZERO_POINT": "0", "OUTPUT_NAME": "output_0",
              "IDS_INPUT": "0", "MASK_INPUT": "1", "LOGIT": "output->data.f[i]",
              "DYNAMIC_LENGTH": "true" if export.get("dynamic_length") else "false"}
    if export["artifact"].endswith(".tflite"):
        from edgekd.targets.litert import model_summary

        data = (model_dir / export["artifact"]).read_bytes()
        names = model_summary(data)["input_names"]
        mask_first = "attention_mask" in names[0]
        values["IDS_INPUT"], values["MASK_INPUT"] = ("1", "0") if mask_first else ("0", "1")
        values.update(_tflite_output(model_dir / export["artifact"]))
        if float(values["OUTPUT_SCALE"]):
            values["LOGIT"] = "(output->data.int8[i] - kOutputZeroPoint) * kOutputScale"
    return values


def _tflite_output(file: Path) -> dict:
    """The LiteRT signature's output name and the int8 output's scale and zero point (0 for float)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(file))
    outputs = interpreter.get_signature_list()["serving_default"]["outputs"]
    scale, zero_point = interpreter.get_output_details()[0]["quantization"]
    return {"OUTPUT_NAME": outputs[0], "OUTPUT_SCALE": repr(float(scale)), "OUTPUT_ZERO_POINT": str(int(zero_point))}


def _c_string(text: str) -> str:
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03o}" for b in text.encode()) + '"'


def _write_calling_code(platform: str, fmt: str, values: dict, root: Path) -> list[str]:
    """The platform's calling code from resources/bundle, filled in; returns the files written."""
    variant = fmt.split("/")[1].split("-")[0]            # executorch, litert, coreml, tflm
    folder = RESOURCES / platform
    written = []
    (root / platform).mkdir()
    for source in sorted(folder.iterdir()):
        parts = source.name.split(".")
        if len(parts) == 3 and parts[1] != variant:      # Name.<variant>.ext: only this format's
            continue
        name = f"{parts[0]}.{parts[2]}" if len(parts) == 3 else source.name
        (root / platform / name).write_text(fill_template(source.read_text(), values, source.name))
        written.append(f"{platform}/{name}")
    return written


def fill_template(text: str, values: dict, name: str) -> str:
    """A calling-code template with its {{FIELDS}} filled in."""
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if re.search(r"\{\{[A-Z_]+\}\}", text):
        raise BundleError(f"template {name} has an unfilled field")  # a programming error
    return text


def _kernels(export: dict, artifact: Path) -> dict:
    """Operators an ExecuTorch runtime must register for this .pte, read from the program itself."""
    if artifact.suffix != ".pte":
        return {}
    names = sorted({m.decode() for m in re.findall(rb"(?:aten|quantized_decomposed|torchao|dim_order_ops)::"
                                                   rb"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", artifact.read_bytes())})
    delegation = export.get("delegation", {})
    return {"backend": delegation.get("backend"), "operators": names,
            "quantized_kernels": any(n.startswith("quantized_decomposed::") for n in names)}


def copy_licenses(source: Path, dest: Path) -> None:
    """The model's LICENSE and NOTICE, where the export carried them, beside what ships."""
    for name in ("LICENSE", "NOTICE"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def finish_bundle(out: Path) -> dict:
    """The zip beside the written bundle folder (a failure removes the folder too: a folder without its zip is not
    a finished bundle); the paths and the file count."""
    try:
        _zip(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {"bundle": str(out), "zip": str(_zip_path(out)), "files": sum(1 for p in out.rglob("*") if p.is_file())}


def _zip_path(out: Path) -> Path:
    return out.parent / f"{out.name}.zip"


def _zip(out: Path) -> None:
    """out.zip holding the folder `out`, written to a temporary sibling and renamed."""
    target = _zip_path(out)
    tmp = out.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{out.name}/{path.relative_to(out).as_posix()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------- verify

def verify_bundle(path: Path) -> dict:
    """Simulate the app on this machine; raise BundleError (one line, with counts) on any difference.

    Checksums of every file; the bundle's C tokenizer built with the system compiler against the
    Hugging Face ids of every verification text; the bundled model in its host runtime fed by the C
    tokenizer, softmax and argmax as the calling code does them; labels against PyTorch's.
    """
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        from edgekd.safe_extract import safe_extract

        with tempfile.TemporaryDirectory(prefix="edgekd-verify-") as tmp:
            root = safe_extract(path, Path(tmp) / "bundle")
            inner = [p for p in root.iterdir() if p.is_dir()]
            if len(inner) != 1:
                raise BundleError(f"{path} does not hold one bundle folder; make it with `edgekd bundle`")
            return verify_bundle(inner[0])
    from edgekd.manifest import verify_stage

    manifest = verify_stage(path, "bundle")
    if manifest.get("task") == "text-generation":
        from edgekd.tasks.generation_bundle import verify_decoder_bundle
        return verify_decoder_bundle(path, manifest)
    expected = json.loads((path / EXPECTED).read_text(encoding="utf-8"))
    texts, max_length = expected["texts"], expected["max_length"]
    tok = ctokenizer.CTokenizer(path / "tokenizer" / "c", max_length)
    encoded = [tok.encode(text) for text in texts]
    wrong = [i for i, ((ids, mask), hf) in enumerate(zip(encoded, expected["hf_ids"]))
             if ids[:len(hf)].tolist() != hf or mask.tolist() != [1] * len(hf) + [0] * (max_length - len(hf))]
    if wrong:
        raise BundleError(f"the C tokenizer differs from the model's tokenizer on {len(wrong)} of {len(texts)} "
                          f"verification texts (first: {texts[wrong[0]][:60]!r})")
    result = {"bundle": str(path), "files": len(manifest["files"]), "texts": len(texts), "tokenizer": "exact"}
    labels = _app_labels(path, manifest, encoded, expected.get("dynamic_length", False))
    if labels is None:
        result["model"] = f"not run here: {expected['runtime_note']}"
        return result
    names = json.loads((path / "labels.json").read_text(encoding="utf-8"))
    if names != manifest["labels"]:
        raise BundleError(f"{path}/labels.json does not match the bundle manifest's labels")
    pytorch = expected["pytorch_labels"]
    differ = sum(a != b for a, b in zip(labels, pytorch))
    result.update({"pytorch_agreement": 1 - differ / len(texts), "labels_differing_from_pytorch": differ})
    if expected["float"] and differ:
        raise BundleError(f"the bundle's labels differ from the PyTorch student's on {differ} of {len(texts)} "
                          f"test texts (a float model must agree on every one)")
    if not expected["float"] and expected["runtime_labels"] is not None:
        # A quantized model is checked against its own labels (the artifact in the same runtime on Hugging Face
        # ids): what the bundle adds (the C tokenizer, softmax, argmax) must change nothing. Its agreement with
        # the fp32 student is quantization, judged at export by the accuracy budget; here it is reported.
        runtime_differ = sum(a != b for a, b in zip(labels, expected["runtime_labels"]))
        if runtime_differ:
            raise BundleError(f"the bundle's labels differ from the artifact's own (Hugging Face ids, same runtime) "
                              f"on {runtime_differ} of {len(texts)} test texts")
    return result


def _app_labels(path: Path, manifest: dict, encoded, dynamic: bool) -> list[int] | None:
    """What the calling code computes: the runtime's logits for the C tokenizer's ids (only the real tokens where the
    artifact takes a dynamic length), softmax, argmax."""
    import torch

    from edgekd.targets import RuntimeUnavailable, get_format

    target, name = manifest["format"].split("/")
    try:
        runner = get_format(target, name).runner(path / manifest["artifact"], 1)
    except RuntimeUnavailable:
        return None
    labels = []
    for ids, mask in encoded:
        if dynamic:
            real = int(mask.sum())
            ids, mask = ids[:real], mask[:real]
        logits = np.asarray(runner(torch.from_numpy(ids[None]), torch.from_numpy(mask[None])), np.float64)[0]
        probabilities = np.exp(logits - logits.max())
        labels.append(int(np.argmax(probabilities / probabilities.sum())))
    return labels


# --------------------------------------------------------------------------------------- README

def bundle_readme(platform: str, fmt: str, export: dict, values: dict, kernels: dict, tables: dict,
                  code: list[str]) -> str:
    from edgekd.bundle_readme import render
    return render(platform, fmt, export, values, kernels, tables, code)
