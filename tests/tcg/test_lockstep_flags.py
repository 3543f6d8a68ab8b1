"""How lockstep tells a flag the instruction leaves undefined from a real divergence: two tcg
vCPUs, the second made to set one flag its own way after a MUL, as a CPU of another make may.
Needs nasm, not /dev/kvm."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from vlab.machine import lockstep as lockstep_module
from vlab.machine.lockstep import (UndefinedFlags, lockstep, undefined_flags,
                                   undefined_flags_differing)
from vlab.machine.snapshot import RegisterSnapshot

CF, PF, SF, TF, OF, RF = 1 << 0, 1 << 2, 1 << 7, 1 << 8, 1 << 11, 1 << 16
MUL_RCX = bytes.fromhex("48f7e1")
ADD_EAX_ECX = bytes.fromhex("01c8")
SHLD_ECX_EAX_3 = bytes.fromhex("0fa4c103")
GUEST = """
    mov rax, 0x123456789ABCDEF0
    mov rcx, 7
    mul rcx
    mov r8, rdx
    hlt
"""


def test_undefined_flags_by_instruction():
    assert undefined_flags(MUL_RCX, 64) == ("AF", "PF", "SF", "ZF")
    assert undefined_flags(ADD_EAX_ECX, 64) == ()
    assert {"AF", "OF"} <= set(undefined_flags(SHLD_ECX_EAX_3, 64))


@pytest.mark.parametrize("difference, named", [
    (PF, ("PF",)), (PF | SF, ("PF", "SF")), (CF, ()), (PF | CF, ()), (RF, ())])
def test_only_undefined_flags_are_named(difference, named):
    assert undefined_flags_differing((0x246, 0x246 ^ difference), MUL_RCX, 64) == named
    assert undefined_flags_differing((0x246, 0x246 ^ difference), ADD_EAX_ECX, 64) == ()


@pytest.fixture
def second_side(monkeypatch):
    """`after(code, change)`: each time the second vCPU has stepped an instruction starting
    with `code`, `change(side)` runs; the step then reports the registers as they are."""
    if shutil.which("nasm") is None:
        pytest.skip("nasm is not installed")
    sides, real_init, real_step = [], lockstep_module._Side.__init__, lockstep_module._Side.step

    def init(side, *args, **kwargs):
        real_init(side, *args, **kwargs)
        sides.append(side)

    def after(code: bytes, change) -> None:
        def step(side):
            result = real_step(side)
            if side is sides[1] and lockstep_module._code(side, result.before).startswith(code):
                change(side)
                result = replace(result, after=RegisterSnapshot.capture(side.runner.vcpu))
            return result
        monkeypatch.setattr(lockstep_module._Side, "step", step)

    monkeypatch.setattr(lockstep_module._Side, "__init__", init)
    return after


@pytest.fixture
def second_sets_after_mul(second_side):
    """`flip(bits)`: after every MUL, the second vCPU's RFLAGS get `bits` toggled."""
    def flip(bits: int) -> None:
        def change(side):
            vcpu = side.runner.vcpu
            regs = vcpu.get_regs()
            vcpu.set_regs(replace(regs, rflags=regs.rflags ^ bits))
        second_side(MUL_RCX, change)
    return flip


def test_an_undefined_flag_set_otherwise_is_named_and_stepping_goes_on(second_sets_after_mul):
    second_sets_after_mul(PF)
    report = lockstep(GUEST, "long", accels=("tcg", "tcg"))
    assert report.agreed and report.stop.startswith("both halted at "), str(report)
    [note] = report.undefined
    assert isinstance(note, UndefinedFlags) and (note.step, note.flags) == (3, ("PF",))
    assert note.disassembly.endswith("mul rcx") and note.rflags[0] ^ note.rflags[1] == PF
    assert report.final[0].regs == report.final[1].regs  # the second took the first's RFLAGS
    assert str(report).splitlines()[1] == f"  undefined flags differ after {note}"
    assert "leaves PF undefined" in str(note)


def test_a_defined_flag_set_otherwise_is_a_divergence(second_sets_after_mul):
    second_sets_after_mul(CF)  # MUL defines CF (and OF): the upper half is not zero
    report = lockstep(GUEST, "long", accels=("tcg", "tcg"))
    d = report.divergence
    assert d is not None and d.step == 3 and d.disassembly.endswith("mul rcx")
    assert list(d.registers) == ["rflags"] and report.undefined == []


def test_tf_a_stepped_pushf_stores_is_cleared_as_without_a_debugger(second_side):
    """On VMX and SVM KVM single-steps with the guest's own TF set, so a stepped PUSHF
    stores TF (RFLAGS bit 8); here the second vCPU is made to do the same."""
    def store_tf(side):
        regs, sregs = side.runner.vcpu.get_regs(), side.runner.vcpu.get_sregs()
        at = sregs.ss.base + regs.rsp + 1
        side.machine.memory.write(at, bytes([side.machine.read_physical(at, 1)[0] | 1]))

    second_side(bytes([0x9C]), store_tf)
    report = lockstep("mov ax, 0x7FFF\nadd ax, 1\npushf\npop bx\nhlt", accels=("tcg", "tcg"))
    assert report.agreed and report.stop.startswith("both halted at "), str(report)
    kvm, tcg = report.final
    assert kvm.regs.rbx == tcg.regs.rbx and not kvm.regs.rbx & TF and kvm.regs.rbx & OF
