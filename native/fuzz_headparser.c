/* Memory-safety fuzzer for headparser.c and forward.c, built with -fsanitize=address,undefined by the tests.
 *
 * Valid heads are mutated at random (bytes inserted, replaced, deleted; cut short) and copied into
 * buffers of exactly their size, with pack areas of exactly pack_cap bytes, so that any read or write
 * past an end is caught by the sanitizer. It also checks the results' own invariants (consumed never
 * runs past the buffer, error offsets point inside it, offsets are ordered) and prints, per
 * function, how often each return code came up.
 *
 * usage: fuzz_headparser ITERATIONS [SEED]     exit status 0 = no problem found
 */
#include "headparser.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const seeds[] = {
    "GET /search?q=x HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0 (X11)\r\nAccept: */*\r\n\r\n",
    "\r\n\r\nPOST / HTTP/1.0\r\nA:\r\nB: c \t\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX:  y\r\n\r\n",
    "HTTP/1.1 204\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, close\r\nKeep-Alive: 5\r\n"
    "grpc-status: 14\r\nTrailer: x\r\nUpgrade: y\r\nProxy-Connection: z\r\n\r\n",
    "HTTP/1.0 503 Unavailable\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n",
    "1aF;foo=bar;x=\"q\\\"z\" ; y\r\n",
    "7fffffffffffffff\r\n",
    "A: b\r\nC: d\r\n\r\n",
};
#define NSEEDS (sizeof seeds / sizeof seeds[0])
static const char nasty[] = "\0\r\n \t:;=\"\\\x01\x7f\x80\xff" "aZ09";

static unsigned long long rng_state;
static unsigned rnd(unsigned n) { /* xorshift64*, deterministic per seed */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return n ? (unsigned)((rng_state * 2685821657736338717ull) >> 33) % n : 0;
}

static long counts[5][20];
static void count(int fn, long rc) {
    long idx = rc >= 0 ? 0 : rc == TM_PACK_FULL ? 1 : -rc;
    if (idx < 20)
        counts[fn][idx]++;
}

static int check_head(const char *what, long rc, size_t len, size_t start, const tm_head *h,
                      const tm_header *hs) {
    if (rc > 0) {
        if (start + (size_t)rc > len) {
            printf("%s: consumed past the end\n", what);
            return 1;
        }
        for (size_t i = 0; i < h->num_headers; i++)
            if (!(start <= hs[i].name_start && hs[i].name_start < hs[i].name_end &&
                  hs[i].name_end < hs[i].value_start && hs[i].value_start <= hs[i].value_end &&
                  hs[i].value_end <= start + (size_t)rc)) {
                printf("%s: header %zu offsets out of order\n", what, i);
                return 1;
            }
    } else if (rc != TM_INCOMPLETE && rc != TM_PACK_FULL && h->error_offset >= len) {
        printf("%s: error offset %zu outside the buffer\n", what, h->error_offset);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 100000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) | 1 : 88172645463325252ull;
    char work[600];
    tm_header hs[8];
    for (long it = 0; it < iterations; it++) {
        const char *seed = seeds[rnd(NSEEDS)];
        size_t n = strlen(seed);
        memcpy(work, seed, n);
        for (unsigned m = rnd(5); m > 0; m--) {
            size_t at = rnd((unsigned)n + 1);
            char c = nasty[rnd(sizeof nasty - 1)];
            switch (rnd(3)) {
            case 0:
                if (n < 500) {
                    memmove(work + at + 1, work + at, n - at);
                    work[at] = c;
                    n++;
                }
                break;
            case 1:
                if (at < n)
                    work[at] = c;
                break;
            default:
                if (at < n) {
                    memmove(work + at, work + at + 1, n - at - 1);
                    n--;
                }
            }
        }
        size_t len = rnd(4) == 0 ? rnd((unsigned)n + 1) : n;
        char *buf = malloc(len ? len : 1);
        memcpy(buf, work, len);
        size_t start = (rnd(8) == 0 && len) ? rnd((unsigned)len) : 0;
        size_t max_headers = rnd(9);
        size_t pack_cap = rnd(600);
        char *pack = malloc(pack_cap ? pack_cap : 1);
        char *maybe_pack = rnd(2) ? pack : NULL;
        tm_head h;
        uint64_t size;
        size_t error_offset = 0;
        long rc;

        rc = tm_parse_request(buf, len, start, &h, hs, max_headers, maybe_pack, pack_cap);
        count(0, rc);
        if (check_head("request", rc, len, start, &h, hs))
            return 1;
        rc = tm_parse_response(buf, len, start, &h, hs, max_headers, maybe_pack, pack_cap);
        count(1, rc);
        if (check_head("response", rc, len, start, &h, hs))
            return 1;
        rc = tm_parse_fields(buf, len, start, &h, hs, max_headers, maybe_pack, pack_cap);
        count(2, rc);
        if (check_head("fields", rc, len, start, &h, hs))
            return 1;
        rc = tm_parse_chunk_size(buf, len, start, &size, &error_offset);
        count(3, rc);
        if ((rc > 0 && start + (size_t)rc > len) || (rc < -2 && error_offset >= len) ||
            (rc > 0 && size > 0x7fffffffffffffffull)) {
            printf("chunk: bad result %ld\n", rc);
            return 1;
        }
        tm_forward_info info;
        rc = tm_forward_response(buf, len, start, &h, hs, max_headers, pack, pack_cap, "x-triomesh-peer", &info);
        count(4, rc);
        if (check_head("forward", rc, len, start, &h, hs))
            return 1;
        if (rc > 0 && info.plain &&
            (info.out_len > pack_cap || info.grpc_status_start > info.grpc_status_end ||
             (info.grpc_status_end && (info.grpc_status_start < start || info.grpc_status_end > start + (size_t)rc)) ||
             info.take_start > info.take_end ||
             (info.taken && (info.take_start < start || info.take_end > start + (size_t)rc)))) {
            printf("forward: bad result (out_len %zu of %zu)\n", info.out_len, pack_cap);
            return 1;
        }
        free(buf);
        free(pack);
    }
    static const char *const names[] = {"request", "response", "fields", "chunk", "forward"};
    for (int f = 0; f < 5; f++) {
        printf("%s", names[f]);
        for (int c = 0; c < 20; c++)
            if (counts[f][c])
                printf(" %d:%ld", c == 0 ? 0 : c == 1 ? TM_PACK_FULL : -c, counts[f][c]);
        printf("\n");
    }
    return 0;
}
