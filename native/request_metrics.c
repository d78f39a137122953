/* Istio's per-request HTTP metrics of one worker in preallocated arrays: module
 * proxy.telemetry._request_metrics_c, a CPython extension (METH_FASTCALL/METH_O, no cffi: a cffi call
 * alone costs more than the whole of a request's accounting here). Its pure-Python twin is
 * proxy/telemetry/_request_table_py.py; proxy/telemetry/request_table.py picks one. The API and the
 * reasons are described there; this file follows it line for line.
 *
 * Theory of operation. A label set is a *slot*: a fixed row of counts (the duration, request size and
 * response size histograms on Envoy's default buckets, their sums, the gRPC message counts). Python
 * decides a request's slot the first time it sees the request's *key* (its listener, cluster,
 * endpoint and peer facts, which are objects of the current snapshot, and its status) and tells the
 * table with remember(); every later request with the same key is counted by record_known(ctx) in
 * one call, which reads the key and the sizes straight from the RequestContext's slots (at the
 * offsets of its member descriptors, found once, as CPython's own LOAD_ATTR_SLOT does), finds the
 * slot in a small open-addressing table keyed by object identity, reads the clock and bumps the
 * counts. Anything it does not know (a new snapshot, a new key, response flags, gRPC facts) makes
 * it return False and Python takes the general path, which ends in record().
 *
 * Keys hold strong references to their objects, so an address in a key is never reused by another
 * object while the key exists; forget() drops them all when the snapshot changes. Slots are never
 * freed, and every index is checked against the capacity: a slot from an older snapshot stays valid. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

#define BOUNDS_COUNT 19
#define BUCKETS (BOUNDS_COUNT + 1) /* the last is +Inf */

/* Envoy's default histogram buckets (HistogramSettingsImpl::defaultBuckets) */
static const double BOUNDS[BOUNDS_COUNT] = {0.5,    1.0,     5.0,     10.0,    25.0,      50.0,     100.0,
                                            250.0,  500.0,   1000.0,  2500.0,  5000.0,    10000.0,  30000.0,
                                            60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0};

enum { DURATION = 0, REQUEST_BYTES = 1, RESPONSE_BYTES = 2, HISTOGRAMS = 3 };

typedef struct {
    uint64_t counts[HISTOGRAMS][BUCKETS];
    double sums[HISTOGRAMS];
    uint64_t request_messages, response_messages;
} Slot;

typedef struct {
    PyObject *listener, *cluster, *endpoint, *peer; /* listener NULL: an empty entry */
    long status;
    Py_ssize_t slot;
} Key;

/* the RequestContext fields read per request */
enum { F_SNAPSHOT, F_LISTENER, F_CLUSTER, F_ENDPOINT, F_STATUS, F_RESPONSE_FLAGS, F_EXTRA, F_START, F_BYTES_RECEIVED,
       F_BYTES_SENT, FIELDS };
static const char *FIELD_NAMES[FIELDS] = {"snapshot", "listener", "cluster", "endpoint", "status", "response_flags",
                                          "extra", "start_monotonic", "bytes_received", "bytes_sent"};

#define GRPC_NAMES 2
static const char *GRPC_NAME_STRINGS[GRPC_NAMES] = {"grpc_status", "grpc_messages"};

typedef struct {
    PyObject_HEAD
    Slot *slots;
    Py_ssize_t capacity;
    Key *keys;
    size_t key_mask;          /* the key table's size - 1 (a power of two, at least twice max_keys) */
    Py_ssize_t key_count, max_keys;
    PyObject *snapshot;       /* the snapshot the keys belong to (None until forget() names one) */
    PyTypeObject *context_type;
    Py_ssize_t offsets[FIELDS];
    PyObject *peer_name;      /* "peer": ctx.extra's peer facts, part of the key */
    PyObject *grpc_names[GRPC_NAMES]; /* ctx.extra's gRPC facts: such a request takes the general path */
    int clock_set;
    double clock_offset;      /* added to CLOCK_MONOTONIC: Trio's SystemClock is offset + perf_counter() */
    PyObject *clock;          /* or a clock to call (NULL: CLOCK_MONOTONIC) */
} Table;

/* A small non-negative int's value without a call (statuses and sizes are nearly always one); -1: not one */
static inline long long small_int(PyObject *value) {
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)value)) {
        Py_ssize_t n = PyUnstable_Long_CompactValue((PyLongObject *)value);
        return n >= 0 ? (long long)n : -1;
    }
    return -1;
#else
    Py_ssize_t size = Py_SIZE(value); /* 3.11: the sign and number of 30-bit digits */
    if (size == 0) return 0;
    if (size == 1) return (long long)((PyLongObject *)value)->ob_digit[0];
    return -1;
#endif
}

/* The tables' memory straight from the kernel: zero pages that cost nothing until first written, so
 * the slots and keys never used are never touched. (calloc gives the same only when it maps fresh
 * memory; for a block below glibc's dynamic mmap threshold it clears reused heap memory instead, a
 * memset of the whole table at start-up that also made its pages resident.) NULL: out of memory. */
static void *zeroed_pages(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void free_pages(void *p, size_t bytes) {
    if (p != NULL) munmap(p, bytes);
}

static inline PyObject *field(PyObject *ctx, const Table *t, int which) {
    return *(PyObject **)((char *)ctx + t->offsets[which]);
}

/* bisect_left over BOUNDS (a value equal to a bound is in it; NaN in the first bucket, as bisect says) */
static int bisect_bounds(double value) {
    int i = 0;
    while (i < BOUNDS_COUNT && BOUNDS[i] < value) i++;
    return i;
}

/* The common small values by table instead (filled at import from bisect_bounds): a size below
 * SMALL_SIZE indexes its bucket; as every bound is a multiple of 0.5, a duration d below
 * SMALL_DURATION_MS ms is in the bucket of ceil(2 d) / 2 (bounds are inclusive: exactly 0.5 is in
 * le="0.5", anything above it in the next). */
#define SMALL_SIZE 4096
#define SMALL_DURATION_MS 1000
static unsigned char SIZE_BUCKET[SMALL_SIZE];
static unsigned char DURATION_BUCKET[2 * SMALL_DURATION_MS + 1];

static void fill_bucket_tables(void) {
    for (int n = 0; n < SMALL_SIZE; n++) SIZE_BUCKET[n] = (unsigned char)bisect_bounds((double)n);
    for (int half = 0; half <= 2 * SMALL_DURATION_MS; half++) DURATION_BUCKET[half] = (unsigned char)bisect_bounds(half / 2.0);
}

static inline int size_bucket(long long n) { return n < SMALL_SIZE ? SIZE_BUCKET[n] : bisect_bounds((double)n); }

static inline int duration_bucket(double ms) {
    /* !(ms < 0): NaN and negative durations (a clock that stepped back) go to bisect_bounds */
    if (ms >= 0.0 && ms < SMALL_DURATION_MS) return DURATION_BUCKET[(int)ceil(ms * 2.0)];
    return bisect_bounds(ms);
}

static inline size_t key_hash(PyObject *listener, PyObject *cluster, PyObject *endpoint, PyObject *peer, long status) {
    uint64_t h = (uint64_t)(uintptr_t)listener;
    h = (h ^ (uint64_t)(uintptr_t)cluster) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ (uint64_t)(uintptr_t)endpoint) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ (uint64_t)(uintptr_t)peer) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ (uint64_t)status) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h ^ (h >> 29));
}

/* The clock the request start times were read from, in seconds. */
static int read_clock(Table *t, double *now) {
    if (t->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        /* as time.perf_counter() makes it: integer nanoseconds, then one division */
        int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        *now = (double)ns / 1e9 + t->clock_offset;
        return 0;
    }
    PyObject *value = PyObject_CallNoArgs(t->clock);
    if (value == NULL) return -1;
    *now = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (*now == -1.0 && PyErr_Occurred()) return -1;
    *now += t->clock_offset;
    return 0;
}

static inline void count(Slot *s, double duration_ms, long long request_bytes, long long response_bytes) {
    s->counts[DURATION][duration_bucket(duration_ms)]++;
    s->sums[DURATION] += duration_ms;
    s->counts[REQUEST_BYTES][size_bucket(request_bytes)]++;
    s->sums[REQUEST_BYTES] += (double)request_bytes;
    s->counts[RESPONSE_BYTES][size_bucket(response_bytes)]++;
    s->sums[RESPONSE_BYTES] += (double)response_bytes;
}

/* The key of a request the fast path may count: 1 and the key's parts, or 0 (the general path). */
static int read_key(Table *t, PyObject *ctx, PyObject **listener, PyObject **cluster, PyObject **endpoint,
                    PyObject **peer, long *status) {
    if (Py_TYPE(ctx) != t->context_type || field(ctx, t, F_SNAPSHOT) != t->snapshot || !t->clock_set) return 0;
    PyObject *flags = field(ctx, t, F_RESPONSE_FLAGS);
    if (flags == NULL || !PyList_CheckExact(flags) || PyList_GET_SIZE(flags) != 0) return 0;
    PyObject *extra = field(ctx, t, F_EXTRA);
    *peer = Py_None;
    if (extra != Py_None) { /* the peer facts are part of the key; gRPC facts decide labels and counts */
        if (extra == NULL || !PyDict_CheckExact(extra)) return 0;
        for (int i = 0; i < GRPC_NAMES; i++) {
            int found = PyDict_Contains(extra, t->grpc_names[i]);
            if (found != 0) {
                if (found < 0) PyErr_Clear();
                return 0;
            }
        }
        PyObject *facts = PyDict_GetItemWithError(extra, t->peer_name);
        if (facts != NULL) {
            *peer = facts;
        } else if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    PyObject *status_object = field(ctx, t, F_STATUS);
    *listener = field(ctx, t, F_LISTENER);
    *cluster = field(ctx, t, F_CLUSTER);
    *endpoint = field(ctx, t, F_ENDPOINT);
    if (status_object == NULL || !PyLong_CheckExact(status_object) || *listener == NULL || *cluster == NULL ||
        *endpoint == NULL)
        return 0;
    long long small = small_int(status_object);
    if (small >= 0) {
        *status = (long)small;
        return 1;
    }
    *status = PyLong_AsLong(status_object);
    if (*status == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static Key *find(Table *t, PyObject *listener, PyObject *cluster, PyObject *endpoint, PyObject *peer, long status) {
    size_t i = key_hash(listener, cluster, endpoint, peer, status) & t->key_mask;
    for (;;) {
        Key *k = &t->keys[i];
        if (k->listener == NULL || (k->listener == listener && k->cluster == cluster && k->endpoint == endpoint &&
                                    k->peer == peer && k->status == status))
            return k;
        i = (i + 1) & t->key_mask;
    }
}

static int read_size(PyObject *value, long long *out) {
    if (value == NULL || !PyLong_CheckExact(value)) return 0;
    *out = small_int(value);
    if (*out >= 0) return 1;
    *out = PyLong_AsLongLong(value);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return *out >= 0;
}

/* record_known(ctx) -> bool: counted (its key was remembered), or False: the caller takes the general path */
static PyObject *Table_record_known(Table *t, PyObject *ctx) {
    PyObject *listener, *cluster, *endpoint, *peer;
    long status;
    if (!read_key(t, ctx, &listener, &cluster, &endpoint, &peer, &status)) Py_RETURN_FALSE;
    Key *k = find(t, listener, cluster, endpoint, peer, status);
    PyObject *start = field(ctx, t, F_START);
    long long request_bytes, response_bytes;
    if (k->listener == NULL || start == NULL || !PyFloat_CheckExact(start) ||
        !read_size(field(ctx, t, F_BYTES_RECEIVED), &request_bytes) ||
        !read_size(field(ctx, t, F_BYTES_SENT), &response_bytes))
        Py_RETURN_FALSE;
    double now;
    if (read_clock(t, &now) < 0) return NULL;
    count(&t->slots[k->slot], (now - PyFloat_AS_DOUBLE(start)) * 1000.0, request_bytes, response_bytes);
    Py_RETURN_TRUE;
}

static int check_slot(Table *t, Py_ssize_t slot) {
    if (slot < 0 || slot >= t->capacity) {
        PyErr_Format(PyExc_IndexError, "slot %zd out of the table's %zd", slot, t->capacity);
        return -1;
    }
    return 0;
}

/* remember(ctx, slot) -> bool: later requests with ctx's key are counted in `slot` by record_known
 * (False: ctx is not one the fast path counts, or the key table is full). */
static PyObject *Table_remember(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "remember(ctx, slot)");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(args[1]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(t, slot) < 0) return NULL;
    PyObject *listener, *cluster, *endpoint, *peer;
    long status;
    if (!read_key(t, args[0], &listener, &cluster, &endpoint, &peer, &status)) Py_RETURN_FALSE;
    Key *k = find(t, listener, cluster, endpoint, peer, status);
    if (k->listener == NULL) {
        if (t->key_count >= t->max_keys) Py_RETURN_FALSE;
        Py_INCREF(listener);
        Py_INCREF(cluster);
        Py_INCREF(endpoint);
        Py_INCREF(peer);
        k->listener = listener;
        k->cluster = cluster;
        k->endpoint = endpoint;
        k->peer = peer;
        k->status = status;
        t->key_count++;
    }
    k->slot = slot;
    Py_RETURN_TRUE;
}

static void clear_keys(Table *t) {
    for (size_t i = 0; i <= t->key_mask; i++) {
        Key *k = &t->keys[i];
        if (k->listener != NULL) {
            PyObject *listener = k->listener, *cluster = k->cluster, *endpoint = k->endpoint, *peer = k->peer;
            k->listener = k->cluster = k->endpoint = k->peer = NULL;
            Py_DECREF(listener);
            Py_DECREF(cluster);
            Py_DECREF(endpoint);
            Py_DECREF(peer);
        }
    }
    t->key_count = 0;
}

/* forget(snapshot): every remembered key dropped; the fast path now counts requests of `snapshot` only */
static PyObject *Table_forget(Table *t, PyObject *snapshot) {
    clear_keys(t);
    Py_INCREF(snapshot);
    Py_XSETREF(t->snapshot, snapshot);
    Py_RETURN_NONE;
}

/* set_clock(offset, clock=None): now = clock() + offset, or CLOCK_MONOTONIC (perf_counter) + offset */
static PyObject *Table_set_clock(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "set_clock(offset, clock=None)");
        return NULL;
    }
    double offset = PyFloat_AsDouble(args[0]);
    if (offset == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *clock = nargs == 2 && args[1] != Py_None ? args[1] : NULL;
    if (clock != NULL && !PyCallable_Check(clock)) {
        PyErr_SetString(PyExc_TypeError, "clock must be callable");
        return NULL;
    }
    Py_XINCREF(clock);
    Py_XSETREF(t->clock, clock);
    t->clock_offset = offset;
    t->clock_set = 1;
    Py_RETURN_NONE;
}

/* record(slot, start, request_bytes, response_bytes, request_messages=0, response_messages=0) */
static PyObject *Table_record(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "record(slot, start, request_bytes, response_bytes[, request_messages, response_messages])");
        return NULL;
    }
    if (!t->clock_set) {
        PyErr_SetString(PyExc_RuntimeError, "record() before set_clock()");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(args[0]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(t, slot) < 0) return NULL;
    double start = PyFloat_AsDouble(args[1]);
    if (start == -1.0 && PyErr_Occurred()) return NULL;
    long long sizes[4] = {0, 0, 0, 0};
    for (Py_ssize_t i = 2; i < nargs; i++) {
        sizes[i - 2] = PyLong_AsLongLong(args[i]);
        if (sizes[i - 2] == -1 && PyErr_Occurred()) return NULL;
        if (sizes[i - 2] < 0) {
            PyErr_SetString(PyExc_ValueError, "sizes and message counts are never negative");
            return NULL;
        }
    }
    double now;
    if (read_clock(t, &now) < 0) return NULL;
    Slot *s = &t->slots[slot];
    count(s, (now - start) * 1000.0, sizes[0], sizes[1]);
    s->request_messages += (uint64_t)sizes[2];
    s->response_messages += (uint64_t)sizes[3];
    Py_RETURN_NONE;
}

/* histogram(slot, which) -> (counts per bucket as a list, sum): which 0 duration, 1 request, 2 response bytes */
static PyObject *Table_histogram(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "histogram(slot, which)");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(args[0]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(t, slot) < 0) return NULL;
    Py_ssize_t which = PyLong_AsSsize_t(args[1]);
    if (which == -1 && PyErr_Occurred()) return NULL;
    if (which < 0 || which >= HISTOGRAMS) {
        PyErr_Format(PyExc_IndexError, "histogram %zd of %d", which, HISTOGRAMS);
        return NULL;
    }
    Slot *s = &t->slots[slot];
    PyObject *counts = PyList_New(BUCKETS);
    if (counts == NULL) return NULL;
    for (int i = 0; i < BUCKETS; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(s->counts[which][i]);
        if (n == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyList_SET_ITEM(counts, i, n);
    }
    return Py_BuildValue("(Nd)", counts, s->sums[which]);
}

/* messages(slot) -> (request_messages, response_messages) */
static PyObject *Table_messages(Table *t, PyObject *slot_object) {
    Py_ssize_t slot = PyLong_AsSsize_t(slot_object);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(t, slot) < 0) return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)t->slots[slot].request_messages,
                         (unsigned long long)t->slots[slot].response_messages);
}

static PyObject *Table_get_capacity(Table *t, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(t->capacity);
}

static PyObject *Table_get_remembered(Table *t, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(t->key_count);
}

/* RequestTable(capacity, max_keys, context_type) */
static int Table_init(Table *t, PyObject *args, PyObject *kwargs) {
    Py_ssize_t capacity, max_keys;
    PyObject *context_type;
    static char *names[] = {"capacity", "max_keys", "context_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nnO!", names, &capacity, &max_keys, &PyType_Type, &context_type))
        return -1;
    if (t->slots != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RequestTable is initialised once");
        return -1;
    }
    if (capacity < 1 || max_keys < 1 || capacity > (PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(Slot)) ||
        max_keys > ((Py_ssize_t)1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "capacity and max_keys must be positive (max_keys at most 2**24)");
        return -1;
    }
    for (int i = 0; i < FIELDS; i++) { /* each a __slots__ member (T_OBJECT_EX) of exactly this type */
        PyObject *descr = PyObject_GetAttrString(context_type, FIELD_NAMES[i]);
        if (descr == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
            PyErr_Clear();
        }
        int ok = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_common.d_type == (PyTypeObject *)context_type &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok) t->offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_XDECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ field of it", ((PyTypeObject *)context_type)->tp_name,
                         FIELD_NAMES[i]);
            return -1;
        }
    }
    size_t size = 2;
    while (size < (size_t)max_keys * 2) size <<= 1;
    t->slots = zeroed_pages((size_t)capacity * sizeof(Slot));
    t->keys = zeroed_pages(size * sizeof(Key));
    if (t->slots == NULL || t->keys == NULL) {
        free_pages(t->slots, (size_t)capacity * sizeof(Slot));
        free_pages(t->keys, size * sizeof(Key));
        t->slots = NULL;
        t->keys = NULL;
        PyErr_NoMemory();
        return -1;
    }
    t->capacity = capacity;
    t->key_mask = size - 1;
    t->max_keys = max_keys;
    Py_INCREF(context_type);
    t->context_type = (PyTypeObject *)context_type;
    return 0;
}

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    (void)args;
    (void)kwargs;
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    t->snapshot = Py_NewRef(Py_None);
    t->peer_name = PyUnicode_InternFromString("peer");
    for (int i = 0; i < GRPC_NAMES; i++) t->grpc_names[i] = PyUnicode_InternFromString(GRPC_NAME_STRINGS[i]);
    if (t->peer_name == NULL || t->grpc_names[0] == NULL || t->grpc_names[1] == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static int Table_traverse(Table *t, visitproc visit, void *arg) {
    Py_VISIT(t->snapshot);
    Py_VISIT(t->clock);
    Py_VISIT(t->context_type);
    if (t->keys != NULL) {
        for (size_t i = 0; i <= t->key_mask; i++) {
            Key *k = &t->keys[i];
            if (k->listener != NULL) {
                Py_VISIT(k->listener);
                Py_VISIT(k->cluster);
                Py_VISIT(k->endpoint);
                Py_VISIT(k->peer);
            }
        }
    }
    return 0;
}

static int Table_clear(Table *t) {
    if (t->keys != NULL) clear_keys(t);
    Py_CLEAR(t->snapshot);
    Py_CLEAR(t->clock);
    Py_CLEAR(t->context_type);
    return 0;
}

static void Table_dealloc(Table *t) {
    PyObject_GC_UnTrack(t);
    Table_clear(t);
    Py_CLEAR(t->peer_name);
    for (int i = 0; i < GRPC_NAMES; i++) Py_CLEAR(t->grpc_names[i]);
    free_pages(t->slots, (size_t)t->capacity * sizeof(Slot));
    if (t->keys != NULL) free_pages(t->keys, (t->key_mask + 1) * sizeof(Key));
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef Table_methods[] = {
    {"record_known", (PyCFunction)Table_record_known, METH_O, "Count a request whose key was remembered: True, else False."},
    {"remember", (PyCFunction)(void (*)(void))Table_remember, METH_FASTCALL, "remember(ctx, slot) -> bool"},
    {"forget", (PyCFunction)Table_forget, METH_O, "forget(snapshot): drop every remembered key."},
    {"set_clock", (PyCFunction)(void (*)(void))Table_set_clock, METH_FASTCALL, "set_clock(offset, clock=None)"},
    {"record", (PyCFunction)(void (*)(void))Table_record, METH_FASTCALL,
     "record(slot, start, request_bytes, response_bytes, request_messages=0, response_messages=0)"},
    {"histogram", (PyCFunction)(void (*)(void))Table_histogram, METH_FASTCALL, "histogram(slot, which) -> (counts, sum)"},
    {"messages", (PyCFunction)Table_messages, METH_O, "messages(slot) -> (request_messages, response_messages)"},
    {NULL},
};

static PyGetSetDef Table_getset[] = {
    {"capacity", (getter)Table_get_capacity, NULL, "slots in the table", NULL},
    {"remembered", (getter)Table_get_remembered, NULL, "keys remembered now", NULL},
    {NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.telemetry._request_metrics_c.RequestTable",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RequestTable(capacity, max_keys, context_type): one worker's Istio request metrics.",
    .tp_new = Table_new,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear,
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy.telemetry._request_metrics_c",
    .m_doc = "Istio's per-request HTTP metrics in preallocated arrays (native twin of _request_table_py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__request_metrics_c(void) {
    fill_bucket_tables();
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *bounds = PyTuple_New(BOUNDS_COUNT);
    if (bounds == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < BOUNDS_COUNT; i++) {
        PyObject *bound = PyFloat_FromDouble(BOUNDS[i]);
        if (bound == NULL) {
            Py_DECREF(bounds);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(bounds, i, bound);
    }
    /* BOUNDS: the bucket bounds compiled in, which the tests compare with the Python ones */
    if (PyModule_AddObjectRef(m, "RequestTable", (PyObject *)&TableType) < 0 ||
        PyModule_AddIntConstant(m, "BUCKETS", BUCKETS) < 0 || PyModule_AddObject(m, "BOUNDS", bounds) < 0) {
        Py_DECREF(bounds);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
