/* Strict RFC 9112 HTTP/1.1 head parser: one call per head, offsets into the caller's buffer.
 *
 * Every function reads buf[start..len) and never writes to it, never allocates, never keeps state
 * between calls. Results are byte offsets into buf (absolute, i.e. counted from buf, not from start),
 * so the caller slices its own buffer.
 *
 * Return value: > 0  bytes consumed from start (the head ends at start + return value);
 *               TM_INCOMPLETE (-2)  more bytes are needed and nothing seen so far is invalid;
 *               other negative     one TM_E_* code; head->error_offset (or *error_offset) is the
 *                                  absolute offset of the offending byte.
 * Errors are reported as soon as the offending byte is seen, even if the head is not complete yet.
 */
#ifndef TRIOMESH_HEADPARSER_H
#define TRIOMESH_HEADPARSER_H

#include <stddef.h>
#include <stdint.h>

#define TM_INCOMPLETE (-2)
#define TM_E_BARE_CR (-3)             /* CR not followed by LF (RFC 9112 2.2) */
#define TM_E_BARE_LF (-4)             /* LF not preceded by CR: we require CRLF (RFC 9112 2.2 "MAY") */
#define TM_E_NUL (-5)                 /* NUL byte anywhere in the head */
#define TM_E_INVALID_METHOD (-6)      /* method is not a token, or missing */
#define TM_E_INVALID_TARGET (-7)      /* request-target is not 1*VCHAR */
#define TM_E_INVALID_VERSION (-8)     /* not "HTTP/1." DIGIT */
#define TM_E_INVALID_STATUS (-9)      /* not 3 digits in 100..599 */
#define TM_E_INVALID_REASON (-10)     /* reason-phrase byte outside HTAB / SP / VCHAR / obs-text */
#define TM_E_INVALID_TOKEN (-11)      /* field-name byte is not a tchar, or empty field name */
#define TM_E_SPACE_BEFORE_COLON (-12) /* whitespace between field-name and ':' (RFC 9112 5.1) */
#define TM_E_MISSING_COLON (-13)      /* field line without ':' */
#define TM_E_OBS_FOLD (-14)           /* field line starting with SP/HTAB (RFC 9112 5.2) */
#define TM_E_INVALID_HEADER_VALUE (-15) /* control byte (other than HTAB) in a field value */
#define TM_E_TOO_MANY_HEADERS (-16)   /* more than max_headers field lines */
#define TM_E_INVALID_CHUNK_SIZE (-17) /* chunk-size not 1*16HEXDIG, or >= 2**63 */
#define TM_E_INVALID_CHUNK_EXT (-18)  /* chunk-ext does not follow RFC 9112 7.1.1 */
#define TM_PACK_FULL (-100)           /* not a parse error: the head is valid but pack_cap is too small;
                                         call again with pack_cap >= head->pack_len */

/* One field line: name is buf[name_start..name_end), value (OWS stripped) buf[value_start..value_end). */
typedef struct {
    size_t name_start, name_end, value_start, value_end;
} tm_header;

/* Everything but the field lines; all members are size_t so callers may read it as a flat array. */
typedef struct {
    size_t method_start, method_end;  /* request only */
    size_t target_start, target_end;  /* request only */
    size_t reason_start, reason_end;  /* response only */
    size_t minor_version;             /* the x of HTTP/1.x */
    size_t status;                    /* response only */
    size_t num_headers;
    size_t error_offset;              /* set when an error code is returned */
    size_t pack_len;                  /* bytes written to pack (see below) */
} tm_head;

/* The optional `pack` output (pass NULL to skip it) is for bindings that want the strings rather
 * than offsets: after a successful parse the elements are copied into pack separated by NUL bytes
 * (which cannot occur in a valid head), header names lowercased, values OWS-stripped:
 *   request:  method NUL target (NUL name NUL value)*
 *   response: reason (NUL name NUL value)*
 *   fields:   name NUL value (NUL name NUL value)*   (nothing at all for an empty section)
 * It never needs more bytes than the head it came from. */

/* request-line CRLF *( field-line CRLF ) CRLF; leading empty lines (CRLF) are skipped (RFC 9112 2.2). */
long tm_parse_request(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                      size_t max_headers, char *pack, size_t pack_cap);

/* status-line CRLF *( field-line CRLF ) CRLF */
long tm_parse_response(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                       size_t max_headers, char *pack, size_t pack_cap);

/* *( field-line CRLF ) CRLF, e.g. the trailer section after the last chunk. */
long tm_parse_fields(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                     size_t max_headers, char *pack, size_t pack_cap);

/* What tm_forward_response found besides the head (all size_t, as tm_head). */
typedef struct {
    size_t plain;              /* 1: the fields below describe the response; 0: take the general path */
    size_t content_length;     /* the one Content-Length */
    size_t has_content_length;
    size_t conn_close, conn_keep_alive; /* Connection options seen */
    size_t keep_alive;         /* the upstream connection may carry another request (RFC 9112 9.3) */
    size_t grpc_status_start, grpc_status_end; /* the grpc-status value, start == end when none */
    size_t out_len;            /* bytes of the field block written to out */
    size_t taken;              /* 1: a field named `take` was left out of the block */
    size_t take_start, take_end; /* the last such field's value */
} tm_forward_info;

/* tm_parse_response, then (on success) the field block the proxy forwards: every field but the
 * hop-by-hop ones and those named `take` (NUL-terminated, lowercase; "": none), as
 * "lowercased-name: value CRLF", written to out (at most out_cap bytes), and in info the framing and
 * keep-alive facts of the plain case and the last `take` field's value (see forward.c). Same return values as
 * tm_parse_response; when it returns > 0 and info->plain is 0, the caller must use its general
 * path for this response (out is then undefined). */
long tm_forward_response(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                         size_t max_headers, char *out, size_t out_cap, const char *take,
                         tm_forward_info *info);

/* chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1). */
long tm_parse_chunk_size(const char *buf, size_t len, size_t start, uint64_t *chunk_size,
                         size_t *error_offset);

#endif
