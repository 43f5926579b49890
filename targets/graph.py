"""The graph every exporter starts from: int32 ids and mask [1, L] in, logits out (L fixed, or 1..max_length)."""
from __future__ import annotations

import copy
import math

import torch

# The additive mask's value for padding: float16's min, not float32's. Backends that compute in
# float16 (Core ML, fp16 delegates) turn float32's min into -inf, and 0 * -inf is NaN for every kept
# token; exp() of float16's min is 0 in float32 as well, so fp32 parity is unchanged.
MASK_VALUE = torch.finfo(torch.float16).min


class ExportWrapper(torch.nn.Module):
    """(input_ids int32 [1, L], attention_mask int32 [1, L]) -> logits float32 [1, C].

    int32 ids because edge runtimes dislike int64. The additive mask is built here, so the
    graph carries no mask-construction ops (arange/index/where) that would split delegation
    and that break PT2E quantization; transformers passes a prepared 4D mask through as is.
    Eager attention, because SDPA's decomposition adds a "safe softmax" (eq/any/where/
    logical_not per layer) that XNNPACK does not delegate: measured 4.4 -> 3.5 ms on the
    2-layer MiniLM student.
    """

    def __init__(self, model):
        super().__init__()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype  # float32, or float16 for fp16 evaluation
        additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE
        return self.model(input_ids=input_ids.long(), attention_mask=additive).logits


# The additive mask of graphs whose activations are quantized statically (int8-static: ExecuTorch's
# PT2E, LiteRT's and TFLite Micro's full int8). Calibration puts the mask's range into the int8 scale of
# the add it feeds: with float16's or float32's min (-65504, -3.4e38) every real attention score rounds
# to one step or the mask to 0 (LiteRT measured a scale of 3.9e-12; the ExecuTorch tiny student agreed
# with fp32 on 63 % of texts). -30 stays inside the scores' range and still weighs a padded key e^-30.
STATIC_MASK = -30.0


class StaticInt8Wrapper(ExportWrapper):
    """ExportWrapper with the -30 additive mask, for statically quantized (full-int8) graphs."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * STATIC_MASK
        return self.model(input_ids=input_ids.long(), attention_mask=additive).logits


class ErfGELU(torch.nn.Module):
    """Exact (erf) GELU in ABS, EXP, DIV, MUL, ADD, SUB only: for runtimes without GELU or ERF (TFLite Micro).

    erf(t), t >= 0, by Abramowitz & Stegun 7.1.26: 1 - s(a1 + s(a2 + ... + s a5)) e^(-t^2), s = 1/(1 + p t),
    error <= 1.5e-7. GELU(x) = x/2 (1 + erf(x/sqrt 2)) and erf is odd, so GELU(x) = (x + |x| erf(|x|/sqrt 2)) / 2:
    no SIGN op needed. Measured against float64 GELU on [-12, 12]: max error 3.3e-7 in float32 (torch's own
    float32 GELU: 1.2e-6). Written out op by op, so the converter has no erf pattern to fuse back into GELU.
    """

    P, A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs()
        s = 1.0 / (1.0 + (self.P / math.sqrt(2.0)) * a)
        poly = s * (self.A[0] + s * (self.A[1] + s * (self.A[2] + s * (self.A[3] + s * self.A[4]))))
        return 0.5 * (x + a) - 0.5 * a * poly * torch.exp(-0.5 * a * a)


class TanhGELU(torch.nn.Module):
    """Tanh-approximated GELU as x * sigmoid(2c(x + 0.044715 x^3)), c = sqrt(2/pi): the same function
    (0.5 (1 + tanh z) = sigmoid(2z)) in LOGISTIC and MUL, where torch's form lowers to GELU or POW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))


def _gelu_replacement(module: torch.nn.Module) -> torch.nn.Module | None:
    """ErfGELU or TanhGELU for a GELU activation module of torch or transformers, else None."""
    from transformers import activations as act

    if isinstance(module, torch.nn.GELU):
        return ErfGELU() if module.approximate == "none" else TanhGELU()
    if type(module) is act.GELUActivation:       # F.gelu or its python erf form: exact GELU
        return ErfGELU()
    if type(module) in (act.GELUTanh, act.NewGELUActivation):
        return TanhGELU()
    return None


def without_gelu(model):
    """`model` itself if it has no GELU activation module, else a copy with each one written in
    elementwise ops (ErfGELU, TanhGELU). A source transform for one export graph (TFLite Micro has no
    GELU, ERF or POW kernel): the caller's model and every other target keep torch's GELU.
    """
    if not any(_gelu_replacement(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            replacement = _gelu_replacement(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model


INPUT_NAMES = ("input_ids", "attention_mask")


def example_inputs(max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(1, max_length, dtype=torch.int32)
    mask = torch.ones(1, max_length, dtype=torch.int32)
    return ids, mask


# The shortest sequence a dynamic-length graph takes. torch.export (2.13) and the XNNPACK delegate accept a
# length of 1 here (no 0/1 specialization once the bound is declared); a tokenized text has >= 2 anyway.
MIN_LENGTH = 1


def dynamic_shapes(max_length: int) -> tuple[dict, dict]:
    """torch.export's dynamic_shapes for (ids, mask): one sequence dimension shared by both, <= max_length.

    ExecuTorch plans memory for the upper bound, and the runtime refuses a longer input."""
    seq = torch.export.Dim("seq", min=MIN_LENGTH, max=max_length)
    return {1: seq}, {1: seq}


def encode_unpadded(tokenizer, texts: list[str], max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each text as a dynamic-length graph takes it: its own token length (truncated at max_length), int32."""
    encoded = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        encoded.append((enc["input_ids"].to(torch.int32), enc["attention_mask"].to(torch.int32)))
    return encoded


def median_length_text(tokenizer, texts: list[str], max_length: int) -> str:
    """The text of median token length (truncated at max_length; the first of ties): the input a benchmark times,
    typical of the data, and the same for every export and search candidate drawn from the same sample."""
    lengths = [int(mask.sum()) for _, mask in encode_unpadded(tokenizer, texts, max_length)]
    return texts[sorted(range(len(texts)), key=lambda i: (lengths[i], i))[(len(texts) - 1) // 2]]


def encode_fixed(tokenizer, texts: list[str], max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each text as the exported graph takes it: padded to max_length, int32, batch of one."""
    if not texts:
        return []
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"].to(torch.int32), enc["attention_mask"].to(torch.int32)
    return [(ids[i:i + 1], mask[i:i + 1]) for i in range(len(texts))]


def export_graph(model, max_length: int, dynamic: bool = False):
    """torch.export of the wrapped model at the fixed shape [1, max_length], or [1, 1..max_length] if `dynamic`."""
    wrapper = ExportWrapper(model.eval()).eval()
    with torch.no_grad():
        return torch.export.export(wrapper, example_inputs(max_length), strict=False,
                                   dynamic_shapes=dynamic_shapes(max_length) if dynamic else None)


@torch.no_grad()
def run_graph(module, inputs) -> "torch.Tensor":
    """Logits [n, C] of an eager or exported module over encode_fixed() or encode_unpadded() inputs."""
    return torch.cat([module(ids, mask) for ids, mask in inputs]).float()
