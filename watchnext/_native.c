/* watchnext._native: gathers feature values from a list of dicts into columns, for the encoder.
 *
 * A rank request arrives as JSON objects; building Arrow arrays from them and encoding those took
 * most of a request's time in Python. `gather` walks the objects once, in C, and writes raw values
 * into arrays the caller allocated:
 *
 *   categorical       FNV-1a 64 of the id's UTF-8 bytes          uint64 (n,)
 *   categorical_list  FNV-1a 64 of the first `width` ids         uint64 (n, width), kept count int64 (n,)
 *   numeric           the number as a double                     float64 (n,)
 *   vector            the `width` numbers as doubles             float64 (n, width)
 *
 * and, for every feature, whether the row holds it (uint8, 0 for absent or null). Bucketing,
 * transforms, defaults and the checks stay in watchnext/encoding.py, shared with the Arrow path.
 *
 * It only gathers plain values: a str id, an int or float number (not a bool), lists of those.
 * Anything else (a wrong type, a vector of the wrong length, a null inside a list, an integer that
 * a double cannot hold exactly) makes it stop and report the row; the caller then takes the Arrow
 * path, which accepts or names the field at fault exactly as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { CATEGORICAL = 0, LIST = 1, NUMERIC = 2, VECTOR = 3 };
/* why gathering stopped (returned to the caller, who falls back) */
enum { OK = 0, NOT_OBJECT = 1, NOT_STRING = 2, NOT_NUMBER = 3, NOT_LIST = 4, WRONG_LENGTH = 5 };

static const uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL;
static const uint64_t FNV_PRIME = 0x100000001b3ULL;
static const long long EXACT = 1LL << 53; /* integers a double holds exactly */

typedef struct {
    PyObject *key;
    int kind;
    Py_ssize_t width;
    Py_buffer present, values, count;
    int has_count;
} Field;

static int hash_str(PyObject *s, uint64_t *out) {
    if (!PyUnicode_CheckExact(s)) return NOT_STRING;
    Py_ssize_t len;
    const char *p = PyUnicode_AsUTF8AndSize(s, &len);
    if (p == NULL) { /* a lone surrogate: not UTF-8 */
        PyErr_Clear();
        return NOT_STRING;
    }
    uint64_t h = FNV_OFFSET;
    for (Py_ssize_t i = 0; i < len; i++) {
        h ^= (unsigned char)p[i];
        h *= FNV_PRIME;
    }
    *out = h;
    return OK;
}

static int number(PyObject *v, double *out) {
    if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return OK;
    }
    if (PyLong_CheckExact(v)) { /* bool is a subclass, so it is refused here */
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || x > EXACT || x < -EXACT) return NOT_NUMBER;
        *out = (double)x;
        return OK;
    }
    return NOT_NUMBER;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (view->len != bytes) {
        PyErr_Format(PyExc_ValueError, "gather: %s buffer holds %zd bytes, expected %zd", what, view->len, bytes);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static void release(Field *fields, Py_ssize_t nf) {
    for (Py_ssize_t j = 0; j < nf; j++) {
        if (fields[j].present.obj) PyBuffer_Release(&fields[j].present);
        if (fields[j].values.obj) PyBuffer_Release(&fields[j].values);
        if (fields[j].count.obj) PyBuffer_Release(&fields[j].count);
    }
    PyMem_Free(fields);
}

/* one value of one row; `i` is the row */
static int put(Field *f, Py_ssize_t i, PyObject *v) {
    uint8_t *present = (uint8_t *)f->present.buf;
    int rc;
    switch (f->kind) {
    case CATEGORICAL:
        if ((rc = hash_str(v, (uint64_t *)f->values.buf + i)) != OK) return rc;
        break;
    case NUMERIC:
        if ((rc = number(v, (double *)f->values.buf + i)) != OK) return rc;
        break;
    case LIST: {
        if (!PyList_CheckExact(v)) return NOT_LIST;
        Py_ssize_t len = PyList_GET_SIZE(v), keep = len < f->width ? len : f->width;
        uint64_t *row = (uint64_t *)f->values.buf + i * f->width;
        for (Py_ssize_t k = 0; k < keep; k++)
            if ((rc = hash_str(PyList_GET_ITEM(v, k), row + k)) != OK) return rc;
        for (Py_ssize_t k = keep; k < len; k++) /* past max_len: dropped, but still an id */
            if (!PyUnicode_CheckExact(PyList_GET_ITEM(v, k))) return NOT_STRING;
        ((int64_t *)f->count.buf)[i] = keep;
        break;
    }
    case VECTOR: {
        if (!PyList_CheckExact(v)) return NOT_LIST;
        if (PyList_GET_SIZE(v) != f->width) return WRONG_LENGTH;
        double *row = (double *)f->values.buf + i * f->width;
        for (Py_ssize_t k = 0; k < f->width; k++)
            if ((rc = number(PyList_GET_ITEM(v, k), row + k)) != OK) return rc;
        break;
    }
    }
    present[i] = 1;
    return OK;
}

PyDoc_STRVAR(gather_doc,
"gather(rows, fields) -> (status, row, unknown)\n\n"
"rows: a list of dicts. fields: a tuple of (key, kind, width, present, values, count) with kind\n"
"0 categorical, 1 categorical_list, 2 numeric, 3 vector; present a uint8 (n,) array, values uint64\n"
"or float64 (n,) or (n, width), count an int64 (n,) array for lists, else None. The arrays are\n"
"written where a row holds the feature and left as they are elsewhere. status 0: every row was\n"
"gathered, and unknown is how many keys the rows hold that name no field; otherwise the reason\n"
"gathering stopped at `row`, and the arrays are partly written.");

static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *rows, *spec;
    if (!PyArg_ParseTuple(args, "O!O!:gather", &PyList_Type, &rows, &PyTuple_Type, &spec)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows), nf = PyTuple_GET_SIZE(spec);
    Field *fields = PyMem_Calloc(nf ? nf : 1, sizeof(Field));
    if (fields == NULL) return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < nf; j++) {
        Field *f = &fields[j];
        PyObject *present, *values, *count;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, j), "UinOOO:gather field", &f->key, &f->kind, &f->width,
                              &present, &values, &count))
            goto fail;
        if (f->kind < CATEGORICAL || f->kind > VECTOR || f->width < 1) {
            PyErr_Format(PyExc_ValueError, "gather: field %R has kind %d and width %zd", f->key, f->kind, f->width);
            goto fail;
        }
        Py_ssize_t cells = (f->kind == LIST || f->kind == VECTOR) ? n * f->width : n;
        if (get_buffer(present, &f->present, n, "present") < 0 || get_buffer(values, &f->values, cells * 8, "values") < 0)
            goto fail;
        f->has_count = f->kind == LIST;
        if (f->has_count && get_buffer(count, &f->count, n * 8, "count") < 0) goto fail;
    }
    Py_ssize_t unknown = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyList_GET_ITEM(rows, i);
        if (!PyDict_CheckExact(d)) {
            release(fields, nf);
            return Py_BuildValue("inn", NOT_OBJECT, i, (Py_ssize_t)0);
        }
        Py_ssize_t found = 0;
        for (Py_ssize_t j = 0; j < nf; j++) {
            PyObject *v = PyDict_GetItemWithError(d, fields[j].key); /* borrowed */
            if (v == NULL) {
                if (PyErr_Occurred()) goto fail;
                continue;
            }
            found++;
            if (v == Py_None) continue;
            int rc = put(&fields[j], i, v);
            if (rc != OK) {
                release(fields, nf);
                return Py_BuildValue("inn", rc, i, (Py_ssize_t)0);
            }
        }
        unknown += PyDict_GET_SIZE(d) - found;
    }
    release(fields, nf);
    return Py_BuildValue("inn", OK, (Py_ssize_t)-1, unknown);
fail:
    release(fields, nf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS, gather_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "watchnext._native",
    "Gathers feature values from dicts into columns for watchnext.encoding (see gather).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
