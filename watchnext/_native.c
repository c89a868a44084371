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
 * and, for every feature, whether the row holds it (uint8, 0 for absent or null). `scan` reads the
 * same columns straight from a request body's bytes, in steps if asked (see below), and `encode`
 * turns the columns into the model's inputs: bucketing, padding, defaults and the checks of
 * Encoder.encode_gathered, which stays the reference (tests hold the two to the same bits) and
 * which the caller falls back on whenever `encode` finds a value that fails a check.
 *
 * It only gathers plain values: a str id, an int or float number (not a bool), lists of those.
 * Anything else (a wrong type, a vector of the wrong length, a null inside a list, an integer that
 * a double cannot hold exactly) makes it stop and report the row; the caller then takes the Arrow
 * path, which accepts or names the field at fault exactly as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <ctype.h>
#include <math.h>
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
    const char *name; /* the key's UTF-8 bytes (scan) */
    Py_ssize_t name_len;
} Field;

static inline uint64_t fnv(const unsigned char *s, Py_ssize_t len) {
    uint64_t h = FNV_OFFSET;
    for (Py_ssize_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= FNV_PRIME;
    }
    return h;
}

static int hash_str(PyObject *s, uint64_t *out) {
    if (!PyUnicode_CheckExact(s)) return NOT_STRING;
    Py_ssize_t len;
    const char *p = PyUnicode_AsUTF8AndSize(s, &len);
    if (p == NULL) { /* a lone surrogate: not UTF-8 */
        PyErr_Clear();
        return NOT_STRING;
    }
    *out = fnv((const unsigned char *)p, len);
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

/* a writable C-contiguous buffer of exactly `bytes` bytes, aligned to `align` */
static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, const char *what, size_t align) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (view->len != bytes || (uintptr_t)view->buf % align) {
        PyErr_Format(PyExc_ValueError, "%s buffer holds %zd bytes at %s, expected %zd", what, view->len,
                     (uintptr_t)view->buf % align ? "an unaligned address" : "an aligned address", bytes);
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

/* the fields of `spec` for n rows, their buffers held (release() them); NULL with an exception set */
static Field *load_fields(PyObject *spec, Py_ssize_t n) {
    Py_ssize_t nf = PyTuple_GET_SIZE(spec);
    Field *fields = PyMem_Calloc(nf ? nf : 1, sizeof(Field));
    if (fields == NULL) return (Field *)PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < nf; j++) {
        Field *f = &fields[j];
        PyObject *present, *values, *count;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, j), "UinOOO:field", &f->key, &f->kind, &f->width, &present,
                              &values, &count))
            goto fail;
        /* an exact str key: a subclass's __eq__ could run Python code in the middle of a dict lookup */
        if (!PyUnicode_CheckExact(f->key) || f->kind < CATEGORICAL || f->kind > VECTOR || f->width < 1 ||
            f->width > PY_SSIZE_T_MAX / 8 / (n ? n : 1)) {
            PyErr_Format(PyExc_ValueError, "field %R has kind %d and width %zd", f->key, f->kind, f->width);
            goto fail;
        }
        Py_ssize_t cells = (f->kind == LIST || f->kind == VECTOR) ? n * f->width : n;
        if (get_buffer(present, &f->present, n, "present", 1) < 0 ||
            get_buffer(values, &f->values, cells * 8, "values", 8) < 0)
            goto fail;
        if (f->kind == LIST && get_buffer(count, &f->count, n * 8, "count", 8) < 0) goto fail;
        f->name = PyUnicode_AsUTF8AndSize(f->key, &f->name_len);
        if (f->name == NULL) goto fail;
    }
    return fields;
fail:
    release(fields, nf);
    return NULL;
}

static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *rows, *spec;
    if (!PyArg_ParseTuple(args, "O!O!:gather", &PyList_Type, &rows, &PyTuple_Type, &spec)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows), nf = PyTuple_GET_SIZE(spec);
    Field *fields = load_fields(spec, n);
    if (fields == NULL) return NULL;
    Py_ssize_t unknown = 0;
    int rc = OK;
    Py_ssize_t i = 0;
    /* a lookup can run Python code (a key's __eq__ in a row) that changes the list or the row: each row is
       held while it is read, and the list's size is checked again before each row */
    for (; i < n && rc == OK; i++) {
        if (i >= PyList_GET_SIZE(rows) || !PyDict_CheckExact(PyList_GET_ITEM(rows, i))) {
            rc = NOT_OBJECT;
            break;
        }
        PyObject *d = PyList_GET_ITEM(rows, i);
        Py_INCREF(d);
        Py_ssize_t found = 0;
        for (Py_ssize_t j = 0; j < nf && rc == OK; j++) {
            PyObject *v = PyDict_GetItemWithError(d, fields[j].key); /* borrowed */
            if (v == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(d);
                    release(fields, nf);
                    return NULL;
                }
                continue;
            }
            found++;
            if (v != Py_None) {
                Py_INCREF(v);
                rc = put(&fields[j], i, v);
                Py_DECREF(v);
            }
        }
        if (rc == OK) unknown += PyDict_GET_SIZE(d) - found;
        Py_DECREF(d);
    }
    release(fields, nf);
    if (rc != OK) return Py_BuildValue("inn", rc, rc == NOT_OBJECT ? i : i - 1, (Py_ssize_t)0);
    return Py_BuildValue("inn", OK, (Py_ssize_t)-1, unknown);
}

/* ------------------------------------------------------------------ scan: JSON bytes -> columns
 *
 * `scan` reads a rank request's "candidates" array straight from the body's bytes, into the same
 * columns as `gather`, without making a Python object per value. It takes what the orjson path
 * would give `gather` and nothing else: anything it is not sure of (an escape in an id or a key,
 * an integer beyond 2**53, a number orjson refuses, a duplicate key, a null inside a list, invalid
 * JSON or UTF-8) makes it stop, and the caller parses the body with orjson as before.
 */

enum { BAIL = 100, PAUSED = 2 };
#define MAX_DEPTH 64

/* 128-bit mantissas of 10**q, rounded down, q in [MIN_EXP10, MAX_EXP10] (set_powers, from Python) */
#define MIN_EXP10 (-348)
#define MAX_EXP10 347
static uint64_t POW_HI[MAX_EXP10 - MIN_EXP10 + 1], POW_LO[MAX_EXP10 - MIN_EXP10 + 1];
static int have_powers = 0;
static const double EXACT_POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                       1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

PyDoc_STRVAR(set_powers_doc, "set_powers(hi, lo): the 128-bit mantissas of 10**-348 .. 10**347 (uint64 buffers).");

static PyObject *set_powers(PyObject *self, PyObject *args) {
    Py_buffer hi, lo;
    if (!PyArg_ParseTuple(args, "y*y*:set_powers", &hi, &lo)) return NULL;
    if (hi.len != (Py_ssize_t)sizeof(POW_HI) || lo.len != (Py_ssize_t)sizeof(POW_LO)) {
        PyBuffer_Release(&hi);
        PyBuffer_Release(&lo);
        PyErr_SetString(PyExc_ValueError, "set_powers: expected 696 uint64 values in each buffer");
        return NULL;
    }
    memcpy(POW_HI, hi.buf, sizeof(POW_HI));
    memcpy(POW_LO, lo.buf, sizeof(POW_LO));
    PyBuffer_Release(&hi);
    PyBuffer_Release(&lo);
    have_powers = 1;
    Py_RETURN_NONE;
}

/* Eisel-Lemire: man * 10**exp10 correctly rounded, or 0 when it cannot tell (the caller falls back) */
static int eisel_lemire(uint64_t man, int exp10, int neg, double *out) {
    if (exp10 < MIN_EXP10 || exp10 > MAX_EXP10 || man == 0) return 0;
    int clz = __builtin_clzll(man);
    man <<= clz;
    uint64_t ret_exp2 = (uint64_t)(((217706 * exp10) >> 16) + 64 + 1023) - (uint64_t)clz;
    unsigned __int128 x = (unsigned __int128)man * POW_HI[exp10 - MIN_EXP10];
    uint64_t x_hi = (uint64_t)(x >> 64), x_lo = (uint64_t)x;
    if ((x_hi & 0x1FF) == 0x1FF && x_lo + man < man) { /* a wider approximation */
        unsigned __int128 y = (unsigned __int128)man * POW_LO[exp10 - MIN_EXP10];
        uint64_t y_hi = (uint64_t)(y >> 64), y_lo = (uint64_t)y;
        uint64_t merged_hi = x_hi, merged_lo = x_lo + y_hi;
        if (merged_lo < x_lo) merged_hi++;
        if ((merged_hi & 0x1FF) == 0x1FF && merged_lo + 1 == 0 && y_lo + man < man) return 0;
        x_hi = merged_hi;
        x_lo = merged_lo;
    }
    uint64_t msb = x_hi >> 63;
    uint64_t mant = x_hi >> (msb + 9);
    ret_exp2 -= 1 ^ msb;
    if (x_lo == 0 && (x_hi & 0x1FF) == 0 && (mant & 3) == 1) return 0; /* half-way */
    mant += mant & 1;
    mant >>= 1;
    if (mant >> 53) {
        mant >>= 1;
        ret_exp2 += 1;
    }
    if (ret_exp2 - 1 >= 0x7FF - 1) return 0; /* subnormal, zero, or infinite */
    uint64_t bits = ret_exp2 << 52 | (mant & 0x000FFFFFFFFFFFFFULL);
    if (neg) bits |= 0x8000000000000000ULL;
    memcpy(out, &bits, 8);
    return 1;
}

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static inline void ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

static inline int isdig(unsigned char ch) { return ch >= '0' && ch <= '9'; }

/* a JSON number: the double orjson would give (an integer within 2**53 as an exact double; "-0" as 0) */
static int scan_number(Cursor *c, double *out) {
    const unsigned char *start = c->p, *p = c->p, *end = c->end;
    int neg = 0, digits = 0, trunc = 0, is_int = 1;
    long exp10 = 0;
    uint64_t man = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end) return BAIL;
    if (*p == '0') {
        p++;
        if (p < end && isdig(*p)) return BAIL; /* a leading zero */
    } else if (isdig(*p)) {
        while (p < end && isdig(*p)) {
            if (digits < 19) {
                man = man * 10 + (*p - '0');
                digits++;
            } else {
                exp10++;
                trunc = 1;
            }
            p++;
        }
    } else {
        return BAIL;
    }
    if (p < end && *p == '.') {
        is_int = 0;
        p++;
        if (p >= end || !isdig(*p)) return BAIL;
        while (p < end && isdig(*p)) {
            if (digits < 19) {
                man = man * 10 + (*p - '0');
                if (man) digits++;
                exp10--;
            } else {
                trunc = 1;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        is_int = 0;
        p++;
        int eneg = 0;
        if (p < end && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= end || !isdig(*p)) return BAIL;
        long e = 0;
        while (p < end && isdig(*p)) {
            if (e < 100000) e = e * 10 + (*p - '0');
            p++;
        }
        if (e > 400) return BAIL; /* orjson's own limits there are not ours to guess */
        exp10 += eneg ? -e : e;
    }
    if (p - start > 64) return BAIL; /* likewise for very long numbers (orjson read 0.000...0e400 as infinite) */
    c->p = p;
    if (is_int) { /* orjson gives an int: the gather takes it only where a double holds it exactly */
        if (trunc || man > (uint64_t)EXACT) return BAIL;
        *out = neg ? -(double)man : (double)man;
        if (man == 0) *out = 0.0;
        return OK;
    }
    if (!trunc) {
        if (man == 0) {
            *out = neg ? -0.0 : 0.0;
            return OK;
        }
        if (man <= (uint64_t)EXACT && exp10 >= -22 && exp10 <= 22) { /* exact operands, one rounding */
            double d = (double)man;
            d = exp10 < 0 ? d / EXACT_POW10[-exp10] : d * EXACT_POW10[exp10];
            *out = neg ? -d : d;
            return OK;
        }
        if (have_powers && eisel_lemire(man, (int)exp10, neg, out)) return OK;
    }
    /* the rest: Python's own correctly rounded conversion (with the GIL: the scan may run without it) */
    char buf[128];
    Py_ssize_t len = p - start;
    if (len >= (Py_ssize_t)sizeof(buf)) return BAIL;
    memcpy(buf, start, len);
    buf[len] = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    double d = PyOS_string_to_double(buf, NULL, NULL);
    int failed = d == -1.0 && PyErr_Occurred();
    if (failed) PyErr_Clear();
    PyGILState_Release(gil);
    if (failed) return BAIL;
    if (!isfinite(d)) return BAIL; /* orjson refuses a number that overflows a double */
    *out = d;
    return OK;
}

/* the value of the escape at p (a backslash, 'u', four hex digits), or -1 */
static int hex4(const unsigned char *p, const unsigned char *end) {
    if (end - p < 6) return -1;
    int u = 0;
    for (int k = 2; k < 6; k++) {
        unsigned char h = p[k];
        int d = isdig(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
        if (d < 0) return -1;
        u = u * 16 + d;
    }
    return u;
}

/* a JSON string at c->p ('"'): its bytes (without quotes) and whether it holds an escape; checks UTF-8 */
static int scan_string(Cursor *c, const unsigned char **s, Py_ssize_t *len, int *escaped) {
    const unsigned char *p = c->p + 1, *end = c->end;
    *escaped = 0;
    *s = p;
    while (p < end) {
        unsigned char ch = *p;
        if (ch == '"') {
            *len = p - *s;
            c->p = p + 1;
            return OK;
        }
        if (ch == '\\') {
            *escaped = 1;
            if (p + 1 >= end) return BAIL;
            unsigned char e = p[1];
            if (e == 'u') { /* a surrogate must come as a high-low pair, as orjson wants */
                int u = hex4(p, end);
                if (u < 0 || (u >= 0xDC00 && u <= 0xDFFF)) return BAIL;
                p += 6;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    int low = (p + 1 < end && p[0] == '\\' && p[1] == 'u') ? hex4(p, end) : -1;
                    if (low < 0xDC00 || low > 0xDFFF) return BAIL;
                    p += 6;
                }
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
                p += 2;
            } else {
                return BAIL;
            }
            continue;
        }
        if (ch < 0x20) return BAIL;
        if (ch < 0x80) {
            p++;
            continue;
        }
        /* UTF-8: the well-formed sequences only (no surrogates, no overlongs) */
        int need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (ch >= 0xC2 && ch <= 0xDF) need = 1;
        else if (ch == 0xE0) { need = 2; lo = 0xA0; }
        else if (ch >= 0xE1 && ch <= 0xEC) need = 2;
        else if (ch == 0xED) { need = 2; hi = 0x9F; }
        else if (ch >= 0xEE && ch <= 0xEF) need = 2;
        else if (ch == 0xF0) { need = 3; lo = 0x90; }
        else if (ch >= 0xF1 && ch <= 0xF3) need = 3;
        else if (ch == 0xF4) { need = 3; hi = 0x8F; }
        else return BAIL;
        if (end - p <= need) return BAIL;
        if (p[1] < lo || p[1] > hi) return BAIL;
        for (int k = 2; k <= need; k++)
            if (p[k] < 0x80 || p[k] > 0xBF) return BAIL;
        p += need + 1;
    }
    return BAIL;
}

static int literal(Cursor *c, const char *word, Py_ssize_t len) {
    if (c->end - c->p < len || memcmp(c->p, word, len) != 0) return BAIL;
    c->p += len;
    return OK;
}

enum { NEXT = 200, CLOSED = 201 }; /* after_item */

/* at an opening bracket: steps over it; whether `close` follows at once (then steps over that too) */
static int opens_empty(Cursor *c, unsigned char close) {
    c->p++;
    ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    return 0;
}

/* after a container's item: a comma (NEXT, at the next item) or `close` (CLOSED, stepped over); else BAIL */
static int after_item(Cursor *c, unsigned char close) {
    ws(c);
    if (c->p >= c->end) return BAIL;
    if (*c->p == close) {
        c->p++;
        return CLOSED;
    }
    if (*c->p++ != ',') return BAIL;
    ws(c);
    return NEXT;
}

/* an object's key and its colon; with `plain`, a key holding an escape makes it BAIL */
static int scan_key(Cursor *c, const unsigned char **key, Py_ssize_t *len, int plain) {
    int esc;
    if (c->p >= c->end || *c->p != '"' || scan_string(c, key, len, &esc) != OK || (plain && esc)) return BAIL;
    ws(c);
    if (c->p >= c->end || *c->p++ != ':') return BAIL;
    ws(c);
    return OK;
}

/* any JSON value, checked and passed over */
static int skip_value(Cursor *c, int depth) {
    if (depth > MAX_DEPTH || c->p >= c->end) return BAIL;
    const unsigned char *s;
    Py_ssize_t len;
    int esc, r;
    double d;
    switch (*c->p) {
    case '"':
        return scan_string(c, &s, &len, &esc);
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    case '[':
        if (opens_empty(c, ']')) return OK;
        for (;;) {
            if (skip_value(c, depth + 1) != OK) return BAIL;
            if ((r = after_item(c, ']')) != NEXT) return r == CLOSED ? OK : BAIL;
        }
    case '{':
        if (opens_empty(c, '}')) return OK;
        for (;;) {
            if (scan_key(c, &s, &len, 0) != OK || skip_value(c, depth + 1) != OK) return BAIL;
            if ((r = after_item(c, '}')) != NEXT) return r == CLOSED ? OK : BAIL;
        }
    default:
        return scan_number(c, &d);
    }
}

/* a hashed id: a string without escapes */
static int scan_id(Cursor *c, uint64_t *out) {
    const unsigned char *s;
    Py_ssize_t len;
    int esc;
    if (c->p >= c->end || *c->p != '"' || scan_string(c, &s, &len, &esc) != OK || esc) return BAIL;
    *out = fnv(s, len);
    return OK;
}

/* one known feature's value (not null) for row i */
static int scan_value(Cursor *c, Field *f, Py_ssize_t i) {
    switch (f->kind) {
    case CATEGORICAL:
        return scan_id(c, (uint64_t *)f->values.buf + i);
    case NUMERIC:
        if (c->p >= c->end || !(*c->p == '-' || isdig(*c->p))) return BAIL;
        return scan_number(c, (double *)f->values.buf + i);
    case LIST:
    case VECTOR: {
        if (c->p >= c->end || *c->p != '[') return BAIL;
        Py_ssize_t k = 0;
        if (!opens_empty(c, ']')) {
            for (;;) {
                if (f->kind == LIST) {
                    if (k < f->width) {
                        if (scan_id(c, (uint64_t *)f->values.buf + i * f->width + k) != OK) return BAIL;
                    } else {  /* past max_len: dropped, but it must still be a string */
                        const unsigned char *s;
                        Py_ssize_t len;
                        int esc;
                        if (c->p >= c->end || *c->p != '"' || scan_string(c, &s, &len, &esc) != OK) return BAIL;
                    }
                } else {
                    if (k >= f->width) return BAIL;
                    if (c->p >= c->end || !(*c->p == '-' || isdig(*c->p))) return BAIL;
                    if (scan_number(c, (double *)f->values.buf + i * f->width + k) != OK) return BAIL;
                }
                k++;
                int r = after_item(c, ']');
                if (r == CLOSED) break;
                if (r != NEXT) return BAIL;
            }
        }
        if (f->kind == VECTOR && k != f->width) return BAIL;
        if (f->kind == LIST) ((int64_t *)f->count.buf)[i] = k < f->width ? k : f->width;
        return OK;
    }
    }
    return BAIL;
}

/* one candidate object, row i */
#define MAX_UNKNOWN_KEYS 16 /* per object; more make it BAIL */

static int scan_object(Cursor *c, Field *fields, Py_ssize_t nf, Py_ssize_t i, Py_ssize_t *unknown) {
    uint64_t seen = 0, unknown_keys[MAX_UNKNOWN_KEYS];
    int n_unknown = 0;
    if (c->p >= c->end || *c->p != '{') return BAIL;
    if (opens_empty(c, '}')) return OK;
    for (;;) {
        const unsigned char *key;
        Py_ssize_t klen;
        if (scan_key(c, &key, &klen, 1) != OK) return BAIL;
        Py_ssize_t j = 0;
        while (j < nf && !(fields[j].name_len == klen && memcmp(fields[j].name, key, klen) == 0)) j++;
        if (j < nf) {
            if (seen >> j & 1) return BAIL; /* a repeated key: orjson keeps the last; leave it to orjson */
            seen |= 1ULL << j;
            if (c->p < c->end && *c->p == 'n') {
                if (literal(c, "null", 4) != OK) return BAIL;
            } else {
                if (scan_value(c, &fields[j], i) != OK) return BAIL;
                ((uint8_t *)fields[j].present.buf)[i] = 1;
            }
        } else { /* counted once per key, as in orjson's dict: a repeated unknown key makes it BAIL */
            uint64_t h = fnv(key, klen);
            for (int u = 0; u < n_unknown; u++)
                if (unknown_keys[u] == h) return BAIL;
            if (n_unknown == MAX_UNKNOWN_KEYS) return BAIL;
            unknown_keys[n_unknown++] = h;
            if (skip_value(c, 1) != OK) return BAIL;
            (*unknown)++;
        }
        int r = after_item(c, '}');
        if (r != NEXT) return r == CLOSED ? OK : BAIL;
    }
}

/* the array's objects from c->p (an object's start), rows *n on; OK when the array closed, PAUSED when
   `stop_after` rows are read and another follows (c->p is at its start) */
static int scan_items(Cursor *c, Field *fields, Py_ssize_t nf, const unsigned char *base, int64_t *st, int64_t *en,
                      Py_ssize_t cap, Py_ssize_t *n, Py_ssize_t *unknown, Py_ssize_t stop_after) {
    for (;;) {
        if (*n >= cap) return BAIL;
        st[*n] = c->p - base;
        if (scan_object(c, fields, nf, *n, unknown) != OK) return BAIL;
        en[*n] = c->p - base;
        (*n)++;
        int r = after_item(c, ']');
        if (r == CLOSED) return OK;
        if (r != NEXT) return BAIL;
        if (*n == stop_after) return PAUSED;
    }
}

PyDoc_STRVAR(scan_doc,
"scan(body, key, fields, starts, ends, stop_after=-1, resume_at=0, array_start=-1, first_row=0)\n"
"    -> (status, n, array_start, array_end, unknown, resume_at)\n\n"
"Reads the array under the top-level `key` (bytes) of the JSON object `body`: one row per object\n"
"in it, into `fields` (as for gather; the buffers have room for len(starts) rows). starts/ends\n"
"(int64) get each object's byte span. status 0: done, and array_start/array_end are the array's\n"
"span; 2 (PAUSED): `stop_after` rows are read and more follow; call again with resume_at, array_start\n"
"and first_row = n to go on (unknown counts the keys of this call's rows only); otherwise nothing is\n"
"certain (the caller parses the body another way).");

/* what one scan call reads, and where it got to */
typedef struct {
    const unsigned char *base, *end, *key;
    Py_ssize_t klen, nf, cap, stop_after, resume_at, array_start, first_row;
    Field *fields;
    int64_t *st, *en;
    Py_ssize_t n, unknown, a_start, a_end, pos; /* out */
} ScanJob;

/* the scan itself: no Python object is touched (it runs without the GIL), but for scan_number's rare
   fallback, which takes the GIL back for itself */
static int scan_run(ScanJob *j) {
    Cursor c = {j->base, j->end};
    const unsigned char *base = j->base;
    Field *fields = j->fields;
    Py_ssize_t nf = j->nf, cap = j->cap, n = 0, unknown = 0, a_start = -1, a_end = -1, pos = 0;
    int64_t *st = j->st, *en = j->en;
    int status = BAIL, r;
    if (j->resume_at) { /* inside the array, at an object's start, as a PAUSED call left it */
        c.p = base + j->resume_at;
        n = j->first_row;
        a_start = j->array_start;
        if ((r = scan_items(&c, fields, nf, base, st, en, cap, &n, &unknown, j->stop_after)) != OK) goto stopped;
        a_end = c.p - base;
        goto next_key;
    }
    ws(&c);
    if (c.p >= c.end || *c.p != '{' || opens_empty(&c, '}')) goto bail; /* no candidates: orjson's path says so */
    for (;;) {
        const unsigned char *key;
        Py_ssize_t klen;
        if (scan_key(&c, &key, &klen, 1) != OK) goto bail;
        if (klen == j->klen && memcmp(key, j->key, klen) == 0) {
            if (a_start >= 0 || c.p >= c.end || *c.p != '[') goto bail;
            a_start = c.p - base;
            if (!opens_empty(&c, ']') &&
                (r = scan_items(&c, fields, nf, base, st, en, cap, &n, &unknown, j->stop_after)) != OK)
                goto stopped;
            a_end = c.p - base;
        } else if (skip_value(&c, 1) != OK) {
            goto bail;
        }
    next_key:
        if ((r = after_item(&c, '}')) == CLOSED) break;
        if (r != NEXT) goto bail;
    }
    ws(&c);
    if (c.p != c.end || a_start < 0) goto bail;
    status = OK;
    goto bail;
stopped:
    if (r == PAUSED) {
        status = PAUSED;
        pos = c.p - base;
    }
bail:
    if (status == BAIL) n = unknown = a_start = a_end = 0;
    j->n = n, j->unknown = unknown, j->a_start = a_start, j->a_end = a_end, j->pos = pos;
    return status;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer body, key_buf;
    PyObject *spec, *starts_obj, *ends_obj;
    ScanJob job = {0};
    job.stop_after = -1, job.array_start = -1;
    if (!PyArg_ParseTuple(args, "y*y*O!OO|nnnn:scan", &body, &key_buf, &PyTuple_Type, &spec, &starts_obj, &ends_obj,
                          &job.stop_after, &job.resume_at, &job.array_start, &job.first_row))
        return NULL;
    PyObject *result = NULL;
    Py_buffer starts = {0}, ends = {0};
    Field *fields = NULL;
    Py_ssize_t cap = 0, nf = PyTuple_GET_SIZE(spec);
    if (PyObject_GetBuffer(starts_obj, &starts, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        starts.obj = NULL;
        goto done;
    }
    cap = starts.len / 8;
    if (starts.len % 8 || (uintptr_t)starts.buf % 8) {
        PyErr_SetString(PyExc_ValueError, "scan: starts must be an aligned int64 buffer");
        goto done;
    }
    if (get_buffer(ends_obj, &ends, cap * 8, "ends", 8) < 0) goto done;
    if (nf > 64) {
        PyErr_SetString(PyExc_ValueError, "scan: at most 64 fields");
        goto done;
    }
    if (job.resume_at && (job.resume_at < 0 || job.resume_at >= body.len || job.array_start < 0 ||
                          job.array_start >= job.resume_at || job.first_row < 0 || job.first_row > cap)) {
        PyErr_SetString(PyExc_ValueError, "scan: resume_at, array_start and first_row must be a paused scan's");
        goto done;
    }
    fields = load_fields(spec, cap);
    if (fields == NULL) goto done;
    job.base = (const unsigned char *)body.buf, job.end = job.base + body.len;
    job.key = (const unsigned char *)key_buf.buf, job.klen = key_buf.len;
    job.fields = fields, job.nf = nf, job.cap = cap;
    job.st = (int64_t *)starts.buf, job.en = (int64_t *)ends.buf;
    int status;
    /* another thread may run meanwhile (a share of a batch on the model: Ranker.rank_early); only over immutable
       bytes, which no thread can change under the scan */
    if (body.len > 8192 && body.obj != NULL && PyBytes_CheckExact(body.obj)) {
        Py_BEGIN_ALLOW_THREADS
        status = scan_run(&job);
        Py_END_ALLOW_THREADS
    } else {
        status = scan_run(&job);
    }
    result = Py_BuildValue("innnnn", status, job.n, job.a_start, job.a_end, job.unknown, job.pos);
done:
    if (fields) release(fields, nf);
    if (starts.obj) PyBuffer_Release(&starts);
    if (ends.obj) PyBuffer_Release(&ends);
    PyBuffer_Release(&body);
    PyBuffer_Release(&key_buf);
    return result;
}

/* ------------------------------------------------------------------ encode: columns -> model inputs
 *
 * `encode` does for gathered columns what Encoder.encode_gathered does with numpy, in one pass and
 * one call: ids to embedding rows (hash % buckets + 1, 0 when absent), lists padded with 0, vectors
 * as float32 (zeros when absent), numbers into a float64 matrix with their mask (the default where
 * absent; the log1p itself stays with numpy, so that the trainer's and the service's values are the
 * same bits). A section of one row is broadcast to every row. It only encodes values that pass every
 * check; at the first that does not it returns 1, and the caller takes encode_gathered, which names
 * the field.
 */

static const double F32_MAX = 3.4028234663852886e38;

typedef struct {
    int kind, log1p;
    Py_ssize_t rows, width, col;
    unsigned long long buckets;
    double dflt;
    Py_buffer present, values, count, out;
} Column;

static void release_columns(Column *cols, Py_ssize_t nc) {
    for (Py_ssize_t j = 0; j < nc; j++) {
        Py_buffer *b[4] = {&cols[j].present, &cols[j].values, &cols[j].count, &cols[j].out};
        for (int k = 0; k < 4; k++)
            if (b[k]->obj) PyBuffer_Release(b[k]);
    }
    PyMem_Free(cols);
}

static inline int fits(double v) { return isfinite(v) && fabs(v) <= F32_MAX; }

/* whether row r of column c fails a check (encode_row's, and a one-row section's with no rows to write) */
static int check_row(Column *c, Py_ssize_t r) {
    if (!((const uint8_t *)c->present.buf)[r]) return 0;
    if (c->kind == NUMERIC) {
        double v = ((const double *)c->values.buf)[r];
        return !fits(v) || (c->log1p && !(v > -1));
    }
    if (c->kind == VECTOR) {
        const double *v = (const double *)c->values.buf + r * c->width;
        for (Py_ssize_t k = 0; k < c->width; k++)
            if (!fits(v[k])) return 1;
    }
    return 0;
}

/* row r of column c into output row i (r is i, or 0 for a broadcast section); 1 when a value fails a check */
static int encode_row(Column *c, Py_ssize_t r, Py_ssize_t i, double *num, float *mask, Py_ssize_t ncols) {
    int here = c->rows && ((const uint8_t *)c->present.buf)[r];
    const Py_ssize_t w = c->width;
    if (here && check_row(c, r)) return 1;
    switch (c->kind) {
    case CATEGORICAL:
        ((int64_t *)c->out.buf)[i] = here ? (int64_t)(((const uint64_t *)c->values.buf)[r] % c->buckets) + 1 : 0;
        return 0;
    case LIST: {
        int64_t *o = (int64_t *)c->out.buf + i * w;
        const uint64_t *v = c->rows ? (const uint64_t *)c->values.buf + r * w : NULL;
        Py_ssize_t kept = c->rows ? ((const int64_t *)c->count.buf)[r] : 0;
        for (Py_ssize_t k = 0; k < w; k++) o[k] = k < kept ? (int64_t)(v[k] % c->buckets) + 1 : 0;
        return 0;
    }
    case NUMERIC: {
        double v = here ? ((const double *)c->values.buf)[r] : c->dflt;
        num[i * ncols + c->col] = v;
        mask[i * ncols + c->col] = (float)here;
        return 0;
    }
    default: { /* VECTOR */
        float *o = (float *)c->out.buf + i * w;
        if (!here) {
            memset(o, 0, w * sizeof(float));
            return 0;
        }
        const double *v = (const double *)c->values.buf + r * w;
        for (Py_ssize_t k = 0; k < w; k++) o[k] = (float)v[k];
        return 0;
    }
    }
}

PyDoc_STRVAR(encode_doc,
"encode(columns, n, numeric, mask) -> 0, or 1 when a value fails a check (nothing is certain then)\n\n"
"columns: one (kind, rows, present, values, count, buckets, width, col, log1p, default, out) per feature;\n"
"rows is n, 1 (broadcast to every row) or 0 (absent everywhere; present, values and count are then\n"
"None). out: int64 (n,) or (n, width) for ids, float32 (n, width) for vectors, None for numbers,\n"
"which go to column `col` of numeric (float64 (n, ncols)) and of mask (float32 (n, ncols)).");

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *spec, *num_obj, *mask_obj;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O!nOO:encode", &PyTuple_Type, &spec, &n, &num_obj, &mask_obj)) return NULL;
    Py_ssize_t nc = PyTuple_GET_SIZE(spec), ncols = 0;
    Py_buffer num = {0}, mask = {0};
    PyObject *result = NULL;
    Column *cols = PyMem_Calloc(nc ? nc : 1, sizeof(Column));
    if (cols == NULL) return PyErr_NoMemory();
    if (n < 0 || n > PY_SSIZE_T_MAX / 64) {
        PyErr_SetString(PyExc_ValueError, "encode: n out of range");
        goto done;
    }
    if (num_obj != Py_None) {
        if (PyObject_GetBuffer(num_obj, &num, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            num.obj = NULL;
            goto done;
        }
        ncols = num.ndim == 2 ? num.shape[1] : -1;
        if (ncols < 0 || num.shape[0] != n || strcmp(num.format, "d") != 0 || (uintptr_t)num.buf % 8) {
            PyErr_SetString(PyExc_ValueError, "encode: numeric must be an aligned float64 (n, ncols) buffer");
            goto done;
        }
        if (get_buffer(mask_obj, &mask, n * ncols * 4, "mask", 4) < 0) goto done;
    }
    for (Py_ssize_t j = 0; j < nc; j++) {
        Column *c = &cols[j];
        PyObject *present, *values, *count, *out;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, j), "inOOOKnnidO:column", &c->kind, &c->rows, &present, &values,
                              &count, &c->buckets, &c->width, &c->col, &c->log1p, &c->dflt, &out))
            goto done;
        if (c->kind < CATEGORICAL || c->kind > VECTOR || !(c->rows == 0 || c->rows == 1 || c->rows == n) ||
            c->width < 1 || c->width > 1 << 20 || c->width > PY_SSIZE_T_MAX / 8 / (n > 1 ? n : 1) ||
            ((c->kind == CATEGORICAL || c->kind == LIST) && c->buckets == 0) ||
            (c->kind == NUMERIC && (num.obj == NULL || c->col < 0 || c->col >= ncols))) {
            PyErr_Format(PyExc_ValueError, "encode: column %zd is not valid", j);
            goto done;
        }
        Py_ssize_t width = (c->kind == LIST || c->kind == VECTOR) ? c->width : 1, item = c->kind == VECTOR ? 4 : 8;
        if (c->rows) {
            if (get_buffer(present, &c->present, c->rows, "present", 1) < 0 ||
                get_buffer(values, &c->values, c->rows * width * 8, "values", 8) < 0 ||
                (c->kind == LIST && get_buffer(count, &c->count, c->rows * 8, "count", 8) < 0))
                goto done;
        }
        if (c->kind != NUMERIC && get_buffer(out, &c->out, n * width * item, "out", item) < 0) goto done;
    }
    int status = 0;
    for (Py_ssize_t j = 0; j < nc && !status; j++) {
        Column *c = &cols[j];
        if (n == 0) { /* nothing to write, but a one-row section's values are checked all the same */
            status = c->rows ? check_row(c, 0) : 0;
        } else if (c->rows == n) {
            for (Py_ssize_t i = 0; i < n && !status; i++) status = encode_row(c, i, i, num.buf, mask.buf, ncols);
        } else { /* one row (or none) for all: encode row 0, then copy it */
            status = encode_row(c, 0, 0, num.buf, mask.buf, ncols);
            for (Py_ssize_t i = 1; i < n && !status; i++) {
                if (c->kind == NUMERIC) {
                    ((double *)num.buf)[i * ncols + c->col] = ((double *)num.buf)[c->col];
                    ((float *)mask.buf)[i * ncols + c->col] = ((float *)mask.buf)[c->col];
                } else {
                    Py_ssize_t bytes = c->kind == CATEGORICAL ? 8 : (c->kind == VECTOR ? 4 : 8) * c->width;
                    memcpy((char *)c->out.buf + i * bytes, c->out.buf, bytes);
                }
            }
        }
    }
    result = PyLong_FromLong(status);
done:
    release_columns(cols, nc);
    if (num.obj) PyBuffer_Release(&num);
    if (mask.obj) PyBuffer_Release(&mask);
    return result;
}

PyDoc_STRVAR(repeats_doc, "has_repeats(values) -> whether a uint64 buffer holds some value twice (a hash set).");

static PyObject *has_repeats(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*:has_repeats", &buf)) return NULL;
    Py_ssize_t n = buf.len / 8, size = 16;
    while (size < 2 * n) size *= 2;
    uint64_t *slots = PyMem_Calloc(size, sizeof(uint64_t));
    uint8_t *used = PyMem_Calloc(size, 1);
    int found = 0;
    if (slots == NULL || used == NULL) {
        PyMem_Free(slots);
        PyMem_Free(used);
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    const unsigned char *bytes = (const unsigned char *)buf.buf;
    for (Py_ssize_t i = 0; i < n && !found; i++) {
        uint64_t v;
        memcpy(&v, bytes + 8 * i, 8); /* any alignment */
        uint64_t h = v * 0x9E3779B97F4A7C15ULL; /* spread the bits: FNV hashes mod a power of two collide */
        Py_ssize_t k = (Py_ssize_t)(h >> 32) & (size - 1);
        while (used[k] && slots[k] != v) k = (k + 1) & (size - 1);
        if (used[k]) found = 1;
        used[k] = 1;
        slots[k] = v;
    }
    PyMem_Free(slots);
    PyMem_Free(used);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(found);
}

PyDoc_STRVAR(count_doc, "count_byte(data, byte) -> how many times `byte` (an int) occurs in `data` (memchr).");

static PyObject *count_byte(PyObject *self, PyObject *args) {
    Py_buffer data;
    int byte;
    if (!PyArg_ParseTuple(args, "y*i:count_byte", &data, &byte)) return NULL;
    if (byte < 0 || byte > 255) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "count_byte: byte must be 0..255");
        return NULL;
    }
    const char *p = data.buf, *end = p + data.len;
    Py_ssize_t n = 0;
    while (p < end && (p = memchr(p, byte, end - p)) != NULL) {
        n++;
        p++;
    }
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"count_byte", count_byte, METH_VARARGS, count_doc},
    {"encode", encode, METH_VARARGS, encode_doc},
    {"has_repeats", has_repeats, METH_VARARGS, repeats_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"scan", scan, METH_VARARGS, scan_doc},
    {"set_powers", set_powers, METH_VARARGS, set_powers_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "watchnext._native",
    "Feature values from dicts (gather) or JSON bytes (scan) into columns, and columns into model inputs (encode),"
    " for watchnext.encoding.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
