/* _simd.c -- CPython glue for the cosine top-k kernels (intercascade_core.core._simd).
 *
 * Conventions (pyrsistent-style): ic_* are module functions, everything is
 * static, every function that allocates ends in one `cleanup:` label.
 * Each entry point validates every array (type, dtype, C-contiguity, alignment,
 * shapes) and option while holding the GIL, then releases the GIL only around
 * ic_topk() and ic_gather(), which touch no Python object. Multi-phase init (PEP 489); the
 * module keeps no global mutable state (only cpu.h's write-once CPUID cache), so it
 * declares Py_MOD_GIL_NOT_USED.
 * The ISA is an explicit argument (tests force each path); "auto" = best
 * supported. The Python layer (retrieve.py) raises the typed errors; these
 * checks are the last line of defence against a crash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <unistd.h>

#include "kernels.h"

static const char *const ISA_NAMES[IC_ISA_COUNT] = {"scalar", "avx2", "avx512"};

/* Validate a numpy array argument; returns a borrowed reference or NULL. */
static PyArrayObject *check_array(PyObject *obj, const char *name, int typenum, int ndim) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %.100s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", name, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned (use np.ascontiguousarray)", name);
        return NULL;
    }
    return a;
}

static int parse_isa(PyObject *obj, ic_isa *isa) {
    if (obj == NULL || obj == Py_None) {
        for (int i = IC_ISA_COUNT - 1; i >= 0; i--)
            if (ic_cpu_has((ic_isa)i)) {
                *isa = (ic_isa)i;
                return 0;
            }
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "isa must be a str or None");
        return -1;
    }
    for (int i = 0; i < IC_ISA_COUNT; i++)
        if (PyUnicode_CompareWithASCIIString(obj, ISA_NAMES[i]) == 0) {
            if (!ic_cpu_has((ic_isa)i)) {
                PyErr_Format(PyExc_ValueError, "isa %R is not supported by this CPU", obj);
                return -1;
            }
            *isa = (ic_isa)i;
            return 0;
        }
    PyErr_Format(PyExc_ValueError, "isa must be one of 'scalar', 'avx2', 'avx512' or None, got %R", obj);
    return -1;
}

/* threads: 0 = auto (2 when the scan is big enough and 2 CPUs are online). */
static int pick_threads(int threads, size_t n, size_t d, size_t m) {
    if (threads < 0 || threads > 2) {
        PyErr_SetString(PyExc_ValueError, "threads must be 0 (auto), 1 or 2");
        return -1;
    }
    if (threads == 0)
        threads = ((double)n * d * m >= 4194304.0 && sysconf(_SC_NPROCESSORS_ONLN) >= 2) ? 2 : 1;
    return threads;
}

/* Shared body of topk() and topk_int8(). */
static PyObject *run_topk(ic_job *job, PyObject *vectors, PyObject *queries, Py_ssize_t k,
                          PyObject *codes, PyObject *isa_obj, int threads, int want_candidates) {
    PyObject *result = NULL, *idx = NULL, *scores = NULL;
    ic_hit *hits = NULL;
    PyArrayObject *v, *q, *c = NULL;
    size_t kprime = 0, ncand = 0;
    int rc;

    if (!(v = check_array(vectors, "vectors", NPY_FLOAT32, 2)) ||
        !(q = check_array(queries, "queries", NPY_FLOAT32, 2)))
        goto cleanup;
    job->n = (size_t)PyArray_DIM(v, 0);
    job->d = (size_t)PyArray_DIM(v, 1);
    job->m = (size_t)PyArray_DIM(q, 0);
    if ((size_t)PyArray_DIM(q, 1) != job->d) {
        PyErr_Format(PyExc_ValueError, "queries must have %zu columns like vectors, got %zd", job->d,
                     PyArray_DIM(q, 1));
        goto cleanup;
    }
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "k must be >= 0, got %zd", k);
        goto cleanup;
    }
    if (codes != Py_None) {
        if (!(c = check_array(codes, "codes", NPY_INT32, 1)))
            goto cleanup;
        if ((size_t)PyArray_DIM(c, 0) != job->n) {
            PyErr_SetString(PyExc_ValueError, "codes must have one entry per row of vectors");
            goto cleanup;
        }
        job->codes = (const int32_t *)PyArray_DATA(c);
    }
    if (parse_isa(isa_obj, &job->isa) < 0 || (job->threads = pick_threads(threads, job->n, job->d, job->m)) < 0)
        goto cleanup;
    job->vectors = (const float *)PyArray_DATA(v);
    job->queries = (const float *)PyArray_DATA(q);
    {
        const float *qq = job->queries;
        for (size_t i = 0; i < job->m * job->d; i++)
            if (!isfinite(qq[i])) {
                PyErr_SetString(PyExc_ValueError, "queries contains NaN or infinite values");
                goto cleanup;
            }
    }
    job->k = (size_t)k < job->n ? (size_t)k : job->n;
    if (job->k > 0 && job->m > 0) {
        if (!(hits = PyMem_RawMalloc(job->m * job->k * sizeof(ic_hit)))) {
            PyErr_NoMemory();
            goto cleanup;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = ic_topk(job, hits, &kprime, &ncand);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            PyErr_NoMemory();
            goto cleanup;
        }
    }
    npy_intp dims[2] = {(npy_intp)job->m, (npy_intp)kprime};
    if (!(idx = PyArray_SimpleNew(2, dims, NPY_INT64)) || !(scores = PyArray_SimpleNew(2, dims, NPY_FLOAT32)))
        goto cleanup;
    {
        int64_t *pi = PyArray_DATA((PyArrayObject *)idx);
        float *ps = PyArray_DATA((PyArrayObject *)scores);
        for (size_t i = 0; i < job->m * kprime; i++) {
            pi[i] = hits[i].index;
            ps[i] = hits[i].score;
        }
    }
    result = want_candidates ? Py_BuildValue("(OOn)", idx, scores, (Py_ssize_t)ncand)
                             : PyTuple_Pack(2, idx, scores);
cleanup:
    Py_XDECREF(idx);
    Py_XDECREF(scores);
    PyMem_RawFree(hits);
    return result;
}

PyDoc_STRVAR(ic_topk_doc,
             "topk(vectors, queries, k, codes=None, tenant=-1, *, isa=None, threads=0)\n--\n\n"
             "Exact float32 top-k by inner product: (indices int64 (m, k'), scores float32 (m, k')).\n"
             "Rows with codes[i] != tenant are skipped when codes is given.");

static PyObject *ic_topk_py(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"vectors", "queries", "k", "codes", "tenant", "isa", "threads", NULL};
    PyObject *vectors, *queries, *codes = Py_None, *isa = Py_None;
    Py_ssize_t k;
    int tenant = -1, threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOn|Oi$Oi", kwlist, &vectors, &queries, &k, &codes,
                                     &tenant, &isa, &threads))
        return NULL;
    ic_job job = {0};
    job.tenant = tenant;
    return run_topk(&job, vectors, queries, k, codes, isa, threads, 0);
}

PyDoc_STRVAR(ic_topk_int8_doc,
             "topk_int8(vectors, packed, scales, errs, queries, k, codes=None, tenant=-1, *, isa=None, "
             "threads=0)\n--\n\n"
             "Top-k identical to topk(), found by scanning the int8 copy and re-scoring in float32\n"
             "every row its error bound cannot exclude. packed is (ceil(n/16), ceil(d/4), 16, 4) uint8\n"
             "holding q + 128 for blocks of 16 rows (vectors ~= scales * q, ||row error|| <= errs);\n"
             "scales and errs have ceil(n/16)*16 entries. Returns (indices, scores, rows re-scored).");

static PyObject *ic_topk_int8_py(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"vectors", "packed", "scales", "errs", "queries", "k",
                             "codes", "tenant", "isa", "threads", NULL};
    PyObject *vectors, *packed, *scales, *errs, *queries, *codes = Py_None, *isa = Py_None;
    Py_ssize_t k;
    int tenant = -1, threads = 0;
    PyArrayObject *pa, *sa, *ea, *va;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOn|Oi$Oi", kwlist, &vectors, &packed, &scales,
                                     &errs, &queries, &k, &codes, &tenant, &isa, &threads))
        return NULL;
    if (!(va = check_array(vectors, "vectors", NPY_FLOAT32, 2)) ||
        !(pa = check_array(packed, "packed", NPY_UINT8, 4)) ||
        !(sa = check_array(scales, "scales", NPY_FLOAT32, 1)) ||
        !(ea = check_array(errs, "errs", NPY_FLOAT32, 1)))
        return NULL;
    npy_intp n = PyArray_DIM(va, 0), d = PyArray_DIM(va, 1), nb = PyArray_DIM(pa, 0);
    if (nb * 16 < n || nb * 16 >= n + 16 || PyArray_DIM(pa, 1) != (d + 3) / 4 || PyArray_DIM(pa, 2) != 16 ||
        PyArray_DIM(pa, 3) != 4 || PyArray_DIM(sa, 0) != nb * 16 || PyArray_DIM(ea, 0) != nb * 16) {
        PyErr_SetString(PyExc_ValueError,
                        "packed must have shape (ceil(n/16), ceil(d/4), 16, 4) and scales/errs "
                        "ceil(n/16)*16 entries for vectors of shape (n, d)");
        return NULL;
    }
    ic_job job = {0};
    job.tenant = tenant;
    job.packed = (const uint8_t *)PyArray_DATA(pa);
    job.scales = (const float *)PyArray_DATA(sa);
    job.errs = (const float *)PyArray_DATA(ea);
    return run_topk(&job, vectors, queries, k, codes, isa, threads, 1);
}

PyDoc_STRVAR(ic_gather_doc,
             "gather(vectors, queries, rows, *, isa=None)\n--\n\n"
             "Exact float32 scores of chosen rows: out[q, j] = vectors[rows[q, j]] . queries[q] as\n"
             "float32 (m, c), for rows int64 (m, c) with 0 <= rows < n. The same bits on every ISA\n"
             "(float64 products, 8 lanes summed in dimension order, fixed lane tree, one rounding).");

static PyObject *ic_gather_py(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"vectors", "queries", "rows", "isa", NULL};
    PyObject *vectors, *queries, *rows, *isa_obj = Py_None, *out = NULL;
    PyArrayObject *v, *q, *r;
    ic_isa isa;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$O", kwlist, &vectors, &queries, &rows, &isa_obj))
        return NULL;
    if (!(v = check_array(vectors, "vectors", NPY_FLOAT32, 2)) ||
        !(q = check_array(queries, "queries", NPY_FLOAT32, 2)) || !(r = check_array(rows, "rows", NPY_INT64, 2)))
        return NULL;
    size_t n = (size_t)PyArray_DIM(v, 0), d = (size_t)PyArray_DIM(v, 1), m = (size_t)PyArray_DIM(q, 0);
    size_t c = (size_t)PyArray_DIM(r, 1);
    if ((size_t)PyArray_DIM(q, 1) != d || (size_t)PyArray_DIM(r, 0) != m) {
        PyErr_Format(PyExc_ValueError,
                     "queries must be (m, %zu) like vectors' columns and rows (m, c), got queries %zd x %zd, "
                     "rows %zd x %zd",
                     d, PyArray_DIM(q, 0), PyArray_DIM(q, 1), PyArray_DIM(r, 0), PyArray_DIM(r, 1));
        return NULL;
    }
    if (parse_isa(isa_obj, &isa) < 0)
        return NULL;
    const int64_t *ri = (const int64_t *)PyArray_DATA(r);
    for (size_t i = 0; i < m * c; i++)
        if (ri[i] < 0 || (uint64_t)ri[i] >= n) { /* the kernel would read outside vectors */
            PyErr_Format(PyExc_ValueError, "rows must be in [0, %zu), got %lld", n, (long long)ri[i]);
            return NULL;
        }
    npy_intp dims[2] = {(npy_intp)m, (npy_intp)c};
    if (!(out = PyArray_SimpleNew(2, dims, NPY_FLOAT32)))
        return NULL;
    const float *pv = (const float *)PyArray_DATA(v), *pq = (const float *)PyArray_DATA(q);
    float *po = (float *)PyArray_DATA((PyArrayObject *)out);
    if (m * c > 0) {
        Py_BEGIN_ALLOW_THREADS
        ic_gather(pv, d, pq, m, ri, c, isa, po);
        Py_END_ALLOW_THREADS
    }
    return out;
}

PyDoc_STRVAR(ic_capabilities_doc,
             "capabilities()\n--\n\nThe ISAs this CPU supports, best first, e.g. ('avx512', 'avx2', 'scalar').");

static PyObject *ic_capabilities(PyObject *self, PyObject *unused) {
    PyObject *names[IC_ISA_COUNT];
    Py_ssize_t count = 0;
    for (int i = IC_ISA_COUNT - 1; i >= 0; i--)
        if (ic_cpu_has((ic_isa)i))
            names[count++] = PyUnicode_FromString(ISA_NAMES[i]);
    PyObject *tuple = PyTuple_New(count);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!names[i] || !tuple) {
            for (Py_ssize_t j = i; j < count; j++)
                Py_XDECREF(names[j]);
            Py_XDECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, names[i]);
    }
    return tuple;
}

static PyMethodDef ic_methods[] = {
    {"topk", (PyCFunction)(void (*)(void))ic_topk_py, METH_VARARGS | METH_KEYWORDS, ic_topk_doc},
    {"topk_int8", (PyCFunction)(void (*)(void))ic_topk_int8_py, METH_VARARGS | METH_KEYWORDS, ic_topk_int8_doc},
    {"gather", (PyCFunction)(void (*)(void))ic_gather_py, METH_VARARGS | METH_KEYWORDS, ic_gather_doc},
    {"capabilities", ic_capabilities, METH_NOARGS, ic_capabilities_doc},
    {NULL, NULL, 0, NULL},
};

static int ic_exec(PyObject *module) {
    if (_import_array() < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot ic_slots[] = {
    {Py_mod_exec, ic_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* the numpy C API is not per-interpreter */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef ic_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "intercascade_core.core._simd",
    .m_doc = "SIMD cosine top-k (float32 and int8 + float32 re-score) with runtime CPU dispatch.",
    .m_size = 0,
    .m_methods = ic_methods,
    .m_slots = ic_slots,
};

PyMODINIT_FUNC PyInit__simd(void) { return PyModuleDef_Init(&ic_module); }
