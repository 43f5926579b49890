"""Stage 4: one artifact directory per (model, target format, QuantSpec), proven correct, its change measured.

Two questions, kept apart:
- Is the export correct? The artifact runs in its real runtime beside its own reference, the graph it
  must compute: fp32 artifacts beside the fp32 PyTorch model (logits within 1e-4); quantized ones beside
  the reference their format's exporter returns (targets.Reference: ExecuTorch, the PT2E/torchao program
  it lowered, in PyTorch; LiteRT, the same .tflite in reference kernels), within that format's measured
  tolerance. A failure is a broken export: it raises GateError with the figures, nothing written.
- What did quantization cost? Accuracy on the whole validation and test splits, and top-1 agreement, of
  the artifact against the fp32 model it came from, with paired 95 % intervals, recorded as `vs_fp32`.
  It fails only when the whole interval of the validation loss lies beyond the accuracy budget
  (compress.budget, else DEFAULT_BUDGET_POINTS): a loss that noise could explain never fails.
Where this machine cannot run the runtime (Core ML off Apple hardware: the runner raises
RuntimeUnavailable), the exporter's structural check is the parity and no test metrics are claimed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgekd.compress.quant import QuantSpec
from edgekd.data import Dataset
from edgekd.errors import ExportError, GateError
from edgekd.intervals import paired_difference
from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import count_parameters, label_names, load_classifier, load_tokenizer
from edgekd.sample import Samples
from edgekd.targets import Format, Reference, RuntimeUnavailable
from edgekd.targets.graph import (
    INPUT_NAMES,
    MIN_LENGTH,
    ExportWrapper,
    encode_fixed,
    encode_unpadded,
    median_length_text,
    run_graph,
)

FP32_TOLERANCE = 1e-4          # max |logit difference| of a float artifact vs PyTorch
# Validation accuracy points a quantized artifact may lose against its fp32 model when the recipe sets
# no compress.budget; judged on the paired 95 % interval of the loss (see _check_budget).
DEFAULT_BUDGET_POINTS = 2.0
PARITY_TEXTS = 200
PADDED_TEXTS = 20              # a dynamic-length artifact is also checked at its upper bound on these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def artifact_name(model_name: str, fmt: Format, spec: QuantSpec) -> str:
    """ExecuTorch's benchmark apps parse <model>_<backend>_<quant>.pte."""
    return f"{model_name}_{fmt.backend}_{spec.name.replace('-', '')}.{fmt.suffix}"


def export_artifact(model_dir: Path, model_stage: str, fmt: Format, spec: QuantSpec, dataset: Dataset,
                    out: Path, role: str, model_name: str, threads: int = 0, options: dict | None = None,
                    asked: str | None = None, budget_points: float | None = None) -> dict:
    """Export, prove against the artifact's own reference, measure the change against fp32; raise GateError
    (nothing written) when either gate fails. `asked`: the recipe's spec when `spec` is the format's nearest
    realization of it (int8 -> int8-weights). `budget_points`: see DEFAULT_BUDGET_POINTS."""
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
    if not spec.is_float:  # the gate a quantized artifact passed is part of what it is
        params["budget_points"] = DEFAULT_BUDGET_POINTS if budget_points is None else budget_points
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
        reference = delegation.pop("reference", None)
        try:
            runner, unavailable = fmt.runner(file, threads), None
        except RuntimeUnavailable as exc:  # e.g. Core ML on Linux
            runner, unavailable = None, str(exc)

        parity_texts = samples.split("validation", PARITY_TEXTS, "parity").texts
        val_inputs = encode(tokenizer, dataset.validation.texts, max_length)  # the change against fp32: all of it
        test_labels = dataset.label_ids(dataset.test)
        if runner is None:
            # Nothing here can run the artifact: the exporter's structural check (it raises on a
            # mismatch) stands in for parity, and no test metrics are claimed without a runtime.
            parity = {"checked": "structural", "reason": unavailable, "checks": delegation.get("checks", [])}
            test, test_logits, change = None, None, None
        else:
            parity = check_artifact(model, spec, runner, tokenizer, parity_texts, max_length, dynamic, file.name,
                                    reference, f"{fmt.target}/{fmt.name}")
        if runner is not None:
            fp32 = ExportWrapper(model)
            test_inputs = encode(tokenizer, dataset.test.texts, max_length)
            test_logits = _run(runner, test_inputs)
            fp32_test = run_graph(fp32, test_inputs).numpy()
            test = classification_metrics(test_logits, test_labels, reference_logits=fp32_test)
            change = None if spec.is_float else {
                "validation": _change(_run(runner, val_inputs), run_graph(fp32, val_inputs).numpy(),
                                      dataset.label_ids(dataset.validation)),
                "test": _change(test_logits, fp32_test, test_labels), "budget_points": params["budget_points"]}
            if change:
                _check_budget(change, file.name)
        stage.metrics = {"test": test, "parity": parity, "vs_fp32": change, "params": count_parameters(model),
                         "load_ms": runner.load_ms if runner else None}
        if runner is None:
            stage.metrics["test_note"] = f"not measured: {unavailable}; run the artifact there to measure it"
        for name in TOKENIZER_FILES + ("LICENSE", "NOTICE"):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, stage.path / name)
        stage.extra.update({
            "artifact": file.name, "size_bytes": artifact_size(file), "role": role, "max_length": max_length,
            "labels": label_names(model), "quant": spec.to_dict(), "delegation": delegation,
            "quant_asked": asked or spec.name,  # the recipe's name for it (int8), where the format realizes another
            "model_inputs": [_input_spec(n, max_length, dynamic) for n in INPUT_NAMES],
            "dynamic_length": dynamic,
            "model_outputs": [{"name": "logits", "shape": [1, len(label_names(model))],
                               "dtype": _output_dtype(delegation)}],
            "tokenizer": [n for n in TOKENIZER_FILES if (model_dir / n).is_file()],
            # Per-text test predictions and the labels they are scored on: the report compares every
            # variant with the teacher's, text by text (paired intervals).
            "test_predictions": None if test_logits is None else test_logits.argmax(-1).tolist(),
            "test_labels": [int(label) for label in test_labels],
            # A real validation text as the graph takes it: the parity sample's text of median token length,
            # unpadded for a dynamic-length artifact, so a benchmark times a typical length. Benchmarks feed it.
            "sample_input": _sample_input(tokenizer, parity_texts, max_length, encode),
            "runtime": fmt.runner.versions(),
            "samples": samples.records,
        })
        if not spec.is_float and delegation.get("non_delegated_nodes"):
            stage.extra["warnings"] = [f"quantized model not fully delegated: "
                                       f"{delegation['non_delegated_nodes']} nodes run on portable kernels "
                                       f"({', '.join(list(delegation['non_delegated_ops'])[:5])})"]
    return stage.metrics


def check_artifact(model, spec: QuantSpec, runner, tokenizer, texts: list[str], max_length: int, dynamic: bool,
                   name: str, reference: Reference | None = None, fmt_name: str = "this format") -> dict:
    """The parity gate of an artifact loaded in `runner` against its own `reference` (fp32: the PyTorch model),
    on `texts` encoded as it takes them (each at its own length when `dynamic`, plus a few padded to max_length):
    the figures, or GateError. export_artifact's gate and the budget search's on each candidate."""
    if reference is None and not spec.is_float:  # the format knows no faithful reference for this spec
        return {"checked": "none", "reason": f"{fmt_name} declares no numerical reference for {spec.name}; "
                                             f"judged by its change against fp32 alone"}
    encode = encode_unpadded if dynamic else encode_fixed
    parity = _parity(model, runner, reference, encode(tokenizer, texts, max_length))
    if dynamic:  # the upper bound too: a few texts padded to max_length, gated with the rest
        padded = _parity(model, runner, reference, encode_fixed(tokenizer, texts[:PADDED_TEXTS], max_length))
        parity = {**_pool(parity, padded), "own_length": _figures(parity), "padded_to_max_length": padded}
    _check_parity(parity, name)
    return parity


def _sample_input(tokenizer, texts: list[str], max_length: int, encode) -> dict:
    text = median_length_text(tokenizer, texts, max_length)
    ids, mask = encode(tokenizer, [text], max_length)[0]
    return {"text": text, "input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist()}


def _run(runner, inputs) -> np.ndarray:
    return np.concatenate([np.asarray(runner(ids, mask), dtype=np.float32) for ids, mask in inputs])


def _parity(model, runner, reference: Reference | None, inputs) -> dict:
    """The runtime's logits against the artifact's own reference on the same inputs (fp32: the PyTorch model).

    Quantized: each text's largest |logit difference| is scaled by 1 + that text's largest |reference
    logit|, so one tolerance holds for small random models and trained ones with wide logits."""
    produced = _run(runner, inputs)
    if reference is None:
        expected = run_graph(ExportWrapper(model), inputs).numpy()
        name, limit = "the fp32 PyTorch model", FP32_TOLERANCE
        scaled = np.abs(produced - expected).max(-1)
    else:
        expected = _run(reference.run, inputs)
        name, limit = reference.name, reference.tolerance
        scaled = np.abs(produced - expected).max(-1) / (1 + np.abs(expected).max(-1))
    return {"checked": "numerical", "reference": name, "texts": len(inputs),
            "max_abs_diff": float(np.abs(produced - expected).max()), "max_scaled_diff": float(scaled.max()),
            "tolerance": limit, "scaled": reference is not None,
            "top1_agreement": float((produced.argmax(-1) == expected.argmax(-1)).mean())}


def _change(logits: np.ndarray, fp32_logits: np.ndarray, labels) -> dict:
    """Accuracy of the artifact and of its fp32 model on the same texts, their difference with its paired
    95 % interval (in points), and top-1 agreement."""
    labels = np.asarray(labels)
    ours, theirs = logits.argmax(-1) == labels, fp32_logits.argmax(-1) == labels
    delta, low, high = paired_difference(ours.tolist(), theirs.tolist())
    return {"texts": int(len(labels)), "accuracy": float(ours.mean()), "fp32_accuracy": float(theirs.mean()),
            "delta_points": round(100 * delta, 2), "delta_ci95_points": [round(100 * low, 2), round(100 * high, 2)],
            "top1_agreement": float((logits.argmax(-1) == fp32_logits.argmax(-1)).mean())}


def _figures(parity: dict) -> dict:
    return {k: parity[k] for k in ("texts", "max_abs_diff", "max_scaled_diff", "top1_agreement")}


def _pool(a: dict, b: dict) -> dict:
    """Two comparisons as one: the figures the parity gate judges."""
    texts = a["texts"] + b["texts"]
    agreement = (a["top1_agreement"] * a["texts"] + b["top1_agreement"] * b["texts"]) / texts
    return {**a, "texts": texts, "max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"]),
            "max_scaled_diff": max(a["max_scaled_diff"], b["max_scaled_diff"]), "top1_agreement": agreement}


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


def _check_parity(parity: dict, name: str) -> None:
    """A broken export (wrong weights, a dropped mask, a miscompiled kernel) differs from its own reference
    by far more than the tolerance; a correct one never does, whatever the data or thread count."""
    if parity["max_scaled_diff"] > parity["tolerance"]:
        measure = "|logit diff| / (1 + |logit|)" if parity["scaled"] else "|logit diff|"
        raise GateError(f"{name} fails parity with {parity['reference']}: max {measure} "
                        f"{parity['max_scaled_diff']:.2e} > {parity['tolerance']:.0e} on {parity['texts']} "
                        f"validation texts (top-1 agreement {parity['top1_agreement']:.1%}): the export is broken; "
                        f"nothing written")


def _check_budget(change: dict, name: str) -> None:
    """Refuse only a loss beyond the budget that noise cannot explain: the whole paired 95 % interval of
    (artifact - fp32) validation accuracy below -budget points. A few texts either way never fail."""
    val, budget = change["validation"], change["budget_points"]
    if val["delta_ci95_points"][1] < -budget:
        low, high = val["delta_ci95_points"]
        raise GateError(f"{name} loses {-val['delta_points']:.1f} points of validation accuracy against its fp32 "
                        f"model (95 % interval {-high:.1f} to {-low:.1f} on {val['texts']} texts), beyond the budget "
                        f"of {budget:g} points; choose a milder quantization or raise compress.budget; "
                        f"nothing written")
