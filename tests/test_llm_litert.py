"""android/litert for decoder LMs: litert-torch's export of a tiny random Llama to a .litertlm, its .tflite gated in
LiteRT's interpreter against its own reference, the bundle checked in LiteRT-LM, and the checks failing where they
should (another model's reference, another tokenizer)."""
import pytest
import torch

from edgekd.compress.quant import get_spec
from edgekd.errors import ExportError
from edgekd.lm_data import FINSENT_TEMPLATE, prompt_ids
from edgekd.targets.llm_executorch import decoder_parity
from edgekd.targets.llm_litert import (
    LiteRTDecoderRunner,
    LiteRTLMRunner,
    export_litert_decoder,
    litert_lm_check,
    litert_recipe,
    litert_reference,
)

from conftest import make_rows
from lm_tiny import tiny_bpe_tokenizer, tiny_llama

for package in ("litert_torch", "litert_lm", "tensorflow", "ai_edge_quantizer"):  # the module imports them lazily
    pytest.importorskip(package)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("litert-lm")
    rows = make_rows(12, 1)
    texts = [FINSENT_TEMPLATE] + [r["text"] + " " + r["label"] for r in rows]
    tokenizer = tiny_bpe_tokenizer(texts)
    model = tiny_llama(vocab_size=320, layers=2)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = [prompt_ids(tokenizer, FINSENT_TEMPLATE.replace("{text}", r["text"])) for r in rows[:3]]
    return root, model, tokenizer, prompts


@pytest.fixture(scope="module", params=["fp32", "int4"])
def exported(tiny, request):
    root, model, tokenizer, prompts = tiny
    spec = get_spec(request.param)
    work = root / f"work-{spec.name}"
    work.mkdir()
    details = export_litert_decoder(root / "model", root / f"tiny_{spec.name}.litertlm", spec, 128, [16, 64], work)
    return spec, details


def test_the_tflite_passes_its_gate_and_the_bundle_its_litert_lm_check(tiny, exported):
    root, model, tokenizer, prompts = tiny
    spec, details = exported
    import transformers
    from litert_torch.generative.export_hf.core import patches

    # the exporter's import-time patch of transformers is put back: models built after it are transformers' own
    assert transformers.integrations.use_kernel_forward_from_hub is patches.original_use_kernel_forward_from_hub
    assert details["recipe"] == ("none" if spec.is_float else "dynamic_wi4b32_afp32")
    assert details["prefill_lengths"] == [16, 64] and details["file"].endswith(".litertlm")
    litert = LiteRTDecoderRunner(details["tflite"], {2}, threads=1)
    assert litert.max_seq_len == 128 and litert.vocab_size == 320 and sorted(litert.prefills) == [16, 64]
    reference = model if spec.is_float else litert_reference(model, spec)
    parity = decoder_parity(litert, reference, prompts, 8, float_model=None if spec.is_float else model)
    assert parity["passed"], parity
    if spec.is_float:  # "none" is fp32: the exporter's own default would be dynamic int8
        assert parity["worst_logit_diff"] < 1e-5
    else:  # the mirrored reference is far closer to the .tflite than the fp32 model is
        assert parity["worst_logit_diff"] < parity["median_quantization_error"] / 4
    engine = LiteRTLMRunner(details["file"], threads=1, max_seq_len=128)
    assert engine.eos_ids == {2}
    check = litert_lm_check(engine, litert, tokenizer, prompts, 8)
    assert check["passed"] and check["tokens_equal"] == 3 and check["decisive_forks"] == 0, check
    timings = engine.generate([0] * 16, 4)[1]
    assert timings["prompt_tokens"] == 16 and timings["decode_tokens_per_s"] > 0


def test_another_models_reference_fails_the_gate_and_another_tokenizer_the_litert_lm_check(tiny, exported):
    root, model, tokenizer, prompts = tiny
    spec, details = exported
    if not spec.is_float:
        pytest.skip("shown once, on the fp32 export")
    litert = LiteRTDecoderRunner(details["tflite"], {2}, threads=1)
    other = tiny_llama(vocab_size=320, layers=2, seed=1)
    assert not decoder_parity(litert, other, prompts, 8)["passed"]
    # ids shifted by one: the tokenizer an app would link disagrees with the one the model was trained with
    shifted = [[i + 1 if 3 < i < 319 else i for i in ids] for ids in prompts]
    check = litert_lm_check(LiteRTLMRunner(details["file"], threads=1, max_seq_len=128), litert, tokenizer,
                            shifted, 8)
    assert not check["passed"] and check["tokens_equal"] == 0


def test_the_reference_quantizes_as_ai_edge_quantizer_does():
    model = tiny_llama(vocab_size=64, layers=1)
    model.model.layers[0].mlp.up_proj.weight.data[:, :32] = 0  # an all-zero block keeps scale 0, not a NaN
    reference = litert_reference(model, get_spec("int4"))
    weight = reference.model.layers[0].mlp.up_proj.weight
    assert torch.isfinite(weight).all() and (weight[:, :32] == 0).all()
    # int4 per block of 32: at most 16 levels in every block, the block's largest magnitude kept (scale max/7)
    block = weight[0, 32:64]
    assert len(set(block.tolist())) <= 16
    original = model.model.layers[0].mlp.up_proj.weight[0, 32:64]
    assert block.abs().max() == pytest.approx(original.abs().max().item(), rel=1e-2)
    assert reference.lm_head.weight.data_ptr() != reference.model.embed_tokens.weight.data_ptr()


def test_a_spec_litert_cannot_realize_is_one_line():
    for name in ("int4-g128", "fp16", "int8-static"):
        with pytest.raises(ExportError) as info:
            litert_recipe(get_spec(name))
        assert "\n" not in str(info.value) and "use fp32, int8, int4 or int4-g64" in str(info.value)
    assert litert_recipe(get_spec("int4-g64")) == "dynamic_wi4b64_afp32"


def test_greedy_agreement_tells_a_near_tie_fork_from_a_decisive_one():
    from edgekd.targets.llm_litert import greedy_agreement

    prefixes = ["a", "ab", "abc", "abcd"]
    agree = lambda text, decisive=(True,) * 5, stopped=False, prefixes=prefixes: greedy_agreement(
        text, prefixes, stopped, list(decisive))
    assert agree("abcd")["equal"] and agree("abcx")["equal"]  # a path cut by its length: its last token not compared
    assert agree("abxd") == {"equal": False, "fork": 2, "decisive_fork": True}
    assert agree("abxd", (True, True, False, True))["decisive_fork"] is False
    # a path that ended at an eos: the text must end there too
    assert agree("abc", stopped=True, prefixes=prefixes[:3])["equal"]
    assert agree("abcd", stopped=True, prefixes=prefixes[:3])["decisive_fork"]
    # byte-level tokens that end inside a UTF-8 character decode to U+FFFD alone: checked with the next token
    split = ["a", "a\ufffd", "aé", "aéb", "aébc"]
    assert agree("aébcd", prefixes=split)["equal"]
    assert agree("aèbcd", prefixes=split) == {"equal": False, "fork": 1, "decisive_fork": True}
