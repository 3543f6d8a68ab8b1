"""The Unicorn engine wrapper on its own: memory map, hooks, linear access."""
from __future__ import annotations

import gc
import mmap
import weakref

import pytest
from unicorn import UC_ERR_OK
from unicorn import x86_const as x86

from vlab.accel.tcg import engine as engine_module
from vlab.accel.tcg.cpustate import write_sregs
from vlab.accel.tcg.engine import Engine
from vlab.kvm.abi import ffi
from vlab.kvm.exits import IoIn, IoOut
from vlab.kvm.state import Segment, Sregs

REAL_MODE = Sregs(cs=Segment(type=11))


class Region:
    def __init__(self, gpa: int, size: int, readonly: bool = False):
        self.gpa, self.size, self.readonly = gpa, size, readonly
        self.memory = mmap.mmap(-1, size)
        self.host_address = int(ffi.cast("uintptr_t", ffi.from_buffer(self.memory)))


@pytest.fixture
def engine():
    accesses = []
    made = Engine(lambda address, size: accesses.append(("read", address, size)) or 0x5A,
                  lambda address, size, value: accesses.append(("write", address, size, value)))
    made.accesses = accesses
    write_sregs(made.uc, REAL_MODE)
    yield made
    made.close()


def run(engine, ram, code: bytes) -> int:
    ram.memory[0x8000:0x8000 + len(code)] = code
    engine.flush_translations()
    engine.write(x86.UC_X86_REG_RIP, 0x8000)
    return engine.start(100)


def test_a_hole_page_is_mapped_on_first_touch_and_gives_way_to_a_region(engine):
    ram, rom = Region(0, 0x10000), Region(0x20000, 0x1000, readonly=True)
    engine.set_memory([ram, rom])
    assert sorted(engine.uc.mem_regions()) == [(0, 0xFFFF, 7), (0x20000, 0x20FFF, 5)]
    # mov al, [0x1000] with DS base 0x30000: a hole
    write_sregs(engine.uc, REAL_MODE.replace(ds=Segment(selector=0x3000, base=0x30000)))
    assert run(engine, ram, bytes.fromhex("a0 0010 f4")) == UC_ERR_OK
    assert engine.accesses == [("read", 0x31000, 1)]
    assert (0x31000, 0x31FFF, 3) in engine.uc.mem_regions()
    late = Region(0x30000, 0x4000)
    late.memory[0x1000] = 0x77
    engine.set_memory([ram, rom, late])
    assert sorted(engine.uc.mem_regions())[2] == (0x30000, 0x33FFF, 7)
    assert run(engine, ram, bytes.fromhex("a0 0010 f4")) == UC_ERR_OK
    assert engine.read(x86.UC_X86_REG_RAX) & 0xFF == 0x77
    assert len(engine.accesses) == 1


def test_guest_ram_is_the_host_memory(engine):
    ram = Region(0, 0x10000)
    engine.set_memory([ram])
    ram.memory[0x1000] = 0x42
    assert run(engine, ram, bytes.fromhex("a0 0010 f4")) == UC_ERR_OK   # mov al, [0x1000]
    assert engine.read(x86.UC_X86_REG_RAX) & 0xFF == 0x42
    assert engine.read_linear(0x1000, 1) == b"\x42"
    engine.write_linear(0x1001, b"\x43")
    assert ram.memory[0x1001] == 0x43


def test_hole_accesses_reach_the_callbacks_with_physical_addresses(engine):
    ram = Region(0, 0x10000)
    engine.set_memory([ram])
    # mov al, [0]; mov [2], al with DS base 0x20000; hlt
    write_sregs(engine.uc, REAL_MODE.replace(ds=Segment(selector=0x2000, base=0x20000)))
    assert run(engine, ram, bytes.fromhex("a0 0000 a2 0200 f4")) == UC_ERR_OK
    assert engine.accesses == [("read", 0x20000, 1), ("write", 0x20002, 1, 0x5A)]


@pytest.fixture(params=["C", "ctypes"])
def trampoline(request, monkeypatch):
    """The IN and OUT hooks in C (`_insnhooks`), and the ctypes ones vlab uses without it."""
    if request.param == "C" and engine_module._insnhooks is None:
        pytest.skip("vlab.accel.tcg._insnhooks is not built (no C compiler at install)")
    if request.param == "ctypes":
        monkeypatch.setattr(engine_module, "_C_HOOKS", {})
    return request.param


def test_io_hooks_get_the_exit_with_rip_and_cs_at_the_instruction(engine, trampoline):
    ram = Region(0, 0x10000)
    engine.set_memory([ram])
    write_sregs(engine.uc, REAL_MODE.replace(cs=Segment(selector=0x700, base=0x7000, type=11)))
    seen = []
    engine.hook_insn(x86.UC_X86_INS_OUT, lambda *args: seen.append(("out", *args)))
    engine.hook_insn(x86.UC_X86_INS_IN, lambda *args: seen.append(("in", *args)) or 0x1234)
    # at CS:IP 0x700:0x1000: mov al, 0x5a; out 0x80, al; in ax, dx; hlt
    ram.memory[0x8000:0x8006] = bytes.fromhex("b0 5a e6 80 ed f4")
    engine.flush_translations()
    engine.write(x86.UC_X86_REG_RDX, 0x3F8)
    engine.write(x86.UC_X86_REG_RIP, 0x1000)
    assert engine.start(100) == UC_ERR_OK
    assert seen == [("out", IoOut(0x80, 1, 1, b"\x5a"), 0x1002, 0x700),
                    ("in", IoIn(0x3F8, 2, 1, 0), 0x1004, 0x700)]
    assert engine.read(x86.UC_X86_REG_RAX) & 0xFFFF == 0x1234


def test_an_engine_and_what_its_hooks_call_are_collected(trampoline):
    """The hooks refer to their owner, which holds the engine: a cycle the collector frees."""
    class Owner:
        def on_out(self, exit, rip, cs):
            pass

    owner = Owner()
    owner.engine = Engine(lambda address, size: 0, lambda address, size, value: None)
    owner.engine.hook_insn(x86.UC_X86_INS_OUT, owner.on_out)
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("insn, code", [(x86.UC_X86_INS_OUT, "e6 80 f4"),   # out 0x80, al
                                        (x86.UC_X86_INS_IN, "e4 80 f4")])   # in al, 0x80
def test_an_exception_in_an_io_hook_is_raised_by_start(engine, trampoline, insn, code):
    ram = Region(0, 0x10000)
    engine.set_memory([ram])

    def broken(exit, rip, cs):
        raise RuntimeError(f"port {exit.port:#x}")

    engine.hook_insn(insn, broken)
    with pytest.raises(RuntimeError, match="port 0x80"):
        run(engine, ram, bytes.fromhex(code))
    assert engine.rip() == 0x8002   # stopped after the instruction, before the HLT


def test_fetch_stops_where_memory_ends(engine):
    ram = Region(0, 0x10000)
    engine.set_memory([ram])
    ram.memory[0xFFFC:0x10000] = b"\x90\x90\x90\x90"
    assert engine.fetch(0xFFFC) == b"\x90" * 4
