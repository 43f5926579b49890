/* edgekd on-device tokenizer (see edgekd_tokenizer.h). Portable C99, libc only, no heap.
 *
 * One pass over the input: special tokens are matched in the raw text (as the Rust AddedVocabulary
 * does, leftmost-longest); every other character is decoded from UTF-8, mapped through the generated
 * normalizer table (the model's own BertNormalizer, probed character by character at bundle time),
 * combining marks are put in canonical order, and the pre-tokenizer classes split words, each of which
 * WordPiece turns into ids. Output stops once max_length - 1 ids are written (truncation).
 */
#include "edgekd_tokenizer.h"

#include <string.h>

#include "edgekd_tokenizer_tables.h"

enum { OP_DROP, OP_BREAK, OP_DELTA, OP_ALT, OP_SEQ, OP_PAD, OP_HANGUL };
enum { CLASS_OTHER, CLASS_SPACE, CLASS_PUNCT };

typedef struct {
    int32_t *ids;
    size_t count;  /* ids written, [CLS] included */
    size_t limit;  /* max_length - 1: the last place is [SEP]'s */
} output;

/* Index of the range holding cp in a table of sorted, disjoint [lo, hi] ranges (hi in the low 24 bits
 * of `hi_tag`), or -1. */
static long find_range(const uint32_t *lo, const uint32_t *hi_tag, size_t count, uint32_t cp) {
    size_t a = 0, b = count;
    while (a < b) {
        size_t mid = a + (b - a) / 2;
        if (cp < lo[mid]) {
            b = mid;
        } else if (cp > (hi_tag[mid] & 0xFFFFFFu)) {
            a = mid + 1;
        } else {
            return (long)mid;
        }
    }
    return -1;
}

static int char_class(uint32_t cp) {
    long i = find_range(ekd_class_lo, ekd_class_hi, EKD_CLASS_COUNT, cp);
    return i < 0 ? CLASS_OTHER : (int)(ekd_class_hi[i] >> 24);
}

static uint8_t combining_class(uint32_t cp) {
    size_t a = 0, b = EKD_CCC_COUNT;
    while (a < b) {  /* ekd_ccc: code point in the low 24 bits, class in the top 8, sorted */
        size_t mid = a + (b - a) / 2;
        uint32_t key = ekd_ccc[mid] & 0xFFFFFFu;
        if (cp == key) return (uint8_t)(ekd_ccc[mid] >> 24);
        if (cp < key) b = mid; else a = mid + 1;
    }
    return 0;
}

/* Decode one character at s[0..n) (n >= 1); *cp gets it, or U+FFFD for a maximal invalid subpart
 * (Unicode's recommended practice, which Python's "replace" error handler follows). Returns bytes used. */
static size_t decode_utf8(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char b0 = s[0];
    size_t need, k;
    unsigned char lo = 0x80, hi = 0xBF;
    uint32_t value;
    if (b0 < 0x80) { *cp = b0; return 1; }
    if (b0 >= 0xC2 && b0 <= 0xDF) { need = 1; value = b0 & 0x1Fu; }
    else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 2; value = b0 & 0x0Fu;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;  /* no surrogates */
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 3; value = b0 & 0x07u;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;  /* nothing past U+10FFFF */
    } else { *cp = 0xFFFD; return 1; }
    for (k = 1; k <= need; k++) {
        unsigned char b;
        if (k >= n) { *cp = 0xFFFD; return k; }
        b = s[k];
        if (b < lo || b > hi) { *cp = 0xFFFD; return k; }
        lo = 0x80; hi = 0xBF;
        value = (value << 6) | (b & 0x3Fu);
    }
    *cp = value;
    return need + 1;
}

static size_t encode_utf8(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

/* FNV-1a over the continuation prefix (when `continued`) then `len` bytes: the hash the generator used. */
static uint32_t vocab_hash(int continued, const char *s, size_t len) {
    uint32_t h = 2166136261u;
    size_t i;
    if (continued) {
        for (i = 0; i < EKD_PREFIX_LEN; i++) { h ^= (unsigned char)EKD_PREFIX[i]; h *= 16777619u; }
    }
    for (i = 0; i < len; i++) { h ^= (unsigned char)s[i]; h *= 16777619u; }
    return h;
}

/* The id of token (prefix +) s[0..len) in the vocabulary, or -1. Open addressing, linear probing. */
static int32_t vocab_find(int continued, const char *s, size_t len) {
    const uint32_t mask = (1u << EKD_SLOT_BITS) - 1u;
    uint32_t slot = vocab_hash(continued, s, len) & mask;
    size_t want = len + (continued ? EKD_PREFIX_LEN : 0);
    for (;;) {
        uint32_t entry = ekd_vocab_slots[slot];
        const unsigned char *key;
        if (entry == 0) return -1;  /* slots hold token index + 1; 0 is empty */
        key = ekd_vocab_bytes + ekd_vocab_offsets[entry - 1];
        if ((size_t)(ekd_vocab_offsets[entry] - ekd_vocab_offsets[entry - 1]) == want &&
            (!continued || memcmp(key, EKD_PREFIX, EKD_PREFIX_LEN) == 0) &&
            memcmp(key + (continued ? EKD_PREFIX_LEN : 0), s, len) == 0) {
            return ekd_vocab_ids[entry - 1];
        }
        slot = (slot + 1) & mask;
    }
}

static void emit(output *out, int32_t id) {
    if (out->count < out->limit) out->ids[out->count++] = id;
}

/* Stable insertion sort of the current run of combining marks by class: Unicode canonical ordering.
 * Runs are short; a long one makes its word longer than EKD_MAX_WORD_CHARS, i.e. [UNK], anyway. */
static void close_run(ekd_workspace *ws) {
    size_t end = ws->length < EKD_MAX_WORD_CHARS + 1 ? ws->length : EKD_MAX_WORD_CHARS + 1, i;
    for (i = ws->run_start + 1; i < end; i++) {
        uint32_t c = ws->chars[i];
        uint8_t k = ws->ccc[i];
        size_t j = i;
        while (j > ws->run_start && ws->ccc[j - 1] > k) {
            ws->chars[j] = ws->chars[j - 1]; ws->ccc[j] = ws->ccc[j - 1]; j--;
        }
        ws->chars[j] = c; ws->ccc[j] = k;
    }
    ws->run_start = ws->length;
}

/* WordPiece over the finished word: greedy longest match from the left, "##" pieces after the first;
 * a word with a character no piece covers, or longer than EKD_MAX_WORD_CHARS, is one [UNK]. */
static void flush_word(ekd_workspace *ws, output *out) {
    size_t n = ws->length, i, start = 0, pieces = 0, bytes = 0;
    close_run(ws);
    ws->length = ws->run_start = 0;
    if (n == 0) return;
    if (n > EKD_MAX_WORD_CHARS) { emit(out, EKD_UNK_ID); return; }
    for (i = 0; i < n; i++) {
        bytes += encode_utf8(ws->chars[i], ws->bytes + bytes);
        ws->ends[i] = (uint16_t)bytes;
    }
    while (start < n) {
        size_t end = n, from = start ? ws->ends[start - 1] : 0;
        int32_t id = -1;
        for (; end > start; end--) {
            id = vocab_find(start > 0, ws->bytes + from, ws->ends[end - 1] - from);
            if (id >= 0) break;
        }
        if (id < 0) { emit(out, EKD_UNK_ID); return; }
        ws->pieces[pieces++] = id;
        start = end;
    }
    for (i = 0; i < pieces; i++) emit(out, ws->pieces[i]);
}

/* One normalized character into the pre-tokenizer: whitespace ends a word, punctuation is a word of
 * its own, anything else joins the word (with its combining class, for canonical ordering). */
static void put_char(ekd_workspace *ws, output *out, uint32_t c) {
    uint8_t k = EKD_REORDER ? combining_class(c) : 0;
    int cls;
    if (k == 0) close_run(ws);
    cls = char_class(c);
    if (cls == CLASS_SPACE) { flush_word(ws, out); return; }
    if (cls == CLASS_PUNCT) {
        flush_word(ws, out);
        ws->chars[0] = c; ws->ccc[0] = 0; ws->length = 1;
        flush_word(ws, out);
        return;
    }
    if (ws->length <= EKD_MAX_WORD_CHARS) { ws->chars[ws->length] = c; ws->ccc[ws->length] = k; }
    ws->length++;  /* counted past capacity: the word is then [UNK] */
    if (k == 0) ws->run_start = ws->length;
}

/* The normalizer for one input character: drop it, map it, or pass it through. */
static void normalize_char(ekd_workspace *ws, output *out, uint32_t cp) {
    long i = find_range(ekd_map_lo, ekd_map_hi, EKD_MAP_COUNT, cp);
    int op;
    uint32_t k;
    if (i < 0) { put_char(ws, out, cp); return; }
    op = (int)(ekd_map_hi[i] >> 24);
    switch (op) {
    case OP_DROP: return;                                   /* removed before any reordering happens */
    case OP_BREAK: close_run(ws); return;                   /* a stripped mark of class 0 still ends a run */
    case OP_DELTA: put_char(ws, out, (uint32_t)((int32_t)cp + ekd_map_arg[i])); return;
    case OP_ALT:                                            /* every other code point from lo: case pairs */
        put_char(ws, out, ((cp - ekd_map_lo[i]) & 1u) ? cp : (uint32_t)((int32_t)cp + ekd_map_arg[i]));
        return;
    case OP_SEQ:                                            /* pool entry: length, then the characters */
        for (k = 1; k <= ekd_seq[ekd_map_arg[i]]; k++) put_char(ws, out, ekd_seq[ekd_map_arg[i] + k]);
        return;
    case OP_PAD: put_char(ws, out, ' '); put_char(ws, out, cp); put_char(ws, out, ' '); return;
    case OP_HANGUL: {                                       /* NFD of a Hangul syllable, by the algorithm */
        uint32_t s = cp - 0xAC00u;
        put_char(ws, out, 0x1100u + s / 588u);
        put_char(ws, out, 0x1161u + (s % 588u) / 28u);
        if (s % 28u) put_char(ws, out, 0x11A7u + s % 28u);
        return;
    }
    default: put_char(ws, out, cp); return;
    }
}

/* Length of the longest special token starting at text[0..n), its id in *id; 0 when none does. */
static size_t match_added(const char *text, size_t n, int32_t *id) {
    size_t best = 0, t;
    for (t = 0; t < EKD_ADDED_COUNT; t++) {
        size_t len = ekd_added_offsets[t + 1] - ekd_added_offsets[t];
        if (len > best && len <= n && memcmp(text, ekd_added_bytes + ekd_added_offsets[t], len) == 0) {
            best = len; *id = ekd_added_ids[t];
        }
    }
    return best;
}

int ekd_tokenize(ekd_workspace *ws, const char *text, size_t text_len,
                 int32_t *input_ids, int32_t *attention_mask, size_t max_length) {
    output out;
    size_t pos = 0, i;
    if (!ws || (!text && text_len) || !input_ids || !attention_mask || max_length < 2) return -1;
    out.ids = input_ids; out.count = 0; out.limit = max_length - 1;
    ws->length = ws->run_start = 0;
    emit(&out, EKD_CLS_ID);
    while (pos < text_len && out.count < out.limit) {  /* once full, nothing later can change the ids */
        int32_t id;
        uint32_t cp;
        size_t used = match_added(text + pos, text_len - pos, &id);
        if (used) {                                     /* segments around it are tokenized apart */
            flush_word(ws, &out);
            emit(&out, id);
            pos += used;
            continue;
        }
        pos += decode_utf8((const unsigned char *)text + pos, text_len - pos, &cp);
        normalize_char(ws, &out, cp);
    }
    flush_word(ws, &out);
    out.ids[out.count++] = EKD_SEP_ID;
    for (i = 0; i < max_length; i++) {
        attention_mask[i] = i < out.count;
        if (i >= out.count) input_ids[i] = EKD_PAD_ID;
    }
    return (int)out.count;
}
