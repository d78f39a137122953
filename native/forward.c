/* A response head as the proxy forwards it, in one call (see headparser.h, tm_forward_response).
 *
 * Theory of operation
 * -------------------
 * The head is parsed by tm_parse_response (same rules, same error codes). Then one pass over the
 * field lines sorts them: hop-by-hop fields are dropped (RFC 9110 7.6.1), Content-Length and
 * Connection are read for framing and keep-alive, grpc-status is noted for the retry policy, and
 * every other field is copied to `out` as "lowercased-name: value CRLF", in order: the field block
 * of the head the proxy sends downstream. A field the caller names (`take`, lowercase) is left out
 * of the block too and its last value reported (the proxy's own metadata header, which is read
 * here so that Python never searches the block for it).
 *
 * Only the plain case is decided here: one Content-Length of 1..18 digits, a Connection with no
 * option but close / keep-alive, no Transfer-Encoding or TE, and a final status that has content.
 * Anything else sets info->plain = 0 and the caller takes its general path (h1.classify_response),
 * which knows every rule; so this file never has to be right about the rare cases, only about when
 * a case is not plain.
 */
#include "headparser.h"

#include <string.h>

/* Case-insensitive equality of a field name with `lower` (lowercase letters and '-'). `c | 0x20`
 * lowercases letters; no other tchar maps onto a lowercase letter or '-' that way. */
static int name_is(const char *buf, const tm_header *h, const char *lower, size_t n) {
    if (h->name_end - h->name_start != n)
        return 0;
    const char *p = buf + h->name_start;
    for (size_t i = 0; i < n; i++)
        if ((p[i] | 0x20) != lower[i])
            return 0;
    return 1;
}

#define NAME_IS(h, lit) name_is(buf, (h), lit, sizeof(lit) - 1)

static int token_is(const char *p, size_t n, const char *lower, size_t m) {
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((p[i] | 0x20) != lower[i])
            return 0;
    return 1;
}

/* Connection options (RFC 9110 7.6.1): 1 when every token is close or keep-alive (recorded in
 * info), 0 when another one names fields to drop (the general path does that). */
static int read_connection(const char *p, const char *end, tm_forward_info *info) {
    while (p < end) {
        const char *t = p;
        while (p < end && *p != ',')
            p++;
        const char *e = p;
        if (p < end)
            p++; /* the comma */
        while (t < e && (*t == ' ' || *t == '\t'))
            t++;
        while (e > t && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        size_t n = (size_t)(e - t);
        if (n == 0)
            continue;
        if (token_is(t, n, "close", 5))
            info->conn_close = 1;
        else if (token_is(t, n, "keep-alive", 10))
            info->conn_keep_alive = 1;
        else
            return 0;
    }
    return 1;
}

long tm_forward_response(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                         size_t max_headers, char *out, size_t out_cap, const char *take,
                         tm_forward_info *info) {
    long rc = tm_parse_response(buf, len, start, head, headers, max_headers, NULL, 0);
    if (rc < 0)
        return rc;
    memset(info, 0, sizeof(*info));
    info->plain = 1;
    size_t status = head->status;
    if (status < 200 || status == 204 || status == 304) {
        info->plain = 0; /* no content: framing rules of their own */
        return rc;
    }
    char *o = out, *o_end = out + out_cap;
    size_t take_len = strlen(take);
    for (size_t i = 0; i < head->num_headers; i++) {
        const tm_header *h = &headers[i];
        if (take_len != 0 && name_is(buf, h, take, take_len)) {
            info->take_start = h->value_start; /* the last one counts */
            info->take_end = h->value_end;
            info->taken = 1;
            continue;
        }
        switch ((buf[h->name_start] | 0x20)) { /* most names need one comparison at most */
        case 'c':
            if (NAME_IS(h, "content-length")) {
                const char *v = buf + h->value_start;
                size_t n = h->value_end - h->value_start;
                if (info->has_content_length || n == 0 || n > 18) {
                    info->plain = 0;
                    return rc;
                }
                size_t value = 0;
                for (size_t k = 0; k < n; k++) {
                    if (v[k] < '0' || v[k] > '9') {
                        info->plain = 0;
                        return rc;
                    }
                    value = value * 10 + (size_t)(v[k] - '0');
                }
                info->has_content_length = 1;
                info->content_length = value;
                continue;
            }
            if (NAME_IS(h, "connection")) {
                if (!read_connection(buf + h->value_start, buf + h->value_end, info)) {
                    info->plain = 0;
                    return rc;
                }
                continue;
            }
            break;
        case 't':
            if (NAME_IS(h, "transfer-encoding") || NAME_IS(h, "te")) {
                info->plain = 0;
                return rc;
            }
            if (NAME_IS(h, "trailer"))
                continue; /* hop-by-hop */
            break;
        case 'k':
            if (NAME_IS(h, "keep-alive"))
                continue;
            break;
        case 'p':
            if (NAME_IS(h, "proxy-connection"))
                continue;
            break;
        case 'u':
            if (NAME_IS(h, "upgrade"))
                continue;
            break;
        case 'g':
            if (NAME_IS(h, "grpc-status") && info->grpc_status_end == 0) { /* the first one counts */
                info->grpc_status_start = h->value_start;
                info->grpc_status_end = h->value_end;
            }
            break;
        default:
            break;
        }
        size_t name_len = h->name_end - h->name_start, value_len = h->value_end - h->value_start;
        if ((size_t)(o_end - o) < name_len + value_len + 4) {
            info->plain = 0; /* the caller's area is too small: its general path has no limit */
            return rc;
        }
        const char *s = buf + h->name_start;
        for (size_t k = 0; k < name_len; k++)
            o[k] = (s[k] >= 'A' && s[k] <= 'Z') ? (char)(s[k] | 0x20) : s[k];
        o += name_len;
        *o++ = ':';
        *o++ = ' ';
        memcpy(o, buf + h->value_start, value_len);
        o += value_len;
        *o++ = '\r';
        *o++ = '\n';
    }
    if (!info->has_content_length) {
        info->plain = 0; /* the body ends with the connection: the general path relays that */
        return rc;
    }
    info->keep_alive = !info->conn_close && (head->minor_version >= 1 || info->conn_keep_alive);
    info->out_len = (size_t)(o - out);
    return rc;
}
