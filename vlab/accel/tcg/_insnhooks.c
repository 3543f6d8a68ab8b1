/* Unicorn's IN and OUT hooks for the tcg vCPU, in C: the trampoline from the engine to Python.
 *
 * A ctypes callback costs about as much per `out` as the rest of an exit handled inside
 * emulation, and so do the RIP and CS reads the vCPU needs (where KVM would report the exit)
 * and the exit object made in Python. Here Unicorn calls C, which reads RIP and CS with
 * `uc_reg_read`, fills the `vlab.kvm.exits` object without running Python code, and calls
 * the vCPU's method:
 *
 *   callback(IoOut(port, size, 1, data), rip, cs)     -> ignored      (OUT)
 *   callback(IoIn(port, size, 1, 0), rip, cs)         -> value read   (IN)
 *
 * An exception raised by the callback goes to `on_error(exception)` (the engine keeps it and
 * stops emulation), as the ctypes trampolines in engine.py do. Nothing is linked against
 * Unicorn: the engine passes the address of `uc_reg_read` and the register numbers.
 *
 *   Hook(callback, on_error, uc_reg_read_address, rip_id, cs_id, exit_class)
 *   Hook.attach(inline, entry, vcpu, past_out, access_log)   or   Hook.attach(None)
 *   OUT, IN: the addresses of the two C hooks, for uc_hook_add with the Hook as user data.
 *
 * While attached, an access is first offered to `entry(inline, ...)`, the run loop's own
 * handling of one access in C (vlab/machine/_runloop.c, InlinePortIo), with RIP where KVM
 * reports it; what it leaves (0) goes to the callback as above. It is offered only where the
 * vCPU's Python method would dispatch it inline: not while single-stepping, an IN not while
 * an instruction is replayed (restart.py), an OUT only once its RIP past it is known
 * (`past_out`, filled by the vCPU's first dispatch of that instruction).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

typedef int (*reg_read_t)(void *uc, int regid, void *value);
typedef int (*inline_io_t)(PyObject *inline_io, int out, uint32_t port, int size,
                           uint32_t *value, uint64_t rip);

typedef struct {
    PyObject_HEAD
    PyObject *callback;
    PyObject *on_error;
    PyTypeObject *exit_class;
    reg_read_t reg_read;
    int rip_id, cs_id;
    PyObject *inline_io, *vcpu, *past_out, *access_log;   /* attached, or NULL */
    inline_io_t entry;
} Hook;

static PyObject *name_port, *name_size, *name_count, *name_data, *name_data_offset, *one, *zero,
                *name_single_step, *name_replaying;

/* A Hook refers to the vCPU (callback) and the engine (on_error), which keep it: the cyclic
 * collector must see through it. */
static int hook_traverse(Hook *self, visitproc visit, void *arg) {
    Py_VISIT(self->callback);
    Py_VISIT(self->on_error);
    Py_VISIT(self->exit_class);
    Py_VISIT(self->inline_io);
    Py_VISIT(self->vcpu);
    Py_VISIT(self->past_out);
    Py_VISIT(self->access_log);
    return 0;
}

static int hook_clear(Hook *self) {
    Py_CLEAR(self->callback);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->exit_class);
    Py_CLEAR(self->inline_io);
    Py_CLEAR(self->vcpu);
    Py_CLEAR(self->past_out);
    Py_CLEAR(self->access_log);
    return 0;
}

static void hook_dealloc(Hook *self) {
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int hook_init(Hook *self, PyObject *args, PyObject *kwds) {
    PyObject *callback, *on_error, *exit_class;
    unsigned long long reg_read;
    if (!PyArg_ParseTuple(args, "OOKiiO", &callback, &on_error, &reg_read, &self->rip_id,
                          &self->cs_id, &exit_class))
        return -1;
    if (!PyCallable_Check(callback) || !PyCallable_Check(on_error) || reg_read == 0
            || !PyType_Check(exit_class)) {
        PyErr_SetString(PyExc_TypeError,
                        "Hook(callback, on_error, uc_reg_read address, rip, cs, exit class)");
        return -1;
    }
    Py_INCREF(callback);
    Py_INCREF(on_error);
    Py_INCREF(exit_class);
    Py_XSETREF(self->callback, callback);
    Py_XSETREF(self->on_error, on_error);
    Py_XSETREF(self->exit_class, (PyTypeObject *)exit_class);
    self->reg_read = (reg_read_t)(uintptr_t)reg_read;
    return 0;
}

/* Sets `name` to `value` (a new reference, NULL if making it failed) and drops it. */
static int set_field(PyObject *obj, PyObject *name, PyObject *value, int borrowed) {
    if (value == NULL)
        return -1;
    int status = PyObject_GenericSetAttr(obj, name, value);
    if (!borrowed)
        Py_DECREF(value);
    return status;
}

/* The exit, port I/O of count 1: an OUT's data is `value`'s `size` bytes, an IN's offset 0. */
static PyObject *make_exit(Hook *self, uint32_t port, int size, int out, uint32_t value) {
    PyObject *exit = self->exit_class->tp_alloc(self->exit_class, 0);
    if (exit == NULL)
        return NULL;
    unsigned char data[4] = {value, value >> 8, value >> 16, value >> 24};
    if (size < 1 || size > 4
            || set_field(exit, name_port, PyLong_FromUnsignedLong(port), 0) < 0
            || set_field(exit, name_size, PyLong_FromLong(size), 0) < 0
            || set_field(exit, name_count, one, 1) < 0
            || (out ? set_field(exit, name_data,
                                PyBytes_FromStringAndSize((const char *)data, size), 0)
                    : set_field(exit, name_data_offset, zero, 1)) < 0) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "port access of %d bytes", size);
        Py_DECREF(exit);
        return NULL;
    }
    return exit;
}

static PyObject *hook_attach(Hook *self, PyObject *args) {
    PyObject *inline_io, *vcpu = NULL, *past_out = NULL, *access_log = NULL;
    unsigned long long entry = 0;
    if (!PyArg_ParseTuple(args, "O|KOO!O", &inline_io, &entry, &vcpu, &PyDict_Type, &past_out,
                          &access_log))
        return NULL;
    if (inline_io != Py_None && (entry == 0 || access_log == NULL)) {
        PyErr_SetString(PyExc_TypeError, "attach(inline, entry, vcpu, past_out, access_log)");
        return NULL;
    }
    Py_CLEAR(self->vcpu);
    Py_CLEAR(self->past_out);
    Py_CLEAR(self->access_log);
    Py_CLEAR(self->inline_io);
    if (inline_io != Py_None) {
        self->vcpu = Py_NewRef(vcpu);
        self->past_out = Py_NewRef(past_out);
        self->access_log = Py_NewRef(access_log);
        self->inline_io = Py_NewRef(inline_io);
        self->entry = (inline_io_t)(uintptr_t)entry;
    }
    Py_RETURN_NONE;
}

static PyMethodDef hook_methods[] = {
    {"attach", (PyCFunction)hook_attach, METH_VARARGS,
     "attach(inline, entry, vcpu, past_out, access_log): offer each access to entry first; "
     "attach(None): no more."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlab.accel.tcg._insnhooks.Hook",
    .tp_basicsize = sizeof(Hook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_doc = "A Python callback for Unicorn's IN or OUT hook, with RIP and CS",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hook_init,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_methods = hook_methods,
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

/* callback(exit, rip, cs); its result, or NULL after on_error has been told. */
static PyObject *call(Hook *self, void *uc, uint32_t port, int size, int out, uint32_t value) {
    uint64_t rip = 0, cs = 0;
    self->reg_read(uc, self->rip_id, &rip);
    self->reg_read(uc, self->cs_id, &cs);
    PyObject *args[3] = {make_exit(self, port, size, out, value),
                         PyLong_FromUnsignedLongLong(rip), PyLong_FromUnsignedLongLong(cs & 0xFFFF)};
    PyObject *result = NULL;
    if (args[0] != NULL && args[1] != NULL && args[2] != NULL)
        result = PyObject_Vectorcall(self->callback, args, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        tell_error(self);
    return result;
}

static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    int truth = value ? PyObject_IsTrue(value) : -1;
    Py_XDECREF(value);
    return truth;
}

/* The attached handling of this access: 1 done (an IN's answer in *value), 0 the callback's,
 * -1 after on_error has been told. */
static int offer(Hook *self, void *uc, uint32_t port, int size, int out, uint32_t *value) {
    if (self->inline_io == NULL)
        return 0;
    int refused = attr_true(self->vcpu, name_single_step);
    if (!refused && !out)
        refused = attr_true(self->access_log, name_replaying);
    if (refused)
        return refused < 0 ? (tell_error(self), -1) : 0;
    uint64_t rip = 0, cs = 0;
    self->reg_read(uc, self->rip_id, &rip);
    if (out) {   /* KVM reports an OUT past it: known once the vCPU has decoded it */
        self->reg_read(uc, self->cs_id, &cs);
        PyObject *key = Py_BuildValue("(KK)", (unsigned long long)rip,
                                      (unsigned long long)(cs & 0xFFFF));
        PyObject *past = key ? PyDict_GetItemWithError(self->past_out, key) : NULL;
        Py_XDECREF(key);
        if (past == NULL)
            return PyErr_Occurred() ? (tell_error(self), -1) : 0;
        rip = PyLong_AsUnsignedLongLong(past);
        if (PyErr_Occurred())
            return tell_error(self), -1;
    }
    int done = self->entry(self->inline_io, out, port, size, value, rip);
    if (done < 0)
        tell_error(self);
    return done;
}

/* <unicorn/unicorn.h> uc_cb_insn_out_t */
static void out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    if (offer((Hook *)user_data, uc, port, size, 1, &value) == 0)
        Py_XDECREF(call((Hook *)user_data, uc, port, size, 1, value));
    PyGILState_Release(gil);
}

/* <unicorn/unicorn.h> uc_cb_insn_in_t */
static uint32_t in_hook(void *uc, uint32_t port, int size, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    Hook *self = (Hook *)user_data;
    uint32_t value = 0;
    int done = offer(self, uc, port, size, 0, &value);
    if (done) {
        PyGILState_Release(gil);
        return done < 0 ? 0 : value;
    }
    PyObject *result = call(self, uc, port, size, 0, 0);
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
    if (!(name_port = PyUnicode_InternFromString("port"))
            || !(name_size = PyUnicode_InternFromString("size"))
            || !(name_count = PyUnicode_InternFromString("count"))
            || !(name_data = PyUnicode_InternFromString("data"))
            || !(name_data_offset = PyUnicode_InternFromString("data_offset"))
            || !(name_single_step = PyUnicode_InternFromString("_single_step"))
            || !(name_replaying = PyUnicode_InternFromString("replaying"))
            || !(one = PyLong_FromLong(1)) || !(zero = PyLong_FromLong(0))
            || PyType_Ready(&HookType) < 0)
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
