/* The compiled run loop: `VcpuRunner.run()`'s loop for a KVM vCPU, and ExitLog's rows.
 *
 * runloop.py's `VcpuRunner._run_python` is the reference a learner reads; this file does the
 * same per exit without entering Python for the common exits, and
 * tests/kvm/test_runloop_compiled.py holds the two to the same records, device effects and
 * stop reasons. Per exit: KVM_RUN (the GIL released, and taken back only by an exit that
 * needs a Python object), its duration, KVM's counters from the binary stats fd (one
 * pread), then
 *   - port I/O to a port no device claims, an OUT to the debug console, and the 16550's
 *     polling (an LSR read, a THR write) while it has no interrupt, loopback or divisor
 *     latch on: handled here, a row written to the log (exitlog.py's ROW layout), the stop
 *     conditions checked;
 *   - EINTR: an `Interrupted` row, as the Python loop records it;
 *   - anything else (other devices, MMIO, HLT, DEBUG...), or counters that moved more than
 *     a row holds: `slow(duration, before, after, exits, interrupted)`, the Python loop's
 *     own handling of the exit in kvm_run.
 * A byte for the console is appended to its chunks as Console.write does, or, while it has
 * listeners (a terminal streaming it, a widget), passed to Console.write itself.
 *
 *   run(state tuple) -> (code, value, exits, last_seq, counters)
 *   append(log, record) -> bool     ExitLog.append for a record that fits a row whole
 *   setup(IoOut, IoIn, MmioRead, MmioWrite, Hlt, Interrupted)
 *   InlinePortIo(...)               the same handling for one access inside tcg's emulation
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNTERS 14
#define DELTA_MAX 0xFFFF
#define GENERATION 255   /* ExitLog._counts[255]: bumped when _rows or _latest are replaced */
#define FIRST_SEEN 256   /* ExitLog._counts[256 + kind]: the seq of that kind's first exit */

/* exitlog.py: ROW = struct.Struct("<QQQfHHBBBx14H") */
#pragma pack(push, 1)
struct row {
    uint64_t rip, address, value;
    float duration_s;
    uint16_t vcpu, device;
    uint8_t kind, size, flags, pad;
    uint16_t deltas[MAX_COUNTERS];
};
#pragma pack(pop)
_Static_assert(sizeof(struct row) == 64, "a row is 64 bytes");

enum { IO_OUT = 1, IO_IN = 2, MMIO_READ = 3, MMIO_WRITE = 4, HLT = 5, INTR = 6 };
enum { CLAIMED = 1, HAS_COUNTERS = 2 };
/* port table (runloop.py's _port_table) */
enum { PORT_PYTHON = 0, PORT_UNCLAIMED = 1, PORT_DEBUGCON = 2, PORT_UART = 3 };
/* uart16550.py's registers and bits */
enum { UART_TX = 0, UART_LSR = 5, LCR_DLAB = 0x80, MCR_LOOP = 0x10, LSR_OE = 0x02,
       LSR_BI = 0x10, LSR_THRE_TEMT = 0x60 };
/* how run() ended */
enum { STOP_REQUESTED = 1, STOP_SLOW = 2, STOP_UNTIL = 3, STOP_PREDICATE = 4,
       STOP_MAX_EXITS = 5, STOP_ERRNO = 6 };

static PyTypeObject *cls[7];   /* indexed by kind: IoOut .. Interrupted */
static PyObject *s_rows, *s_counts, *s_keep, *s_latest, *s_device_number, *s_grow, *s_cell,
                *s_seq, *s_vcpu, *s_exit, *s_rip, *s_device, *s_claimed, *s_duration_s,
                *s_counters_before, *s_counters_after, *s_kernel_events, *s_port, *s_size,
                *s_count, *s_data, *s_data_offset, *s_address, *s_length, *s_last,
                *s_announce, *s_listeners, *s_lcr, *s_ier, *s_mcr, *s_lsr, *s_thr,
                *s_thr_ipending, *s_irq_level;

/* -- the log's buffers ------------------------------------------------------------------ */

struct log_view {
    PyObject *log;
    Py_buffer rows, counts, latest;   /* latest: the vCPU's counters after its last exit */
    int have_rows, have_counts, have_latest;
    unsigned long long keep, generation;
};

static void log_release(struct log_view *lv) {
    if (lv->have_rows) PyBuffer_Release(&lv->rows);
    if (lv->have_counts) PyBuffer_Release(&lv->counts);
    if (lv->have_latest) PyBuffer_Release(&lv->latest);
    lv->have_rows = lv->have_counts = lv->have_latest = 0;
}

static int get_buffer(PyObject *owner, PyObject *name, Py_buffer *view, int *have) {
    PyObject *obj = PyObject_GetAttr(owner, name);
    if (obj == NULL)
        return -1;
    int status = PyObject_GetBuffer(obj, view, PyBUF_WRITABLE);
    Py_DECREF(obj);
    if (status == 0)
        *have = 1;
    return status;
}

/* Take the log's buffers (again: after any Python code, which may have replaced them). With
 * `vcpu` >= 0 also its latest counters, which must then exist. */
static int log_acquire(struct log_view *lv, long vcpu) {
    log_release(lv);
    if (get_buffer(lv->log, s_rows, &lv->rows, &lv->have_rows) < 0
            || get_buffer(lv->log, s_counts, &lv->counts, &lv->have_counts) < 0)
        return -1;
    PyObject *keep = PyObject_GetAttr(lv->log, s_keep);
    if (keep == NULL)
        return -1;
    lv->keep = PyLong_AsUnsignedLongLong(keep);
    Py_DECREF(keep);
    if (PyErr_Occurred())
        return -1;
    lv->generation = ((uint64_t *)lv->counts.buf)[GENERATION];
    if (vcpu >= 0) {
        PyObject *latest = PyObject_GetAttr(lv->log, s_latest);
        if (latest == NULL)
            return -1;
        PyObject *key = PyLong_FromLong(vcpu);
        PyObject *array = key ? PyDict_GetItemWithError(latest, key) : NULL;
        Py_XDECREF(key);
        int status = -1;
        if (array != NULL) {
            status = PyObject_GetBuffer(array, &lv->latest, PyBUF_WRITABLE);
            lv->have_latest = status == 0;
        } else if (!PyErr_Occurred()) {
            status = 0;   /* no counters for this vCPU (yet): rows without them */
        }
        Py_DECREF(latest);
        return status;
    }
    return 0;
}

/* The next row, its seq in *seq; NULL with an exception set if the log could not grow. */
static struct row *log_next(struct log_view *lv, long vcpu, unsigned long long *seq) {
    uint64_t *counts = lv->counts.buf;
    *seq = counts[0] + 1;
    unsigned long long index = (*seq - 1) % lv->keep;
    if ((index + 1) * sizeof(struct row) > (unsigned long long)lv->rows.len) {
        PyObject *done = PyObject_CallMethodNoArgs(lv->log, s_grow);
        if (done == NULL)
            return NULL;
        Py_DECREF(done);
        if (log_acquire(lv, vcpu) < 0)
            return NULL;
    }
    return (struct row *)lv->rows.buf + index;
}

static void log_commit(struct log_view *lv, unsigned long long seq, int kind) {
    uint64_t *counts = lv->counts.buf;
    if (counts[kind] == 0)
        counts[FIRST_SEEN + kind] = seq;
    counts[kind] += 1;
    /* the row is written before the total that shows it: a thread holding the GIL may be
     * reading the log while run() writes it without */
    __atomic_store_n(&counts[0], seq, __ATOMIC_RELEASE);
}

/* -- append(log, record) ---------------------------------------------------------------- */

static int as_u64(PyObject *obj, unsigned long long *value) {
    *value = PyLong_AsUnsignedLongLong(obj);
    if (*value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

static int attr_u64(PyObject *obj, PyObject *name, unsigned long long *value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return -1;
    }
    int status = as_u64(v, value);
    Py_DECREF(v);
    return status;
}

/* The row fields of an exit a row holds whole (exitlog.py's _row_fields); -1 if it does not. */
static int exit_fields(PyObject *exit, int *kind, unsigned long long *address,
                       unsigned long long *value, unsigned long long *size) {
    PyTypeObject *type = Py_TYPE(exit);
    *address = *value = *size = 0;
    for (*kind = IO_OUT; *kind <= INTR; ++*kind)
        if (type == cls[*kind])
            break;
    if (*kind > INTR)
        return -1;
    if (*kind == HLT || *kind == INTR)
        return 0;
    if (*kind == IO_OUT || *kind == IO_IN) {
        unsigned long long count;
        if (attr_u64(exit, s_port, address) < 0 || attr_u64(exit, s_size, size) < 0
                || attr_u64(exit, s_count, &count) < 0 || count != 1)
            return -1;
        if (*kind == IO_IN)
            return attr_u64(exit, s_data_offset, value);
    } else {
        if (attr_u64(exit, s_address, address) < 0 || attr_u64(exit, s_length, size) < 0
                || *size > 0xFF)
            return -1;
        if (*kind == MMIO_READ)
            return 0;
    }
    PyObject *data = PyObject_GetAttr(exit, s_data);
    if (data == NULL) {
        PyErr_Clear();
        return -1;
    }
    int status = -1;
    if (PyBytes_Check(data) && (unsigned long long)PyBytes_GET_SIZE(data) == *size && *size <= 8) {
        const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(data);
        for (unsigned long long i = 0; i < *size; i++)
            *value |= (unsigned long long)bytes[i] << (8 * i);
        status = 0;
    }
    Py_DECREF(data);
    return status;
}

/* before/after of a record, as deltas; 0: none; 1: deltas; -1: not for a row (Python's path) */
static int record_deltas(PyObject *before, PyObject *after, const Py_buffer *latest,
                         uint16_t deltas[MAX_COUNTERS], uint64_t values[MAX_COUNTERS]) {
    if (before == Py_None || after == Py_None)
        return 0;
    if (!PyTuple_Check(before) || !PyTuple_Check(after) || latest == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(after);
    if (n > MAX_COUNTERS || PyTuple_GET_SIZE(before) != n
            || latest->len != (Py_ssize_t)(n * sizeof(uint64_t)))
        return -1;
    const uint64_t *previous = latest->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long b, a;
        if (as_u64(PyTuple_GET_ITEM(before, i), &b) < 0 || as_u64(PyTuple_GET_ITEM(after, i), &a) < 0
                || b != previous[i] || a < b || a - b > DELTA_MAX)
            return -1;
        deltas[i] = (uint16_t)(a - b);
        values[i] = a;
    }
    return 1;
}

static PyObject *runloop_append(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "append(log, record)");
        return NULL;
    }
    PyObject *log = args[0], *record = args[1];
    PyObject *exit = NULL, *events = NULL, *device = NULL, *numbers = NULL, *before = NULL,
             *after = NULL, *rip = NULL, *duration = NULL, *claimed = NULL;
    PyObject *result = Py_False;
    unsigned long long vcpu;
    struct log_view lv = {.log = log};
    if (attr_u64(record, s_vcpu, &vcpu) < 0 || vcpu > 0xFFFF)
        goto done;
    if (!(exit = PyObject_GetAttr(record, s_exit)) || !(events = PyObject_GetAttr(record, s_kernel_events))
            || !(device = PyObject_GetAttr(record, s_device))
            || !(numbers = PyObject_GetAttr(log, s_device_number))
            || !(before = PyObject_GetAttr(record, s_counters_before))
            || !(after = PyObject_GetAttr(record, s_counters_after))
            || !(rip = PyObject_GetAttr(record, s_rip)) || !(duration = PyObject_GetAttr(record, s_duration_s))
            || !(claimed = PyObject_GetAttr(record, s_claimed)))
        goto failed;
    int truth = PyObject_IsTrue(events);
    if (truth != 0)
        goto failed_or_python;
    PyObject *number = PyDict_GetItemWithError(numbers, device);
    if (number == NULL)
        goto failed_or_python;
    unsigned long long device_number, rip_value, address, value, size;
    int kind;
    if (as_u64(number, &device_number) < 0 || as_u64(rip, &rip_value) < 0
            || exit_fields(exit, &kind, &address, &value, &size) < 0)
        goto done;
    double seconds = PyFloat_AsDouble(duration);
    int is_claimed = PyObject_IsTrue(claimed);
    if ((seconds == -1.0 && PyErr_Occurred()) || is_claimed < 0)
        goto failed;
    if (log_acquire(&lv, before != Py_None && after != Py_None ? (long)vcpu : -1) < 0)
        goto failed;
    uint16_t deltas[MAX_COUNTERS] = {0};
    uint64_t values[MAX_COUNTERS];
    int measured = record_deltas(before, after, lv.have_latest ? &lv.latest : NULL, deltas, values);
    if (measured < 0)
        goto done;
    unsigned long long seq = ((uint64_t *)lv.counts.buf)[0] + 1;
    if (((seq - 1) % lv.keep + 1) * sizeof(struct row) > (unsigned long long)lv.rows.len)
        goto done;   /* Python grows the rows */
    PyObject *seq_obj = PyLong_FromUnsignedLongLong(seq);
    if (seq_obj == NULL || PyObject_SetAttr(record, s_seq, seq_obj) < 0) {
        Py_XDECREF(seq_obj);
        goto failed;
    }
    Py_DECREF(seq_obj);
    struct row *row = (struct row *)lv.rows.buf + (seq - 1) % lv.keep;
    *row = (struct row){.rip = rip_value, .address = address, .value = value,
                        .duration_s = (float)seconds, .vcpu = (uint16_t)vcpu,
                        .device = (uint16_t)device_number, .kind = (uint8_t)kind,
                        .size = (uint8_t)size,
                        .flags = (is_claimed ? CLAIMED : 0) | (measured ? HAS_COUNTERS : 0)};
    if (measured) {
        memcpy(row->deltas, deltas, sizeof deltas);
        memcpy(lv.latest.buf, values, lv.latest.len);
    }
    log_commit(&lv, seq, kind);
    result = Py_True;
    goto done;
failed_or_python:
    if (!PyErr_Occurred())
        goto done;
failed:
    result = NULL;
done:
    log_release(&lv);
    Py_XDECREF(exit); Py_XDECREF(events); Py_XDECREF(device); Py_XDECREF(numbers);
    Py_XDECREF(before); Py_XDECREF(after); Py_XDECREF(rip); Py_XDECREF(duration);
    Py_XDECREF(claimed);
    if (result == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();   /* not an ExitRecord as a row takes it: Python's path says why */
        result = Py_False;
    }
    Py_XINCREF(result);
    return result;
}

/* -- run(state) ----------------------------------------------------------------------- */

struct loop {
    int fd;
    struct kvm_run *run;
    unsigned long long mapping_size;
    int stats_fd;
    long long stats_offset;
    Py_ssize_t stats_length;
    unsigned char *stats_block;
    uint32_t offsets[MAX_COUNTERS];
    int ncounters;
    uint64_t previous[MAX_COUNTERS], current[MAX_COUNTERS];
    const unsigned char *ports;        /* 65536 port codes */
    PyObject *debugcon_data;           /* the debug console's bytearray */
    PyObject *uart;                    /* the 16550 handled here */
    unsigned uart_base;
    struct sink { PyObject *write, *chunks, *listeners; } debugcon_out, uart_out;
    PyObject *predicate, *slow, *listeners;
    Py_buffer stop_cell;               /* StopFlag.cell: nonzero once stop() was asked */
    PyThreadState *released;           /* while the loop runs without the GIL */
    double signals_checked;
    unsigned long long max_exits, exits;
    unsigned until_kinds;              /* bit per kind: `until` matches it */
    long vcpu;
    uint16_t debugcon_number, unassigned_number, uart_number;
    struct log_view lv;
};

/* The GIL: let go for KVM_RUN and kept away after it for as long as the exits need no
 * Python object (a port nobody claims: its row is plain memory in buffers this loop holds);
 * taken back by `hold` before anything that does. Other threads (a widget's poller, the
 * thread waiting on the vCPUs) then run without taking it from the loop at every exit. */
static void let_go(struct loop *l) {
    if (l->released == NULL)
        l->released = PyEval_SaveThread();
}

static void hold(struct loop *l) {
    if (l->released != NULL) {
        PyEval_RestoreThread(l->released);
        l->released = NULL;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}


/* A device's byte out: Console.write's append, or the call itself while it has listeners. */
static int emit(struct sink *out, char byte) {
    if (out->write == Py_None)
        return 0;
    PyObject *data = PyBytes_FromStringAndSize(&byte, 1);   /* CPython's cached 1-byte bytes */
    if (data == NULL)
        return -1;
    int status;
    if (PyList_GET_SIZE(out->listeners)) {
        PyObject *done = PyObject_CallOneArg(out->write, data);
        status = done ? 0 : -1;
        Py_XDECREF(done);
    } else {
        status = PyList_Append(out->chunks, data);
    }
    Py_DECREF(data);
    return status;
}

static int sink_arg(PyObject *arg, struct sink *out) {
    if (!PyTuple_Check(arg) || PyTuple_GET_SIZE(arg) != 3
            || !PyList_Check(PyTuple_GET_ITEM(arg, 1)) || !PyList_Check(PyTuple_GET_ITEM(arg, 2))) {
        PyErr_SetString(PyExc_TypeError, "run(): an output is (write, chunks, listeners)");
        return -1;
    }
    *out = (struct sink){PyTuple_GET_ITEM(arg, 0), PyTuple_GET_ITEM(arg, 1), PyTuple_GET_ITEM(arg, 2)};
    return 0;
}

static int attr_long(PyObject *obj, PyObject *name, long *value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *value = PyLong_AsLong(v);
    Py_DECREF(v);
    return *value == -1 && PyErr_Occurred() ? -1 : 0;
}

static int set_attr(PyObject *obj, PyObject *name, PyObject *value) {
    if (value == NULL)
        return -1;
    int status = PyObject_SetAttr(obj, name, value);
    Py_DECREF(value);
    return status;
}

/* The 16550 polled: an LSR read or a THR write of one byte, done here when it has no effect
 * beyond the register (Uart16550._read_register, _transmit): no interrupt enabled or raised,
 * no loopback, no divisor latch, THR empty, no error bits to clear. 1: done; 0: Python's. */
static int uart_polled(struct loop *l, int kind, unsigned port, unsigned size,
                       unsigned long long data, unsigned char *io_data) {
    unsigned reg = port - l->uart_base;
    if (size != 1 || !((reg == UART_LSR && kind == IO_IN) || (reg == UART_TX && kind == IO_OUT)))
        return 0;
    long lcr, ier, mcr, lsr;
    if (attr_long(l->uart, s_lcr, &lcr) < 0 || attr_long(l->uart, s_ier, &ier) < 0
            || attr_long(l->uart, s_mcr, &mcr) < 0 || attr_long(l->uart, s_lsr, &lsr) < 0)
        return -1;
    if ((lcr & LCR_DLAB) || ier || (mcr & MCR_LOOP) || (lsr & LSR_THRE_TEMT) != LSR_THRE_TEMT
            || (lsr & (LSR_OE | LSR_BI)))
        return 0;
    PyObject *level = PyObject_GetAttr(l->uart, s_irq_level);
    int raised = level ? PyObject_IsTrue(level) : -1;
    Py_XDECREF(level);
    if (raised)
        return raised < 0 ? -1 : 0;
    if (kind == IO_IN) {
        io_data[0] = (unsigned char)lsr;
        return 1;
    }
    /* sent at once: THR empty again, its interrupt pending (masked, as IER is 0) */
    if (set_attr(l->uart, s_thr, PyLong_FromUnsignedLongLong(data & 0xFF)) < 0
            || PyObject_SetAttr(l->uart, s_thr_ipending, Py_True) < 0
            || emit(&l->uart_out, (char)(data & 0xFF)) < 0)
        return -1;
    return 1;
}

/* An exit of a port handled here: the device's effect, its number and whether it claimed
 * the access. 1: done; 0: Python's; -1: error. */
static int port_io(struct loop *l, int port_code, int kind, unsigned port, unsigned size,
                   unsigned long long data, unsigned char *io_data, uint16_t *device,
                   int *claimed) {
    *device = 0;
    *claimed = 1;
    if (port_code == PORT_UNCLAIMED) {
        *claimed = 0;   /* a write nobody claims is dropped */
        if (kind == IO_IN) {
            /* a read nobody claims floats high: all-ones (QEMU's unassigned_io_ops) */
            memset(io_data, 0xFF, size);
            *device = l->unassigned_number;
        }
        return 1;
    }
    if (port_code == PORT_DEBUGCON && kind == IO_OUT) {
        /* isa-debugcon: the low byte, into the device's bytes and (batched) its output */
        Py_ssize_t n = PyByteArray_GET_SIZE(l->debugcon_data);
        if (PyByteArray_Resize(l->debugcon_data, n + 1) < 0)
            return -1;
        PyByteArray_AS_STRING(l->debugcon_data)[n] = (char)(data & 0xFF);
        *device = l->debugcon_number;
        return emit(&l->debugcon_out, (char)(data & 0xFF)) < 0 ? -1 : 1;
    }
    if (port_code == PORT_UART) {
        *device = l->uart_number;
        return uart_polled(l, kind, port, size, data, io_data);
    }
    return 0;
}

/* Before Python code runs: the log's buffers let go (it may replace them). After it: the
 * buffers again. */
static int leave(struct loop *l) {
    log_release(&l->lv);
    return 0;
}

static int back(struct loop *l) {
    return log_acquire(&l->lv, l->ncounters ? l->vcpu : -1);
}

static PyObject *counters_tuple(const uint64_t *values, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t != NULL && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
        if (v == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* Read the counters into l->current; the deltas since l->previous into `deltas`.
 * 1: they fit a row; 0: one does not; -1: error (exception set). */
static int read_counters(struct loop *l, uint16_t deltas[MAX_COUNTERS]) {
    if (l->ncounters == 0)
        return 1;
    ssize_t got = pread(l->stats_fd, l->stats_block, l->stats_length, l->stats_offset);
    if (got != l->stats_length) {
        int error = got < 0 ? errno : EIO;   /* EIO: the stats fd read short */
        hold(l);
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int fits = 1;
    for (int i = 0; i < l->ncounters; i++) {
        uint64_t value;
        memcpy(&value, l->stats_block + l->offsets[i], sizeof value);
        l->current[i] = value;
        uint64_t delta = value - l->previous[i];
        if (value < l->previous[i] || delta > DELTA_MAX)
            fits = 0;
        deltas[i] = (uint16_t)delta;
    }
    return fits;
}

/* A row for an exit handled here, RIP as the exit reports it; its seq in *seq. */
static int record_row(struct loop *l, uint64_t rip, double duration, int kind,
                      unsigned long long address, unsigned long long value, unsigned size,
                      uint16_t device, int claimed, const uint16_t deltas[MAX_COUNTERS],
                      unsigned long long *seq) {
    if (((uint64_t *)l->lv.counts.buf)[GENERATION] != l->lv.generation) {
        hold(l);   /* another thread grew or cleared the log meanwhile */
        if (back(l) < 0)
            return -1;
    }
    unsigned long long index = ((uint64_t *)l->lv.counts.buf)[0] % l->lv.keep;
    if ((index + 1) * sizeof(struct row) > (unsigned long long)l->lv.rows.len)
        hold(l);   /* log_next grows the rows */
    struct row *row = log_next(&l->lv, l->ncounters ? l->vcpu : -1, seq);
    if (row == NULL)
        return -1;
    *row = (struct row){.rip = rip, .address = address, .value = value,
                        .duration_s = (float)duration, .vcpu = (uint16_t)l->vcpu,
                        .device = device, .kind = (uint8_t)kind, .size = (uint8_t)size,
                        .flags = (claimed ? CLAIMED : 0) | (l->ncounters ? HAS_COUNTERS : 0)};
    if (l->ncounters) {
        memcpy(row->deltas, deltas, l->ncounters * sizeof deltas[0]);
        if (l->lv.have_latest)
            memcpy(l->lv.latest.buf, l->current, l->ncounters * sizeof(uint64_t));
        memcpy(l->previous, l->current, l->ncounters * sizeof(uint64_t));
    }
    log_commit(&l->lv, *seq, kind);
    return 0;
}

/* The Python loop's handling of this exit; its stop reason (a new reference), or Py_None. */
static PyObject *call_slow(struct loop *l, double duration, int interrupted) {
    if (leave(l) < 0)
        return NULL;
    PyObject *before = counters_tuple(l->previous, l->ncounters);
    PyObject *after = counters_tuple(l->current, l->ncounters);
    PyObject *result = NULL;
    if (before && after) {
        PyObject *args[] = {PyFloat_FromDouble(duration), l->ncounters ? before : Py_None,
                            l->ncounters ? after : Py_None, PyLong_FromUnsignedLongLong(l->exits),
                            interrupted ? Py_True : Py_False};
        if (args[0] && args[3]) {
            /* returns (stop reason or None, exits) */
            PyObject *pair = PyObject_Vectorcall(l->slow, args, 5, NULL);
            if (pair != NULL && PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2) {
                l->exits = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(pair, 1));
                if (!PyErr_Occurred()) {
                    result = PyTuple_GET_ITEM(pair, 0);
                    Py_INCREF(result);
                }
            } else if (pair != NULL) {
                PyErr_SetString(PyExc_TypeError, "slow() must return (stop reason, exits)");
            }
            Py_XDECREF(pair);
        }
        Py_XDECREF(args[0]);
        Py_XDECREF(args[3]);
    }
    Py_XDECREF(before);
    Py_XDECREF(after);
    memcpy(l->previous, l->current, l->ncounters * sizeof(uint64_t));
    if (result != NULL && back(l) < 0)
        Py_CLEAR(result);
    return result;
}

/* After an exit handled here: listeners, then the stop conditions in the Python loop's
 * order (`until`, the predicate, max_exits). 0: go on; a STOP_* code; -1: error. */
static int after_fast_exit(struct loop *l, int kind) {
    if (PyList_GET_SIZE(l->listeners)) {
        hold(l);
        if (leave(l) < 0)
            return -1;
        PyObject *done = PyObject_CallMethodNoArgs(l->lv.log, s_announce);
        if (done == NULL)
            return -1;
        Py_DECREF(done);
        if (back(l) < 0)
            return -1;
    }
    if (kind == INTR)
        return 0;   /* a kick, not an exit the guest caused */
    l->exits++;
    if (l->until_kinds & (1u << kind))
        return STOP_UNTIL;
    if (l->predicate != Py_None) {
        hold(l);
        if (leave(l) < 0)
            return -1;
        PyObject *last = PyObject_GetAttr(l->lv.log, s_last);
        PyObject *matched = last ? PyObject_CallOneArg(l->predicate, last) : NULL;
        Py_XDECREF(last);
        int truth = matched ? PyObject_IsTrue(matched) : -1;
        Py_XDECREF(matched);
        if (truth < 0 || back(l) < 0)
            return -1;
        if (truth)
            return STOP_PREDICATE;
    }
    if (l->max_exits && l->exits >= l->max_exits)
        return STOP_MAX_EXITS;
    return 0;
}

/* The loop; its result tuple's first two items in *code and *value (a new reference). It
 * returns with the GIL however it ends. */
static int loop_exits(struct loop *l, int first_slow, int *code, PyObject **value,
                      unsigned long long *last_seq) {
    uint16_t deltas[MAX_COUNTERS] = {0};
    *value = NULL;
    for (;;) {
        double started = now();
        /* a signal that came between two KVM_RUNs: its Python handler (Ctrl-C's stops the
         * run) runs now, as it would between two bytecodes of the Python loop; while the loop
         * runs without the GIL, within a millisecond */
        if (l->released == NULL || started - l->signals_checked > 1e-3) {
            hold(l);
            if (PyErr_CheckSignals() < 0)
                return -1;
            l->signals_checked = started;
        }
        if (((volatile const unsigned char *)l->stop_cell.buf)[0])
            return *code = STOP_REQUESTED, 0;
        let_go(l);
        int status = ioctl(l->fd, KVM_RUN, 0), error = status < 0 ? errno : 0;
        double duration = now() - started;
        if (status < 0 && error != EINTR && error != EAGAIN) {
            hold(l);
            *code = STOP_ERRNO;
            *value = PyLong_FromLong(error);
            return *value ? 0 : -1;
        }
        int fits = read_counters(l, deltas);
        if (fits < 0)
            return -1;
        int kind = 0, port_code = PORT_PYTHON;
        unsigned long long address = 0, data = 0;
        unsigned size = 0;
        const struct kvm_run *run = l->run;
        if (status < 0) {
            l->run->immediate_exit = 0;
            hold(l);
            if (leave(l) < 0 || PyErr_CheckSignals() < 0 || back(l) < 0)
                return -1;
            kind = INTR;
        } else if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1
                   && (run->io.size == 1 || run->io.size == 2 || run->io.size == 4)
                   && run->io.data_offset <= l->mapping_size - run->io.size
                   && run->io.direction <= KVM_EXIT_IO_OUT) {
            port_code = l->ports[run->io.port];
            kind = run->io.direction == KVM_EXIT_IO_OUT ? IO_OUT : IO_IN;
            address = run->io.port;
            size = run->io.size;
            unsigned char *bytes = (unsigned char *)run + run->io.data_offset;
            if (kind == IO_OUT) {
                for (unsigned i = 0; i < size; i++)
                    data |= (unsigned long long)bytes[i] << (8 * i);
            } else {
                data = run->io.data_offset;
            }
        }
        uint16_t device = 0;
        int claimed = 1, fast = fits && !first_slow && kind != 0;
        if (fast && kind != INTR && port_code != PORT_UNCLAIMED)
            hold(l);   /* the device is a Python object */
        if (fast && kind != INTR)
            fast = port_io(l, port_code, kind, run->io.port, size, data,
                           (unsigned char *)l->run + run->io.data_offset, &device, &claimed);
        if (fast < 0)
            return -1;
        first_slow = 0;
        if (!fast) {
            hold(l);
            PyObject *reason = call_slow(l, duration, status < 0);
            if (reason == NULL)
                return -1;
            *last_seq = 0;
            if (reason != Py_None) {
                *code = STOP_SLOW;
                *value = reason;
                return 0;
            }
            Py_DECREF(reason);
            continue;
        }
        if (record_row(l, run->s.regs.regs.rip, duration, kind, address, data, size, device,
                       claimed, deltas, last_seq) < 0)
            return -1;
        int ended = after_fast_exit(l, kind);
        if (ended)
            return ended < 0 ? -1 : (*code = ended, 0);
    }
}

static int loop(struct loop *l, int first_slow, int *code, PyObject **value,
                unsigned long long *last_seq) {
    int status = loop_exits(l, first_slow, code, value, last_seq);
    hold(l);
    return status;
}

static int u64_arg(PyObject *obj, unsigned long long *value) {
    *value = PyLong_AsUnsignedLongLong(obj);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *runloop_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    enum { FD, RUN, MAPPING_SIZE, STATS_FD, STATS_OFFSET, STATS_LENGTH, OFFSETS, PREVIOUS,
           PORTS, DEBUGCON_DATA, DEBUGCON_OUTPUT, UART, UART_OUTPUT, UART_BASE, LOG, STOP_FLAG,
           MAX_EXITS, UNTIL_KINDS, PREDICATE, SLOW, EXITS, VCPU, DEBUGCON_NUMBER,
           UNASSIGNED_NUMBER, UART_NUMBER, FIRST_SLOW, NARGS };
    if (nargs != NARGS) {
        PyErr_Format(PyExc_TypeError, "run() takes %d arguments, got %zd", NARGS, nargs);
        return NULL;
    }
    struct loop *l = PyMem_Calloc(1, sizeof *l);
    if (l == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL, *value = NULL;
    unsigned long long fd, address, stats_length, until, vcpu, debugcon, unassigned, first,
                       uart_base, uart_number;
    long long stats_fd;
    if (u64_arg(args[FD], &fd) < 0 || u64_arg(args[RUN], &address) < 0
            || u64_arg(args[MAPPING_SIZE], &l->mapping_size) < 0
            || (stats_fd = PyLong_AsLongLong(args[STATS_FD]), PyErr_Occurred())
            || (l->stats_offset = PyLong_AsLongLong(args[STATS_OFFSET]), PyErr_Occurred())
            || u64_arg(args[STATS_LENGTH], &stats_length) < 0
            || u64_arg(args[MAX_EXITS], &l->max_exits) < 0 || u64_arg(args[UNTIL_KINDS], &until) < 0
            || u64_arg(args[EXITS], &l->exits) < 0 || u64_arg(args[VCPU], &vcpu) < 0
            || u64_arg(args[DEBUGCON_NUMBER], &debugcon) < 0
            || u64_arg(args[UNASSIGNED_NUMBER], &unassigned) < 0
            || u64_arg(args[UART_BASE], &uart_base) < 0 || u64_arg(args[UART_NUMBER], &uart_number) < 0
            || u64_arg(args[FIRST_SLOW], &first) < 0)
        goto out;
    if (!PyBytes_Check(args[OFFSETS]) || PyBytes_GET_SIZE(args[OFFSETS]) > (Py_ssize_t)sizeof l->offsets
            || !PyBytes_Check(args[PORTS]) || PyBytes_GET_SIZE(args[PORTS]) != 65536
            || !PyByteArray_Check(args[DEBUGCON_DATA])) {
        PyErr_SetString(PyExc_TypeError, "run(): bad counter offsets, port table or console");
        goto out;
    }
    if ((l->listeners = PyObject_GetAttr(args[LOG], s_listeners)) == NULL)
        goto out;
    if (!PyList_Check(l->listeners)) {
        PyErr_SetString(PyExc_TypeError, "run(): the log's listeners must be a list");
        goto out;
    }
    if (l->mapping_size < sizeof(struct kvm_run)) {
        PyErr_SetString(PyExc_ValueError, "the mapping is smaller than struct kvm_run");
        goto out;
    }
    l->fd = (int)fd;
    l->run = (struct kvm_run *)(uintptr_t)address;
    l->stats_fd = (int)stats_fd;
    l->stats_length = (Py_ssize_t)stats_length;
    l->ncounters = (int)(PyBytes_GET_SIZE(args[OFFSETS]) / sizeof(uint32_t));
    memcpy(l->offsets, PyBytes_AS_STRING(args[OFFSETS]), l->ncounters * sizeof(uint32_t));
    for (int i = 0; i < l->ncounters; i++)
        if (l->offsets[i] + sizeof(uint64_t) > stats_length) {
            PyErr_SetString(PyExc_ValueError, "a counter lies outside the stats block");
            goto out;
        }
    if (l->ncounters) {
        if (!PyTuple_Check(args[PREVIOUS]) || PyTuple_GET_SIZE(args[PREVIOUS]) != l->ncounters) {
            PyErr_SetString(PyExc_TypeError, "run(): the previous counters must match the offsets");
            goto out;
        }
        for (int i = 0; i < l->ncounters; i++) {
            unsigned long long v;
            if (u64_arg(PyTuple_GET_ITEM(args[PREVIOUS], i), &v) < 0)
                goto out;
            l->previous[i] = v;
        }
        if ((l->stats_block = PyMem_Malloc(stats_length)) == NULL) {
            PyErr_NoMemory();
            goto out;
        }
    }
    l->ports = (const unsigned char *)PyBytes_AS_STRING(args[PORTS]);
    l->debugcon_data = args[DEBUGCON_DATA];
    l->uart = args[UART];
    if (sink_arg(args[DEBUGCON_OUTPUT], &l->debugcon_out) < 0
            || sink_arg(args[UART_OUTPUT], &l->uart_out) < 0)
        goto out;
    l->uart_base = (unsigned)uart_base;
    l->uart_number = (uint16_t)uart_number;
    PyObject *cell = PyObject_GetAttr(args[STOP_FLAG], s_cell);
    int have_cell = cell != NULL && PyObject_GetBuffer(cell, &l->stop_cell, PyBUF_SIMPLE) == 0;
    Py_XDECREF(cell);   /* the buffer holds the bytearray */
    if (!have_cell)
        goto out;
    if (l->stop_cell.len != 1) {
        PyErr_SetString(PyExc_ValueError, "run(): the stop flag's cell must be one byte");
        goto out;
    }
    l->predicate = args[PREDICATE];
    l->slow = args[SLOW];
    l->until_kinds = (unsigned)until;
    l->vcpu = (long)vcpu;
    l->debugcon_number = (uint16_t)debugcon;
    l->unassigned_number = (uint16_t)unassigned;
    l->lv.log = args[LOG];
    if (back(l) < 0)
        goto out;
    int code = 0;
    unsigned long long last_seq = 0;
    int status = loop(l, (int)first, &code, &value, &last_seq);
    if (leave(l) < 0 || status < 0)
        goto out;
    PyObject *counters = l->ncounters ? counters_tuple(l->previous, l->ncounters) : Py_NewRef(Py_None);
    if (counters != NULL)
        result = Py_BuildValue("(iOKKN)", code, value ? value : Py_None, l->exits, last_seq, counters);
out:
    log_release(&l->lv);
    if (l->stop_cell.obj != NULL)
        PyBuffer_Release(&l->stop_cell);
    Py_XDECREF(value);
    Py_XDECREF(l->listeners);
    PyMem_Free(l->stats_block);
    PyMem_Free(l);
    return result;
}

/* -- one port access inside tcg's emulation ------------------------------------------------
 *
 * tcg's IN and OUT hooks (vlab/accel/tcg/_insnhooks.c) call `inline_port_io` for each access,
 * with RIP where KVM would report it, before they call the vCPU's Python method. The cheap
 * devices of run() above (unclaimed ports, the debug console, the 16550's polling) are
 * handled here, the vCPU's counters bumped as its `_dispatch_inline` does and a row written as
 * VcpuRunner._on_port_io writes it: its duration since `_resumed`, its counters since
 * `_previous_counters`, `_exits` counted, those three updated on the runner. An access that
 * may stop the run (`until`, max_exits), one whose counters break the log's sequence, and
 * every other device are left to Python (0), untouched.
 *
 *   InlinePortIo(runner, counter indices, ports, debugcon data, debugcon output, uart,
 *                uart output, uart base, log, max_exits, until kinds, vcpu, debugcon number,
 *                unassigned number, uart number)
 *   .bind(counts, bumped)   the vCPU's counters (a list) and those an access handled inline bumps
 *   .entry                  the address of inline_port_io, for the hooks
 */
typedef struct {
    PyObject_HEAD
    struct loop l;               /* the devices, the log and the run's conditions */
    PyObject *args, *counts;     /* what the loop's fields point into; the vCPU's counters */
    PyObject *runner;            /* borrowed from args: its _exits, _resumed, _previous_counters */
    unsigned char index[MAX_COUNTERS];
    Py_ssize_t bumped[4];
    int nbumped;
} InlinePortIo;

static PyObject *s_exits, *s_previous_counters, *s_resumed;

static int inline_traverse(InlinePortIo *self, visitproc visit, void *arg) {
    Py_VISIT(self->args);
    Py_VISIT(self->counts);
    Py_VISIT(self->l.listeners);
    return 0;
}

static int inline_clear(InlinePortIo *self) {
    log_release(&self->l.lv);
    Py_CLEAR(self->args);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->l.listeners);
    return 0;
}

static void inline_dealloc(InlinePortIo *self) {
    PyObject_GC_UnTrack(self);
    inline_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int inline_init(InlinePortIo *self, PyObject *args, PyObject *kwds) {
    PyObject *runner, *indices, *ports, *debugcon_data, *debugcon_out, *uart, *uart_out, *log;
    unsigned int uart_base, until, vcpu, debugcon, unassigned, uart_number;
    unsigned long long max_exits;
    if (self->args != NULL) {
        PyErr_SetString(PyExc_TypeError, "InlinePortIo is set up once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OSSYOOOIOKIIIII", &runner, &indices, &ports, &debugcon_data,
                          &debugcon_out, &uart, &uart_out, &uart_base, &log, &max_exits, &until,
                          &vcpu, &debugcon, &unassigned, &uart_number))
        return -1;
    struct loop *l = &self->l;
    if (PyBytes_GET_SIZE(indices) > MAX_COUNTERS || PyBytes_GET_SIZE(ports) != 65536) {
        PyErr_SetString(PyExc_TypeError, "InlinePortIo(): bad counter indices or port table");
        return -1;
    }
    if (sink_arg(debugcon_out, &l->debugcon_out) < 0 || sink_arg(uart_out, &l->uart_out) < 0)
        return -1;
    if ((l->listeners = PyObject_GetAttr(log, s_listeners)) == NULL)
        return -1;
    if (!PyList_Check(l->listeners)) {
        PyErr_SetString(PyExc_TypeError, "InlinePortIo(): the log's listeners must be a list");
        return -1;
    }
    self->args = Py_NewRef(args);   /* keeps the objects the fields below borrow */
    l->ncounters = (int)PyBytes_GET_SIZE(indices);
    memcpy(self->index, PyBytes_AS_STRING(indices), l->ncounters);
    l->ports = (const unsigned char *)PyBytes_AS_STRING(ports);
    l->debugcon_data = debugcon_data;
    l->uart = uart;
    l->uart_base = uart_base;
    l->lv.log = log;
    l->max_exits = max_exits;
    l->until_kinds = until;
    l->predicate = Py_None;
    l->vcpu = vcpu;
    l->debugcon_number = (uint16_t)debugcon;
    l->unassigned_number = (uint16_t)unassigned;
    l->uart_number = (uint16_t)uart_number;
    self->runner = runner;
    return 0;
}

static PyObject *inline_bind(InlinePortIo *self, PyObject *args) {
    PyObject *counts, *bumped;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &counts, &PyTuple_Type, &bumped))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bumped);
    if (n > (Py_ssize_t)(sizeof self->bumped / sizeof self->bumped[0])) {
        PyErr_SetString(PyExc_ValueError, "bind(): too many counters bumped");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        self->bumped[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(bumped, i));
        if (self->bumped[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    for (int i = 0; i < self->l.ncounters; i++)
        if (self->index[i] >= PyList_GET_SIZE(counts))
            return PyErr_Format(PyExc_IndexError, "counter %d is not in the vCPU's", self->index[i]);
    for (Py_ssize_t i = 0; i < n; i++)
        if (self->bumped[i] < 0 || self->bumped[i] >= PyList_GET_SIZE(counts))
            return PyErr_Format(PyExc_IndexError, "counter %zd is not in the vCPU's", self->bumped[i]);
    self->nbumped = (int)n;
    Py_XSETREF(self->counts, Py_NewRef(counts));
    Py_RETURN_NONE;
}

/* The vCPU's counter `i` as it will read once this access is counted. */
static int counter_after(InlinePortIo *self, Py_ssize_t i, unsigned long long *value) {
    if (as_u64(PyList_GET_ITEM(self->counts, i), value) < 0)
        return -1;
    for (int b = 0; b < self->nbumped; b++)
        *value += self->bumped[b] == i;
    return 0;
}

/* One IN or OUT of `size` bytes; an OUT's data (an IN's answer) in *value. 1: handled here;
 * 0: Python's, nothing done; -1: error (exception set). */
static int inline_port_io(PyObject *obj, int out, uint32_t port, int size, uint32_t *value,
                          uint64_t rip) {
    InlinePortIo *self = (InlinePortIo *)obj;
    struct loop *l = &self->l;
    PyObject *runner = self->runner;
    int kind = out ? IO_OUT : IO_IN;
    int port_code = l->ports[port & 0xFFFF];
    if (port_code == PORT_PYTHON || self->counts == NULL || (l->until_kinds & (1u << kind))
            || !(size == 1 || size == 2 || size == 4))
        return 0;
    if (attr_u64(runner, s_exits, &l->exits) < 0 || (l->max_exits && l->exits + 1 >= l->max_exits))
        return 0;
    uint16_t deltas[MAX_COUNTERS] = {0};
    if (!l->lv.have_rows || ((uint64_t *)l->lv.counts.buf)[GENERATION] != l->lv.generation
            || (l->ncounters && !l->lv.have_latest))
        if (back(l) < 0)
            return -1;
    if (l->ncounters) {
        if (!l->lv.have_latest || l->lv.latest.len != (Py_ssize_t)(l->ncounters * sizeof(uint64_t)))
            return 0;   /* the vCPU's first record in this log */
        PyObject *before = PyObject_GetAttr(runner, s_previous_counters);
        if (before == NULL)
            return -1;
        int fits = PyTuple_Check(before) && PyTuple_GET_SIZE(before) == l->ncounters;
        for (int i = 0; fits && i < l->ncounters; i++) {
            unsigned long long b = 0, a = 0;
            fits = as_u64(PyTuple_GET_ITEM(before, i), &b) == 0
                   && b == ((uint64_t *)l->lv.latest.buf)[i]
                   && counter_after(self, self->index[i], &a) == 0 && a >= b && a - b <= DELTA_MAX;
            l->previous[i] = b;
            l->current[i] = a;
            deltas[i] = (uint16_t)(a - b);
        }
        Py_DECREF(before);
        if (!fits)
            return 0;   /* a break in the log's sequence, or a delta a row does not hold */
    }
    PyObject *resumed = PyObject_GetAttr(runner, s_resumed);
    double since = resumed ? PyFloat_AsDouble(resumed) : -1.0;
    Py_XDECREF(resumed);
    if (since == -1.0 && PyErr_Occurred())
        return -1;
    double duration = now() - since;
    unsigned long long data = out ? *value & (0xFFFFFFFFull >> (32 - 8 * size)) : 0;
    unsigned char reply[4] = {0};
    uint16_t device;
    int claimed;
    int done = port_io(l, port_code, kind, port, size, data, reply, &device, &claimed);
    if (done <= 0)
        return done;
    if (!out)
        *value = reply[0] | reply[1] << 8 | reply[2] << 16 | (uint32_t)reply[3] << 24;
    for (int b = 0; b < self->nbumped; b++) {
        unsigned long long count;
        if (as_u64(PyList_GET_ITEM(self->counts, self->bumped[b]), &count) < 0) {
            PyErr_SetString(PyExc_TypeError, "a vCPU counter is not a whole number");
            return -1;
        }
        PyObject *bumped = PyLong_FromUnsignedLongLong(count + 1);
        if (bumped == NULL || PyList_SetItem(self->counts, self->bumped[b], bumped) < 0)
            return -1;
    }
    unsigned long long seq;
    if (record_row(l, rip, duration, kind, port, data, size, device, claimed, deltas, &seq) < 0)
        return -1;
    if (l->ncounters && set_attr(runner, s_previous_counters,
                                   counters_tuple(l->current, l->ncounters)) < 0)
        return -1;
    if (after_fast_exit(l, kind) < 0
            || set_attr(runner, s_exits, PyLong_FromUnsignedLongLong(l->exits)) < 0
            || set_attr(runner, s_resumed, PyFloat_FromDouble(now())) < 0)
        return -1;
    return 1;
}

static PyObject *inline_entry(InlinePortIo *self, void *closure) {
    return PyLong_FromVoidPtr((void *)inline_port_io);
}

static PyMethodDef inline_methods[] = {
    {"bind", (PyCFunction)inline_bind, METH_VARARGS,
     "bind(counts, bumped): the vCPU's counters, and those an access handled inline bumps."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef inline_getset[] = {
    {"entry", (getter)inline_entry, NULL,
     "The address of int inline_port_io(state, out, port, size, uint32_t *value, rip).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject InlinePortIoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlab.machine._runloop.InlinePortIo",
    .tp_basicsize = sizeof(InlinePortIo),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)inline_traverse,
    .tp_clear = (inquiry)inline_clear,
    .tp_doc = "VcpuRunner's handling of one port access inside tcg's emulation, for its hooks",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)inline_init,
    .tp_dealloc = (destructor)inline_dealloc,
    .tp_methods = inline_methods,
    .tp_getset = inline_getset,
};

static PyObject *runloop_setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != INTR) {
        PyErr_SetString(PyExc_TypeError, "setup(IoOut, IoIn, MmioRead, MmioWrite, Hlt, Interrupted)");
        return NULL;
    }
    for (int kind = IO_OUT; kind <= INTR; kind++) {
        if (!PyType_Check(args[kind - 1])) {
            PyErr_SetString(PyExc_TypeError, "setup() takes the exit classes");
            return NULL;
        }
        Py_XSETREF(cls[kind], (PyTypeObject *)Py_NewRef(args[kind - 1]));
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))runloop_run, METH_FASTCALL,
     "VcpuRunner's loop: (code, value, exits, last seq, counters)."},
    {"append", (PyCFunction)(void (*)(void))runloop_append, METH_FASTCALL,
     "ExitLog.append of a record that fits a row whole: True, else False (append it in Python)."},
    {"setup", (PyCFunction)(void (*)(void))runloop_setup, METH_FASTCALL,
     "The exit classes rows are made of."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_runloop",
                                    "The compiled run loop and ExitLog rows.", -1, methods};

#define INTERN(var, text) (var = PyUnicode_InternFromString(text))

PyMODINIT_FUNC PyInit__runloop(void) {
    if (!INTERN(s_rows, "_rows") || !INTERN(s_counts, "_counts") || !INTERN(s_keep, "keep")
            || !INTERN(s_latest, "_latest") || !INTERN(s_device_number, "_device_number")
            || !INTERN(s_grow, "grow") || !INTERN(s_cell, "cell") || !INTERN(s_seq, "seq")
            || !INTERN(s_vcpu, "vcpu") || !INTERN(s_exit, "exit") || !INTERN(s_rip, "rip")
            || !INTERN(s_device, "device") || !INTERN(s_claimed, "claimed")
            || !INTERN(s_duration_s, "duration_s") || !INTERN(s_counters_before, "counters_before")
            || !INTERN(s_counters_after, "counters_after")
            || !INTERN(s_kernel_events, "kernel_events") || !INTERN(s_port, "port")
            || !INTERN(s_size, "size") || !INTERN(s_count, "count") || !INTERN(s_data, "data")
            || !INTERN(s_data_offset, "data_offset") || !INTERN(s_address, "address")
            || !INTERN(s_length, "length") || !INTERN(s_last, "last")
            || !INTERN(s_announce, "_announce") || !INTERN(s_listeners, "_listeners")
            || !INTERN(s_lcr, "lcr") || !INTERN(s_ier, "ier") || !INTERN(s_mcr, "mcr")
            || !INTERN(s_lsr, "lsr") || !INTERN(s_thr, "thr")
            || !INTERN(s_thr_ipending, "thr_ipending") || !INTERN(s_irq_level, "irq_level")
            || !INTERN(s_exits, "_exits") || !INTERN(s_previous_counters, "_previous_counters")
            || !INTERN(s_resumed, "_resumed") || PyType_Ready(&InlinePortIoType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "InlinePortIo", (PyObject *)&InlinePortIoType) < 0)
        Py_CLEAR(m);
    return m;
}
