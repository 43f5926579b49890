"""ExecuTorch portable .pte (no delegate) and the operator list a selective build needs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

pytest.importorskip("executorch")

from edgekd.compress.quant import get_spec  # noqa: E402
from edgekd.errors import ExportError  # noqa: E402
from edgekd.targets import FORMATS, get_format  # noqa: E402
from edgekd.targets.executorch import ExecuTorchRunner, lower_portable  # noqa: E402
from edgekd.targets.export import _check_parity  # noqa: E402
from edgekd.targets.graph import ExportWrapper, run_graph  # noqa: E402


def test_portable_pte_runs_exactly_and_lists_its_operators(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=150, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).eval()
    inputs = [(torch.randint(0, 150, (1, 12), dtype=torch.int32), torch.ones(1, 12, dtype=torch.int32))
              for _ in range(6)]
    file = tmp_path / "m_portable_fp32.pte"
    details = lower_portable(model, get_spec("fp32"), 12, [], file)
    produced = np.concatenate([ExecuTorchRunner(file)(ids, mask) for ids, mask in inputs])
    reference = run_graph(ExportWrapper(model), inputs).numpy()
    assert np.abs(produced - reference).max() < 1e-5
    listed = (tmp_path / "selected_operators.txt").read_text().strip().split(",")
    assert listed == details["selected_operators"]
    assert {"aten::addmm.out", "aten::native_layer_norm.out", "aten::embedding.out"} <= set(listed)
    assert details["delegated_nodes"] == 0


def test_portable_is_an_embedded_format_that_refuses_quantized_specs():
    fmt = get_format("embedded", "executorch-portable")
    embedded = [name for name in FORMATS.in_order() if name.startswith("embedded/")]
    assert fmt.specs == ("fp32",) and embedded[0] == "embedded/tflm"  # tflm stays the target's default
    with pytest.raises(ExportError, match="max \\|logit diff\\|"):
        _check_parity({"max_scaled_diff": 1.0, "tolerance": 1e-4, "scaled": False, "reference": "PyTorch",
                       "top1_agreement": 1.0, "texts": 1}, "x.pte")
