/* The suffix trie's hot path in C: appending tokens to a stream (suffix_tree.SuffixTrie.append, same layout).
 *
 * Appending one token visits every stored suffix of the stream (up to max_depth of them), which in Python costs
 * tens of microseconds per token: too much for a prompt of thousands of tokens or for every decode step of a
 * batch. The trie stays in the Python object's int32 arrays and children dicts; this function only walks and
 * writes them, so the pure-Python implementation (the fallback, and the reference the tests compare against)
 * reads and writes the very same structure. The caller reserves array capacity for the worst case beforehand.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

enum { F_TOKEN, F_DEPTH, F_COUNT, F_OUT, F_BEST, F_LINK, F_FREE, N_FIELDS };

static int get_child(PyObject *kids, int32_t node, int32_t token, PyObject **inner_out, int32_t *child) {
    /* Looks `token` up in node's children dict (if it has one); *child = -1 when absent. */
    PyObject *key = PyLong_FromLong(node);
    if (!key) return -1;
    PyObject *inner = PyDict_GetItemWithError(kids, key);
    Py_DECREF(key);
    if (!inner && PyErr_Occurred()) return -1;
    *inner_out = inner;
    *child = -1;
    if (!inner) return 0;
    key = PyLong_FromLong(token);
    if (!key) return -1;
    PyObject *v = PyDict_GetItemWithError(inner, key);
    Py_DECREF(key);
    if (!v) return PyErr_Occurred() ? -1 : 0;
    *child = (int32_t)PyLong_AsLong(v);
    return 0;
}

static int dict_set_ints(PyObject *d, long k, long v) {
    PyObject *key = PyLong_FromLong(k), *val = PyLong_FromLong(v);
    int rc = (key && val) ? PyDict_SetItem(d, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return rc;
}

static PyObject *extend(PyObject *self, PyObject *args) {
    PyObject *fields, *kids, *tokens;
    Py_ssize_t nfree, size, cursor;
    int max_depth;
    if (!PyArg_ParseTuple(args, "O!O!nnnOi", &PyTuple_Type, &fields, &PyDict_Type, &kids, &nfree, &size, &cursor,
                          &tokens, &max_depth))
        return NULL;
    if (PyTuple_GET_SIZE(fields) != N_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "extend: expected 7 int32 arrays");
        return NULL;
    }
    Py_buffer buf[N_FIELDS];
    int32_t *f[N_FIELDS];
    int got = 0;
    PyObject *seq = NULL, *result = NULL;
    for (; got < N_FIELDS; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(fields, got), &buf[got], PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
            goto done;
        if (buf[got].itemsize != 4 || strcmp(buf[got].format, "i") != 0) {
            PyBuffer_Release(&buf[got]);
            PyErr_SetString(PyExc_TypeError, "extend: arrays must be array('i')");
            goto done;
        }
        f[got] = (int32_t *)buf[got].buf;
    }
    Py_ssize_t capacity = buf[F_TOKEN].len / 4;
    for (int i = 1; i < F_FREE; i++)
        if (buf[i].len / 4 != capacity) {
            PyErr_SetString(PyExc_ValueError, "extend: node arrays differ in length");
            goto done;
        }
    int32_t *tok = f[F_TOKEN], *dep = f[F_DEPTH], *cnt = f[F_COUNT], *out = f[F_OUT], *best = f[F_BEST],
            *link = f[F_LINK], *fre = f[F_FREE];
    seq = PySequence_Fast(tokens, "extend: tokens must be a sequence of ints");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), new_nodes = 0, new_dicts = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int32_t a = (int32_t)cursor;
    for (Py_ssize_t i = 0; i < n; i++) {
        long tl = PyLong_AsLong(items[i]);
        if (tl == -1 && PyErr_Occurred()) goto done;
        int32_t t = (int32_t)tl, last = -1, new_cursor = -1;
        for (;;) {
            int32_t b = best[a], c = -1;
            if (b >= 0 && tok[b] == t) {
                c = b;
            } else {
                PyObject *inner = NULL;
                if (get_child(kids, a, t, &inner, &c) < 0) goto done;
                if (c < 0) {
                    if (nfree > 0) {
                        c = fre[--nfree];
                    } else {
                        if (size >= capacity) {
                            PyErr_SetString(PyExc_RuntimeError, "extend: node capacity not reserved");
                            goto done;
                        }
                        c = (int32_t)size++;
                    }
                    tok[c] = t;
                    dep[c] = dep[a] + 1;
                    cnt[c] = out[c] = 0;
                    best[c] = link[c] = -1;
                    new_nodes++;
                    if (b >= 0) {
                        if (!inner) {
                            PyObject *d = PyDict_New(), *key = PyLong_FromLong(a);
                            int rc = (d && key) ? PyDict_SetItem(kids, key, d) : -1;
                            Py_XDECREF(key);
                            Py_XDECREF(d);  /* kids holds it now */
                            if (rc < 0 || dict_set_ints(d, tok[b], b) < 0) goto done;
                            inner = d;
                            new_dicts++;
                        }
                        if (dict_set_ints(inner, t, c) < 0) goto done;
                    }
                }
            }
            cnt[c]++;
            out[a]++;
            b = best[a];
            if (b < 0 || cnt[c] > cnt[b] || (cnt[c] == cnt[b] && t < tok[b])) best[a] = c;
            if (last >= 0 && link[last] < 0) link[last] = c;
            if (new_cursor < 0 && dep[c] < max_depth) new_cursor = c;
            last = c;
            if (a == 0) break;
            a = link[a];
        }
        if (link[last] < 0) link[last] = 0;
        a = new_cursor >= 0 ? new_cursor : 0;
    }
    result = Py_BuildValue("nnnnn", (Py_ssize_t)a, size, nfree, new_nodes, new_dicts);
done:
    Py_XDECREF(seq);
    for (int i = 0; i < got; i++) PyBuffer_Release(&buf[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"extend", extend, METH_VARARGS,
     "extend((token, depth, count, out, best, link, free), kids, nfree, size, cursor, tokens, max_depth)"
     " -> (cursor, size, nfree, new_nodes, new_dicts)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_suffix_trie", NULL, -1, methods};

PyMODINIT_FUNC PyInit__suffix_trie(void) { return PyModule_Create(&module); }
