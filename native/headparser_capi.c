/* The two head-parser calls of every proxied HTTP/1.1 request, parse_request_head and
 * forward_response_head, as a CPython extension: module proxy.l7._headparser_capi (METH_FASTCALL, no
 * cffi). It calls the one C parser (headparser.c, forward.c) and builds the Python results here.
 * Through cffi the call alone cost several thousand instructions and building the result from the
 * offsets and the pack area several thousand more, against ~1,000 for the parse itself.
 *
 * Same API and results as proxy/l7/_headparser_py.py (see proxy/l7/headparser.py), held to it by the
 * tests. proxy/l7/_headparser_native.py binds these functions after configure(error_for_code,
 * full_path) has given the module the Python side's HeadParseError factory and FULL_PATH marker.
 *
 * Not reentrant across threads without the GIL: the field-line and field-block areas are static and
 * reused by every call (each call runs to its end holding the GIL, and calls no Python code while it
 * uses them). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "headparser.h"

#define HEADERS_FIXED 128
#define FIELDS_OUT_CAP 16384 /* a bigger field block takes the general path (as the cffi binding did) */

static tm_header headers_fixed[HEADERS_FIXED];
static tm_header *headers_grown; /* for max_headers above HEADERS_FIXED (parse_request_head only) */
static size_t headers_grown_cap;
static char fields_out[FIELDS_OUT_CAP];

static PyObject *error_for_code; /* callable(code number, buf, offset, max_headers) -> HeadParseError */
static PyObject *full_path;      /* the FULL_PATH marker */

static tm_header *headers_for(size_t max_headers) {
    if (max_headers <= HEADERS_FIXED)
        return headers_fixed;
    if (max_headers > headers_grown_cap) {
        tm_header *grown = PyMem_Realloc(headers_grown, max_headers * sizeof(tm_header));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        headers_grown = grown;
        headers_grown_cap = max_headers;
    }
    return headers_grown;
}

/* Optional arguments after `buf`, given by position or by name (names[i] for slot i). */
static int optional_arguments(const char *function, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                              const char *const *names, Py_ssize_t count, PyObject **slots) {
    if (nargs < 1 || nargs > 1 + count) {
        PyErr_Format(PyExc_TypeError, "%s() takes from 1 to %zd positional arguments (%zd given)", function,
                     1 + count, nargs);
        return -1;
    }
    for (Py_ssize_t i = 1; i < nargs; i++)
        slots[i - 1] = args[i];
    Py_ssize_t given = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < given; k++) {
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
        if (name == NULL)
            return -1;
        Py_ssize_t i = 0;
        while (i < count && strcmp(name, names[i]) != 0)
            i++;
        if (i == count) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%s'", function, name);
            return -1;
        }
        if (slots[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", function, name);
            return -1;
        }
        slots[i] = args[nargs + k];
    }
    return 0;
}

/* A non-negative integer argument (OverflowError for a negative one), `fallback` when not given. */
static int size_argument(PyObject *value, size_t fallback, size_t *out) {
    if (value == NULL) {
        *out = fallback;
        return 0;
    }
    *out = PyLong_AsSize_t(value);
    return (*out == (size_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *raise_parse_error(long code, PyObject *buf, size_t offset, size_t max_headers) {
    if (error_for_code == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxy.l7._headparser_capi: configure() was not called");
        return NULL;
    }
    PyObject *error = PyObject_CallFunction(error_for_code, "lOnn", code, buf, (Py_ssize_t)offset,
                                            (Py_ssize_t)max_headers);
    if (error == NULL)
        return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(error), error);
    Py_DECREF(error);
    return NULL;
}

static inline PyObject *slice(const char *buf, size_t start, size_t end) {
    return PyBytes_FromStringAndSize(buf + start, (Py_ssize_t)(end - start));
}

/* The field name lowercased (names are tchars: ASCII). */
static PyObject *lower_name(const char *buf, const tm_header *h) {
    size_t n = h->name_end - h->name_start;
    PyObject *name = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (name == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(name);
    const char *s = buf + h->name_start;
    for (size_t i = 0; i < n; i++)
        o[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] | 0x20) : s[i];
    return name;
}

/* [(lowercased name, value), ...] */
static PyObject *field_list(const char *buf, const tm_header *headers, size_t n) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL)
            goto fail;
        PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
        PyObject *name = lower_name(buf, &headers[i]);
        if (name == NULL)
            goto fail;
        PyTuple_SET_ITEM(pair, 0, name);
        PyObject *value = slice(buf, headers[i].value_start, headers[i].value_end);
        if (value == NULL)
            goto fail;
        PyTuple_SET_ITEM(pair, 1, value);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* A tuple built from `n` new references (any of them NULL: the others are released, NULL returned). */
static PyObject *tuple_of(Py_ssize_t n, PyObject **items) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) {
            for (Py_ssize_t k = 0; k < n; k++)
                Py_XDECREF(items[k]);
            return NULL;
        }
    }
    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL) {
        for (Py_ssize_t k = 0; k < n; k++)
            Py_DECREF(items[k]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(tuple, i, items[i]);
    return tuple;
}

static const char *const REQUEST_NAMES[] = {"start", "max_headers"};

/* parse_request_head(buf, start=0, max_headers=100)
 *     -> None (incomplete) | (end, method, target, minor_version, headers); HeadParseError */
static PyObject *parse_request_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)module;
    PyObject *given[2] = {NULL, NULL};
    size_t start, max_headers;
    if (optional_arguments("parse_request_head", args, nargs, kwnames, REQUEST_NAMES, 2, given) < 0 ||
        size_argument(given[0], 0, &start) < 0 || size_argument(given[1], 100, &max_headers) < 0)
        return NULL;
    PyObject *buf = args[0];
    tm_header *headers = headers_for(max_headers);
    if (headers == NULL)
        return NULL;
    tm_head head;
    Py_buffer view;
    const char *data;
    size_t len;
    int is_bytes = PyBytes_CheckExact(buf);
    if (is_bytes) {
        data = PyBytes_AS_STRING(buf);
        len = (size_t)PyBytes_GET_SIZE(buf);
    } else {
        if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        data = view.buf;
        len = (size_t)view.len;
    }
    long rc = tm_parse_request(data, len, start, &head, headers, max_headers, NULL, 0);
    PyObject *result;
    if (rc == TM_INCOMPLETE) {
        result = Py_NewRef(Py_None);
    } else if (rc < 0) {
        result = NULL; /* raised below, once the buffer is released */
    } else {
        PyObject *items[5] = {
            PyLong_FromSize_t(start + (size_t)rc),
            slice(data, head.method_start, head.method_end),
            slice(data, head.target_start, head.target_end),
            PyLong_FromSize_t(head.minor_version),
            field_list(data, headers, head.num_headers),
        };
        result = tuple_of(5, items);
    }
    if (!is_bytes)
        PyBuffer_Release(&view);
    if (rc < 0 && rc != TM_INCOMPLETE)
        return raise_parse_error(rc, buf, head.error_offset, max_headers);
    return result;
}

static const char *const FORWARD_NAMES[] = {"start", "max_headers", "take"};

/* forward_response_head(buf, start=0, max_headers=100, take=b"")
 *     -> None | FULL_PATH | (end, minor_version, status, reason, fields, content_length, keep_alive,
 *                            grpc_status, taken)
 * Like the cffi binding before it, only a bytes buffer and at most HEADERS_FIXED field lines take this
 * path; anything else is FULL_PATH (the general path parses it). */
static PyObject *forward_response_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames) {
    (void)module;
    PyObject *given[3] = {NULL, NULL, NULL};
    size_t start, max_headers;
    if (optional_arguments("forward_response_head", args, nargs, kwnames, FORWARD_NAMES, 3, given) < 0 ||
        size_argument(given[0], 0, &start) < 0 || size_argument(given[1], 100, &max_headers) < 0)
        return NULL;
    const char *take = "";
    if (given[2] != NULL) {
        if (!PyBytes_Check(given[2])) {
            PyErr_SetString(PyExc_TypeError, "forward_response_head(): take must be bytes");
            return NULL;
        }
        take = PyBytes_AS_STRING(given[2]); /* NUL-terminated */
    }
    if (full_path == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxy.l7._headparser_capi: configure() was not called");
        return NULL;
    }
    PyObject *buf = args[0];
    if (max_headers > HEADERS_FIXED || !PyBytes_CheckExact(buf))
        return Py_NewRef(full_path);
    const char *data = PyBytes_AS_STRING(buf);
    tm_head head;
    tm_forward_info info;
    long rc = tm_forward_response(data, (size_t)PyBytes_GET_SIZE(buf), start, &head, headers_fixed, max_headers,
                                  fields_out, FIELDS_OUT_CAP, take, &info);
    if (rc < 0)
        return Py_NewRef(rc == TM_INCOMPLETE ? Py_None : full_path);
    if (!info.plain)
        return Py_NewRef(full_path);
    PyObject *items[9] = {
        PyLong_FromSize_t(start + (size_t)rc),
        PyLong_FromSize_t(head.minor_version),
        PyLong_FromSize_t(head.status),
        slice(data, head.reason_start, head.reason_end),
        PyBytes_FromStringAndSize(fields_out, (Py_ssize_t)info.out_len),
        PyLong_FromSize_t(info.content_length),
        PyBool_FromLong(info.keep_alive == 1),
        info.grpc_status_end > info.grpc_status_start ? slice(data, info.grpc_status_start, info.grpc_status_end)
                                                      : Py_NewRef(Py_None),
        info.taken ? slice(data, info.take_start, info.take_end) : Py_NewRef(Py_None),
    };
    return tuple_of(9, items);
}

/* configure(error_for_code, full_path): error_for_code(code number, buf, offset, max_headers) returns
 * the HeadParseError to raise; full_path is the marker forward_response_head returns. */
static PyObject *configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyCallable_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "configure(error_for_code, full_path): a callable and a marker");
        return NULL;
    }
    Py_XSETREF(error_for_code, Py_NewRef(args[0]));
    Py_XSETREF(full_path, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse_request_head", (PyCFunction)(void (*)(void))parse_request_head, METH_FASTCALL | METH_KEYWORDS,
     "parse_request_head(buf, start=0, max_headers=100) -> None | (end, method, target, minor_version, headers)"},
    {"forward_response_head", (PyCFunction)(void (*)(void))forward_response_head, METH_FASTCALL | METH_KEYWORDS,
     "forward_response_head(buf, start=0, max_headers=100, take=b'') -> None | FULL_PATH | (end, minor_version, "
     "status, reason, fields, content_length, keep_alive, grpc_status, taken)"},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(error_for_code, full_path): the Python side's error factory and FULL_PATH marker"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "proxy.l7._headparser_capi",
    "parse_request_head and forward_response_head on the C head parser (native/headparser_capi.c)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__headparser_capi(void) {
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "INCOMPLETE", TM_INCOMPLETE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
