"""The on-device C tokenizer: its generated tables, a host build, and a ctypes handle to run it here.

The C code (resources/ctokenizer) is generic; what makes it the model's tokenizer is two generated
headers. Their Unicode tables are not transcribed from a Unicode database: every code point is
passed through the model's own Rust normalizer and pre-tokenizer (the `tokenizers` library that the
Hugging Face fast tokenizer runs), so they hold exactly what that library does, including its own
Unicode versions (measured: it keeps unassigned code points and post-9.0 emoji, which a table made
from Python's `unicodedata` would drop). `unicodedata` supplies only the canonical combining classes,
the one contextual rule (NFD reorders combining marks), and every one of those is checked against
the normalizer before it is used.
"""
from __future__ import annotations

import ctypes
import functools
import json
import re
import shutil
import subprocess
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError

SOURCES = Path(__file__).parent / "resources" / "ctokenizer"
C_FILES = ("edgekd_tokenizer.h", "edgekd_tokenizer.c")
CONFIG_H, TABLES_H = "edgekd_tokenizer_config.h", "edgekd_tokenizer_tables.h"
SUPPORTED = ("BERT WordPiece (BertNormalizer + BertPreTokenizer + WordPiece, [CLS] text [SEP]), "
             "as in BERT, DistilBERT, MiniLM and ELECTRA checkpoints")
OP_DROP, OP_BREAK, OP_DELTA, OP_ALT, OP_SEQ, OP_PAD, OP_HANGUL = range(7)
CLASS_SPACE, CLASS_PUNCT = 1, 2
HANGUL = range(0xAC00, 0xD7A4)
MAX_WORD_CHARS = 10_000  # the workspace stores byte offsets of a word as uint16: 4 bytes a character at most
# Two marks that survive accent stripping and that NFD swaps (classes 226 then 216): a character
# between them that keeps them swapped is transparent to canonical ordering, one that keeps them
# apart ends the run of marks.
_LATE, _EARLY = "\U0001D16D", "\U0001D165"


class TokenizerNotSupported(EdgeKDError):
    """The tokenizer is not of the family the C tokenizer implements."""


def describe(tokenizer) -> dict:
    """The settings of a BERT WordPiece tokenizer, or TokenizerNotSupported naming what is supported."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerNotSupported(f"the tokenizer has no tokenizer.json (a slow Python tokenizer); the C "
                                    f"tokenizer supports {SUPPORTED}")
    spec = json.loads(backend.to_str())
    parts = {"normalizer": spec.get("normalizer") or {}, "pre_tokenizer": spec.get("pre_tokenizer") or {},
             "model": spec.get("model") or {}}
    want = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece"}
    found = {k: v.get("type", "none") for k, v in parts.items()}
    if found != want:
        raise TokenizerNotSupported(f"this tokenizer is {found['model']} with {found['normalizer']} and "
                                    f"{found['pre_tokenizer']}; the C tokenizer supports {SUPPORTED} only")
    model, vocab = parts["model"], tokenizer.get_vocab()
    cls_id, sep_id = _template_ids(spec.get("post_processor") or {})
    added = []
    for token in spec.get("added_tokens", []):
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise TokenizerNotSupported(f"added token {token['content']!r} is matched on normalized text or with "
                                        f"lstrip/rstrip/single_word; the C tokenizer supports {SUPPORTED} with "
                                        f"its special tokens matched as written")
        added.append((token["content"], token["id"]))
    if not 0 < int(model["max_input_chars_per_word"]) <= MAX_WORD_CHARS:
        raise TokenizerNotSupported(f"max_input_chars_per_word {model['max_input_chars_per_word']} is outside "
                                    f"1..{MAX_WORD_CHARS}, the word buffer the C tokenizer is built for")
    if model["unk_token"] not in vocab or tokenizer.pad_token_id is None:
        raise TokenizerNotSupported(f"the vocabulary lacks its unknown token {model['unk_token']!r} or a padding "
                                    f"token; the C tokenizer supports {SUPPORTED}")
    return {"vocab": vocab, "unk_id": vocab[model["unk_token"]], "prefix": model["continuing_subword_prefix"],
            "max_word_chars": int(model["max_input_chars_per_word"]), "cls_id": cls_id, "sep_id": sep_id,
            "pad_id": tokenizer.pad_token_id, "added": added, "normalizer": parts["normalizer"]}


def _template_ids(post: dict) -> tuple[int, int]:
    """[CLS] and [SEP] ids of a single-sequence template [CLS] $A [SEP] (TemplateProcessing or BertProcessing)."""
    if post.get("type") == "BertProcessing":
        return post["cls"][1], post["sep"][1]
    if post.get("type") == "TemplateProcessing":
        single = post.get("single", [])
        kinds = [next(iter(item)) for item in single]
        if kinds == ["SpecialToken", "Sequence", "SpecialToken"]:
            first, last = (post["special_tokens"][single[i]["SpecialToken"]["id"]]["ids"] for i in (0, 2))
            if len(first) == 1 and len(last) == 1:
                return first[0], last[0]
    raise TokenizerNotSupported(f"the post-processor is {post.get('type', 'none')} but not [CLS] text [SEP]; "
                                f"the C tokenizer supports {SUPPORTED}")


# --------------------------------------------------------------------------------------- tables

@functools.lru_cache(maxsize=4)
def _probe(normalizer_json: str) -> dict:
    """What the normalizer does to every code point, read from the tokenizers library itself."""
    from tokenizers import normalizers, pre_tokenizers

    settings = {k: v for k, v in json.loads(normalizer_json).items() if k != "type"}
    norm = normalizers.BertNormalizer(**settings).normalize_str
    pre = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    reorder = norm(_LATE + _EARLY) == _EARLY + _LATE
    ops: dict[int, tuple] = {}
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:  # surrogates: never decoded (invalid UTF-8 becomes U+FFFD)
            ops[cp] = (OP_DROP, 0)
            continue
        ch = chr(cp)
        out = norm(ch)
        if out == ch:
            continue
        if out == "":
            breaks = reorder and norm(_LATE + ch + _EARLY) != _EARLY + _LATE
            ops[cp] = (OP_BREAK if breaks else OP_DROP, 0)
        elif out == f" {ch} ":
            ops[cp] = (OP_PAD, 0)
        elif cp in HANGUL and out == _hangul_nfd(cp):
            ops[cp] = (OP_HANGUL, 0)
        elif len(out) == 1:
            ops[cp] = (OP_DELTA, ord(out) - cp)
        else:
            ops[cp] = (OP_SEQ, out)
    classes = {}
    for cp in range(0x110000):
        if not 0xD800 <= cp < 0xE000:
            parts = [p for p, _ in pre("a" + chr(cp) + "b")]
            if parts == ["a", "b"]:
                classes[cp] = CLASS_SPACE
            elif parts == ["a", chr(cp), "b"]:
                classes[cp] = CLASS_PUNCT
    ccc = _combining_classes(norm, ops, reorder)
    return {"ops": ops, "classes": classes, "ccc": ccc, "reorder": reorder}


def _hangul_nfd(cp: int) -> str:
    s = cp - 0xAC00
    return chr(0x1100 + s // 588) + chr(0x1161 + (s % 588) // 28) + (chr(0x11A7 + s % 28) if s % 28 else "")


def _combining_classes(norm, ops: dict, reorder: bool) -> dict[int, int]:
    """Non-zero combining classes of the characters that survive normalization, checked pairwise."""
    if not reorder:
        return {}
    def transparent(ch: str) -> bool:  # it stays inside the run of marks: the two marks get swapped
        out = norm(_LATE + ch + _EARLY)
        return out.index(_EARLY) < out.index(_LATE)

    ccc = {cp: unicodedata.combining(chr(cp)) for cp in range(0x110000)
           if cp not in ops and unicodedata.combining(chr(cp)) and transparent(chr(cp))}
    for a in ccc:
        for b in ccc:
            expected = chr(b) + chr(a) if ccc[a] > ccc[b] else chr(a) + chr(b)
            if norm(chr(a) + chr(b)) != expected:
                raise EdgeKDError(f"the normalizer orders U+{a:04X} U+{b:04X} unlike Unicode's canonical "
                                  f"ordering; the C tokenizer cannot reproduce it")
    return ccc


def unicode_tables(normalizer: dict, vocab: dict) -> dict:
    """The normalizer's range table, pre-tokenizer classes and combining classes, smallest for `vocab`.

    A mapping X -> Y matters only if X or Y can be part of a vocabulary token: when neither is (and
    both are ordinary word characters), the word holding it is [UNK] either way, so the entry goes.
    """
    probed = _probe(json.dumps(normalizer, sort_keys=True))
    alphabet = {ord(c) for token in vocab for c in token}
    classes, ccc = probed["classes"], probed["ccc"]

    def irrelevant(cp: int, out: str) -> bool:
        chars = [cp] + [ord(c) for c in out]
        return not any(c in alphabet or c in classes or c in ccc for c in chars)

    ops = {}
    for cp, (op, arg) in probed["ops"].items():
        out = chr(cp + arg) if op == OP_DELTA else arg if op == OP_SEQ else None
        if out is None or not irrelevant(cp, out):
            ops[cp] = (op, arg)
    used = bytearray(b"\x01") * 0x110000            # code points that can reach the pre-tokenizer
    for cp, (op, _arg) in probed["ops"].items():
        if op in (OP_DROP, OP_BREAK):
            used[cp] = 0
    for op, arg in probed["ops"].values():
        for c in (arg if op == OP_SEQ else ""):
            used[ord(c)] = 1
    return {"map": _map_ranges(ops), "classes": _class_ranges(classes, used), "ccc": sorted(ccc.items()),
            "reorder": probed["reorder"]}


def _map_ranges(ops: dict) -> tuple[list, list]:
    """[(lo, hi, op, arg)] merged runs (ALT for case pairs that alternate), and the SEQ pool."""
    ranges, pool = [], []
    for cp in sorted(ops):
        op, arg = ops[cp]
        last = ranges[-1] if ranges else None
        if op == OP_SEQ:
            ranges.append([cp, cp, OP_SEQ, len(pool)])
            pool += [len(arg)] + [ord(c) for c in arg]
        elif last and last[2] == op and last[3] == arg and last[1] == cp - 1:
            last[1] = cp                                   # a contiguous run (DROP, PAD, A-Z -> a-z, ...)
        elif (last and op == OP_DELTA and last[3] == arg and last[1] == cp - 2 and cp - 1 not in ops
              and (last[2] == OP_ALT or (last[2] == OP_DELTA and last[0] == last[1]))):
            last[1], last[2] = cp, OP_ALT                  # every other code point: Ā ā Ă ă ...
        else:
            ranges.append([cp, cp, op, arg])
    return [tuple(r) for r in ranges], pool


def _class_ranges(classes: dict, used: bytearray) -> list:
    """[(lo, hi, class)] for space and punctuation; code points the normalizer never outputs may join a range."""
    ranges = []
    for cp in sorted(classes):
        kind = classes[cp]
        if ranges and ranges[-1][2] == kind and all(not used[c] or classes.get(c) == kind
                                                    for c in range(ranges[-1][1] + 1, cp)):
            ranges[-1][1] = cp
        elif used[cp]:
            ranges.append([cp, cp, kind])
    return [tuple(r) for r in ranges]


def vocab_table(vocab: dict) -> dict:
    """Tokens as one UTF-8 blob with offsets, their ids, and an open-addressing hash table of indexes."""
    tokens = sorted(vocab, key=vocab.get)
    blob, offsets = bytearray(), [0]
    for token in tokens:
        blob += token.encode()
        offsets.append(len(blob))
    bits = max(4, (2 * len(tokens) - 1).bit_length())
    slots = [0] * (1 << bits)
    for index, token in enumerate(tokens):
        slot = fnv1a(token.encode()) & ((1 << bits) - 1)
        while slots[slot]:
            slot = (slot + 1) & ((1 << bits) - 1)
        slots[slot] = index + 1
    return {"blob": bytes(blob), "offsets": offsets, "ids": [vocab[t] for t in tokens], "bits": bits, "slots": slots}


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


# --------------------------------------------------------------------------------------- C output

def write_sources(tokenizer, max_length: int, out: Path) -> dict:
    """Copy the C tokenizer into `out` with the model's generated headers; return a summary."""
    info = describe(tokenizer)
    tables = unicode_tables(info["normalizer"], info["vocab"])
    vocab = vocab_table(info["vocab"])
    out.mkdir(parents=True, exist_ok=True)
    for name in C_FILES:
        shutil.copyfile(SOURCES / name, out / name)
    (out / CONFIG_H).write_text(
        "/* Generated by edgekd bundle for one model. Do not edit. */\n"
        "#ifndef EDGEKD_TOKENIZER_CONFIG_H\n#define EDGEKD_TOKENIZER_CONFIG_H\n"
        f"#define EKD_MAX_LENGTH {max_length}  /* the model's input length */\n"
        f"#define EKD_MAX_WORD_CHARS {info['max_word_chars']}  /* longer words are [UNK] */\n"
        "#endif\n")
    (out / TABLES_H).write_text(_tables_source(info, tables, vocab))
    return {"vocab_size": len(info["vocab"]), "map_ranges": len(tables["map"][0]),
            "class_ranges": len(tables["classes"]),
            "combining_classes": len(tables["ccc"]), "normalizer": info["normalizer"],
            "table_bytes": (out / TABLES_H).stat().st_size}


def _array(ctype: str, name: str, values, per_line: int = 12) -> str:
    values = list(values) or [0]  # C has no empty arrays; the COUNT macros say how many are real
    rows = ",\n".join("  " + ", ".join(str(v) for v in values[i:i + per_line]) for i in range(0, len(values), per_line))
    return f"static const {ctype} {name}[{len(values)}] = {{\n{rows}\n}};\n"


def _tables_source(info: dict, tables: dict, vocab: dict) -> str:
    (ranges, pool), classes, ccc = tables["map"], tables["classes"], tables["ccc"]
    added_blob, added_offsets = bytearray(), [0]
    for content, _ in info["added"]:
        added_blob += content.encode()
        added_offsets.append(len(added_blob))
    slot_type = "uint16_t" if len(vocab["ids"]) < 0xFFFF else "uint32_t"
    prefix = "".join(f"\\x{b:02x}" for b in info["prefix"].encode())
    return "\n".join([
        "/* Generated by edgekd bundle from the model's tokenizer. Do not edit.",
        f" * Normalizer: {json.dumps(info['normalizer'], sort_keys=True)}",
        " * Unicode tables: what that normalizer and BertPreTokenizer do to each code point (probed). */",
        "#ifndef EDGEKD_TOKENIZER_TABLES_H\n#define EDGEKD_TOKENIZER_TABLES_H\n",
        f"#define EKD_CLS_ID {info['cls_id']}\n#define EKD_SEP_ID {info['sep_id']}\n"
        f"#define EKD_PAD_ID {info['pad_id']}",
        f"#define EKD_UNK_ID {info['unk_id']}\n#define EKD_REORDER {int(tables['reorder'])}",
        f'static const char EKD_PREFIX[] = "{prefix}";\n#define EKD_PREFIX_LEN {len(info["prefix"].encode())}\n',
        "/* Normalizer: sorted ranges; hi in the low 24 bits, the operation in the top 8. */",
        f"#define EKD_MAP_COUNT {len(ranges)}",
        _array("uint32_t", "ekd_map_lo", (r[0] for r in ranges)),
        _array("uint32_t", "ekd_map_hi", (f"{r[1] | r[2] << 24}u" for r in ranges)),
        _array("int32_t", "ekd_map_arg", (r[3] for r in ranges)),
        _array("uint32_t", "ekd_seq", pool),
        "/* Pre-tokenizer: whitespace (1) and punctuation (2) ranges; everything else is a word character. */",
        f"#define EKD_CLASS_COUNT {len(classes)}",
        _array("uint32_t", "ekd_class_lo", (r[0] for r in classes)),
        _array("uint32_t", "ekd_class_hi", (f"{r[1] | r[2] << 24}u" for r in classes)),
        "/* Canonical combining classes of the marks that survive normalization: code point | class << 24. */",
        f"#define EKD_CCC_COUNT {len(ccc)}",
        _array("uint32_t", "ekd_ccc", (f"{cp | k << 24}u" for cp, k in ccc)),
        f"/* Vocabulary: {len(vocab['ids'])} tokens as UTF-8, offsets, ids, FNV-1a hash slots (token index + 1). */",
        f"#define EKD_SLOT_BITS {vocab['bits']}",
        _array("unsigned char", "ekd_vocab_bytes", vocab["blob"], 24),
        _array("uint32_t", "ekd_vocab_offsets", vocab["offsets"]),
        _array("int32_t", "ekd_vocab_ids", vocab["ids"]),
        _array(slot_type, "ekd_vocab_slots", vocab["slots"], 16),
        "/* Special tokens, matched in the raw text before normalization (leftmost, longest). */",
        f"#define EKD_ADDED_COUNT {len(info['added'])}",
        _array("unsigned char", "ekd_added_bytes", added_blob, 24),
        _array("uint32_t", "ekd_added_offsets", added_offsets),
        _array("int32_t", "ekd_added_ids", (i for _, i in info["added"])),
        "#endif\n"])


# --------------------------------------------------------------------------------------- host build

def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_library(sources: Path, out: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the C tokenizer in `sources` as a shared library with the system C compiler."""
    cc = compiler()
    if cc is None:
        raise EdgeKDError("no C compiler (cc, gcc or clang) on this machine; install one to build the C tokenizer")
    lib = Path(out) / "libedgekd_tokenizer.so"
    command = [cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-shared", "-fPIC",
               *extra_flags, str(Path(sources) / "edgekd_tokenizer.c"), "-o", str(lib)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise EdgeKDError(f"the C tokenizer does not compile with {Path(cc).name}: {first}")
    return lib


class CTokenizer:
    """The compiled C tokenizer through ctypes: encode(text) -> (ids, mask) int32 arrays as the app gets them."""

    def __init__(self, sources: Path, max_length: int):
        self._tmp = tempfile.TemporaryDirectory(prefix="edgekd-ctok-")
        self.lib = ctypes.CDLL(str(build_library(sources, Path(self._tmp.name))))
        self.lib.ekd_tokenize.restype = ctypes.c_int
        self.lib.ekd_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        # sizeof(ekd_workspace): 15 bytes a word character at most (4 + 1 + 2 + 4 + 4), plus two size_t.
        chars = int(re.search(r"EKD_MAX_WORD_CHARS (\d+)", (Path(sources) / CONFIG_H).read_text()).group(1))
        self.workspace = ctypes.create_string_buffer(15 * (chars + 2) + 64)
        self.max_length = max_length

    def encode(self, text: str | bytes, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        length = max_length or self.max_length
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        ids, mask = np.zeros(length, np.int32), np.zeros(length, np.int32)
        count = self.lib.ekd_tokenize(self.workspace, data, len(data), ids.ctypes.data, mask.ctypes.data, length)
        if count < 0:
            raise EdgeKDError(f"the C tokenizer refused its arguments (max_length {length})")
        return ids, mask
