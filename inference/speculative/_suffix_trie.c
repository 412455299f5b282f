/* The suffix trie's hot paths in C: appending tokens to a stream and drafting (suffix_tree.SuffixTrie's append,
 * draft_path and draft_tree, same layout, same arithmetic in the same order, so the drafts are identical).
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


/* ---- drafting: the same walks as SuffixTrie.draft_path / draft_tree, on the same arrays ---------------------- */

typedef struct {
    int32_t *tok, *dep, *cnt, *out, *best, *link;
    Py_buffer buf[F_FREE];
    int got;
} View;

static int view_open(View *v, PyObject *fields) {
    v->got = 0;
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) < F_FREE) {
        PyErr_SetString(PyExc_ValueError, "draft: expected the trie's int32 arrays");
        return -1;
    }
    int32_t **f[F_FREE] = {&v->tok, &v->dep, &v->cnt, &v->out, &v->best, &v->link};
    for (; v->got < F_FREE; v->got++) {
        Py_buffer *b = &v->buf[v->got];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(fields, v->got), b, PyBUF_FORMAT) < 0) return -1;
        if (b->itemsize != 4 || strcmp(b->format, "i") != 0) {
            v->got++;
            PyErr_SetString(PyExc_TypeError, "draft: arrays must be array('i')");
            return -1;
        }
        *f[v->got] = (int32_t *)b->buf;
    }
    return 0;
}

static void view_close(View *v) {
    for (int i = 0; i < v->got; i++) PyBuffer_Release(&v->buf[i]);
}

static PyObject *build_draft(int32_t *tokens, int32_t *parents, double *probs, int n) {
    PyObject *t = PyList_New(n), *p = PyList_New(n), *q = PyList_New(n);
    if (!t || !p || !q) goto fail;
    for (int i = 0; i < n; i++) {
        PyObject *a = PyLong_FromLong(tokens[i]), *b = PyLong_FromLong(parents[i]), *c = PyFloat_FromDouble(probs[i]);
        if (!a || !b || !c) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_XDECREF(c);
            goto fail;
        }
        PyList_SET_ITEM(t, i, a);
        PyList_SET_ITEM(p, i, b);
        PyList_SET_ITEM(q, i, c);
    }
    return Py_BuildValue("NNN", t, p, q);
fail:
    Py_XDECREF(t);
    Py_XDECREF(p);
    Py_XDECREF(q);
    return NULL;
}

static PyObject *draft_path(PyObject *self, PyObject *args) {
    PyObject *fields;
    int node, budget, max_depth;
    double min_prob;
    if (!PyArg_ParseTuple(args, "Oiidi", &fields, &node, &budget, &min_prob, &max_depth)) return NULL;
    View v;
    PyObject *result = NULL;
    int32_t *tokens = NULL, *parents = NULL;
    double *probs = NULL;
    if (view_open(&v, fields) < 0) goto done;
    if (budget < 0) budget = 0;
    tokens = PyMem_Malloc(sizeof(int32_t) * (budget + 1));
    parents = PyMem_Malloc(sizeof(int32_t) * (budget + 1));
    probs = PyMem_Malloc(sizeof(double) * (budget + 1));
    if (!tokens || !parents || !probs) {
        PyErr_NoMemory();
        goto done;
    }
    int n_out = 0;
    double prob = 1.0;
    int32_t n = v.dep[node] >= max_depth ? v.link[node] : node;
    while (n_out < budget) {
        int32_t c = v.best[n];
        if (c < 0) break;
        prob *= (double)v.cnt[c] / (double)v.out[n];
        if (prob < min_prob) break;
        tokens[n_out] = v.tok[c];
        parents[n_out] = n_out - 1;
        probs[n_out] = prob;
        n_out++;
        n = v.dep[c] >= max_depth ? v.link[c] : c;
    }
    result = build_draft(tokens, parents, probs, n_out);
done:
    PyMem_Free(tokens);
    PyMem_Free(parents);
    PyMem_Free(probs);
    view_close(&v);
    return result;
}

typedef struct {
    double neg;        /* -(path probability) */
    long order;        /* push order: ties pop first-pushed first */
    int32_t parent;    /* draft index of the parent (-1: the context) */
    int32_t owner;     /* trie node whose children these siblings are */
    int32_t rank;      /* which sibling */
    int32_t ranked;    /* index into the ranked lists, -1 while only `best` is known */
    double parent_prob;
} Entry;

static int entry_less(const Entry *a, const Entry *b) {
    return a->neg < b->neg || (a->neg == b->neg && a->order < b->order);
}

static void heap_push(Entry *h, int *n, Entry e) {
    int i = (*n)++;
    h[i] = e;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!entry_less(&h[i], &h[p])) break;
        Entry t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

static Entry heap_pop(Entry *h, int *n) {
    Entry top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && entry_less(&h[l], &h[m])) m = l;
        if (r < *n && entry_less(&h[r], &h[m])) m = r;
        if (m == i) break;
        Entry t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
    return top;
}

static const int32_t *sort_cnt, *sort_tok;

static int rank_cmp(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    if (sort_cnt[a] != sort_cnt[b]) return sort_cnt[a] > sort_cnt[b] ? -1 : 1;
    return (sort_tok[a] > sort_tok[b]) - (sort_tok[a] < sort_tok[b]);
}

typedef struct {
    int32_t *items;
    int len;
} Ranked;

static PyObject *draft_tree(PyObject *self, PyObject *args) {
    PyObject *fields, *kids;
    int node, budget, max_depth;
    double min_prob;
    if (!PyArg_ParseTuple(args, "OO!iidi", &fields, &PyDict_Type, &kids, &node, &budget, &min_prob, &max_depth))
        return NULL;
    View v;
    PyObject *result = NULL;
    if (budget < 0) budget = 0;
    int32_t *tokens = PyMem_Malloc(sizeof(int32_t) * (budget + 1));
    int32_t *parents = PyMem_Malloc(sizeof(int32_t) * (budget + 1));
    double *probs = PyMem_Malloc(sizeof(double) * (budget + 1));
    Entry *heap = PyMem_Malloc(sizeof(Entry) * (2 * budget + 2));
    Ranked *ranked = PyMem_Malloc(sizeof(Ranked) * (budget + 1));
    int n_ranked = 0;
    if (view_open(&v, fields) < 0) goto done;
    if (!tokens || !parents || !probs || !heap || !ranked) {
        PyErr_NoMemory();
        goto done;
    }
    int n_out = 0, n_heap = 0;
    long order = 0;
    int32_t n = v.dep[node] >= max_depth ? v.link[node] : node;
    int32_t b = v.best[n];
    if (b >= 0 && (double)v.cnt[b] / (double)v.out[n] >= min_prob) {
        Entry e = {-((double)v.cnt[b] / (double)v.out[n]), order, -1, n, 0, -1, 1.0};
        heap_push(heap, &n_heap, e);
    }
    while (n_heap > 0 && n_out < budget) {
        Entry e = heap_pop(heap, &n_heap);
        int32_t c = e.ranked >= 0 ? ranked[e.ranked].items[e.rank] : v.best[e.owner];
        int32_t idx = n_out;
        tokens[n_out] = v.tok[c];
        parents[n_out] = e.parent;
        probs[n_out] = -e.neg;
        n_out++;
        int32_t total = v.out[e.owner];
        if (e.ranked < 0 && e.parent_prob * (double)(total - v.cnt[c]) / (double)total >= min_prob) {
            /* rank the siblings that can reach min_prob, best first */
            PyObject *key = PyLong_FromLong(e.owner);
            if (!key) goto done;
            PyObject *inner = PyDict_GetItemWithError(kids, key);
            Py_DECREF(key);
            if (!inner && PyErr_Occurred()) goto done;
            Ranked r = {NULL, 0};
            Py_ssize_t size = inner ? PyDict_GET_SIZE(inner) : 1;
            r.items = PyMem_Malloc(sizeof(int32_t) * (size_t)size);
            if (!r.items) {
                PyErr_NoMemory();
                goto done;
            }
            if (!inner) {
                r.items[r.len++] = v.best[e.owner];
            } else {
                Py_ssize_t pos = 0;
                PyObject *k, *val;
                while (PyDict_Next(inner, &pos, &k, &val)) {
                    int32_t ch = (int32_t)PyLong_AsLong(val);
                    if (e.parent_prob * (double)v.cnt[ch] / (double)total >= min_prob) r.items[r.len++] = ch;
                }
                sort_cnt = v.cnt;
                sort_tok = v.tok;
                qsort(r.items, (size_t)r.len, sizeof(int32_t), rank_cmp);
            }
            ranked[n_ranked] = r;
            e.ranked = n_ranked++;
        }
        if (e.ranked >= 0 && e.rank + 1 < ranked[e.ranked].len) {
            order++;
            int32_t sib = ranked[e.ranked].items[e.rank + 1];
            Entry s = {-(e.parent_prob * (double)v.cnt[sib] / (double)total), order, e.parent, e.owner, e.rank + 1,
                       e.ranked, e.parent_prob};
            heap_push(heap, &n_heap, s);
        }
        int32_t m = v.dep[c] >= max_depth ? v.link[c] : c;
        int32_t mb = v.best[m];
        if (mb >= 0) {
            double p = -e.neg * (double)v.cnt[mb] / (double)v.out[m];
            if (p >= min_prob) {
                order++;
                Entry ch = {-p, order, idx, m, 0, -1, -e.neg};
                heap_push(heap, &n_heap, ch);
            }
        }
    }
    result = build_draft(tokens, parents, probs, n_out);
done:
    for (int i = 0; i < n_ranked; i++) PyMem_Free(ranked[i].items);
    PyMem_Free(ranked);
    PyMem_Free(heap);
    PyMem_Free(tokens);
    PyMem_Free(parents);
    PyMem_Free(probs);
    view_close(&v);
    return result;
}

static PyMethodDef methods[] = {
    {"extend", extend, METH_VARARGS,
     "extend((token, depth, count, out, best, link, free), kids, nfree, size, cursor, tokens, max_depth)"
     " -> (cursor, size, nfree, new_nodes, new_dicts)"},
    {"draft_path", draft_path, METH_VARARGS,
     "draft_path(fields, node, budget, min_prob, max_depth) -> (tokens, parents, probs)"},
    {"draft_tree", draft_tree, METH_VARARGS,
     "draft_tree(fields, kids, node, budget, min_prob, max_depth) -> (tokens, parents, probs)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_suffix_trie", NULL, -1, methods};

PyMODINIT_FUNC PyInit__suffix_trie(void) { return PyModule_Create(&module); }
