"""Faults the software accelerator once turned into endless loops or tracebacks, run on tcg
and, where /dev/kvm is usable, on KVM: each must end in a decoded outcome (a `RunResult`
with its stop reason), and what KVM decides, tcg decides too."""
from __future__ import annotations

import shutil

import pytest

from vlab.kvm import InternalError, IoIn
from vlab.kvm.abi import InternalErrorSuberror
from vlab.machine.board import TESTDEV_BASE

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]
COM1 = 0x3F8
DOORBELL = TESTDEV_BASE + 0x0C
INSD_INTO_MMIO = f"""
    mov dx, {COM1:#x}
    mov edi, {DOORBELL:#x}
    insd
    hlt
"""


def insd_lab(make_lab, accel):
    """A guest that reads COM1's first four registers (RBR: one received byte) into the
    test device's doorbell, with "x" waiting in the UART."""
    lab = make_lab(accel, mode="protected")
    lab.load_assembly(INSD_INTO_MMIO)
    lab.bring_up()
    lab.machine.devices["serial0"].feed(b"x")
    return lab


def assert_read_once(lab) -> None:
    assert sum(isinstance(record.exit, IoIn) for record in lab.exits().records) == 1
    doorbells = lab.machine.devices["testdev"].doorbells
    # QEMU's TCG stores a dummy 0 before the port read (to be restartable): at most that
    # (a second read would have found the receiver empty: 0 in the low byte)
    assert doorbells[-1] & 0xFF == ord("x") and len(doorbells) <= 2, doorbells


@pytest.mark.parametrize("accel", ACCELS)
def test_insd_from_a_port_into_mmio_completes_once(make_lab, accel):
    """INS reads the port once and stores the value into the device once; tcg used to
    restart it forever, reading the port (and consuming its data) each time."""
    lab = insd_lab(make_lab, accel)
    result = lab.run(timeout=5)
    assert result.stop_reason.startswith("HLT"), result
    assert_read_once(lab)


@pytest.mark.parametrize("accel", ACCELS)
def test_insd_into_mmio_single_stepped(make_lab, accel):
    """Stepped, INS completes once too (tcg takes a step for each of its exits)."""
    lab = insd_lab(make_lab, accel)
    lab.step(), lab.step()
    for _ in range(4):
        if lab.step().rip_after != lab.guest.assembly.org + 9:  # past the INSD
            break
    assert_read_once(lab)


# A real-mode exception whose vector table entry or stack is outside RAM: the CPU cannot
# read the handler's address or push the return frame. Recent KVM ends a delivery by the CPU
# through MMIO with INTERNAL_ERROR DELIVERY_EV; where KVM's emulator delivers it (kvm_pvm, SVM
# without nested paging) the frame goes to the hole as MMIO writes and a vector table there
# is read again without end, until the run's timeout. Either way the run ends decoded; tcg
# ends it with DELIVERY_EV and says why.
STACK_OUTSIDE_RAM = """
    mov ax, 0xF000
    mov ss, ax
    mov sp, 0x100
    int3
    hlt
"""
IVT_OUTSIDE_RAM = """
    lidt [idtr]
    int3
    hlt
idtr: dw 0x3ff
      dd 0xF00000
"""


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("source, memory, outside", [
    (STACK_OUTSIDE_RAM, "64K", 0xF00FE),
    (IVT_OUTSIDE_RAM, "64K", 0xF0000C),
    (IVT_OUTSIDE_RAM, "1M", 0xF0000C),
], ids=["stack", "vector-table", "vector-table-1M"])
def test_real_mode_exception_delivered_outside_ram(make_lab, accel, source, memory, outside):
    lab = make_lab(accel, memory=memory)
    lab.load_assembly(source)
    lab.bring_up()
    result = lab.run(timeout=1)
    assert result.stop_reason, result
    exit = result.last_exit
    if isinstance(exit, InternalError):
        assert exit.suberror == InternalErrorSuberror.DELIVERY_EV
        assert "DELIVERY_EV" in result.explanation
    if lab.backend.kind == "tcg":
        assert isinstance(exit, InternalError) and exit.data[0] == 3  # int3's vector
        assert f"{outside:#x}" in result.explanation and "outside" in result.explanation
        assert "software CPU" in result.explanation and "KVM" not in result.explanation.split(
            "\n")[0]


@pytest.mark.parametrize("memory", ["64K", "1M"])
def test_real_mode_exception_outside_ram_single_stepped_on_tcg(make_lab, memory):
    lab = make_lab("tcg", memory=memory)
    lab.load_assembly(IVT_OUTSIDE_RAM)
    lab.bring_up()
    lab.step()
    step = lab.step()
    assert isinstance(step.exit, InternalError)
    assert step.exit.suberror == InternalErrorSuberror.DELIVERY_EV


def test_ud2_on_tcg_is_not_blamed_on_kvm(make_lab):
    """#UD through a protected-mode IDT, which tcg does not deliver."""
    lab = make_lab("tcg", mode="protected")
    lab.load_assembly("lidt [idtr]\nud2\nidtr: dw 0x3FF\n dd 0")
    lab.bring_up()
    result = lab.run(timeout=5)
    assert isinstance(result.last_exit, InternalError) and result.last_exit.data == (6,)
    assert "KVM" not in result.explanation and "KVM" not in result.stop_reason
    assert "software CPU" in result.explanation and "ud2" in result.explanation


@pytest.mark.parametrize("accel", ACCELS)
def test_code_in_an_mmio_hole_is_explained_as_such(make_lab, accel):
    lab = make_lab(accel, mode="protected")
    lab.load_assembly(f"mov eax, {TESTDEV_BASE:#x}\njmp eax")
    lab.bring_up()
    result = lab.run(timeout=5)
    assert isinstance(result.last_exit, InternalError) and result.rip == TESTDEV_BASE
    assert "outside them (an MMIO hole" in result.explanation
    assert "#UD" not in result.explanation


def test_emulation_failure_on_kvm_names_kvms_emulator(make_lab):
    """The other side of the same explanation, with an exit as KVM reports it."""
    from vlab.kvm.backend import KVM_PVM, VMX
    from vlab.kvm.state import Regs, Sregs
    from vlab.machine.explain import explain_internal_error
    exit = InternalError(InternalErrorSuberror.EMULATION, insn_bytes=b"\x0f\x0b")
    for backend in (VMX, KVM_PVM):
        text = explain_internal_error(exit, Regs(), Sregs(), b"\x0f\x0b", backend)
        assert "KVM's instruction emulator" in text


@pytest.mark.parametrize("accel", ACCELS)
def test_pc_memory_init_can_be_retried_after_a_failure(make_lab, accel):
    """A guest that does not fit fails pc_memory_init; a fixed one then loads (tcg used to
    say "region 'pc.ram' overlaps 'pc.ram'")."""
    lab = make_lab(accel, memory="64K")
    for _ in range(4):
        lab.next_stage()
    lab.load_assembly("hlt", org=0x20000)
    with pytest.raises(ValueError, match="outside guest memory"):
        lab.pc_memory_init()
    lab.load_assembly("hlt")
    lab.pc_memory_init()
    lab.next_stage()
    assert lab.run(timeout=5).stop_reason.startswith("HLT")
