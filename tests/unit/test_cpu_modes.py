"""CPU mode setup: GDT and page-table bytes, control registers, the sregs pre-flight check,
and the example guests (assembled with nasm, run on Unicorn where installed)."""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from vlab.kvm.state import Segment, Sregs
from vlab.machine.cpu_modes import (
    DEFAULT_LAYOUT, SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS, CpuMode, decode_descriptor,
    encode_descriptor, gdt_segments, initial_regs, setup_mode)
from vlab.kvm.sregs_check import SregsError, check_sregs, validate_sregs
from vlab.x86 import CR0_BITS, CR4_BITS, EFER_BITS, RFLAGS_BITS, decode_bits
from vlab.machine.examples import EXAMPLES, RESULT_GPA

RAM = 4 << 20  # the paged mode's first 4 MiB page; two 2 MiB pages in long mode
KVM_RESET = Sregs()  # what KVM_GET_SREGS returns for a fresh vCPU


class FakeMemory:
    """A bytearray with the `write(gpa, data)` of GuestMemory, bounds-checked."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= len(self.data), hex(gpa)
        self.data[gpa:gpa + len(data)] = data

    def u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.data, gpa)[0]

    def u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.data, gpa)[0]


def setup(mode, ram_size=RAM):
    """Set up `mode` in a memory that ends where guest code begins: writes must fit below."""
    memory = FakeMemory(DEFAULT_LAYOUT.code)
    return setup_mode(mode, KVM_RESET, memory, ram_size=ram_size), memory


def bit(table, *names):
    return sum(1 << table[n] for n in names)


# --- descriptors and the GDT

@pytest.mark.parametrize("role, raw", [
    # The same values as Linux's boot GDT: GDT_ENTRY(0xc09b, 0, 0xfffff) and friends.
    ("code32", 0x00CF9B000000FFFF), ("data", 0x00CF93000000FFFF),
    ("code64", 0x00AF9B000000FFFF), ("tss", 0x00008B0006000067)])
def test_descriptor_bytes_match_known_encodings(role, raw):
    assert encode_descriptor(gdt_segments()[role]) == raw.to_bytes(8, "little")


@pytest.mark.parametrize("seg", [Segment(limit=0xFFFFF000, g=1), Segment(limit=0x100000)])
def test_encode_descriptor_rejects_limits_a_descriptor_cannot_hold(seg):
    with pytest.raises(ValueError, match="limit"):
        encode_descriptor(seg)


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.PAGED, CpuMode.LONG])
def test_gdt_in_memory_decodes_to_the_segments_in_sregs(mode):
    result, memory = setup(mode)
    sregs = result.sregs
    assert sregs.gdt.base == DEFAULT_LAYOUT.gdt
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = getattr(sregs, name)
        assert seg.selector + 8 <= sregs.gdt.limit + 1
        entry = memory.data[sregs.gdt.base + seg.selector:][:8]
        assert decode_descriptor(entry, seg.selector) == seg, name
    tss_high = memory.u64(sregs.gdt.base + SEL_TSS + 8)
    assert tss_high == sregs.tr.base >> 32 == 0


def test_segment_selectors_and_attributes_per_mode():
    protected, long = setup(CpuMode.PROTECTED)[0].sregs, setup(CpuMode.LONG)[0].sregs
    assert (protected.cs.selector, protected.cs.db, protected.cs.l) == (SEL_CODE32, 1, 0)
    assert (long.cs.selector, long.cs.db, long.cs.l) == (SEL_CODE64, 0, 1)
    for sregs in (protected, long):
        assert sregs.ss.selector == sregs.ds.selector == SEL_DATA
        assert (sregs.cs.limit, sregs.cs.g, sregs.cs.type, sregs.cs.s) == (0xFFFFFFFF, 1, 11, 1)
        assert (sregs.tr.type, sregs.tr.s, sregs.tr.present) == (11, 0, 1)
        assert sregs.idt.limit == 0
    real = setup(CpuMode.REAL)[0].sregs
    assert all((getattr(real, n).base, getattr(real, n).selector, getattr(real, n).limit)
               == (0, 0, 0xFFFF) for n in ("cs", "ds", "es", "fs", "gs", "ss"))


# --- control registers

@pytest.mark.parametrize("mode, cr0, cr4, efer, cr3", [
    (CpuMode.REAL, ("ET", "NE"), (), (), 0),
    (CpuMode.PROTECTED, ("PE", "ET", "NE"), (), (), 0),
    (CpuMode.PAGED, ("PE", "ET", "NE", "PG"), ("PSE",), (), DEFAULT_LAYOUT.page_tables),
    (CpuMode.LONG, ("PE", "MP", "ET", "NE", "PG"), ("PAE",), ("LME", "LMA"),
     DEFAULT_LAYOUT.page_tables),
])
def test_control_registers_per_mode(mode, cr0, cr4, efer, cr3):
    sregs = setup(mode)[0].sregs
    assert decode_bits(sregs.cr0, CR0_BITS) == list(cr0)
    assert decode_bits(sregs.cr4, CR4_BITS) == list(cr4)
    assert decode_bits(sregs.efer, EFER_BITS) == list(efer)
    assert sregs.cr3 == cr3


def test_decode_bits_names_known_bits_and_numbers_unknown_ones():
    assert decode_bits(0x60000011, CR0_BITS) == ["PE", "ET", "NW", "CD"]
    assert decode_bits(0x2 | 0x200 | 0x3000, RFLAGS_BITS) == ["bit1", "IF", "IOPL0", "IOPL1"]
    assert decode_bits(0, EFER_BITS) == []


# --- page tables

def walk_paged32(memory, cr3, va):
    pde = memory.u32(cr3 + (va >> 22) * 4)
    if not pde & 1:
        return None
    assert pde & 2, "expected writable (PDE.RW)"
    assert pde & 0x80, "expected a 4 MiB page (PDE.PS)"
    return (pde & 0xFFC00000) | (va & 0x3FFFFF)


def walk_long(memory, cr3, va):
    table = cr3
    for shift in (39, 30, 21):
        entry = memory.u64(table + (va >> shift & 0x1FF) * 8)
        if not entry & 1:
            return None
        assert entry & 2, "expected writable (RW) at every level"
        if shift == 21:
            assert entry & 0x80, "expected a 2 MiB page (PDE.PS)"
            return (entry & 0xFFFFFFFE00000) | (va & 0x1FFFFF)
        table = entry & 0xFFFFFFFFFF000


@pytest.mark.parametrize("mode, walk, page, ram_size", [
    (CpuMode.PAGED, walk_paged32, 4 << 20, 12 << 20),
    (CpuMode.LONG, walk_long, 2 << 20, 12 << 20),
    (CpuMode.LONG, walk_long, 2 << 20, (1 << 30) + (4 << 20)),  # spills into a second PD
])
def test_page_tables_identity_map_exactly_the_ram(mode, walk, page, ram_size):
    result, memory = setup(mode, ram_size)
    cr3 = result.sregs.cr3
    probes = {0, RESULT_GPA, DEFAULT_LAYOUT.code, ram_size - 1}
    probes |= {n * page + off for n in range(ram_size // page) for off in (0, page - 1)}
    for va in sorted(probes):
        assert walk(memory, cr3, va) == va, hex(va)
    assert walk(memory, cr3, ram_size) is None


def test_long_mode_refuses_more_ram_than_its_page_tables_can_map():
    with pytest.raises(ValueError, match="page directories"):
        setup(CpuMode.LONG, ram_size=5 << 30)


@pytest.mark.parametrize("mode", list(CpuMode))
def test_writes_are_recorded_and_stay_below_the_guest(mode):
    result, memory = setup(mode)
    spans = sorted((gpa, gpa + length) for gpa, length, _ in result.writes)
    assert all(end <= a for (_, end), (a, _) in zip(spans, spans[1:])), "overlapping writes"
    assert all(RESULT_GPA + 4 <= start and end <= DEFAULT_LAYOUT.page_tables_end
               for start, end in spans)
    assert (mode is CpuMode.REAL) == (not result.writes)
    assert mode.value in result.description.lower()
    assert not any(memory.data[DEFAULT_LAYOUT.page_tables_end:])


# --- initial registers

def test_initial_regs():
    regs = initial_regs("long", 0x8000, 0x8000)
    assert (regs.rip, regs.rsp, regs.rflags) == (0x8000, 0x8000, 0x2)
    with pytest.raises(ValueError, match="16-bit"):
        initial_regs(CpuMode.REAL, 0x10000, 0x8000)
    with pytest.raises(ValueError, match="32-bit"):
        initial_regs(CpuMode.PROTECTED, 0x8000, 1 << 32)


# --- the pre-flight check

@pytest.mark.parametrize("mode", list(CpuMode))
def test_check_sregs_is_silent_for_every_setup(mode):
    assert check_sregs(setup(mode)[0].sregs) == []


def test_check_sregs_is_silent_for_kvm_reset_state():
    assert check_sregs(KVM_RESET) == []


def _long():
    return setup(CpuMode.LONG)[0].sregs


def _protected():
    return setup(CpuMode.PROTECTED)[0].sregs


CR0, CR4, EFER = CR0_BITS, CR4_BITS, EFER_BITS
BROKEN = {
    "PG without PE": (lambda: KVM_RESET.replace(cr0=bit(CR0, "PG")), "CR0.PG", {}),
    "NW without CD": (lambda: KVM_RESET.replace(cr0=bit(CR0, "NW", "ET")), "CR0.NW", {}),
    "CR0 high bits": (lambda: KVM_RESET.replace(cr0=1 << 32 | bit(CR0, "ET")),
                      "CR0 bits 63:32", {}),
    "CR0 reserved": (lambda: KVM_RESET.replace(cr0=1 << 7 | bit(CR0, "ET")), "CR0 bit7", {}),
    "LME+PG without LMA": (lambda: _long().replace(efer=bit(EFER, "LME")), "EFER.LMA", {}),
    "LME+PG without PAE": (lambda: _long().replace(cr4=0), "CR4.PAE", {}),
    "LMA without LME": (lambda: _protected().replace(efer=bit(EFER, "LMA")), "EFER.LMA", {}),
    "CS.l outside long mode": (lambda: _protected().replace(
        cs=_protected().cs.replace(l=1, db=0)), "CS.l", {}),
    "CS.l with CS.db": (lambda: _long().replace(cs=_long().cs.replace(db=1)), "CS.db", {}),
    "LME without CPUID LM": (_long, "EFER.LME", {"cpuid_has_lm": False}),
    "CR4 outside host mask": (_long, "CR4 PAE", {"host_cr4_mask": bit(CR4, "PSE")}),
    "CR4 reserved": (lambda: KVM_RESET.replace(cr4=1 << 15), "CR4 bit15", {}),
    "CR4 bit KVM never allows": (lambda: KVM_RESET.replace(cr4=bit(CR4, "SMXE")), "SMXE", {}),
    "EFER reserved": (lambda: KVM_RESET.replace(efer=1 << 1), "EFER bit1", {}),
    "CR3 beyond MAXPHYADDR": (lambda: _long().replace(cr3=1 << 52), "CR3", {}),
    "APIC base reserved": (lambda: KVM_RESET.replace(apic_base=0xFEE00901), "apic_base", {}),
    "x2APIC without EN": (lambda: KVM_RESET.replace(apic_base=0xFEE00500), "EXTD", {}),
    "CS not code": (lambda: _protected().replace(cs=_protected().cs.replace(type=3)), "CS", {}),
    "CS code not accessed": (lambda: _protected().replace(
        cs=_protected().cs.replace(type=10)), "CS.type", {}),
    "SS read-only": (lambda: _protected().replace(ss=_protected().ss.replace(type=1)), "SS", {}),
    "DS execute-only code": (lambda: _protected().replace(
        ds=_protected().ds.replace(type=9)), "DS", {}),
    "TR not busy TSS": (lambda: _long().replace(tr=_long().tr.replace(type=9)), "TR.type", {}),
    "TR not system": (lambda: _long().replace(tr=_long().tr.replace(s=1)), "TR.s", {}),
    "G=1 with byte limit": (lambda: _protected().replace(
        ds=_protected().ds.replace(limit=0xFFFF0000)), "DS.g", {}),
    "limit too big for G=0": (lambda: _protected().replace(
        es=_protected().es.replace(g=0)), "ES.limit", {}),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_check_sregs_names_the_broken_bit(case):
    make, needle, kwargs = BROKEN[case]
    problems = check_sregs(make(), **kwargs)
    assert len(problems) == 1, problems
    assert needle in problems[0]


def test_validate_sregs_raises_with_every_problem():
    bad = KVM_RESET.replace(cr0=bit(CR0, "PG", "NW", "ET"))
    with pytest.raises(SregsError) as info:
        validate_sregs(bad)
    assert len(info.value.problems) == 2
    assert "CR0.PG" in str(info.value) and "CR0.NW" in str(info.value)
    validate_sregs(_long())


# --- the example guests

needs_nasm = pytest.mark.skipif(shutil.which("nasm") is None,
                                reason="nasm is not installed (Debian package `nasm`)")


def assemble(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "guest.asm"), Path(tmp, "guest.bin")
        src.write_text(source)
        done = subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return out.read_bytes()


def test_one_example_per_mode():
    assert {ex.mode for ex in EXAMPLES.values()} == set(CpuMode)
    for ex in EXAMPLES.values():
        source = ex.source()
        assert source.startswith("; ") and f"org {ex.org:#x}" in source
        assert ex.expected_output == f"Hello from {ex.mode.value} mode\n".encode()
        assert ex.expected_memory == {RESULT_GPA: (42).to_bytes(4, "little")}
        assert ex.expected_regs == {"rax": 42}


@needs_nasm
@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_assemble(name):
    code = assemble(EXAMPLES[name].source())
    assert EXAMPLES[name].expected_output + b"\0" in code


def run_on_unicorn(mode, source, setup_as=None, clobber=None):
    """Set up `setup_as` (default: the guest's mode) in a Unicorn CPU and run the guest.

    Segment registers are written by selector, so Unicorn loads them from our GDT as a
    CPU would. They are loaded before CR0.PG is set: a segment load that faults outside
    `emu_start` crashes Unicorn, while a fault inside it is an ordinary `UcError`. Long
    mode therefore starts in compatibility mode (CS = code32) at a far jump to the
    64-bit code segment, the step a boot loader takes, which loads CS.L from the GDT.
    `clobber` ({gpa: bytes}) overwrites memory after `setup_mode`.
    """
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86
    long = mode is CpuMode.LONG
    engine = unicorn.UC_MODE_16 if mode is CpuMode.REAL else unicorn.UC_MODE_32
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, engine)
    uc.mem_map(0, RAM)
    memory = FakeMemory(RAM)
    sregs = setup_mode(setup_as or mode, KVM_RESET, memory, ram_size=RAM).sregs
    memory.write(DEFAULT_LAYOUT.code, assemble(source))
    regs = initial_regs(mode, DEFAULT_LAYOUT.code, DEFAULT_LAYOUT.stack_top)
    start = regs.rip
    if long:  # jmp far SEL_CODE64:entry, just below the stack top (the guest has no stack use)
        start = DEFAULT_LAYOUT.stack_top - 16
        memory.write(start, b"\xea" + struct.pack("<IH", regs.rip, sregs.cs.selector))
    for gpa, data in (clobber or {}).items():
        memory.write(gpa, data)
    uc.mem_write(0, bytes(memory.data))
    out = bytearray()
    uc.hook_add(unicorn.UC_HOOK_INSN, lambda _uc, port, _size, value, _data:
                out.append(value & 0xFF) if port == 0xE9 else None,
                None, 1, 0, x86.UC_X86_INS_OUT)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
    uc.reg_write(x86.UC_X86_REG_MSR, (0xC0000080, sregs.efer))
    uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
    uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
    uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0 & ~(1 << CR0_BITS["PG"]))
    for name in ("ds", "es", "fs", "gs", "ss", "cs"):
        selector = SEL_CODE32 if long and name == "cs" else getattr(sregs, name).selector
        uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), selector)
    uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
    uc.reg_write(x86.UC_X86_REG_ESP, regs.rsp)
    uc.reg_write(x86.UC_X86_REG_EFLAGS, regs.rflags)
    try:
        uc.emu_start(start, 0, timeout=1_000_000, count=10_000)
    except unicorn.UcError as error:
        return bytes(out), None, str(error)
    return bytes(out), bytes(uc.mem_read(RESULT_GPA, 4)), uc.reg_read(x86.UC_X86_REG_EAX)


@needs_nasm
@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_run_on_unicorn(name):
    ex = EXAMPLES[name]
    out, result, eax = run_on_unicorn(ex.mode, ex.source())
    assert out == ex.expected_output
    assert {RESULT_GPA: result} == ex.expected_memory
    assert eax == ex.expected_regs["rax"]


@needs_nasm
def test_example_guest_notices_the_wrong_mode():
    ex = EXAMPLES["protected"]
    out, result, eax = run_on_unicorn(ex.mode, ex.source(), setup_as=CpuMode.PAGED)
    assert out.startswith(b"Not in protected mode")
    assert (result, eax) == ((0xBAD).to_bytes(4, "little"), 0xBAD)


@needs_nasm
@pytest.mark.parametrize("name", ["paged", "long"])
def test_example_guest_fails_without_its_page_tables(name):
    ex = EXAMPLES[name]
    out, result, error = run_on_unicorn(ex.mode, ex.source(),
                                        clobber={DEFAULT_LAYOUT.page_tables: bytes(4096)})
    assert (out, result) == (b"", None)
    assert "UC_ERR_EXCEPTION" in error  # the page fault on the first fetch
