"""The C tokenizer against the Hugging Face fast tokenizer, id for id and mask for mask.

Texts: BANKING77 (when <repo>/../shared/data/banking77 exists), the built-in finsent data, and seeded
generated hard cases (accents, mixed scripts, CJK, Arabic, Cyrillic, emoji, combining marks, punctuation
runs, control and zero-width characters, words around the 100-character limit, special tokens written
in the text, empty and whitespace-only strings, texts longer than max_length), at several max_length
values, for the built-in tokenizer and a trimmed student's. Then other BertNormalizer settings, invalid
UTF-8, and a standalone driver built with AddressSanitizer + UndefinedBehaviorSanitizer (leak check on).
"""
from __future__ import annotations

import csv
import json
import random
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekd import ctokenizer
from edgekd.errors import EdgeKDError

pytestmark = pytest.mark.skipif(ctokenizer.compiler() is None, reason="no C compiler")
ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"
LENGTHS = (8, 32, 128, 512)
MIN_TEXTS = 10_000

POOLS = {
    "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "latin": "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞßĀāĂăĄąĆćČčĎďĐđĒēĘęĚěĞğİıĲĳŁłŃń"
             "ŇňŐőŒœŘřŚśŞşŠšŢţŤťŮůŰűŸŹźŻżŽžǅǈǋǲẞﬁﬂ",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρσςτυφχψωάέήίόύώΐΰ",
    "cyrillic": "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюяЇїІіЄєҐґ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهويءآأؤإئةىًٌٍَُِّْ٠١٢٣٤٥٦٧٨٩،؛؟",
    "hebrew_indic_thai": "אבגדהוזחטיכלמנסעפצקרשתְִֵַָֹּकखगघचजटडणतदनपबमयरलवशसहािीुूेैोौंः्กขคงจฉชซญดตถทนบปผพมยรลวสหอะาิีึืุู่้",
    "cjk": "中文字符日本語漢字のテキストカタカナひらがな한국어테스트〇㐀䶵丂豈鿿𠀀𪜀",
    "emoji": ["😀", "🥰", "🤩", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "✨", "🔥", "💯", "🙏🏿", "🧑‍🤝‍🧑", "🫠", "🪿"],
    "marks": "\u0300\u0301\u0302\u0303\u0308\u0327\u0331\u0345\u035c\u0361\u20dd\u1ab0\u0f71\u0f72\u0f80\u0941"
             "\u302e\u302f\U0001D165\U0001D16D\U0001D16E\u1b44\ua953",
    "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»‹›„“”‘’‚—–…·•†‡‰′″※‼⁉、。「」『』【】〈〉《》！＂＃％＆（）＊，－．／：；？＠［］＾＿｛｜｝～¢£¥€₹©®™°±×÷§¶",
    "control": "".join(map(chr, range(0, 32))) + "".join(map(chr, range(0x7F, 0xA0))),
    "invisible": "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad\u034f\u180e\u2061\u206f\ufffd\U000E0001\ue000",
    "spaces": " \t\n\r\u00a0\u1680\u2000\u2003\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u0085\x0b\x0c\x1c\x1f",
    "special": ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "[cls]", "[MASK", "MASK]", "[[SEP]]"],
}


def _random_char(rng: random.Random) -> str:
    """Any code point but a surrogate, most of them in the BMP."""
    while True:
        cp = rng.randrange(0x10000) if rng.random() < 0.7 else rng.randrange(0x10000, 0x110000)
        if not 0xD800 <= cp < 0xE000:
            return chr(cp)


def _word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:  # around the 100-character limit, before and after accent stripping
        return "".join(rng.choice("aé" if rng.random() < 0.5 else "bİ") for _ in range(rng.randrange(95, 106)))
    if kind < 0.15:
        return "".join(_random_char(rng) for _ in range(rng.randrange(1, 8)))
    pools = rng.sample(sorted(POOLS), rng.choice((1, 1, 1, 2, 3)))
    return "".join(rng.choice(POOLS[rng.choice(pools)]) for _ in range(rng.randrange(1, 14)))


def hard_cases(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\t\n ", "\u3000\u00a0", "\x00", "\ufffd", "[CLS]", "[MASK][SEP]", "a" * 100, "a" * 101,
             "é" * 100, "İ" * 60, "\U0001D16D\U0001D165", "\U0001D16D\u0301\U0001D165", "\U0001D16D\u0941\U0001D165",
             "x\U0001D16D\u200b\U0001D165y", "\U0001D160\U0001D16D", "한국어 텍스트", "unaffable " * 200]
    while len(texts) < n:
        words = [_word(rng) for _ in range(rng.choice((1, 3, 8, 20, 60)))]
        seps = POOLS["spaces"] + "     "
        texts.append("".join(w + (rng.choice(seps) if rng.random() < 0.8 else "") for w in words))
    return texts


def _csv_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def corpus() -> list[str]:
    real = []
    for name in ("train.csv", "test.csv"):
        if (BANKING77 / name).is_file():
            real += _csv_texts(BANKING77 / name)
    finsent = Path(ctokenizer.__file__).parent / "resources" / "finsent"
    for name in ("train.csv", "validation.csv", "test.csv"):
        real += _csv_texts(finsent / name)
    return real + hard_cases(max(6000, MIN_TEXTS - len(real)))


def compare(hf, c: ctokenizer.CTokenizer, texts: list[str], lengths=LENGTHS) -> tuple[int, list]:
    """(texts compared, [(text, max_length, HF ids, C ids)] that differ), max_length cycling over `lengths`."""
    wrong = []
    for length in lengths:
        group = texts[lengths.index(length)::len(lengths)]
        expected = hf(group, truncation=True, max_length=length, padding="max_length")
        for text, ids, mask in zip(group, expected["input_ids"], expected["attention_mask"]):
            got_ids, got_mask = c.encode(text, length)
            if got_ids.tolist() != ids or got_mask.tolist() != mask:
                wrong.append((text, length, ids, got_ids.tolist()))
    return len(texts), wrong


@pytest.fixture(scope="module")
def builtin():
    from transformers import AutoTokenizer

    from edgekd.models import builtin_model_dir

    return AutoTokenizer.from_pretrained(builtin_model_dir())


@pytest.fixture(scope="module")
def trimmed(builtin):
    """A student's trimmed tokenizer (distill/student.py): the finsent training texts' tokens and the alphabet."""
    from transformers import BertConfig, BertForSequenceClassification

    from edgekd.distill.student import trim_vocabulary

    model = BertForSequenceClassification(BertConfig(vocab_size=builtin.vocab_size, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    texts = _csv_texts(Path(ctokenizer.__file__).parent / "resources" / "finsent" / "train.csv")
    return trim_vocabulary(model, builtin, texts)[1]


def built(tokenizer, tmp_path_factory, name: str) -> ctokenizer.CTokenizer:
    out = tmp_path_factory.mktemp(name)
    ctokenizer.write_sources(tokenizer, 128, out)
    return ctokenizer.CTokenizer(out, 128)


@pytest.mark.parametrize("which", ["builtin", "trimmed"])
def test_c_tokenizer_equals_hugging_face_on_10000_texts(which, request, tmp_path_factory):
    from conftest import REPORT_LINES

    tokenizer = request.getfixturevalue(which)
    texts = corpus()
    count, wrong = compare(tokenizer, built(tokenizer, tmp_path_factory, which), texts)
    assert count >= MIN_TEXTS
    assert not wrong, f"{len(wrong)} of {count} differ; first: {wrong[0]!r}"
    REPORT_LINES.append(f"C tokenizer == HF ({which}, vocab {tokenizer.vocab_size}): {count} texts "
                        f"(BANKING77 {'included' if BANKING77.is_dir() else 'absent'}), max_length {LENGTHS}")


@pytest.mark.parametrize("settings", [
    {"lowercase": False, "strip_accents": None},                   # a cased BERT
    {"lowercase": True, "strip_accents": False},                   # lowercase, accents kept (İ -> i + U+0307)
    {"lowercase": False, "strip_accents": True, "handle_chinese_chars": False, "clean_text": False},
])
def test_other_bert_normalizer_settings(builtin, settings, tmp_path_factory):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(builtin.backend_tokenizer.to_str())
    spec["normalizer"].update(settings)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="[PAD]",
                                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    count, wrong = compare(tokenizer, built(tokenizer, tmp_path_factory, "variant"), hard_cases(1500, seed=7))
    assert not wrong, f"{len(wrong)} of {count} differ; first: {wrong[0]!r}"


def test_canonical_ordering_of_marks_the_vocabulary_holds(builtin, tmp_path_factory):
    """NFD puts combining marks in canonical order, and words are looked up in that order. BERT's vocabulary
    holds none of the marks that survive accent stripping (so any word with one is [UNK]); a vocabulary
    that holds them as pieces makes the order visible in the ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(builtin.backend_tokenizer.to_str())
    marks = [chr(cp) for cp, _ in ctokenizer.unicode_tables(spec["normalizer"], builtin.get_vocab())["ccc"]]
    vocab = spec["model"]["vocab"]
    for mark in marks:
        for token in (mark, "##" + mark):
            vocab[token] = len(vocab)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="[PAD]",
                                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    rng = random.Random(11)
    between = ["", "", "", "\u0301", "\u0941", "\u200b", " ", "a", "\u00e9"]  # transparent, run-ending, ...
    texts = ["".join(rng.choice("xyz") + "".join(rng.choice(marks) + rng.choice(between) for _ in range(rng.randrange(1, 6)))
                     for _ in range(rng.randrange(1, 5))) for _ in range(1500)]
    count, wrong = compare(tokenizer, built(tokenizer, tmp_path_factory, "marks"), texts, (128,))
    assert not wrong, f"{len(wrong)} of {count} differ; first: {wrong[0]!r}"
    assert sum(tokenizer.unk_token_id not in ids for ids in tokenizer(texts)["input_ids"]) > 1000


def random_bytes(n: int, seed: int = 1) -> list[bytes]:
    """Valid UTF-8 mixed with every kind of invalid sequence (truncated, overlong, surrogate, > U+10FFFF, stray)."""
    rng = random.Random(seed)
    broken = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
              b"\xf5", b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3", b"\xe0\xa0", b"\xf0\x90\x80"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            r = rng.random()
            parts.append(rng.choice(broken) if r < 0.3 else bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
                         if r < 0.5 else _word(rng).encode())
        out.append(b"".join(parts))
    return out


def test_invalid_utf8_is_read_as_python_replace_reads_it(builtin, tmp_path_factory):
    """C gets bytes, Hugging Face gets str: for any bytes the C ids equal HF's for bytes.decode("utf-8", "replace")."""
    c = built(builtin, tmp_path_factory, "bytes")
    data = random_bytes(3000)
    assert sum(1 for d in data if "\ufffd" in d.decode("utf-8", "replace")) > 1000
    expected = builtin([d.decode("utf-8", "replace") for d in data], truncation=True, max_length=64, padding="max_length")
    wrong = [d for d, ids in zip(data, expected["input_ids"]) if c.encode(d, 64)[0].tolist() != ids]
    assert not wrong, f"{len(wrong)} differ; first: {wrong[0]!r}"


def test_sanitizers_find_no_overflow_undefined_behaviour_or_leak(builtin, tmp_path):
    """ASan + UBSan + LeakSanitizer over 4,000 texts (random Unicode, invalid UTF-8, long words, long texts)
    at max_length 2 to 512, with exactly-sized heap buffers; the driver also checks every output's invariants."""
    sources = tmp_path / "src"
    ctokenizer.write_sources(builtin, 128, sources)
    driver = tmp_path / "driver"
    flags = ["-std=c99", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer", f"-I{sources}"]
    build = subprocess.run([ctokenizer.compiler(), *flags, str(sources / "edgekd_tokenizer.c"),
                            str(ROOT / "tests" / "ctokenizer_driver.c"), "-o", str(driver)], capture_output=True, text=True)
    if build.returncode and "sanitize" in build.stderr:
        pytest.skip(f"this compiler has no sanitizer runtime: {build.stderr.strip().splitlines()[0]}")
    assert build.returncode == 0, build.stderr
    rng = random.Random(3)
    texts = random_bytes(1500, seed=2) + [t.encode() for t in hard_cases(2000, seed=5)]
    texts += ["".join(_random_char(rng) for _ in range(rng.randrange(0, 400))).encode() for _ in range(490)]
    texts += [b"a" * 5000, b"\xcc\x81" * 3000, "\U0001D165".encode() * 500, b"[MASK]" * 400, b"", b" " * 1000,
              "é".encode() * 150, b"x" * 100 + b"\xff", "\U0001D16D\U0001D165".encode() * 60, b"\x00" * 64]
    records = tmp_path / "texts.bin"
    records.write_bytes(b"".join(struct.pack("=I", len(t)) + t for t in texts))
    run = subprocess.run([str(driver), str(records), str(builtin.vocab_size)], capture_output=True, text=True,
                         env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert run.returncode == 0 and "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.split() == ["texts", str(len(texts)), "calls", str(6 * len(texts)), "violations", "0"]
    from conftest import REPORT_LINES
    REPORT_LINES.append(f"C tokenizer under ASan+UBSan+LSan: {len(texts)} texts x 6 max_length values, clean")


# --- what it refuses ------------------------------------------------------------------------------

def _fast(model, pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_byte_level_bpe_and_unigram_tokenizers_are_refused_naming_bert_wordpiece():
    from tokenizers import models, normalizers, pre_tokenizers

    roberta = _fast(models.BPE({"<unk>": 0, "<pad>": 1, "a": 2}, [], unk_token="<unk>"), pre_tokenizers.ByteLevel())
    t5 = _fast(models.Unigram([("<unk>", 0.0), ("<pad>", 0.0), ("▁a", -1.0)], 0), pre_tokenizers.Metaspace(),
               normalizers.NFKC())
    for tokenizer, family in ((roberta, "BPE"), (t5, "Unigram")):
        with pytest.raises(ctokenizer.TokenizerNotSupported) as error:
            ctokenizer.describe(tokenizer)
        message = str(error.value)
        assert "\n" not in message and family in message and "BERT WordPiece" in message
        assert isinstance(error.value, EdgeKDError)


def test_the_vocabulary_hash_matches_the_c_one(builtin, tmp_path_factory):
    """Every token of the vocabulary, alone, comes back as its own id (the C lookup finds all 30,522)."""
    c = built(builtin, tmp_path_factory, "vocab")
    vocab = builtin.get_vocab()
    words = [t for t in vocab if not t.startswith("##") and t not in builtin.all_special_tokens
             and builtin.backend_tokenizer.normalizer.normalize_str(t) == t and len(t) == len(t.strip())
             and [p for p, _ in builtin.backend_tokenizer.pre_tokenizer.pre_tokenize_str(t)] == [t]]
    assert len(words) > 20_000
    got = np.array([c.encode(w, 3)[0][1] for w in words])
    assert (got == np.array([vocab[w] for w in words])).all()
