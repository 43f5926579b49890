/* edgekd on-device tokenizer: text -> the exact token ids and attention mask the model was trained with.
 *
 * BERT WordPiece as the Hugging Face fast tokenizer (Rust `tokenizers`) does it: special tokens matched
 * in the raw text, BertNormalizer (clean text, CJK spacing, accent stripping, lowercasing), canonical
 * ordering of combining marks, BertPreTokenizer (split on whitespace and punctuation), greedy
 * longest-match WordPiece with continuation prefix, [CLS] ... [SEP], truncation, padding.
 *
 * Portable C99, libc only (<stddef.h>, <stdint.h>, <string.h>). No heap, no static mutable state:
 * the caller passes the workspace (on the stack, or `static` on a microcontroller), so calls on
 * different workspaces may run in parallel. The Unicode and vocabulary tables are generated for one
 * model by `edgekd bundle` (edgekd_tokenizer_config.h, edgekd_tokenizer_tables.h) and are const data.
 *
 * Input is UTF-8. Invalid UTF-8 is decoded as Python's bytes.decode("utf-8", "replace") does: each
 * maximal invalid subpart becomes U+FFFD, which BERT's text cleaning then removes. So the ids for any
 * byte string equal the Hugging Face tokenizer's ids for that replacement-decoded string.
 */
#ifndef EDGEKD_TOKENIZER_H
#define EDGEKD_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "edgekd_tokenizer_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Scratch space for one call: the word being built (code points, their combining classes, UTF-8)
 * and its WordPiece pieces. About 11 * EKD_MAX_WORD_CHARS bytes. */
typedef struct {
    uint32_t chars[EKD_MAX_WORD_CHARS + 1];
    uint8_t ccc[EKD_MAX_WORD_CHARS + 1];
    uint16_t ends[EKD_MAX_WORD_CHARS + 1];
    char bytes[4 * EKD_MAX_WORD_CHARS + 4];
    int32_t pieces[EKD_MAX_WORD_CHARS + 1];
    size_t length;     /* characters in the current word; past EKD_MAX_WORD_CHARS the word is [UNK] */
    size_t run_start;  /* where the current run of combining marks starts (canonical ordering) */
} ekd_workspace;

/* Tokenize `text_len` bytes of UTF-8 `text` (need not be NUL-terminated; may contain NUL) into
 * `input_ids` and `attention_mask`, each `max_length` int32 values: [CLS], the tokens (truncated to
 * max_length - 2), [SEP], then padding ids with mask 0. EKD_MAX_LENGTH is the model's max_length.
 * Returns the number of real tokens (mask 1), or -1 when an argument is NULL or max_length < 2. */
int ekd_tokenize(ekd_workspace *ws, const char *text, size_t text_len,
                 int32_t *input_ids, int32_t *attention_mask, size_t max_length);

#ifdef __cplusplus
}
#endif

#endif /* EDGEKD_TOKENIZER_H */
