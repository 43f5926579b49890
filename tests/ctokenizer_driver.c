/* Sanitizer driver for the C tokenizer (tests/test_ctokenizer.py). Reads records [uint32 length][bytes]
 * from argv[1], tokenizes each at several max_length values into buffers of exactly that size (heap, so
 * AddressSanitizer sees any write past them; the text has no terminating NUL, so any read past it is
 * seen too), and checks the output's invariants. Prints "texts N calls C violations V". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgekd_tokenizer.h"

static const size_t kLengths[] = {2, 3, 8, 32, 128, 512};

int main(int argc, char **argv) {
    FILE *in;
    unsigned long texts = 0, calls = 0, violations = 0;
    ekd_workspace *ws = malloc(sizeof *ws);
    int32_t id, mask;
    if (argc != 3 || !ws || !(in = fopen(argv[1], "rb"))) return 2;
    /* Argument checks: refused, nothing written. */
    if (ekd_tokenize(ws, "a", 1, &id, &mask, 1) != -1 || ekd_tokenize(NULL, "a", 1, &id, &mask, 2) != -1 ||
        ekd_tokenize(ws, NULL, 1, &id, &mask, 2) != -1 || ekd_tokenize(ws, NULL, 0, &id, &mask, 0) != -1) {
        violations++;
    }
    for (;;) {
        uint32_t length;
        unsigned char *text;
        size_t k;
        if (fread(&length, sizeof length, 1, in) != 1) break;
        text = malloc(length ? length : 1);
        if (!text || fread(text, 1, length, in) != length) return 3;
        texts++;
        for (k = 0; k < sizeof kLengths / sizeof *kLengths; k++) {
            size_t max_length = kLengths[k], i;
            int32_t *ids = malloc(max_length * sizeof *ids), *masks = malloc(max_length * sizeof *masks);
            int count = ekd_tokenize(ws, (const char *)text, length, ids, masks, max_length);
            calls++;
            if (count < 2 || (size_t)count > max_length) violations++;
            for (i = 0; count >= 2 && i < max_length; i++) {
                if (masks[i] != ((int)i < count) || ids[i] < 0 || ids[i] >= atoi(argv[2])) violations++;
            }
            free(ids);
            free(masks);
        }
        free(text);
    }
    fclose(in);
    free(ws);
    printf("texts %lu calls %lu violations %lu\n", texts, calls, violations);
    return violations != 0;
}
