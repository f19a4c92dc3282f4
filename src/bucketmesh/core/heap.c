/* bucketmesh.core.heap, compiled: keeps long-lived, acyclic objects of the core out
 * of the cyclic garbage collector's generations (heap.py says why and when; heap.py
 * is also the module that runs where this one is not built).
 *
 * untrack(obj) -> obj: PyObject_GC_UnTrack. Reference counting still frees the
 * object; only the collector's walks skip it. Memory-safe for any object (whatever
 * it refers to counts as referenced from outside, so it is never freed early); the
 * caller promises only that no reference cycle runs through it, or the cycle would
 * never be collected. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
untrack(PyObject *module, PyObject *obj)
{
    (void)module;
    if (PyObject_IS_GC(obj)) {
        PyObject_GC_UnTrack(obj);
    }
    Py_INCREF(obj);
    return obj;
}

static PyMethodDef methods[] = {
    {"untrack", untrack, METH_O,
     "untrack(obj) -> obj: take obj out of the cyclic garbage collector's generations."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "bucketmesh.core.heap",
    "Long-lived, acyclic core objects kept out of the cyclic garbage collector.",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit_heap(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "COMPILED", Py_True) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
