"""The board on real KVM: the example guest of each CPU mode, the standard devices as guests
use them, and the record kept of every exit."""
from __future__ import annotations

import pytest

from boards import board  # noqa: F401 (fixture)
from vlab.kvm import Hlt, IoIn, MmioRead, MmioWrite, Shutdown, detect_backend
from vlab.machine.board import TESTDEV_BASE
from vlab.machine.examples import EXAMPLES, RESULT_GPA

BACKEND = detect_backend()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_guest_of_each_cpu_mode(board, name):
    example = EXAMPLES[name]
    guest = board(example.source(), example.mode, example.org)
    result = guest.runner.run(timeout=10)
    if name == "paged" and not BACKEND.runs_32bit_paging:
        # This backend (kvm_pvm) cannot run 32-bit paging: the first instruction faults.
        assert isinstance(result.last_exit, Shutdown), result
        assert result.exits == 1 and result.rip == example.org
        assert guest.machine.console.data == b""
        assert "cannot run 32-bit paging" in result.explanation
        return
    assert isinstance(result.last_exit, Hlt), result
    assert guest.runner.halted
    assert guest.machine.console.data == example.expected_output
    for gpa, expected in example.expected_memory.items():
        assert guest.machine.memory.read(gpa, len(expected)) == expected
    regs = guest.vcpu.get_regs()
    for register, value in example.expected_regs.items():
        assert getattr(regs, register) & 0xFFFFFFFF == value
    assert guest.machine.memory.read(RESULT_GPA, 4) == (42).to_bytes(4, "little")


SERIAL_GUEST = """
    mov si, message
next:
    lodsb
    test al, al
    jz done
    mov bl, al
    mov dx, 0x3fd           ; LSR
.wait:
    in al, dx
    test al, 0x20           ; THRE: the transmitter takes a byte
    jz .wait
    mov al, bl
    mov dx, 0x3f8           ; THR
    out dx, al
    jmp next
done:
    hlt
message: db "serial ok", 10, 0
"""


def test_serial_output_from_a_guest_that_polls_lsr(board):
    guest = board(SERIAL_GUEST)
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, Hlt), result
    assert guest.machine.console.data == b"serial ok\n"
    log = guest.machine.log
    assert log.histogram() == {"IO in": 10, "IO out": 10, "HLT": 1}  # two exits per byte
    ins = [r for r in log if isinstance(r.exit, IoIn)]
    assert {(r.exit.port, r.device, r.claimed) for r in ins} == {(0x3FD, "serial0", True)}
    assert guest.machine.devices["serial0"].state()["lsr"] & 0x60 == 0x60


def test_isa_debug_exit_ends_the_run_with_its_status(board):
    guest = board("""
        mov al, 0x21
        out 0xf4, al
        mov al, '!'
        out 0xe9, al        ; never reached: the run stops at the exit request
        hlt
    """)
    result = guest.runner.run(timeout=10)
    assert "isa-debug-exit" in result.stop_reason and "status 67" in result.stop_reason
    assert guest.machine.exit_request.status == (0x21 << 1) | 1
    assert guest.machine.console.data == b"" and not guest.runner.halted
    assert guest.machine.log.last.device == "debug-exit"


def test_fw_cfg_signature_read_by_the_guest(board):
    """The guest selects key 0 with a 16-bit OUT and reads the signature with `rep insb`,
    then checks it itself: string I/O through KVM_EXIT_IO with count > 1."""
    guest = board("""
        mov dx, 0x510
        xor ax, ax              ; FW_CFG_SIGNATURE
        out dx, ax
        inc dx                  ; the data port
        mov di, 0x500
        mov cx, 4
        cld
        rep insb
        mov al, 'Y'
        cmp dword [0x500], 'QEMU'
        je report
        mov al, 'N'
    report:
        out 0xe9, al
        hlt
    """)
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, Hlt), result
    assert guest.machine.memory.read(0x500, 4) == b"QEMU"
    assert guest.machine.console.data == b"Y"
    reads = [r for r in guest.machine.log if isinstance(r.exit, IoIn)]
    assert all(r.device == "fw_cfg" for r in reads)
    assert sum(r.exit.count for r in reads) == 4


def test_mmio_test_device_from_a_protected_mode_guest(board):
    guest = board(f"""
        mov esi, {TESTDEV_BASE:#x}
        mov eax, [esi]              ; ID
        mov dword [esi + 4], 0x1234 ; SCRATCH
        mov ebx, [esi + 4]
        mov ecx, [esi + 8]          ; COUNTER: 1
        mov ecx, [esi + 8]          ; COUNTER: 2
        mov dword [esi + 12], 7     ; DOORBELL
        mov edx, -1
        mov edx, [0xe0000000]       ; nobody there: 0, as QEMU 7.2's unassigned memory
        hlt
    """, mode="protected")
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, Hlt), result
    regs = guest.vcpu.get_regs()
    assert (regs.rax, regs.rbx, regs.rcx, regs.rdx) == (0x564C4142, 0x1234, 2, 0)
    assert guest.machine.devices["testdev"].doorbells == [7]
    mmio = [r for r in guest.machine.log if isinstance(r.exit, (MmioRead, MmioWrite))]
    assert [(r.reason, r.device, r.claimed) for r in mmio] == [
        ("MMIO read", "testdev", True), ("MMIO write", "testdev", True),
        ("MMIO read", "testdev", True), ("MMIO read", "testdev", True),
        ("MMIO read", "testdev", True), ("MMIO write", "testdev", True),
        ("MMIO read", "unassigned: reads 0 (QEMU's unassigned_mem_ops)", False)]
    assert mmio[-1].exit.address == 0xE000_0000


def test_every_exit_is_recorded_with_rip_device_and_kernel_deltas(board):
    guest = board("""
        mov al, 'x'
        out 0xe9, al            ; first
    after_first:
        nop
        out 0x80, al            ; nobody listens on port 0x80
    after_second:
        hlt
    """)
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, Hlt), result
    log = guest.machine.log
    first, second, halt = list(log)
    assert [r.seq for r in log] == [1, 2, 3] and {r.vcpu for r in log} == {0}
    assert (first.reason, first.device, first.claimed) == ("IO out", "debugcon", True)
    assert (second.device, second.claimed) == (None, False)
    assert isinstance(halt.exit, Hlt) and halt.device is None
    assert all(r.duration_s > 0 for r in log)
    if BACKEND.out_exit_rip == "past":
        # kvm_pvm: KVM's emulator finishes an OUT before it exits, RIP is past it.
        assert first.rip == guest.address("after_first")
        assert second.rip == guest.address("after_second")
    else:
        # VMX, SVM: the exit is on the OUT itself; KVM skips it on the next KVM_RUN.
        assert first.rip == guest.address("out 0xe9")
        assert second.rip == guest.address("out 0x80")
    assert guest.runner.counter_names, "KVM_GET_STATS_FD gave no counters"
    # Each record's "before" is the previous record's "after": deltas cover exactly the
    # time between two userspace exits.
    for previous, current in zip(log, list(log)[1:]):
        assert current.counters_before == previous.counters_after
    for r in log:
        delta = log.kernel_delta(r)
        assert delta["exits"] >= 1, delta
        if BACKEND.emulates_kernel_mode:
            assert delta["insn_emulation"] > 0, delta
    assert log.kernel_delta(halt)["halt_exits"] == 1
    # Both OUTs are port I/O exits; kvm_pvm's io_exits stays 0 (Backend.counts_io_exits).
    assert log.kernel_totals()["io_exits"] == (2 if BACKEND.counts_io_exits else 0)
    assert log.kernel_totals()["exits"] >= 3
    df = log.to_dataframe()
    assert df["reason"].tolist() == ["IO out", "IO out", "HLT"]
    assert df["kvm.exits"].sum() == log.kernel_totals()["exits"]
