"""libtraceevent and libtracefs, bound with cffi in ABI mode as abi.py binds the kernel API.

The kernel describes each tracepoint's binary record in a format file (`events/kvm/NAME/
format`): its fields' offsets and sizes, and a print format whose `__print_symbolic` tables
name values (kvm_exit's VMX and SVM exit reasons, KVM_EXIT_* for kvm_userspace_exit...).
libtracefs reads those files into a `tep_handle`; libtraceevent parses them (the fields,
the print format's argument tree) and walks the ring buffer's sub-buffers (kbuffer). Here
each event's parsed layout becomes an `EventFormat`: a `struct.Struct` over its fields, and
its symbol tables with the conditions the print format puts around them, so a record is
decoded with one `unpack_from` and named with the kernel's own words. Only the declarations
used are given; they follow libtraceevent 1.7's public header (event-parse.h, kbuffer.h)
and libtracefs 1.6's (tracefs.h), whose libraries Debian ships as libtraceevent1 and
libtracefs1.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

from cffi import FFI

ffi = FFI()
ffi.cdef("""
struct tep_handle; struct kbuffer; struct tep_event;
struct tep_format_field {
    struct tep_format_field *next; struct tep_event *event; char *type; char *name; char *alias;
    int offset; int size; unsigned int arraylen; unsigned int elementsize; unsigned long flags;
};
struct tep_format {
    int nr_common; int nr_fields;
    struct tep_format_field *common_fields; struct tep_format_field *fields;
};
struct tep_print_flag_sym { struct tep_print_flag_sym *next; char *value; char *str; };
struct tep_print_arg;
struct tep_print_arg_atom { char *atom; };
struct tep_print_arg_field { char *name; struct tep_format_field *field; };
struct tep_print_arg_typecast { char *type; struct tep_print_arg *item; };
struct tep_print_arg_symbol { struct tep_print_arg *field; struct tep_print_flag_sym *symbols; };
struct tep_print_arg_op { char *op; int prio; struct tep_print_arg *left; struct tep_print_arg *right; };
struct tep_print_arg {
    struct tep_print_arg *next;
    int type;                               /* enum tep_print_arg_type */
    union {
        struct tep_print_arg_atom atom;
        struct tep_print_arg_field field;
        struct tep_print_arg_typecast typecast;
        struct tep_print_arg_symbol symbol;
        struct tep_print_arg_op op;
        void *largest_member[3];            /* the union's size: its other members */
    };
};
struct tep_print_fmt { char *format; struct tep_print_arg *args; void *print_cache; };
struct tep_event {
    struct tep_handle *tep; char *name; int id; int flags; struct tep_format format;
    struct tep_print_fmt print_fmt; char *system; void *handler; void *context;
};
int tep_get_events_count(struct tep_handle *tep);
struct tep_event *tep_get_event(struct tep_handle *tep, int index);
int tep_get_sub_buffer_size(struct tep_handle *tep);
void tep_free(struct tep_handle *tep);
struct kbuffer *kbuffer_alloc(int size, int endian);   /* enum kbuffer_long_size, _endian */
void kbuffer_free(struct kbuffer *kbuf);
int kbuffer_load_subbuffer(struct kbuffer *kbuf, void *subbuffer);
/* void * in kbuffer.h: a byte pointer here, so that its offset in the page is a subtraction */
unsigned char *kbuffer_read_event(struct kbuffer *kbuf, unsigned long long *ts);
unsigned char *kbuffer_next_event(struct kbuffer *kbuf, unsigned long long *ts);
struct tep_handle *tracefs_local_events_system(const char *tracing_dir, const char * const *sys_names);
int tracefs_tracing_dir_is_mounted(bool mount, const char **path);
ssize_t read(int fd, void *buf, size_t count);
""")

LIBRARIES = {"libtraceevent.so.1": "libtraceevent1", "libtracefs.so.1": "libtracefs1"}
# enum tep_print_arg_type (event-parse.h): the kinds of node this module reads
PRINT_ATOM, PRINT_FIELD, PRINT_SYMBOL, PRINT_TYPE, PRINT_OP = 1, 2, 4, 7, 11
FIELD_IS_ARRAY, FIELD_IS_SIGNED = 1, 4           # enum tep_format_flags
KBUFFER_LSIZE_SAME_AS_HOST, KBUFFER_ENDIAN_SAME_AS_HOST = 2, 2
_INTEGERS = {1: "b", 2: "h", 4: "i", 8: "q"}
_OPS = {"==": lambda a, b: int(a == b), "!=": lambda a, b: int(a != b),
        "<": lambda a, b: int(a < b), ">": lambda a, b: int(a > b),
        "<=": lambda a, b: int(a <= b), ">=": lambda a, b: int(a >= b),
        "&": lambda a, b: a & b, "|": lambda a, b: a | b, ">>": lambda a, b: a >> b,
        "<<": lambda a, b: a << b, "+": lambda a, b: a + b, "-": lambda a, b: a - b,
        "&&": lambda a, b: int(bool(a and b)), "||": lambda a, b: int(bool(a or b))}
_UNARY = {"!": lambda b: int(not b), "-": lambda b: -b, "~": lambda b: ~b}

_libs = None


def libraries():
    """(libtraceevent, libtracefs), loaded once; OSError names the package that is missing."""
    global _libs
    if _libs is None:
        loaded = []
        for soname, package in LIBRARIES.items():
            try:
                loaded.append(ffi.dlopen(soname))
            except OSError as e:
                raise OSError(f"{soname} cannot be loaded ({e}): install the {package} "
                              f"package (apt install {package})") from None
        _libs = tuple(loaded)
    return _libs


libc = ffi.dlopen(None)


def mounted_tracefs(mount: bool = True) -> str | None:
    """Where tracefs is mounted; with `mount`, libtracefs mounts it at /sys/kernel/tracing
    first if it is not (which needs root). None where it is not and cannot be."""
    _, tracefs = libraries()
    path = ffi.new("const char **")
    if tracefs.tracefs_tracing_dir_is_mounted(mount, path) < 0 or path[0] == ffi.NULL:
        return None
    return ffi.string(path[0]).decode()


# A print-format argument as a Python tree: ("field", name), ("atom", text),
# ("op", op, left, right), ("cast", node), ("symbol", node, {value: name}) or ("other",).
def _node(arg) -> tuple:
    kind = arg.type
    if kind == PRINT_FIELD:
        return ("field", ffi.string(arg.field.name).decode())
    if kind == PRINT_ATOM:
        return ("atom", ffi.string(arg.atom.atom).decode())
    if kind == PRINT_TYPE:
        return ("cast", _node(arg.typecast.item))
    if kind == PRINT_OP:
        side = (lambda a: None if a == ffi.NULL else _node(a))
        return ("op", ffi.string(arg.op.op).decode(), side(arg.op.left), side(arg.op.right))
    if kind == PRINT_SYMBOL:
        table, sym = {}, arg.symbol.symbols
        while sym != ffi.NULL:
            try:
                table[int(ffi.string(sym.value).decode(), 0)] = ffi.string(sym.str).decode()
            except ValueError:
                pass  # a name the kernel's headers define, which the format file cannot
            sym = sym.next
        return ("symbol", _node(arg.symbol.field), table)
    return ("other",)


def _evaluate(node, values: dict) -> int | None:
    """An integer expression of the print format over a record's fields (None: not one)."""
    if node is None:
        return None
    kind = node[0]
    if kind == "field":
        return values.get(node[1])
    if kind == "atom":
        try:
            return int(node[1], 0)
        except ValueError:
            return None
    if kind == "cast":
        return _evaluate(node[1], values)
    if kind == "op":
        op, left, right = node[1:]
        b = _evaluate(right, values)
        if b is None:
            return None
        if left is None or left[0] == "other":
            return _UNARY[op](b) if op in _UNARY else None
        a = _evaluate(left, values)
        return None if a is None or op not in _OPS else _OPS[op](a, b)
    return None


def _fields_of(node) -> set[str]:
    if node is None:
        return set()
    if node[0] == "field":
        return {node[1]}
    if node[0] == "cast":
        return _fields_of(node[1])
    if node[0] == "op":
        return _fields_of(node[2]) | _fields_of(node[3])
    return set()


@dataclass
class EventFormat:
    """One tracepoint's record layout and print-format symbols, from its format file."""
    id: int
    system: str
    name: str
    fields: tuple[str, ...]               # the event's own fields, in record order
    layout: struct.Struct                 # common fields first, then `fields`
    args: tuple = ()                      # the print format's arguments, as trees
    deciding: tuple[str, ...] = ()        # the fields a symbol depends on, conditions' too
    _named: dict = field(default_factory=dict, repr=False, compare=False)

    def unpack(self, page, offset: int) -> tuple:
        """The record at `offset` of a sub-buffer: common_pid, then its fields (arrays as
        bytes), as `values` names them."""
        return self.layout.unpack_from(page, offset)

    def values(self, unpacked: tuple) -> dict:
        """An unpacked record's fields by name."""
        return dict(zip(("common_pid",) + self.fields, unpacked))

    def symbol(self, name: str, values: dict) -> str | None:
        """What the print format prints for field `name` through `__print_symbolic`, taking
        the branch its conditions choose for these values (kvm_exit: VMX's table when
        isa == 1, SVM's otherwise); None where no table names the value."""
        key = (name, *[values.get(f) for f in self.deciding])
        try:
            return self._named[key]
        except KeyError:
            pass
        found = next((n for n in (self._symbol(arg, name, values) for arg in self.args)
                      if n is not None), None)
        if len(self._named) > 4096:   # the fields' values seen are few: bounded all the same
            self._named.clear()
        self._named[key] = found
        return found

    def _symbol(self, node, name: str, values: dict) -> str | None:
        if node[0] == "symbol" and name in _fields_of(node[1]):
            return node[2].get(_evaluate(node[1], values))
        if node[0] == "op" and node[1] == "?" and node[3] is not None and node[3][1] == ":":
            condition = _evaluate(node[2], values)
            if condition is None:
                return None
            return self._symbol(node[3][2] if condition else node[3][3], name, values)
        return None


def _layout(event) -> tuple[tuple[str, ...], struct.Struct]:
    """A native struct reading common_pid, then each field at its offset."""
    items = []
    common = event.format.common_fields
    while common != ffi.NULL:
        if ffi.string(common.name) == b"common_pid":
            items.append((common.offset, common.size, "i", "common_pid"))
        common = common.next
    f = event.format.fields
    while f != ffi.NULL:
        if f.flags & FIELD_IS_ARRAY:
            code = f"{f.size}s"
        else:
            code = _INTEGERS.get(f.size, f"{f.size}s")
            if not f.flags & FIELD_IS_SIGNED and len(code) == 1:
                code = code.upper()
        items.append((f.offset, f.size, code, ffi.string(f.name).decode()))
        f = f.next
    items.sort()
    fmt, position = "=", 0
    for offset, size, code, _ in items:
        fmt += f"{offset - position}x" * (offset > position) + code
        position = offset + size
    names = tuple(name for *_, name in items if name != "common_pid")
    return names, struct.Struct(fmt)


def new_kbuffer():
    """A kbuffer of this host's word size and byte order, freed with its owner."""
    traceevent, _ = libraries()
    return ffi.gc(traceevent.kbuffer_alloc(KBUFFER_LSIZE_SAME_AS_HOST, KBUFFER_ENDIAN_SAME_AS_HOST),
                  traceevent.kbuffer_free)


@dataclass
class Formats:
    """The tep of one event system: every event's `EventFormat` by id, and the size of the
    ring buffer's sub-buffers. Read-only once loaded, so one serves every reader."""
    tep: object
    by_id: dict[int, EventFormat]
    sub_buffer_size: int

    @classmethod
    @functools.cache
    def load(cls, tracing_dir: str, system: str = "kvm") -> "Formats":
        """The system's formats as the kernel describes them under `tracing_dir` (read once
        per process: they change only with the kernel)."""
        traceevent, tracefs = libraries()
        names = [ffi.new("char[]", system.encode()), ffi.NULL]
        tep = tracefs.tracefs_local_events_system(tracing_dir.encode(),
                                                  ffi.new("const char *[]", names))
        if tep == ffi.NULL:
            raise OSError(f"libtracefs could not read the {system} events' formats under "
                          f"{tracing_dir}/events")
        tep = ffi.gc(tep, traceevent.tep_free)
        by_id = {}
        for i in range(traceevent.tep_get_events_count(tep)):
            event = traceevent.tep_get_event(tep, i)
            if ffi.string(event.system).decode() != system:
                continue
            fields, layout = _layout(event)
            args, arg = [], event.print_fmt.args
            while arg != ffi.NULL:
                args.append(_node(arg))
                arg = arg.next
            deciding = tuple(sorted(set().union(*(_deciding(node) for node in args))))
            by_id[event.id] = EventFormat(event.id, system, ffi.string(event.name).decode(),
                                          fields, layout, tuple(args), deciding)
        return cls(tep, by_id, traceevent.tep_get_sub_buffer_size(tep))

    def named(self, name: str) -> EventFormat | None:
        return next((f for f in self.by_id.values() if f.name == name), None)



class SubBufferReader:
    """Reads a CPU's `trace_pipe_raw` one sub-buffer at a time into its own page, and walks
    it with its own kbuffer (one reader per thread at a time)."""

    def __init__(self, formats: Formats):
        self.formats = formats
        self.page = bytearray(formats.sub_buffer_size)
        self._buffer = ffi.from_buffer("unsigned char[]", self.page)
        self._ts = ffi.new("unsigned long long *")
        self._kbuf = new_kbuffer()
        self._lib, _ = libraries()

    def read(self, fd: int) -> list | None:
        """The records of the next sub-buffer from `fd` (opened O_NONBLOCK), None when the
        CPU's buffer is empty: (timestamp, offset of the data in `page`, its EventFormat,
        None for an event of another system)."""
        lib, kbuf, ts, base, page = self._lib, self._kbuf, self._ts, self._buffer, self.page
        if libc.read(fd, base, len(page)) <= 0 or lib.kbuffer_load_subbuffer(kbuf, base) < 0:
            return None
        found, by_id, null = [], self.formats.by_id, ffi.NULL
        data = lib.kbuffer_read_event(kbuf, ts)
        while data != null:
            offset = data - base
            found.append((ts[0], offset, by_id.get(page[offset] | page[offset + 1] << 8)))
            data = lib.kbuffer_next_event(kbuf, ts)
        return found


def _deciding(node) -> set[str]:
    """The fields that decide what a print-format argument's symbols print."""
    if node[0] == "symbol":
        return _fields_of(node[1])
    if node[0] == "op" and node[1] == "?":
        return _fields_of(node[2]) | _deciding(node[3])
    if node[0] == "op":
        return set().union(*(_deciding(n) for n in node[2:] if n is not None))
    return set()
