"""Stage 3: compress the student. Records the QuantSpecs with their accuracy, measured in PyTorch.

Pruning (physically smaller layers) and the budget search join this stage later; the
quantized accuracy here is that of the very PT2E graph the ExecuTorch exporter lowers.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from edgekd.compress.quant import get_spec, quantize_for_xnnpack
from edgekd.data import Dataset
from edgekd.manifest import is_done, read_manifest, stage_input, write_stage
from edgekd.metrics import classification_metrics
from edgekd.models import load_classifier, load_tokenizer
from edgekd.targets import get_format
from edgekd.targets.graph import ExportWrapper, encode_fixed, run_graph

EVAL_TEXTS = 300


def compress(student_dir: Path, dataset: Dataset, quant: list[str], out: Path) -> dict:
    specs = [get_spec(name) for name in quant]  # unknown names fail before any work
    if any(not spec.is_float for spec in specs):
        get_format("android", "executorch")  # the XNNPACK quantizer ships with ExecuTorch: fail early if absent
    manifest, source = stage_input(student_dir, "distill")
    max_length = manifest["max_length"]
    params = {"quant": [spec.to_dict() for spec in specs]}
    inputs = {"student": source, "data": dataset.fingerprint()}
    if is_done(out, "compress", params, inputs):
        return read_manifest(out)["metrics"]
    with write_stage(out, "compress", params, inputs) as stage:
        for file in student_dir.iterdir():
            if file.is_file() and file.name != "manifest.json":
                shutil.copyfile(file, stage.path / file.name)
        model = load_classifier(str(student_dir)).eval()
        tokenizer = load_tokenizer(str(student_dir))
        texts = dataset.validation.texts[:EVAL_TEXTS]
        labels = dataset.label_ids(dataset.validation)[:EVAL_TEXTS]
        inputs = encode_fixed(tokenizer, texts, max_length)
        reference = run_graph(ExportWrapper(model), inputs).numpy()
        variants = {"fp32": classification_metrics(reference, labels)}
        calibration = encode_fixed(tokenizer, dataset.train.texts[:max((s.calibration_samples for s in specs), default=0)],
                                   max_length)
        for spec in specs:
            if spec.is_float:
                continue
            program = quantize_for_xnnpack(model, spec, max_length, calibration)
            logits = run_graph(program.module(), inputs).numpy()
            variants[spec.name] = classification_metrics(logits, labels, reference)
        stage.metrics = {"validation": variants}
        stage.extra.update({"max_length": max_length, "labels": manifest["labels"],
                            "plan": {"pruning": None, "quant": [spec.to_dict() for spec in specs]}})
    return stage.metrics
