"""Stage 4: one artifact directory per (model, target format, QuantSpec), proven against PyTorch.

Every artifact is run in its real runtime on validation texts before it is kept: fp32 must
match PyTorch logits, a quantized one must agree with the fp32 PyTorch model on top-1.
An artifact that fails parity raises with the figures and leaves nothing on disk.
Where this machine cannot run the runtime (Core ML off Apple hardware: the runner raises
RuntimeUnavailable), the exporter's structural check is the parity and no test metrics are claimed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgekd.compress.quant import QuantSpec
from edgekd.data import Dataset
from edgekd.errors import ExportError
from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import count_parameters, label_names, load_classifier, load_tokenizer
from edgekd.sample import Samples
from edgekd.targets import Format, RuntimeUnavailable
from edgekd.targets.graph import INPUT_NAMES, MIN_LENGTH, ExportWrapper, encode_fixed, encode_unpadded, run_graph

FP32_TOLERANCE = 1e-4          # max |logit difference| of a float artifact vs PyTorch
MIN_AGREEMENT = {"fp16": 0.99, "int8": 0.99, "int4": 0.97, "lut4": 0.97}
PARITY_TEXTS = 200
PADDED_TEXTS = 20              # a dynamic-length artifact is also checked at its upper bound on these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def artifact_name(model_name: str, fmt: Format, spec: QuantSpec) -> str:
    """ExecuTorch's benchmark apps parse <model>_<backend>_<quant>.pte."""
    return f"{model_name}_{fmt.backend}_{spec.name.replace('-', '')}.{fmt.suffix}"


def export_artifact(model_dir: Path, model_stage: str, fmt: Format, spec: QuantSpec, dataset: Dataset,
                    out: Path, role: str, model_name: str, threads: int = 0, options: dict | None = None,
                    asked: str | None = None) -> dict:
    """`asked`: the recipe's spec when `spec` is the format's nearest realization of it (int8 -> int8-weights)."""
    if spec.name not in fmt.specs:
        raise ExportError(f"{fmt.target}/{fmt.name} cannot realize quantization '{spec.name}'; "
                          f"it supports: {', '.join(fmt.specs)}")
    source_manifest, source = stage_input(model_dir, model_stage)
    max_length = source_manifest["max_length"]
    options = fmt.resolve_options(options)
    params = {"target": fmt.target, "format": fmt.name, "quant": spec.to_dict(), "role": role,
              "max_length": max_length, "model_name": model_name, "options": options,
              # fields added later enter the key only when set, so older exports keep their keys
              **({"asked": asked} if asked and asked != spec.name else {}),
              **({"threads": threads} if threads else {})}  # the parity run's threads
    inputs = {"model": source, "data": dataset.fingerprint()}
    if is_done(out, "export", params, inputs):
        return read_manifest(out)["metrics"]
    model = load_classifier(str(model_dir)).eval()
    tokenizer = load_tokenizer(str(model_dir))
    # A dynamic-length artifact takes each text at its own token length: it is calibrated, checked and
    # measured that way, as an app would run it (truncated at max_length, never padded).
    dynamic = bool(options.get("dynamic_length"))
    encode = encode_unpadded if dynamic else encode_fixed
    with write_stage(out, "export", params, inputs) as stage:
        file = stage.path / artifact_name(model_name, fmt, spec)
        samples = Samples(dataset)  # stratified by label, seeded: data files are often sorted by label
        calibration = encode(tokenizer, samples.split("train", spec.calibration_samples, "calibration").texts,
                             max_length)
        delegation = fmt.export(model, spec, max_length, calibration, file, **options)
        try:
            runner, unavailable = fmt.runner(file, threads), None
        except RuntimeUnavailable as exc:  # e.g. Core ML on Linux
            runner, unavailable = None, str(exc)

        val_texts = samples.split("validation", PARITY_TEXTS, "parity").texts
        val_inputs = encode(tokenizer, val_texts, max_length)
        if runner is None:
            # Nothing here can run the artifact: the exporter's structural check (it raises on a
            # mismatch) stands in for parity, and no test metrics are claimed without a runtime.
            parity = {"checked": "structural", "reason": unavailable, "checks": delegation.get("checks", [])}
            test, test_logits = None, None
        else:
            parity = {"checked": "numerical", **_compare(model, runner, val_inputs)}
            if dynamic:  # the upper bound too: a few texts padded to max_length, gated with the rest
                padded = _compare(model, runner, encode_fixed(tokenizer, val_texts[:PADDED_TEXTS], max_length))
                parity = {"checked": "numerical", **_pool(parity, padded), "own_length": _figures(parity),
                          "padded_to_max_length": padded}
            _check_parity(parity, spec, file.name)
            test_inputs = encode(tokenizer, dataset.test.texts, max_length)
            test_logits = np.concatenate([runner(ids, mask) for ids, mask in test_inputs])
            test = classification_metrics(test_logits, dataset.label_ids(dataset.test))
        stage.metrics = {"test": test, "parity": parity, "params": count_parameters(model),
                         "load_ms": runner.load_ms if runner else None}
        if runner is None:
            stage.metrics["test_note"] = f"not measured: {unavailable}; run the artifact there to measure it"
        for name in TOKENIZER_FILES + ("LICENSE", "NOTICE"):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, stage.path / name)
        stage.extra.update({
            "artifact": file.name, "size_bytes": artifact_size(file), "role": role, "max_length": max_length,
            "labels": label_names(model), "quant": spec.to_dict(), "quant_asked": asked or spec.name,
            "delegation": delegation,
            "model_inputs": [_input_spec(n, max_length, dynamic) for n in INPUT_NAMES],
            "dynamic_length": dynamic,
            "model_outputs": [{"name": "logits", "shape": [1, len(label_names(model))],
                               "dtype": _output_dtype(delegation)}],
            "tokenizer": [n for n in TOKENIZER_FILES if (model_dir / n).is_file()],
            # Per-text test predictions: the report compares every variant with the teacher's.
            "test_predictions": None if test_logits is None else test_logits.argmax(-1).tolist(),
            # A real validation text as the graph takes it (unpadded for a dynamic-length artifact, so a
            # benchmark times its real length): benchmarks feed this input.
            "sample_input": {"text": val_texts[0], "input_ids": val_inputs[0][0][0].tolist(),
                             "attention_mask": val_inputs[0][1][0].tolist()},
            "runtime": fmt.runner.versions(),
            "samples": samples.records,
        })
        if not spec.is_float and delegation.get("non_delegated_nodes"):
            stage.extra["warnings"] = [f"quantized model not fully delegated: "
                                       f"{delegation['non_delegated_nodes']} nodes run on portable kernels "
                                       f"({', '.join(list(delegation['non_delegated_ops'])[:5])})"]
    return stage.metrics


def _compare(model, runner, inputs) -> dict:
    """The runtime's logits against PyTorch's on the same inputs."""
    reference = run_graph(ExportWrapper(model), inputs).numpy()
    produced = np.concatenate([runner(ids, mask) for ids, mask in inputs])
    return {"texts": len(inputs), "max_abs_diff": float(np.abs(produced - reference).max()),
            "top1_agreement": float((produced.argmax(-1) == reference.argmax(-1)).mean())}


def _figures(parity: dict) -> dict:
    return {k: parity[k] for k in ("texts", "max_abs_diff", "top1_agreement")}


def _pool(a: dict, b: dict) -> dict:
    """Two comparisons as one: the figures the parity gate judges."""
    texts = a["texts"] + b["texts"]
    agreement = (a["top1_agreement"] * a["texts"] + b["top1_agreement"] * b["texts"]) / texts
    return {"texts": texts, "max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"]), "top1_agreement": agreement}


def _input_spec(name: str, max_length: int, dynamic: bool) -> dict:
    """One model input in the manifest: a dynamic length is named "seq", with its bounds."""
    if not dynamic:
        return {"name": name, "shape": [1, max_length], "dtype": "int32"}
    return {"name": name, "shape": [1, "seq"], "min_shape": [1, MIN_LENGTH], "max_shape": [1, max_length],
            "dtype": "int32"}


def _output_dtype(details: dict) -> str:
    """The artifact's real output dtype (int8 for full-int8 .tflite files, which say so), else float32."""
    dtypes = details.get("output_dtypes")
    return str(dtypes[0] if isinstance(dtypes, list) and dtypes else "float32")


def artifact_size(path: Path) -> int:
    """Bytes of the artifact: a file, or every file of a directory format (.mlpackage)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def check_artifact(model, spec: QuantSpec, runner, tokenizer, texts: list[str], max_length: int, dynamic: bool,
                   name: str) -> dict:
    """The parity gate of an artifact loaded in `runner`, on `texts` encoded as it takes them (each at its own
    length when `dynamic`, plus a few padded to max_length): the figures, or ExportError when it fails.
    export_artifact's gate and the budget search's (compress/search.py) on each candidate."""
    encode = encode_unpadded if dynamic else encode_fixed
    parity = {"checked": "numerical", **_compare(model, runner, encode(tokenizer, texts, max_length))}
    if dynamic:
        padded = _compare(model, runner, encode_fixed(tokenizer, texts[:PADDED_TEXTS], max_length))
        parity = {"checked": "numerical", **_pool(parity, padded), "own_length": _figures(parity),
                  "padded_to_max_length": padded}
    _check_parity(parity, spec, name)
    return parity


def _check_parity(parity: dict, spec: QuantSpec, name: str) -> None:
    if spec.is_float and parity["max_abs_diff"] > FP32_TOLERANCE:
        raise ExportError(f"{name} fails parity: max |logit diff| {parity['max_abs_diff']:.2e} > "
                          f"{FP32_TOLERANCE:.0e} on {parity['texts']} validation texts; nothing written")
    needed = MIN_AGREEMENT.get(spec.weights, 1.0) if not spec.is_float else 0.0
    if parity["top1_agreement"] < needed:
        raise ExportError(f"{name} fails parity: top-1 agreement {parity['top1_agreement']:.1%} with PyTorch "
                          f"< {needed:.0%} on {parity['texts']} validation texts; nothing written")
