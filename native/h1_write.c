/* An HTTP/1.1 request head as the proxy sends it upstream, in one call: module proxy.l7._h1_write, a
 * CPython extension (METH_FASTCALL, no cffi).
 *
 * serialize_request_head(method, target, headers, framing, authority=None, extra_fields=b"") is
 * proxy/l7/h1.py's function of the same name, byte for byte (the tests hold the two to it): the
 * request line, `host: authority` first when given, each (name, value) of `headers` as
 * "name: value CRLF", `extra_fields` (field lines already serialised), then the framing line
 * (content-length or transfer-encoding: chunked) and the empty line. In Python the same head was a
 * list of four parts per field joined at the end, about a hundred bytecodes per request; here it is
 * one pass to size the head and one to copy it into the bytes object returned.
 *
 * Only the common shapes are written here: bytes for method, target, authority and extra_fields,
 * a list of 2-tuples of bytes for headers, an int length that fits a long long. Anything else (a
 * bytearray value a stage put there, say) goes to the Python function given by configure(), so the
 * two never disagree on what they accept. Field names and values are not checked here: they were
 * checked when they entered the proxy (parser, HTTP/2 codec) or come from validated config.
 *
 * Memory safety outside the suite: build this file alone with
 * `gcc -fsanitize=address,undefined -g -O1 -shared -fPIC -I<Python include dir>`, load it as
 * proxy.l7._h1_write (importlib, before proxy.l7.h1 is imported) in a python run with libasan and
 * libubsan in LD_PRELOAD, and run tests/l7/test_h1_write.py and tests/l7/test_h1.py in it. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* h1.py's framing kinds (checked against these at import) */
#define KIND_LENGTH 1
#define KIND_CHUNKED 2

static PyObject *python_version; /* h1._serialize_request_head_py: the general case */
static PyObject *kind_name, *length_name;

static const char CONTENT_LENGTH[] = "content-length: ";
static const char CHUNKED_END[] = "transfer-encoding: chunked\r\n\r\n";
static const char HOST[] = "host: ";
static const char VERSION_LINE_END[] = " HTTP/1.1\r\n";

#define LITERAL_LEN(s) (sizeof(s) - 1)

static char *put(char *out, const char *data, Py_ssize_t n) {
    memcpy(out, data, (size_t)n);
    return out + n;
}

static char *put_bytes(char *out, PyObject *b) { return put(out, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b)); }

/* The decimal digits of n (with its sign) into digits; returns how many. */
static int decimal(long long n, char digits[24]) {
    char reversed[24];
    int count = 0;
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        reversed[count++] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    int len = 0;
    if (n < 0)
        digits[len++] = '-';
    while (count > 0)
        digits[len++] = reversed[--count];
    return len;
}

static PyObject *general_case(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (python_version == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxy.l7._h1_write: configure() was not called");
        return NULL;
    }
    return PyObject_Vectorcall(python_version, args, (size_t)nargs, kwnames);
}

static PyObject *serialize_request_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)module;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 4 || nargs + nkw > 6)
        return general_case(args, nargs, kwnames); /* it raises the TypeError */
    PyObject *authority = nargs > 4 ? args[4] : Py_None;
    PyObject *extra = nargs > 5 ? args[5] : NULL;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "authority") == 0 && nargs <= 4)
            authority = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(name, "extra_fields") == 0 && nargs <= 5)
            extra = args[nargs + i];
        else
            return general_case(args, nargs, kwnames);
    }
    PyObject *method = args[0], *target = args[1], *headers = args[2], *framing = args[3];
    if (!PyBytes_CheckExact(method) || !PyBytes_CheckExact(target) || !PyList_CheckExact(headers) ||
        (authority != Py_None && !PyBytes_CheckExact(authority)) || (extra != NULL && !PyBytes_CheckExact(extra)))
        return general_case(args, nargs, kwnames);

    PyObject *kind_object = PyObject_GetAttr(framing, kind_name);
    if (kind_object == NULL)
        return NULL;
    if (!PyLong_CheckExact(kind_object)) {
        Py_DECREF(kind_object);
        return general_case(args, nargs, kwnames);
    }
    long kind = PyLong_AsLong(kind_object);
    Py_DECREF(kind_object);
    if (kind == -1 && PyErr_Occurred())
        PyErr_Clear(); /* an int beyond long: neither LENGTH nor CHUNKED, as in Python */
    char digits[24];
    int digits_len = 0;
    if (kind == KIND_LENGTH) {
        PyObject *length_object = PyObject_GetAttr(framing, length_name);
        if (length_object == NULL)
            return NULL;
        int overflow = 0;
        long long length = PyLong_Check(length_object) ? PyLong_AsLongLongAndOverflow(length_object, &overflow) : -1;
        int usable = PyLong_Check(length_object) && !overflow && !(length == -1 && PyErr_Occurred());
        Py_DECREF(length_object);
        if (!usable) {
            PyErr_Clear();
            return general_case(args, nargs, kwnames);
        }
        digits_len = decimal(length, digits);
    }

    /* one pass to size the head (and check each field's shape), one to write it */
    Py_ssize_t n = PyList_GET_SIZE(headers);
    Py_ssize_t size = PyBytes_GET_SIZE(method) + 1 + PyBytes_GET_SIZE(target) + (Py_ssize_t)LITERAL_LEN(VERSION_LINE_END);
    if (authority != Py_None)
        size += (Py_ssize_t)LITERAL_LEN(HOST) + PyBytes_GET_SIZE(authority) + 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyList_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(field, 0)) ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(field, 1)))
            return general_case(args, nargs, kwnames);
        size += PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 0)) + PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 1)) + 4;
    }
    if (extra != NULL)
        size += PyBytes_GET_SIZE(extra);
    if (kind == KIND_LENGTH)
        size += (Py_ssize_t)LITERAL_LEN(CONTENT_LENGTH) + digits_len + 4;
    else if (kind == KIND_CHUNKED)
        size += (Py_ssize_t)LITERAL_LEN(CHUNKED_END);
    else
        size += 2;

    PyObject *result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(result);
    out = put_bytes(out, method);
    *out++ = ' ';
    out = put_bytes(out, target);
    out = put(out, VERSION_LINE_END, (Py_ssize_t)LITERAL_LEN(VERSION_LINE_END));
    if (authority != Py_None) {
        out = put(out, HOST, (Py_ssize_t)LITERAL_LEN(HOST));
        out = put_bytes(out, authority);
        out = put(out, "\r\n", 2);
    }
    /* the list cannot change meanwhile: nothing here runs Python code */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyList_GET_ITEM(headers, i);
        out = put_bytes(out, PyTuple_GET_ITEM(field, 0));
        out = put(out, ": ", 2);
        out = put_bytes(out, PyTuple_GET_ITEM(field, 1));
        out = put(out, "\r\n", 2);
    }
    if (extra != NULL)
        out = put_bytes(out, extra);
    if (kind == KIND_LENGTH) {
        out = put(out, CONTENT_LENGTH, (Py_ssize_t)LITERAL_LEN(CONTENT_LENGTH));
        out = put(out, digits, digits_len);
        out = put(out, "\r\n\r\n", 4);
    } else if (kind == KIND_CHUNKED) {
        out = put(out, CHUNKED_END, (Py_ssize_t)LITERAL_LEN(CHUNKED_END));
    } else {
        out = put(out, "\r\n", 2);
    }
    if (out != PyBytes_AS_STRING(result) + size) { /* the sizing pass and the writing pass disagree: a bug */
        Py_DECREF(result);
        PyErr_SetString(PyExc_SystemError, "serialize_request_head: head size miscounted");
        return NULL;
    }
    return result;
}

/* configure(python_version): the pure function every uncommon shape of arguments is handed to */
static PyObject *configure(PyObject *module, PyObject *python) {
    (void)module;
    if (!PyCallable_Check(python)) {
        PyErr_SetString(PyExc_TypeError, "configure(python_version): a callable");
        return NULL;
    }
    Py_XSETREF(python_version, Py_NewRef(python));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"serialize_request_head", (PyCFunction)(void (*)(void))serialize_request_head, METH_FASTCALL | METH_KEYWORDS,
     "serialize_request_head(method, target, headers, framing, authority=None, extra_fields=b'') -> bytes"},
    {"configure", (PyCFunction)configure, METH_O, "configure(python_version): the function for the general case"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "proxy.l7._h1_write",
    "HTTP/1.1 request heads as the proxy sends them upstream (native/h1_write.c)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__h1_write(void) {
    kind_name = PyUnicode_InternFromString("kind");
    length_name = PyUnicode_InternFromString("length");
    if (kind_name == NULL || length_name == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "LENGTH", KIND_LENGTH) < 0 ||
        PyModule_AddIntConstant(module, "CHUNKED", KIND_CHUNKED) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
