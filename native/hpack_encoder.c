/* The HPACK encoder (RFC 7541) of one HTTP/2 connection: module proxy.l7._hpack_c, type Encoder, a
 * CPython extension (METH_FASTCALL). Its pure-Python twin is PureEncoder in proxy/l7/h2_hpack.py, which
 * picks one of the two and explains the encoding rules; this file follows PureEncoder line for line
 * and writes the same bytes for any sequence of calls (the tests drive both with the same random
 * calls and compare the bytes, the tables and `generation`). A 9-field request block costs ~14k
 * instructions in Python, ~4.9k here with one dict lookup per field (tuple hash and compare, ~400
 * instructions each); through an h2c -> h2c proxy that is ~6k instructions per request less
 * (bench.instructions). The seen cache (below, before encode_field) answers most lookups of a proxy's
 * blocks by the identity of the field's two objects: Encoder_encode went from ~5.5k to ~2.1k
 * instructions per h2c -> h2c request (callgrind, inclusive).
 *
 * Theory of operation. The state is PureEncoder's, in the same shapes, so the two cannot drift apart:
 * - `index`, a dict (name, value) -> int: the insertion number (>= 0) of the field's dynamic entry,
 *   or ~i (< 0) when fixed[i] is its representation that never changes (static full matches, then
 *   the cached literals); a copy of h2_hpack's _STATIC_FIXED to start with;
 * - `fixed`, a list of bytes: the static table's indexed representations, then cached literals, at
 *   most fixed_cache_max of them and fixed_cache_bytes in all (then forgotten, as PureEncoder does:
 *   which fields are cached decides how later blocks encode, so the caps are the same);
 * - `names`, a dict name -> insertion number of its newest entry;
 * - the entries themselves (the field tuple and its section 4.1 size), oldest first, in a ring that
 *   doubles as needed (a table of at most table_cap bytes has at most table_cap / 32 entries).
 * An insertion number n has the wire index 61 + inserted - n, so nothing is renumbered on insertion.
 * Every field is one dict lookup (or a seen-cache hit) and one copy of bytes into the output (a stack
 * buffer, grown on the heap for a large block), turned into one bytes object at the end.
 *
 * The tables and caps come from h2_hpack by configure() (the static table's representations, the
 * per-name policies, the Huffman code, the caps): one copy of each, in Python. Fields must be tuples
 * of two bytes; a subclass of either is copied into exact ones first, so no Python code (an __eq__ or
 * __hash__ of a subclass) ever runs in the middle of an encode and changes the encoder under it; the
 * one call that may run Python code, `field in sensitive` for a caller's own container, is followed by
 * reading the state afresh.
 *
 * Sanitizer build (outside the test suite; never commit the output): CPython itself is not
 * instrumented, so the sanitizer runtimes are preloaded and leak checking is off:
 *     CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer" \
 *         LDFLAGS="-fsanitize=address,undefined" python setup.py build_ext --inplace --force
 *     LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
 *         ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1 python -m pytest -q -p no:cacheprovider \
 *         tests/l7/test_h2_hpack.py tests/l7/test_h2_hpack_encoder.py tests/l7/test_h2_connection.py
 * then `python setup.py build_ext --inplace --force` again without them. Leaks: test_h2_hpack_encoder.py
 * traces memory over 10,000 blocks; 650,000 encodes kept the RSS flat (17.6 MB). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* The name policies' kinds: h2_hpack's _INDEX, _PATH, _LITERAL, _FRESH (configure checks the numbers) */
enum { KIND_INDEX = 0, KIND_PATH = 1, KIND_LITERAL = 2, KIND_FRESH = 3 };

/* --- what configure() sets ------------------------------------------------------------------------------ */

static PyObject *static_fixed;           /* dict (name, value) -> ~i: static full matches */
static PyObject *static_representations; /* list of bytes: the indexed representation of static entry i + 1 */
static Py_ssize_t static_count;          /* 61: where cached literals start in `fixed` */
static PyObject *name_policies;          /* dict name -> int: kind | literal flags << 2 | static index << 8 */
static uint32_t huffman_codes[256];
static uint8_t huffman_bits[256];
static Py_ssize_t table_cap, fixed_cache_max, fixed_cache_bytes;

/* --- the output buffer ------------------------------------------------------------------------------------ */

#define OUT_STACK 1024

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char stack[OUT_STACK];
} Out;

static void out_init(Out *o) {
    o->p = o->stack;
    o->len = 0;
    o->cap = OUT_STACK;
}

static void out_free(Out *o) {
    if (o->p != o->stack) PyMem_Free(o->p);
}

/* Room for n more bytes; -1 with MemoryError set */
static int out_reserve(Out *o, Py_ssize_t n) {
    if (n <= o->cap - o->len) return 0;
    if (n > PY_SSIZE_T_MAX / 2 - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = o->cap * 2;
    while (cap - o->len < n) cap *= 2;
    char *p = o->p == o->stack ? PyMem_Malloc((size_t)cap) : PyMem_Realloc(o->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (o->p == o->stack) memcpy(p, o->stack, (size_t)o->len);
    o->p = p;
    o->cap = cap;
    return 0;
}

/* An integer with an N-bit prefix (prefix_max = 2^N - 1) OR-ed with the representation's flags (5.1) */
static int out_int(Out *o, uint64_t value, unsigned prefix_max, unsigned flags) {
    if (out_reserve(o, 11) < 0) return -1;
    unsigned char *p = (unsigned char *)o->p + o->len;
    if (value < prefix_max) {
        p[0] = (unsigned char)(flags | value);
        o->len += 1;
        return 0;
    }
    Py_ssize_t n = 0;
    p[n++] = (unsigned char)(flags | prefix_max);
    value -= prefix_max;
    while (value >= 0x80) {
        p[n++] = (unsigned char)((value & 0x7F) | 0x80);
        value >>= 7;
    }
    p[n++] = (unsigned char)value;
    o->len += n;
    return 0;
}

static int out_byte(Out *o, unsigned char byte) {
    if (out_reserve(o, 1) < 0) return -1;
    o->p[o->len++] = (char)byte;
    return 0;
}

static int out_bytes(Out *o, const char *s, Py_ssize_t n) {
    if (out_reserve(o, n) < 0) return -1;
    memcpy(o->p + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

/* A string literal (5.2): plain, or Huffman-coded when asked for and shorter (as _string_bytes) */
static int out_string(Out *o, PyObject *bytes, int huffman) {
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(bytes);
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    if (huffman) {
        uint64_t bits = 0;
        for (Py_ssize_t i = 0; i < n; i++) bits += huffman_bits[s[i]];
        Py_ssize_t coded = (Py_ssize_t)((bits + 7) >> 3);
        if (coded < n) {
            if (out_int(o, (uint64_t)coded, 0x7F, 0x80) < 0 || out_reserve(o, coded) < 0) return -1;
            unsigned char *p = (unsigned char *)o->p + o->len;
            uint64_t acc = 0; /* only its low `pending` bits matter (at most 7 + 30 of them) */
            unsigned pending = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                acc = (acc << huffman_bits[s[i]]) | huffman_codes[s[i]];
                pending += huffman_bits[s[i]];
                while (pending >= 8) {
                    pending -= 8;
                    *p++ = (unsigned char)(acc >> pending);
                }
            }
            if (pending) /* padded with the most significant bits of EOS: ones */
                *p++ = (unsigned char)((acc << (8 - pending)) | (0xFFu >> pending));
            o->len += coded;
            return 0;
        }
    }
    if (out_int(o, (uint64_t)n, 0x7F, 0x00) < 0) return -1;
    return out_bytes(o, (const char *)s, n);
}

/* --- the encoder ------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject *field; /* the (name, value) tuple */
    Py_ssize_t size; /* its section 4.1 size */
} Entry;

/* The seen cache: `index`'s answer for a field whose name and value are objects met before. A proxy
 * sends the same bytes objects again and again (the names are constants, the values come from the
 * decoded-block cache, the snapshot, the request head), in a new tuple each time, so each field cost
 * a tuple hash and a dict lookup with a tuple compare (~400 instructions); a slot chosen by the two
 * addresses answers in a few. The slot holds references to both objects, so an address in it is
 * never another object's, and `version`, index_version when it was filled: any change to `index`
 * invalidates every slot at once. Only fields `index` has are kept (what encode_field reads of it is
 * then the same for as long as `index` is unchanged); it changes how fast a field is found, never what
 * is written, so the bytes stay PureEncoder's. */
#define SEEN_SLOTS 64 /* a power of two */

typedef struct {
    PyObject *name, *value; /* strong references, or NULL */
    unsigned long long version;
    Py_ssize_t found; /* index[(name, value)] */
} Seen;

static inline Seen *seen_slot(Seen *seen, PyObject *name, PyObject *value) {
    uintptr_t h = ((uintptr_t)name >> 4) * 31 + ((uintptr_t)value >> 4);
    return &seen[(h ^ (h >> 7)) & (SEEN_SLOTS - 1)];
}

typedef struct {
    PyObject_HEAD
    int huffman;
    PyObject *index;        /* dict field -> insertion number, or ~i into fixed */
    PyObject *fixed;        /* list of bytes */
    Py_ssize_t fixed_bytes; /* total length of the cached literals in fixed (beyond the static ones) */
    PyObject *names;        /* dict name -> insertion number of its newest entry */
    Entry *entries;         /* ring, oldest at entries[first]; capacity a power of two */
    Py_ssize_t capacity, first, count;
    Py_ssize_t inserted; /* insertion numbers handed out so far */
    Py_ssize_t evicted;  /* insertion number of the oldest entry still in the table */
    Py_ssize_t size;     /* the table's size (section 4.1) */
    Py_ssize_t limit;    /* the table's maximum size */
    int updates_pending; /* a size update to announce: the smallest limit since the last block, the final */
    Py_ssize_t update_smallest, update_final;
    long long generation;
    unsigned long long index_version; /* counts changes to `index` (the seen cache's entries are of one) */
    Seen seen[SEEN_SLOTS];
} Encoder;

/* An int known to fit (insertion numbers and ~i); -1 with an error set never happens for our own values */
static inline Py_ssize_t int_value(PyObject *number) {
#if PY_VERSION_HEX < 0x030C0000
    Py_ssize_t digits = Py_SIZE(number); /* 3.11: the sign and number of 30-bit digits */
    if (digits == 1) return (Py_ssize_t)((PyLongObject *)number)->ob_digit[0];
    if (digits == -1) return -(Py_ssize_t)((PyLongObject *)number)->ob_digit[0];
    if (digits == 0) return 0;
#endif
    return PyLong_AsSsize_t(number);
}

/* dict[key] == number (a missing key is not) */
static int maps_to(PyObject *dict, PyObject *key, Py_ssize_t number) {
    PyObject *found = PyDict_GetItemWithError(dict, key);
    if (found == NULL) return PyErr_Occurred() ? -1 : 0;
    return int_value(found) == number;
}

static int set_number(PyObject *dict, PyObject *key, Py_ssize_t number) {
    PyObject *value = PyLong_FromSsize_t(number);
    if (value == NULL) return -1;
    int result = PyDict_SetItem(dict, key, value);
    Py_DECREF(value);
    return result;
}

/* Evict the oldest entries until the table fits its limit (section 4.4) */
static int evict(Encoder *e) {
    while (e->size > e->limit) {
        Entry entry = e->entries[e->first];
        e->entries[e->first].field = NULL;
        e->first = (e->first + 1) & (e->capacity - 1);
        e->count--;
        Py_ssize_t number = e->evicted++;
        e->size -= entry.size;
        PyObject *name = PyTuple_GET_ITEM(entry.field, 0);
        int mapped = maps_to(e->index, entry.field, number);
        if (mapped > 0) {
            e->index_version++;
            mapped = PyDict_DelItem(e->index, entry.field);
        }
        if (mapped >= 0) mapped = maps_to(e->names, name, number);
        if (mapped > 0) mapped = PyDict_DelItem(e->names, name);
        Py_DECREF(entry.field);
        if (mapped < 0) return -1;
    }
    return 0;
}

static int append_entry(Encoder *e, PyObject *field, Py_ssize_t size) {
    if (e->count == e->capacity) {
        Py_ssize_t capacity = e->capacity ? e->capacity * 2 : 8;
        Entry *grown = PyMem_Malloc((size_t)capacity * sizeof(Entry));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < e->count; i++) grown[i] = e->entries[(e->first + i) & (e->capacity - 1)];
        PyMem_Free(e->entries);
        e->entries = grown;
        e->capacity = capacity;
        e->first = 0;
    }
    Py_INCREF(field);
    e->entries[(e->first + e->count) & (e->capacity - 1)] = (Entry){field, size};
    e->count++;
    return 0;
}

/* Drop the cached literal representations, not the static ones (PureEncoder._forget_literals) */
static int forget_literals(Encoder *e) {
    PyObject *kept = PyDict_New();
    if (kept == NULL) return -1;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(e->index, &pos, &key, &value)) {
        if (int_value(value) > ~static_count && PyDict_SetItem(kept, key, value) < 0) {
            Py_DECREF(kept);
            return -1;
        }
    }
    if (PyList_SetSlice(e->fixed, static_count, PyList_GET_SIZE(e->fixed), NULL) < 0) {
        Py_DECREF(kept);
        return -1;
    }
    e->index_version++;
    Py_SETREF(e->index, kept);
    e->fixed_bytes = 0;
    return 0;
}

/* A policy: kind, the flags of a _LITERAL's representation, the static name index or 0 */
typedef struct {
    int kind;
    unsigned flags;
    Py_ssize_t static_index;
} Policy;

static int policy_of(PyObject *name, Policy *policy) {
    PyObject *packed = PyDict_GetItemWithError(name_policies, name);
    if (packed == NULL) {
        if (PyErr_Occurred()) return -1;
        *policy = (Policy){KIND_INDEX, 0, 0}; /* a name in no table and no list: indexed */
        return 0;
    }
    Py_ssize_t bits = int_value(packed);
    *policy = (Policy){(int)(bits & 3), (unsigned)((bits >> 2) & 0x3F), bits >> 8};
    return 0;
}

/* One field that is not sensitive (the loop body of PureEncoder.encode) */
static int encode_field(Encoder *e, Out *o, PyObject *field) {
    Py_ssize_t base = static_count + e->inserted; /* the wire index of insertion number i is base - i */
    PyObject *name = PyTuple_GET_ITEM(field, 0), *value = PyTuple_GET_ITEM(field, 1);
    Seen *slot = seen_slot(e->seen, name, value);
    Py_ssize_t i;
    if (slot->name == name && slot->value == value && slot->version == e->index_version) {
        i = slot->found; /* index[field], unchanged since the slot was filled */
    } else {
        PyObject *found = PyDict_GetItemWithError(e->index, field);
        if (found == NULL) {
            if (PyErr_Occurred()) return -1;
            goto not_found;
        }
        i = int_value(found);
        Py_INCREF(name);
        Py_INCREF(value);
        Py_XSETREF(slot->name, name); /* (exact bytes: no Python code runs when one is freed) */
        Py_XSETREF(slot->value, value);
        slot->version = e->index_version;
        slot->found = i;
    }
    if (i >= 0) return out_int(o, (uint64_t)(base - i), 0x7F, 0x80); /* indexed (6.1), dynamic */
    PyObject *representation = PyList_GET_ITEM(e->fixed, ~i); /* static, or a literal seen before */
    return out_bytes(o, PyBytes_AS_STRING(representation), PyBytes_GET_SIZE(representation));
not_found:;
    Policy policy;
    if (policy_of(name, &policy) < 0) return -1;
    Py_ssize_t static_index = policy.static_index;
    if (policy.kind == KIND_FRESH) { /* not indexed, the name by index (the first one is inserted, below) */
        PyObject *newest = PyDict_GetItemWithError(e->names, name);
        if (newest == NULL && PyErr_Occurred()) return -1;
        if (newest != NULL || static_index) {
            Py_ssize_t at = newest != NULL ? base - int_value(newest) : static_index;
            if (out_int(o, (uint64_t)at, 0x0F, 0x00) < 0) return -1;
            return out_string(o, value, e->huffman);
        }
    }
    Py_ssize_t size = PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 32;
    if (policy.kind == KIND_LITERAL || size > e->limit >> 1 ||
        (policy.kind == KIND_PATH && memchr(PyBytes_AS_STRING(value), '?', (size_t)PyBytes_GET_SIZE(value)))) {
        /* a literal without indexing (or never indexed), kept for next time unless fresh or large */
        Py_ssize_t start = o->len;
        unsigned flags = policy.kind == KIND_LITERAL ? policy.flags : 0x00;
        if (static_index ? out_int(o, (uint64_t)static_index, 0x0F, flags) < 0
                         : out_byte(o, (unsigned char)flags) < 0 || out_string(o, name, e->huffman) < 0)
            return -1;
        if (out_string(o, value, e->huffman) < 0) return -1;
        Py_ssize_t length = o->len - start;
        if (policy.kind == KIND_FRESH || length > fixed_cache_bytes) return 0;
        if (PyList_GET_SIZE(e->fixed) >= static_count + fixed_cache_max || e->fixed_bytes + length > fixed_cache_bytes) {
            if (forget_literals(e) < 0) return -1;
        }
        PyObject *representation = PyBytes_FromStringAndSize(o->p + start, length);
        if (representation == NULL) return -1;
        e->index_version++;
        int failed = set_number(e->index, field, ~PyList_GET_SIZE(e->fixed)) < 0 ||
                     PyList_Append(e->fixed, representation) < 0;
        Py_DECREF(representation);
        if (failed) return -1;
        e->fixed_bytes += length;
        return 0;
    }
    /* a literal with incremental indexing (6.2.1), the name by index if a table has it */
    if (!static_index) {
        PyObject *newest = PyDict_GetItemWithError(e->names, name);
        if (newest != NULL) static_index = base - int_value(newest);
        else if (PyErr_Occurred()) return -1;
    }
    if (static_index ? out_int(o, (uint64_t)static_index, 0x3F, 0x40) < 0
                     : out_byte(o, 0x40) < 0 || out_string(o, name, e->huffman) < 0)
        return -1;
    if (out_string(o, value, e->huffman) < 0) return -1;
    Py_ssize_t number = e->inserted++;
    e->generation++;
    e->index_version++;
    if (set_number(e->index, field, number) < 0 || set_number(e->names, name, number) < 0 ||
        append_entry(e, field, size) < 0)
        return -1;
    e->size += size;
    return e->size > e->limit ? evict(e) : 0;
}

/* A field to send never indexed (6.2.3): the name by index when a table has it, a dynamic one first */
static int encode_sensitive(Encoder *e, Out *o, PyObject *field) {
    PyObject *name = PyTuple_GET_ITEM(field, 0), *value = PyTuple_GET_ITEM(field, 1);
    Policy policy;
    if (policy_of(name, &policy) < 0) return -1;
    PyObject *newest = PyDict_GetItemWithError(e->names, name);
    if (newest == NULL && PyErr_Occurred()) return -1;
    Py_ssize_t at = newest != NULL ? static_count + e->inserted - int_value(newest) : policy.static_index;
    if (at ? out_int(o, (uint64_t)at, 0x0F, 0x10) < 0 : out_byte(o, 0x10) < 0 || out_string(o, name, e->huffman) < 0)
        return -1;
    return out_string(o, value, e->huffman);
}

/* The field as an exact tuple of two exact bytes (a new reference), or NULL with TypeError */
static PyObject *exact_field(PyObject *field) {
    if (PyTuple_CheckExact(field) && PyTuple_GET_SIZE(field) == 2 && PyBytes_CheckExact(PyTuple_GET_ITEM(field, 0)) &&
        PyBytes_CheckExact(PyTuple_GET_ITEM(field, 1))) {
        Py_INCREF(field);
        return field;
    }
    if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(field, 0)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(field, 1))) {
        PyErr_Format(PyExc_TypeError, "a header field must be a (name, value) tuple of bytes, not %.100s",
                     Py_TYPE(field)->tp_name);
        return NULL;
    }
    PyObject *name = PyTuple_GET_ITEM(field, 0), *value = PyTuple_GET_ITEM(field, 1);
    return Py_BuildValue("(y#y#)", PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), PyBytes_AS_STRING(value),
                         PyBytes_GET_SIZE(value));
}

static int check_configured(void) {
    if (static_fixed == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxy.l7._hpack_c is used through proxy.l7.h2_hpack (configure first)");
        return -1;
    }
    return 0;
}

/* An encoder the garbage collector cleared (tp_clear, in a reference cycle) is not used again */
static PyObject *cleared(void) {
    PyErr_SetString(PyExc_RuntimeError, "the encoder was cleared");
    return NULL;
}

/* encode(fields, sensitive=None) -> bytes: one header block */
static PyObject *Encoder_encode(Encoder *e, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *fields = NULL, *sensitive = Py_None;
    Py_ssize_t given = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 1 || nargs + given > 2 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "encode(fields, sensitive=None)");
        return NULL;
    }
    fields = args[0];
    if (nargs == 2) sensitive = args[1];
    for (Py_ssize_t k = 0; k < given; k++) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, k), "sensitive") != 0) {
            PyErr_SetString(PyExc_TypeError, "encode(fields, sensitive=None)");
            return NULL;
        }
        sensitive = args[nargs + k];
    }
    if (e->index == NULL) return cleared();
    int any_sensitive = sensitive != Py_None ? PyObject_IsTrue(sensitive) : 0;
    if (any_sensitive < 0) return NULL;
    PyObject *sequence = PySequence_Fast(fields, "fields must be a sequence of (name, value) tuples");
    if (sequence == NULL) return NULL;
    Out out;
    out_init(&out);
    if (e->updates_pending) { /* section 4.2 */
        e->updates_pending = 0;
        e->generation++;
        if ((e->update_smallest < e->update_final && out_int(&out, (uint64_t)e->update_smallest, 0x1F, 0x20) < 0) ||
            out_int(&out, (uint64_t)e->update_final, 0x1F, 0x20) < 0)
            goto error;
    }
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(sequence); k++) {
        PyObject *field = exact_field(PySequence_Fast_GET_ITEM(sequence, k));
        if (field == NULL) goto error;
        int hidden = any_sensitive ? PySequence_Contains(sensitive, field) : 0;
        int failed = hidden < 0 || (hidden ? encode_sensitive(e, &out, field) : encode_field(e, &out, field)) < 0;
        Py_DECREF(field);
        if (failed) goto error;
    }
    Py_DECREF(sequence);
    PyObject *block = PyBytes_FromStringAndSize(out.p, out.len);
    out_free(&out);
    return block;
error:
    Py_DECREF(sequence);
    out_free(&out);
    return NULL;
}

/* set_max_table_size(n): the peer's SETTINGS_HEADER_TABLE_SIZE is now n (PureEncoder.set_max_table_size) */
static PyObject *Encoder_set_max_table_size(Encoder *e, PyObject *arg) {
    if (e->index == NULL) return cleared();
    PyObject *number = PyNumber_Index(arg);
    if (number == NULL) return NULL;
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(number, &overflow);
    Py_DECREF(number);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (overflow < 0 || (!overflow && n < 0)) {
        PyErr_SetString(PyExc_ValueError, "table size must not be negative");
        return NULL;
    }
    if (overflow > 0 || n > table_cap) n = table_cap;
    if (n == e->limit && !e->updates_pending) Py_RETURN_NONE;
    e->update_smallest = !e->updates_pending || n < e->update_smallest ? (Py_ssize_t)n : e->update_smallest;
    e->update_final = (Py_ssize_t)n;
    e->updates_pending = 1;
    e->generation++;
    e->limit = (Py_ssize_t)n;
    if (evict(e) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Encoder_get_table_size(Encoder *e, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(e->size);
}

static PyObject *Encoder_get_table_limit(Encoder *e, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(e->limit);
}

/* the dynamic table, newest entry (index 62) first */
static PyObject *Encoder_get_dynamic_table(Encoder *e, void *closure) {
    (void)closure;
    PyObject *table = PyList_New(e->count);
    if (table == NULL) return NULL;
    for (Py_ssize_t i = 0; i < e->count; i++) {
        PyObject *field = e->entries[(e->first + e->count - 1 - i) & (e->capacity - 1)].field;
        Py_INCREF(field);
        PyList_SET_ITEM(table, i, field);
    }
    return table;
}

static PyObject *Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    int huffman = 0;
    static char *names[] = {"huffman", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$p:Encoder", names, &huffman)) return NULL;
    if (check_configured() < 0) return NULL;
    Encoder *e = (Encoder *)type->tp_alloc(type, 0);
    if (e == NULL) return NULL;
    e->huffman = huffman;
    e->limit = 4096; /* the initial SETTINGS_HEADER_TABLE_SIZE */
    e->index = PyDict_Copy(static_fixed);
    e->fixed = PyList_GetSlice(static_representations, 0, static_count);
    e->names = PyDict_New();
    if (e->index == NULL || e->fixed == NULL || e->names == NULL) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static int Encoder_traverse(Encoder *e, visitproc visit, void *arg) {
    Py_VISIT(e->index);
    Py_VISIT(e->fixed);
    Py_VISIT(e->names);
    for (Py_ssize_t i = 0; i < e->count; i++) Py_VISIT(e->entries[(e->first + i) & (e->capacity - 1)].field);
    return 0;
}

static int Encoder_clear(Encoder *e) {
    e->index_version++;
    for (int k = 0; k < SEEN_SLOTS; k++) {
        Py_CLEAR(e->seen[k].name);
        Py_CLEAR(e->seen[k].value);
    }
    Py_CLEAR(e->index);
    Py_CLEAR(e->fixed);
    Py_CLEAR(e->names);
    while (e->count > 0) {
        PyObject *field = e->entries[e->first].field;
        e->first = (e->first + 1) & (e->capacity - 1);
        e->count--;
        Py_DECREF(field);
    }
    e->size = 0;
    return 0;
}

static void Encoder_dealloc(Encoder *e) {
    PyObject_GC_UnTrack(e);
    Encoder_clear(e);
    PyMem_Free(e->entries);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL | METH_KEYWORDS,
     "encode(fields, sensitive=None) -> bytes: one header block for `fields`, (name, value) tuples of bytes; "
     "`sensitive`: fields to send never indexed (section 6.2.3) whatever their name."},
    {"set_max_table_size", (PyCFunction)Encoder_set_max_table_size, METH_O,
     "set_max_table_size(n): the peer's SETTINGS_HEADER_TABLE_SIZE is now n (the table is capped, evicted at once, "
     "and the change announced at the start of the next block)."},
    {NULL},
};

/* The literal cache, for the tests that hold it to its bounds (as PureEncoder's attributes): copies,
 * since encode() trusts what it put there (an entry changed from outside would crash it). */
static PyObject *Encoder_get_index(Encoder *e, void *closure) {
    (void)closure;
    return PyDict_Copy(e->index);
}

static PyObject *Encoder_get_fixed(Encoder *e, void *closure) {
    (void)closure;
    return PyList_GetSlice(e->fixed, 0, PyList_GET_SIZE(e->fixed));
}

static PyGetSetDef Encoder_getset[] = {
    {"_index", (getter)Encoder_get_index, NULL, "a copy of the field -> insertion number / ~literal dict", NULL},
    {"_fixed", (getter)Encoder_get_fixed, NULL, "a copy of the fixed representations list", NULL},
    {"table_size", (getter)Encoder_get_table_size, NULL, "Current size of the dynamic table (section 4.1).", NULL},
    {"table_limit", (getter)Encoder_get_table_limit, NULL, "Current maximum size of the dynamic table.", NULL},
    {"dynamic_table", (getter)Encoder_get_dynamic_table, NULL, "The dynamic table, newest entry (index 62) first.",
     NULL},
    {NULL},
};

static PyMemberDef Encoder_members[] = {
    {"generation", T_LONGLONG, offsetof(Encoder, generation), READONLY,
     "counts what changes how fields encode: while it stays the same, the same fields encode to the same bytes"},
    {"_fixed_bytes", T_PYSSIZET, offsetof(Encoder, fixed_bytes), READONLY, NULL},
    {NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.l7._hpack_c.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Encoder(*, huffman=False): encodes the header blocks of one connection (native twin of "
              "h2_hpack.PureEncoder).",
    .tp_new = Encoder_new,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_traverse = (traverseproc)Encoder_traverse,
    .tp_clear = (inquiry)Encoder_clear,
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
    .tp_members = Encoder_members,
};

/* --- configure ------------------------------------------------------------------------------------------- */

static Py_ssize_t small_nonnegative(PyObject *object, const char *what) {
    Py_ssize_t n = PyLong_Check(object) ? PyLong_AsSsize_t(object) : -1;
    if (n < 0) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "configure: %s must be a non-negative int", what);
        return -1;
    }
    return n;
}

/* The per-name policies packed into one int each: {name: (kind, static index, literal flags)} in */
static PyObject *pack_policies(PyObject *policies) {
    if (!PyDict_Check(policies)) {
        PyErr_SetString(PyExc_TypeError, "configure: name_policies must be a dict");
        return NULL;
    }
    PyObject *packed = PyDict_New();
    if (packed == NULL) return NULL;
    PyObject *name, *policy;
    Py_ssize_t pos = 0;
    while (PyDict_Next(policies, &pos, &name, &policy)) {
        Py_ssize_t kind, static_index, flags;
        if (!PyBytes_CheckExact(name) || !PyTuple_Check(policy) || PyTuple_GET_SIZE(policy) != 3 ||
            (kind = small_nonnegative(PyTuple_GET_ITEM(policy, 0), "a kind")) < 0 ||
            (static_index = small_nonnegative(PyTuple_GET_ITEM(policy, 1), "a static index")) < 0 ||
            (flags = small_nonnegative(PyTuple_GET_ITEM(policy, 2), "literal flags")) < 0 || kind > KIND_FRESH ||
            static_index > static_count || (flags != 0x00 && flags != 0x10)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "configure: a policy is bytes -> (kind, static index, flags)");
            Py_DECREF(packed);
            return NULL;
        }
        if (set_number(packed, name, kind | flags << 2 | static_index << 8) < 0) {
            Py_DECREF(packed);
            return NULL;
        }
    }
    return packed;
}

/* configure(static_fixed, static_representations, name_policies, kinds, huffman_code, table_cap,
 *           fixed_cache_max, fixed_cache_bytes): h2_hpack's tables, once at import (again: replaced) */
static PyObject *configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "configure(static_fixed, static_representations, name_policies, kinds, "
                                         "huffman_code, table_cap, fixed_cache_max, fixed_cache_bytes)");
        return NULL;
    }
    PyObject *fixed = args[0], *representations = args[1], *kinds = args[3], *code = args[4];
    if (!PyDict_CheckExact(fixed) || !PyList_CheckExact(representations) ||
        PyDict_GET_SIZE(fixed) != PyList_GET_SIZE(representations)) {
        PyErr_SetString(PyExc_TypeError, "configure: static_fixed is a dict and static_representations a list, "
                                         "of the same length");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(representations); i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(representations, i))) {
            PyErr_SetString(PyExc_TypeError, "configure: static representations are bytes");
            return NULL;
        }
    }
    PyObject *expected_kinds = Py_BuildValue("(iiii)", KIND_INDEX, KIND_PATH, KIND_LITERAL, KIND_FRESH);
    if (expected_kinds == NULL) return NULL;
    int same = PyObject_RichCompareBool(kinds, expected_kinds, Py_EQ);
    Py_DECREF(expected_kinds);
    if (same <= 0) {
        if (same == 0) PyErr_SetString(PyExc_ValueError, "configure: the policy kinds are not this module's");
        return NULL;
    }
    if (!PyTuple_Check(code) || PyTuple_GET_SIZE(code) < 256) {
        PyErr_SetString(PyExc_TypeError, "configure: huffman_code is a tuple of (code, bits) for 0..255");
        return NULL;
    }
    uint32_t codes[256];
    uint8_t bits[256];
    for (int i = 0; i < 256; i++) {
        PyObject *pair = PyTuple_GET_ITEM(code, i);
        unsigned long c, n;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            ((c = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(pair, 0))) == (unsigned long)-1 && PyErr_Occurred()) ||
            ((n = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(pair, 1))) == (unsigned long)-1 && PyErr_Occurred()) ||
            n < 5 || n > 30 || c >> n) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "configure: a Huffman code is (code, 5..30 bits)");
            return NULL;
        }
        codes[i] = (uint32_t)c;
        bits[i] = (uint8_t)n;
    }
    Py_ssize_t cap = small_nonnegative(args[5], "table_cap"), cache_max = small_nonnegative(args[6], "fixed_cache_max"),
               cache_bytes = small_nonnegative(args[7], "fixed_cache_bytes");
    if (cap < 0 || cache_max < 0 || cache_bytes < 0) return NULL;
    if (cap > ((Py_ssize_t)1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "configure: table_cap is at most 2**30");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(representations);
    Py_ssize_t previous_count = static_count;
    static_count = count; /* pack_policies checks static indices against it */
    PyObject *packed = pack_policies(args[2]);
    if (packed == NULL) {
        static_count = previous_count;
        return NULL;
    }
    Py_INCREF(fixed);
    Py_XSETREF(static_fixed, fixed);
    Py_INCREF(representations);
    Py_XSETREF(static_representations, representations);
    Py_XSETREF(name_policies, packed);
    memcpy(huffman_codes, codes, sizeof codes);
    memcpy(huffman_bits, bits, sizeof bits);
    table_cap = cap;
    fixed_cache_max = cache_max;
    fixed_cache_bytes = cache_bytes;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(static_fixed, static_representations, name_policies, kinds, huffman_code, table_cap, "
     "fixed_cache_max, fixed_cache_bytes): the tables, from proxy.l7.h2_hpack"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy.l7._hpack_c",
    .m_doc = "The HPACK encoder of one HTTP/2 connection (native twin of proxy.l7.h2_hpack.PureEncoder).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__hpack_c(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
