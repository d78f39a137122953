/* Strict RFC 9112 HTTP/1.1 head parser (see headparser.h for the calling convention).
 *
 * Theory of operation
 * -------------------
 * A head is parsed in one forward pass. Each element (method, target, version, field name, field
 * value, ...) is a run of bytes of one character class, found with a table lookup per byte (8 bytes
 * at a time for the long runs: targets and field values). The byte that ends a run decides what
 * happens next: the expected delimiter moves on to the next element; anything else is an error.
 *
 * Every unexpected byte is classified the same way, wherever it occurs (classify()):
 *   NUL                      -> TM_E_NUL
 *   CR not followed by LF    -> TM_E_BARE_CR   (CR as the last byte of the buffer -> TM_INCOMPLETE)
 *   LF                       -> TM_E_BARE_LF   (every LF we reach on our own was not after a CR)
 *   anything else, incl. a CRLF that ends the line too early -> the element's own error code.
 * The pure-Python fallback (proxy/l7/_headparser_py.py) reproduces this order exactly, so both
 * implementations give the same code and offset for the same bytes; the tests hold them to it.
 *
 * Running out of input inside an element returns TM_INCOMPLETE, unless an error was already seen:
 * errors are reported as soon as their byte arrives, so garbage is refused without waiting for a
 * blank line that may never come.
 */
#include "headparser.h"

#include <string.h>

/* Character classes, one bit each. */
#define C_TCHAR 1u  /* token (RFC 9110 5.6.2) */
#define C_VCHAR 2u  /* 0x21-0x7e: request-target */
#define C_FVAL 4u   /* HTAB / SP / VCHAR / obs-text: field values and reason phrases */
#define C_HEX 8u    /* HEXDIG */
#define C_QDTEXT 16u /* quoted-string text (RFC 9110 5.6.4) */

static const unsigned char cls[256] = {
     0,  0,  0,  0,  0,  0,  0,  0,  0, 20,  0,  0,  0,  0,  0,  0,  /* 0x00 */
     0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  /* 0x10 */
    20, 23,  6, 23, 23, 23, 23, 23, 22, 22, 23, 23, 22, 23, 23, 22,  /* 0x20 */
    31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 22, 22, 22, 22, 22, 22,  /* 0x30 */
    22, 31, 31, 31, 31, 31, 31, 23, 23, 23, 23, 23, 23, 23, 23, 23,  /* 0x40 */
    23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 22,  6, 22, 23, 23,  /* 0x50 */
    23, 31, 31, 31, 31, 31, 31, 23, 23, 23, 23, 23, 23, 23, 23, 23,  /* 0x60 */
    23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 22, 23, 22, 23,  0,  /* 0x70 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0x80 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0x90 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xa0 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xb0 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xc0 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xd0 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xe0 */
    20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,  /* 0xf0 */
};

#define IS(c, k) (cls[(unsigned char)(c)] & (k))

/* SWAR helpers on 8 bytes at a time: "some byte < n" (exact as a yes/no for n <= 128), "some byte
 * equals b", "some byte >= 0x80". Used only to skip runs quickly; the per-byte loop decides. */
#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull
#define HAS_LESS(x, n) (((x) - ONES * (n)) & ~(x) & HIGHS)
#define HAS_ZERO(x) (((x) - ONES) & ~(x) & HIGHS)
#define HAS_BYTE(x, b) HAS_ZERO((x) ^ (ONES * (b)))

static inline uint64_t load8(const char *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

/* Skip field-value bytes (HTAB, SP, VCHAR, obs-text). */
static inline const char *skip_fval(const char *p, const char *end) {
    /* 8 at a time while every byte is >= 0x20 and not DEL (obs-text >= 0x80 is fine here) */
    while (end - p >= 8) {
        uint64_t x = load8(p);
        if (HAS_LESS(x, 0x20) | HAS_BYTE(x, 0x7f))
            break;
        p += 8;
    }
    while (p < end && IS(*p, C_FVAL))
        p++;
    return p;
}

/* Skip request-target bytes (VCHAR). */
static inline const char *skip_vchar(const char *p, const char *end) {
    while (end - p >= 8) {
        uint64_t x = load8(p);
        if (HAS_LESS(x, 0x21) | HAS_BYTE(x, 0x7f) | (x & HIGHS))
            break;
        p += 8;
    }
    while (p < end && IS(*p, C_VCHAR))
        p++;
    return p;
}

static inline const char *skip_class(const char *p, const char *end, unsigned k) {
    while (p < end && IS(*p, k))
        p++;
    return p;
}

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

/* The error for an unexpected byte at p (p < end), per the table in the theory of operation. */
static inline long classify(const char *p, const char *end, long element_code) {
    switch (*p) {
    case '\0':
        return TM_E_NUL;
    case '\r':
        if (p + 1 == end)
            return TM_INCOMPLETE;
        return p[1] == '\n' ? element_code : TM_E_BARE_CR;
    case '\n':
        return TM_E_BARE_LF;
    default:
        return element_code;
    }
}

#define FAIL(code, at)                                                                             \
    do {                                                                                           \
        long code_ = (code);                                                                       \
        if (code_ != TM_INCOMPLETE)                                                                \
            *error_offset = (size_t)((at) - buf);                                                  \
        return code_;                                                                              \
    } while (0)

#define NEED(ptr)                                                                                  \
    do {                                                                                           \
        if ((ptr) >= end)                                                                          \
            return TM_INCOMPLETE;                                                                  \
    } while (0)

/* Expect CR LF at p. */
#define EXPECT_CRLF(p, element_code)                                                               \
    do {                                                                                           \
        NEED(p);                                                                                   \
        if (*(p) != '\r')                                                                          \
            FAIL(classify((p), end, (element_code)), (p));                                         \
        NEED((p) + 1);                                                                             \
        if ((p)[1] != '\n')                                                                        \
            FAIL(TM_E_BARE_CR, (p));                                                               \
        (p) += 2;                                                                                  \
    } while (0)

/* "HTTP/1." DIGIT (RFC 9112 2.3); only major version 1 is HTTP/1.x. Sets minor, advances p. */
#define PARSE_VERSION(p, minor)                                                                    \
    do {                                                                                           \
        static const char prefix_[] = "HTTP/1.";                                                   \
        for (int i_ = 0; i_ < 7; i_++, (p)++) {                                                    \
            NEED(p);                                                                               \
            if (*(p) != prefix_[i_])                                                               \
                FAIL(classify((p), end, TM_E_INVALID_VERSION), (p));                               \
        }                                                                                          \
        NEED(p);                                                                                   \
        if (*(p) < '0' || *(p) > '9')                                                              \
            FAIL(classify((p), end, TM_E_INVALID_VERSION), (p));                                   \
        (minor) = (size_t)(*(p) - '0');                                                            \
        (p)++;                                                                                     \
    } while (0)

/* *( field-line CRLF ) CRLF starting at *pp (RFC 9112 5). Returns 0 with *pp just after the blank
 * line, or a negative code. */
static inline long parse_fields(const char *buf, const char **pp, const char *end, tm_header *headers,
                                size_t max_headers, size_t *num_headers, size_t *error_offset) {
    const char *p = *pp;
    size_t n = 0;
    for (;;) {
        NEED(p);
        if (*p == '\r') { /* the blank line that ends the head */
            NEED(p + 1);
            if (p[1] != '\n')
                FAIL(TM_E_BARE_CR, p);
            *num_headers = n;
            *pp = p + 2;
            return 0;
        }
        if (*p == '\n')
            FAIL(TM_E_BARE_LF, p);
        if (*p == ' ' || *p == '\t') /* obs-fold, or whitespace before the first field (5.2, 2.2) */
            FAIL(TM_E_OBS_FOLD, p);
        if (n == max_headers)
            FAIL(TM_E_TOO_MANY_HEADERS, p);

        /* field-name ":" */
        const char *name = p;
        p = skip_class(p, end, C_TCHAR);
        NEED(p);
        if (*p != ':' || p == name) {
            if ((*p == ' ' || *p == '\t') && p != name) {
                const char *q = skip_ws(p, end);
                NEED(q);
                FAIL(*q == ':' ? TM_E_SPACE_BEFORE_COLON : TM_E_INVALID_TOKEN, p);
            }
            if (*p == '\r' && p != name) {
                NEED(p + 1);
                FAIL(p[1] == '\n' ? TM_E_MISSING_COLON : TM_E_BARE_CR, p);
            }
            FAIL(classify(p, end, TM_E_INVALID_TOKEN), p);
        }
        headers[n].name_start = (size_t)(name - buf);
        headers[n].name_end = (size_t)(p - buf);
        p++;

        /* OWS field-value OWS CRLF */
        p = skip_ws(p, end);
        const char *value = p;
        p = skip_fval(p, end);
        NEED(p);
        if (*p != '\r')
            FAIL(classify(p, end, TM_E_INVALID_HEADER_VALUE), p);
        NEED(p + 1);
        if (p[1] != '\n')
            FAIL(TM_E_BARE_CR, p);
        const char *value_end = p;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t'))
            value_end--;
        headers[n].value_start = (size_t)(value - buf);
        headers[n].value_end = (size_t)(value_end - buf);
        n++;
        p += 2;
    }
}

/* Copy helpers for the optional pack output (see headparser.h). */
static inline char *put(char *o, const char *buf, size_t s, size_t e) {
    memcpy(o, buf + s, e - s);
    return o + (e - s);
}

static inline char *put_lower(char *o, const char *buf, size_t s, size_t e) {
    const char *q = buf + s, *qe = buf + e;
    /* 8 bytes at a time: names are tchars (ASCII), so adding to a byte never carries into the next;
     * bit 7 of (c + 0x3f) & ~(c + 0x25) is set exactly for 'A'..'Z', and shifted down it is 0x20. */
    for (; qe - q >= 8; q += 8, o += 8) {
        uint64_t x = load8(q);
        uint64_t upper = (x + ONES * 0x3f) & ~(x + ONES * 0x25) & HIGHS;
        x |= upper >> 2;
        memcpy(o, &x, 8);
    }
    for (; q < qe; q++) {
        unsigned char c = (unsigned char)*q;
        *o++ = (char)(c + ((unsigned)(c - 'A') < 26u ? 32 : 0));
    }
    return o;
}

/* Appends (NUL name NUL value)* to o; the very first NUL is left out when o is the start of pack. */
static inline char *put_fields(char *o, const char *pack, const char *buf, const tm_header *headers,
                               size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (o != pack)
            *o++ = '\0';
        o = put_lower(o, buf, headers[i].name_start, headers[i].name_end);
        *o++ = '\0';
        o = put(o, buf, headers[i].value_start, headers[i].value_end);
    }
    return o;
}

long tm_parse_request(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                      size_t max_headers, char *pack, size_t pack_cap) {
    if (start > len)
        return TM_INCOMPLETE;
    const char *p = buf + start, *end = buf + len;
    size_t *error_offset = &head->error_offset;

    /* "a server ... SHOULD ignore at least one empty line (CRLF) received prior to the
     * request-line" (RFC 9112 2.2) */
    for (;;) {
        NEED(p);
        if (*p != '\r')
            break;
        NEED(p + 1);
        if (p[1] != '\n')
            FAIL(TM_E_BARE_CR, p);
        p += 2;
    }

    /* method SP (RFC 9112 3.1) */
    const char *method = p;
    p = skip_class(p, end, C_TCHAR);
    NEED(p);
    if (*p != ' ' || p == method)
        FAIL(classify(p, end, TM_E_INVALID_METHOD), p);
    head->method_start = (size_t)(method - buf);
    head->method_end = (size_t)(p - buf);
    p++;

    /* request-target SP (RFC 9112 3.2): any VCHAR, the URI forms are checked by the router */
    const char *target = p;
    p = skip_vchar(p, end);
    NEED(p);
    if (*p != ' ' || p == target)
        FAIL(classify(p, end, TM_E_INVALID_TARGET), p);
    head->target_start = (size_t)(target - buf);
    head->target_end = (size_t)(p - buf);
    p++;

    /* HTTP-version CRLF */
    PARSE_VERSION(p, head->minor_version);
    EXPECT_CRLF(p, TM_E_INVALID_VERSION);

    long rc = parse_fields(buf, &p, end, headers, max_headers, &head->num_headers, error_offset);
    if (rc < 0)
        return rc;
    size_t consumed = (size_t)(p - (buf + start));
    if (pack) {
        head->pack_len = consumed; /* an upper bound until written */
        if (pack_cap < consumed)
            return TM_PACK_FULL;
        char *o = put(pack, buf, head->method_start, head->method_end);
        *o++ = '\0';
        o = put(o, buf, head->target_start, head->target_end);
        o = put_fields(o, pack, buf, headers, head->num_headers);
        head->pack_len = (size_t)(o - pack);
    }
    return (long)consumed;
}

long tm_parse_response(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                       size_t max_headers, char *pack, size_t pack_cap) {
    if (start > len)
        return TM_INCOMPLETE;
    const char *p = buf + start, *end = buf + len;
    size_t *error_offset = &head->error_offset;

    /* status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 4). The SP before an
     * empty reason is optional here: enough servers leave it out. */
    PARSE_VERSION(p, head->minor_version);
    NEED(p);
    if (*p != ' ')
        FAIL(classify(p, end, TM_E_INVALID_VERSION), p);
    p++;

    const char *status = p;
    size_t code = 0;
    for (int i = 0; i < 3; i++, p++) {
        NEED(p);
        if (*p < '0' || *p > '9')
            FAIL(classify(p, end, TM_E_INVALID_STATUS), p);
        code = code * 10 + (size_t)(*p - '0');
    }
    /* RFC 9110 15: status codes are 100..599 */
    if (code < 100 || code > 599)
        FAIL(TM_E_INVALID_STATUS, status);
    head->status = code;

    NEED(p);
    const char *reason = p;
    if (*p == ' ') {
        reason = ++p;
        p = skip_fval(p, end);
        NEED(p);
        if (*p != '\r')
            FAIL(classify(p, end, TM_E_INVALID_REASON), p);
    } else if (*p != '\r') {
        FAIL(classify(p, end, TM_E_INVALID_STATUS), p);
    }
    head->reason_start = (size_t)(reason - buf);
    head->reason_end = (size_t)(p - buf);
    EXPECT_CRLF(p, TM_E_INVALID_REASON);

    long rc = parse_fields(buf, &p, end, headers, max_headers, &head->num_headers, error_offset);
    if (rc < 0)
        return rc;
    size_t consumed = (size_t)(p - (buf + start));
    if (pack) {
        head->pack_len = consumed;
        if (pack_cap < consumed)
            return TM_PACK_FULL;
        char *o = put(pack, buf, head->reason_start, head->reason_end);
        for (size_t i = 0; i < head->num_headers; i++) {
            *o++ = '\0';
            o = put_lower(o, buf, headers[i].name_start, headers[i].name_end);
            *o++ = '\0';
            o = put(o, buf, headers[i].value_start, headers[i].value_end);
        }
        head->pack_len = (size_t)(o - pack);
    }
    return (long)consumed;
}

long tm_parse_fields(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                     size_t max_headers, char *pack, size_t pack_cap) {
    if (start > len)
        return TM_INCOMPLETE;
    const char *p = buf + start, *end = buf + len;
    long rc = parse_fields(buf, &p, end, headers, max_headers, &head->num_headers, &head->error_offset);
    if (rc < 0)
        return rc;
    size_t consumed = (size_t)(p - (buf + start));
    if (pack) {
        head->pack_len = consumed;
        if (pack_cap < consumed)
            return TM_PACK_FULL;
        head->pack_len = (size_t)(put_fields(pack, pack, buf, headers, head->num_headers) - pack);
    }
    return (long)consumed;
}

/* chunk = chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1)
 * chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
 * chunk-ext-val = token / quoted-string
 * We allow no whitespace right after the size (as h11), and BWS elsewhere only where the grammar
 * puts it: before ";" or "=" and after them. Extensions are validated and ignored. */
long tm_parse_chunk_size(const char *buf, size_t len, size_t start, uint64_t *chunk_size,
                         size_t *error_offset) {
    if (start > len)
        return TM_INCOMPLETE;
    const char *p = buf + start, *end = buf + len;

    const char *digits = p;
    uint64_t size = 0;
    while (p < end && IS(*p, C_HEX)) {
        if (p - digits == 16) /* at most 16 hex digits, leading zeros included */
            FAIL(TM_E_INVALID_CHUNK_SIZE, p);
        unsigned c = (unsigned char)*p;
        size = (size << 4) | (c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
        p++;
    }
    NEED(p);
    if (p == digits)
        FAIL(classify(p, end, TM_E_INVALID_CHUNK_SIZE), p);
    if (size > (uint64_t)INT64_MAX)
        FAIL(TM_E_INVALID_CHUNK_SIZE, digits);

    while (*p == ';') {
        p = skip_ws(p + 1, end);
        const char *name = p;
        p = skip_class(p, end, C_TCHAR);
        NEED(p);
        if (p == name)
            FAIL(classify(p, end, TM_E_INVALID_CHUNK_EXT), p);
        const char *q = skip_ws(p, end);
        NEED(q);
        if (*q == '=') {
            p = skip_ws(q + 1, end);
            NEED(p);
            if (*p == '"') {
                p++;
                for (;;) {
                    p = skip_class(p, end, C_QDTEXT);
                    NEED(p);
                    if (*p == '"')
                        break;
                    if (*p != '\\')
                        FAIL(classify(p, end, TM_E_INVALID_CHUNK_EXT), p);
                    p++; /* quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text ) */
                    NEED(p);
                    if (!IS(*p, C_FVAL))
                        FAIL(classify(p, end, TM_E_INVALID_CHUNK_EXT), p);
                    p++;
                }
                p++;
            } else {
                const char *val = p;
                p = skip_class(p, end, C_TCHAR);
                NEED(p);
                if (p == val)
                    FAIL(classify(p, end, TM_E_INVALID_CHUNK_EXT), p);
            }
            q = skip_ws(p, end);
            NEED(q);
        }
        if (*q == ';') {
            p = q;
            continue;
        }
        /* only CRLF may follow; whitespace before it is not in the grammar */
        if (*p != '\r')
            FAIL(classify(p, end, TM_E_INVALID_CHUNK_EXT), p);
        break;
    }
    EXPECT_CRLF(p, TM_E_INVALID_CHUNK_SIZE);
    *chunk_size = size;
    return (long)(p - (buf + start));
}
