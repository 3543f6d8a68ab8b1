"""Conversions between cffi structs and vlab's plain values (state.py, dicts)."""
from __future__ import annotations

from .abi import ffi
from .state import CpuidEntry, DTable, Regs, Segment, Sregs, SEGMENT_NAMES, field_names

_REG_FIELDS = field_names(Regs)
_SEG_FIELDS = field_names(Segment)


def regs_from_c(c) -> Regs:
    return Regs(*(getattr(c, name) for name in _REG_FIELDS))


def _store(c, name: str, value, path: str) -> None:
    """`c.name = value`, or a ValueError naming the register when the field cannot hold it
    (cffi would say only "int too big to convert")."""
    try:
        setattr(c, name, value)
    except (OverflowError, TypeError):
        struct = ffi.typeof(c)
        struct = struct.item if struct.kind == "pointer" else struct
        ctype = dict(struct.fields)[name].type
        raise ValueError(f"{path} = {value!r} does not fit the {8 * ffi.sizeof(ctype)}-bit "
                         f"unsigned field of {struct.cname}") from None


def regs_to_c(regs: Regs, c) -> None:
    for name in _REG_FIELDS:
        _store(c, name, getattr(regs, name), name)


def _segment_from_c(c) -> Segment:
    return Segment(*(getattr(c, name) for name in _SEG_FIELDS))


def sregs_from_c(c) -> Sregs:
    return Sregs(
        *(_segment_from_c(getattr(c, name)) for name in SEGMENT_NAMES),
        gdt=DTable(c.gdt.base, c.gdt.limit), idt=DTable(c.idt.base, c.idt.limit),
        cr0=c.cr0, cr2=c.cr2, cr3=c.cr3, cr4=c.cr4, cr8=c.cr8, efer=c.efer,
        apic_base=c.apic_base, interrupt_bitmap=tuple(c.interrupt_bitmap))


def sregs_to_c(sregs: Sregs, c) -> None:
    for name in SEGMENT_NAMES:
        segment, target = getattr(sregs, name), getattr(c, name)
        for field in _SEG_FIELDS:
            _store(target, field, getattr(segment, field), f"{name}.{field}")
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        for field in ("base", "limit"):
            _store(getattr(c, name), field, getattr(table, field), f"{name}.{field}")
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        _store(c, name, getattr(sregs, name), name)
    try:
        c.interrupt_bitmap = list(sregs.interrupt_bitmap)
    except (OverflowError, TypeError, IndexError):
        raise ValueError(f"interrupt_bitmap = {sregs.interrupt_bitmap!r}: four 64-bit "
                         "unsigned words") from None


def to_python(c):
    """A struct, array or integer as dicts, lists, bytes (for u8 arrays) and ints."""
    if not isinstance(c, ffi.CData):
        return c
    ctype = ffi.typeof(c)
    if ctype.kind == "struct" or ctype.kind == "union":
        return {name: to_python(getattr(c, name)) for name, _ in ctype.fields if name != "padding"}
    if ctype.kind == "array":
        if ctype.item.cname in ("uint8_t", "char"):
            return bytes(ffi.buffer(c))
        return [to_python(item) for item in c]
    return int(c)


def from_python(value):
    """The inverse of `to_python`, as an initializer `ffi.new` accepts."""
    if isinstance(value, dict):
        return {key: from_python(item) for key, item in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [from_python(item) for item in value]
    return value


def host_address(buffer) -> int:
    """The address of a writable buffer (an mmap of guest RAM), for
    KVM_SET_USER_MEMORY_REGION's `userspace_addr`. The buffer must outlive the memory slot;
    no view is kept, so it can still be closed."""
    view = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", view))
    finally:
        ffi.release(view)


def flexible(struct: str, entry: str, count: int):
    """Allocate a struct ending in a flexible array of `count` entries; zeroed."""
    size = ffi.sizeof(struct) + count * ffi.sizeof(entry)
    return ffi.from_buffer(f"{struct} *", bytearray(size))  # the cdata keeps its buffer alive


def cpuid_entries_from_c(cpuid) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))]


def cpuid_to_c(entries: list[CpuidEntry]):
    cpuid = flexible("struct kvm_cpuid2", "struct kvm_cpuid_entry2", len(entries))
    cpuid.nent = len(entries)
    for target, e in zip((cpuid.entries[i] for i in range(len(entries))), entries):
        (target.function, target.index, target.flags, target.eax, target.ebx, target.ecx,
         target.edx) = (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
    return cpuid
