/* Unicorn's IN and OUT hooks for the tcg vCPU, in C: the trampoline from the engine to Python.
 *
 * A ctypes callback costs about as much per `out` as the rest of an exit handled inside
 * emulation, and the RIP and CS the vCPU needs (where KVM would report the exit) cost one
 * more ctypes call. Here Unicorn calls C, which reads RIP and CS with `uc_reg_read` and
 * calls the vCPU's method with plain integers:
 *
 *   callback(port, size, value, rip, cs)  -> ignored        (OUT)
 *   callback(port, size, rip, cs)         -> value read     (IN)
 *
 * An exception raised by the callback goes to `on_error(exception)` (the engine keeps it and
 * stops emulation), as the ctypes trampoline in engine.py does. Nothing is linked against
 * Unicorn: the engine passes the address of `uc_reg_read` and the register numbers.
 *
 *   Hook(callback, on_error, uc_reg_read_address, rip_id, cs_id)
 *   OUT, IN: the addresses of the two C hooks, for uc_hook_add with the Hook as user data.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

typedef int (*reg_read_t)(void *uc, int regid, void *value);

typedef struct {
    PyObject_HEAD
    PyObject *callback;
    PyObject *on_error;
    reg_read_t reg_read;
    int rip_id, cs_id;
} Hook;

static void hook_dealloc(Hook *self) {
    Py_XDECREF(self->callback);
    Py_XDECREF(self->on_error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int hook_init(Hook *self, PyObject *args, PyObject *kwds) {
    PyObject *callback, *on_error;
    unsigned long long reg_read;
    if (!PyArg_ParseTuple(args, "OOKii", &callback, &on_error, &reg_read, &self->rip_id,
                          &self->cs_id))
        return -1;
    if (!PyCallable_Check(callback) || !PyCallable_Check(on_error) || reg_read == 0) {
        PyErr_SetString(PyExc_TypeError, "Hook(callback, on_error, uc_reg_read address, rip, cs)");
        return -1;
    }
    Py_INCREF(callback);
    Py_INCREF(on_error);
    Py_XSETREF(self->callback, callback);
    Py_XSETREF(self->on_error, on_error);
    self->reg_read = (reg_read_t)(uintptr_t)reg_read;
    return 0;
}

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlab.accel.tcg._insnhooks.Hook",
    .tp_basicsize = sizeof(Hook),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A Python callback for Unicorn's IN or OUT hook, with RIP and CS",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hook_init,
    .tp_dealloc = (destructor)hook_dealloc,
};

/* The exception raised, to on_error (which keeps it and stops emulation). */
static void tell_error(Hook *self) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    PyObject *told = PyObject_CallOneArg(self->on_error, value != NULL ? value : Py_None);
    if (told == NULL)
        PyErr_WriteUnraisable(self->on_error);
    Py_XDECREF(told);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* callback(*numbers, rip, cs); its result, or NULL after on_error has been told. */
static PyObject *call(Hook *self, void *uc, PyObject **args, Py_ssize_t n) {
    uint64_t rip = 0, cs = 0;
    self->reg_read(uc, self->rip_id, &rip);
    self->reg_read(uc, self->cs_id, &cs);
    args[n] = PyLong_FromUnsignedLongLong(rip);
    args[n + 1] = PyLong_FromUnsignedLongLong(cs & 0xFFFF);
    PyObject *result = NULL;
    int made = 1;
    for (Py_ssize_t i = 0; i < n + 2; i++)
        made = made && args[i] != NULL;
    if (made)
        result = PyObject_Vectorcall(self->callback, args, n + 2, NULL);
    for (Py_ssize_t i = 0; i < n + 2; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        tell_error(self);
    return result;
}

/* <unicorn/unicorn.h> uc_cb_insn_out_t */
static void out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *args[5] = {PyLong_FromUnsignedLong(port), PyLong_FromLong(size),
                         PyLong_FromUnsignedLong(value)};
    Py_XDECREF(call((Hook *)user_data, uc, args, 3));
    PyGILState_Release(gil);
}

/* <unicorn/unicorn.h> uc_cb_insn_in_t */
static uint32_t in_hook(void *uc, uint32_t port, int size, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *args[4] = {PyLong_FromUnsignedLong(port), PyLong_FromLong(size)};
    Hook *self = (Hook *)user_data;
    PyObject *result = call(self, uc, args, 2);
    uint32_t value = 0;
    if (result != NULL) {
        value = (uint32_t)PyLong_AsUnsignedLongMask(result);
        Py_DECREF(result);
        if (PyErr_Occurred()) {   /* not an integer: as an exception from the callback */
            tell_error(self);
            value = 0;
        }
    }
    PyGILState_Release(gil);
    return value;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_insnhooks",
    "Unicorn's IN and OUT hooks in C for the tcg vCPU", -1, NULL,
};

PyMODINIT_FUNC PyInit__insnhooks(void) {
    if (PyType_Ready(&HookType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hook", (PyObject *)&HookType) < 0
        || PyModule_AddObject(m, "OUT", PyLong_FromVoidPtr((void *)out_hook)) < 0
        || PyModule_AddObject(m, "IN", PyLong_FromVoidPtr((void *)in_hook)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
