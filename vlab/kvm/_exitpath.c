/* The VM-exit fast path of VcpuFd.run(): KVM_RUN, then port-I/O exits decoded in C.
 *
 * Port I/O is the exit a run loop meets most, and decoding it in Python (one struct unpack,
 * the bounds checks, a dataclass __init__) costs as much per exit as the rest of vlab's loop.
 * Here the same checks as `exits.decode` run in C and the IoOut / IoIn object is filled
 * without calling Python code. Everything else, and any I/O exit whose fields fail a check,
 * is left to `exits.decode`, which names what is wrong: that module stays the reference, and
 * tests/unit/test_exits.py checks the two agree on hostile kvm_run contents.
 *
 *   run(fd, kvm_run_address, mapping_size, IoOut, IoIn) -> exit | None | -errno
 *   decode_io(kvm_run_address, mapping_size, IoOut, IoIn) -> exit | None
 *
 * None: not a well-formed port-I/O exit, decode it in Python. A negative int: KVM_RUN failed
 * with that errno (EINTR when interrupted); kvm_run is then not read at all, so a closed vCPU
 * (fd -1, mapping gone) fails with EBADF before any memory is touched.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>

static PyObject *name_port, *name_size, *name_count, *name_data, *name_data_offset;

static int set_field(PyObject *obj, PyObject *name, PyObject *value) {
    if (value == NULL)
        return -1;
    int status = PyObject_GenericSetAttr(obj, name, value);
    Py_DECREF(value);
    return status;
}

/* The arguments both functions end with: kvm_run's address, the mapping's size, the classes. */
struct exit_args {
    const struct kvm_run *run;
    unsigned long long mapping_size;
    PyTypeObject *io_out, *io_in;
};

static PyObject *decode(const struct exit_args *args) {
    const struct kvm_run *run = args->run;
    unsigned long long mapping_size = args->mapping_size;
    if (run->exit_reason != KVM_EXIT_IO)
        Py_RETURN_NONE;
    unsigned long long size = run->io.size, count = run->io.count;
    unsigned long long offset = run->io.data_offset, length = size * count;
    /* the checks of exits.decode: a guest-controlled field out of range goes to Python */
    if ((size != 1 && size != 2 && size != 4) || count < 1 || offset > mapping_size
            || length > mapping_size - offset || run->io.direction > KVM_EXIT_IO_OUT)
        Py_RETURN_NONE;
    int out = run->io.direction == KVM_EXIT_IO_OUT;
    PyTypeObject *type = out ? args->io_out : args->io_in;
    PyObject *exit = type->tp_alloc(type, 0);
    if (exit == NULL)
        return NULL;
    if (set_field(exit, name_port, PyLong_FromUnsignedLong(run->io.port)) < 0
            || set_field(exit, name_size, PyLong_FromUnsignedLongLong(size)) < 0
            || set_field(exit, name_count, PyLong_FromUnsignedLongLong(count)) < 0
            || (out ? set_field(exit, name_data, PyBytes_FromStringAndSize(
                                    (const char *)run + offset, (Py_ssize_t)length))
                    : set_field(exit, name_data_offset, PyLong_FromUnsignedLongLong(offset))) < 0) {
        Py_DECREF(exit);
        return NULL;
    }
    return exit;
}

static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                 struct exit_args *parsed) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", expected, nargs);
        return -1;
    }
    Py_ssize_t first = expected - 4;
    parsed->run = PyLong_AsVoidPtr(args[first]);
    parsed->mapping_size = PyLong_AsUnsignedLongLong(args[first + 1]);
    if (PyErr_Occurred())
        return -1;
    if (!PyType_Check(args[first + 2]) || !PyType_Check(args[first + 3])) {
        PyErr_SetString(PyExc_TypeError, "IoOut and IoIn must be classes");
        return -1;
    }
    if (parsed->mapping_size < sizeof(struct kvm_run)) {
        PyErr_SetString(PyExc_ValueError, "the mapping is smaller than struct kvm_run");
        return -1;
    }
    parsed->io_out = (PyTypeObject *)args[first + 2];
    parsed->io_in = (PyTypeObject *)args[first + 3];
    return 0;
}

static PyObject *exitpath_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    struct exit_args parsed;
    if (parse(args, nargs, 5, &parsed) < 0)
        return NULL;
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return NULL;
    }
    int status, error = 0;
    Py_BEGIN_ALLOW_THREADS
    status = ioctl((int)fd, KVM_RUN, 0);
    if (status < 0)
        error = errno;
    Py_END_ALLOW_THREADS
    if (status < 0)
        return PyLong_FromLong(-error);
    return decode(&parsed);
}

static PyObject *exitpath_decode_io(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    struct exit_args parsed;
    if (parse(args, nargs, 4, &parsed) < 0)
        return NULL;
    return decode(&parsed);
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))exitpath_run, METH_FASTCALL,
     "KVM_RUN, then a port-I/O exit decoded: exit, None (decode in Python) or -errno."},
    {"decode_io", (PyCFunction)(void (*)(void))exitpath_decode_io, METH_FASTCALL,
     "The port-I/O exit in a kvm_run, or None when it is not a well-formed one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exitpath",
                                    "The compiled VM-exit path of VcpuFd.run().", -1, methods};

PyMODINIT_FUNC PyInit__exitpath(void) {
    if (!(name_port = PyUnicode_InternFromString("port"))
            || !(name_size = PyUnicode_InternFromString("size"))
            || !(name_count = PyUnicode_InternFromString("count"))
            || !(name_data = PyUnicode_InternFromString("data"))
            || !(name_data_offset = PyUnicode_InternFromString("data_offset")))
        return NULL;
    return PyModule_Create(&module);
}
