"""The Linux loader on real KVM: a small 32-bit "kernel" checks, from inside the guest, the
state the boot protocol (bzImage) and PVH hand over; and on a backend that emulates guest
kernel code (kvm_pvm) a Debian kernel stops with the explained emulation failure, within a
bounded time, through `vlab run --linux` and `Lab.load_linux` alike. That kernel's boot to
/init where guest kernel code runs natively (VMX, SVM) is test_linux_boot_svm.py's."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from linux_images import make_bzimage, make_pvh_elf
from vlab.kvm import detect_backend
from vlab.machine.assembler import assemble
from vlab.machine.debian_kernel import KernelPackageError, linux_kernel
from vlab.machine.initramfs import MARKER, build_initramfs
from vlab.machine.linux import BOOT_INFO, boot_linux
from vlab.machine.pc import BY_GUEST, BY_VCPU

pytestmark = pytest.mark.kvm
REPO = Path(__file__).resolve().parents[2]
MEMORY = "64M"
APPEND = "vlab entry check"
INITRD = b"INIT" + bytes(range(256)) * 16
STOP_TIMEOUT = 120   # seconds: the Debian kernel stops in its emulator in a few here
BOOT_TIMEOUT = 240   # seconds: a boot to /init where kernel code runs natively
PASS = 1             # isa-debug-exit status of the guest's `out 0xf4, 0`

# The guest checks what it was handed, in order, and writes the number of the first check
# that failed to isa-debug-exit (status 2n+1), or 0 (status 1) when all passed.
ENTRY_CHECK = r"""
bits 32
start:
%ifdef PVH
    cmp ebx, {info}             ; 1: EBX = hvm_start_info
    mov al, 1
    jne fail
    mov esi, ebx
    mov esp, 0x8000
%else
    cmp esi, {info}             ; 1: ESI = the zero page
    mov al, 1
    jne fail
    mov eax, ebx                ; 2: EBX, EBP, EDI zero
    or eax, ebp
    or eax, edi
    mov al, 2
    jnz fail
    lea esp, [esi + 0x1e4 + 4]  ; a stack in boot_params.scratch, as Linux's startup_32
%endif
    mov eax, cs                 ; 3: CS = __BOOT_CS
    cmp ax, 0x10
    mov al, 3
    jne fail
    mov eax, ds                 ; 4: DS = ES = SS = __BOOT_DS
    mov ecx, es
    mov edx, ss
    cmp ax, 0x18
    jne .seg
    cmp cx, 0x18
    jne .seg
    cmp dx, 0x18
.seg:
    mov al, 4
    jne fail
    pushfd                      ; 5: interrupts off
    pop eax
    test eax, 0x200
    mov al, 5
    jnz fail
    mov eax, cr0                ; 6: protected mode, paging off
    and eax, 0x80000001
    cmp eax, 1
    mov al, 6
    jne fail
%ifdef PVH
    cmp dword [esi], 0x336ec578 ; 7: hvm_start_info magic, version 1
    jne .magic
    cmp dword [esi + 4], 1
.magic:
    mov al, 7
    jne fail
    cmp dword [esi + 12], 1     ; 8: one module, the initrd, with its size
    jne .mod
    mov edi, [esi + 16]
    mov ecx, [edi + 8]
    mov edi, [edi]
    cmp dword [edi], 'INIT'
    jne .mod
    cmp ecx, {initrd_size}
.mod:
    mov al, 8
    jne fail
    mov edi, [esi + 24]         ; 9: the command line
    cmp dword [edi], 'vlab'
    mov al, 9
    jne fail
    cmp dword [esi + 48], 4     ; 10: four memory map entries, the last RAM from 1 MiB
    jne .map
    mov edi, [esi + 40]
    cmp dword [edi + 3 * 24], 0x100000
    jne .map
    cmp dword [edi + 3 * 24 + 16], 1
.map:
    mov al, 10
    jne fail
%else
    cmp dword [esi + 0x202], 'HdrS'   ; 7: the setup header copied to 0x1f1
    mov al, 7
    jne fail
    cmp byte [esi + 0x210], 0xff      ; 8: type_of_loader, code32_start
    jne .loader
    cmp dword [esi + 0x214], start
.loader:
    mov al, 8
    jne fail
    mov edi, [esi + 0x228]            ; 9: cmd_line_ptr
    cmp dword [edi], 'vlab'
    mov al, 9
    jne fail
    cmp byte [esi + 0x1e8], 4         ; 10: e820_entries, the last RAM from 1 MiB
    jne .e820
    cmp dword [esi + 0x2d0 + 3 * 20], 0x100000
    jne .e820
    cmp dword [esi + 0x2d0 + 3 * 20 + 16], 1
.e820:
    mov al, 10
    jne fail
    mov edi, [esi + 0x218]            ; 11: ramdisk_image, ramdisk_size
    cmp dword [edi], 'INIT'
    jne .initrd
    cmp dword [esi + 0x21c], {initrd_size}
.initrd:
    mov al, 11
    jne fail
%endif
    xor eax, eax
fail:
    out 0xf4, al
    hlt
    jmp fail
"""


def entry_check(pvh: bool) -> bytes:
    source = ENTRY_CHECK.format(info=BOOT_INFO, initrd_size=len(INITRD))
    code = assemble(("%define PVH\n" if pvh else "") + source, bits=32, org=0x100000).code
    return make_pvh_elf(code) if pvh else make_bzimage(code)


@pytest.mark.parametrize("pvh", [False, True], ids=["bzImage", "PVH"])
def test_the_guest_finds_what_the_boot_protocol_promises(kvm, pvh):
    result = boot_linux(entry_check(pvh), INITRD, append=APPEND, memory=MEMORY, timeout=30)
    assert result.ended_by == BY_GUEST, result.summary()
    assert result.status == PASS, f"check {result.status >> 1} failed\n{result.summary()}"


def test_lab_load_linux_runs_the_same_guest(make_lab):
    lab = make_lab(memory=MEMORY, irqchip=True)
    lab.load_linux(entry_check(pvh=False), INITRD, APPEND)
    lab.bring_up()
    notes = lab.records["kvm_arch_put_registers"].notes
    assert any(note.startswith("Linux, bzImage, 32-bit boot protocol 2.15") for note in notes)
    assert any(f"zero page at {BOOT_INFO:#x}" in note for note in notes)
    assert lab.vcpus[0].get_regs().rsi == BOOT_INFO
    devices = lab.records["pc_memory_init"].notes[-1]
    assert devices.startswith("devices for Linux") and "rtc" in devices and "i8042" in devices
    result = lab.run(timeout=30)
    assert result.stop_reason.endswith(f"isa-debug-exit: the guest asked to exit with status "
                                       f"{PASS}"), result


ECHO_FIRST_KEY = """
bits 32
poll:
    mov dx, 0x3fd       ; COM1's LSR: wait for Data Ready
    in al, dx
    test al, 1
    jz poll
    mov dx, 0x3f8       ; the byte received, as the exit status
    in al, dx
    out 0xf4, al
    hlt
"""


def test_vlab_run_linux_feeds_stdin_to_the_serial_port(kvm, tmp_path):
    """What arrives on vlab run's stdin reaches COM1's receiver (an interactive initramfs's
    shell reads it there): this guest exits with the first byte it receives."""
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(assemble(ECHO_FIRST_KEY, bits=32, org=0x100000).code))
    proc = subprocess.run(
        [sys.executable, "-m", "vlab.cli", "run", "--linux", str(kernel), "--memory", MEMORY,
         "--timeout", "30"], input=b"Z", capture_output=True, timeout=90, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == (ord("Z") << 1 | 1) & 0xFF, proc.stdout + proc.stderr


# --- a Debian kernel where guest kernel code is emulated ------------------------------------

emulating = pytest.mark.skipif(
    not detect_backend().emulates_kernel_mode,
    reason="guest kernel code runs natively on this KVM backend: Linux boots here, which "
           "test_linux_boot_svm.py checks")


@pytest.fixture(scope="module")
def debian_kernel():
    try:
        return linux_kernel(log=lambda msg: None)
    except KernelPackageError as e:
        pytest.skip(f"no Debian kernel to boot: {e}")


def assert_explained_emulation_failure(text: str) -> None:
    """The explainer's diagnosis: KVM's emulator gave up, the instruction disassembled, and
    why this backend emulates kernel code at all."""
    backend = detect_backend()
    assert "INTERNAL_ERROR EMULATION: KVM's instruction emulator could not emulate" in text, text
    assert re.search(r"instruction at RIP \(64-bit code, bytes reported by KVM\): "
                     r"0x[0-9a-f]+: (?:[0-9a-f]{2} )+ \w+", text), text
    assert f"On this backend ({backend.module}) every kernel-mode (CPL0) instruction" in text


@emulating
def test_vlab_run_linux_stops_with_the_explained_emulation_failure(kvm, debian_kernel):
    initrd = build_initramfs(log=lambda msg: None)
    proc = subprocess.run(
        [sys.executable, "-m", "vlab.cli", "run", "--linux", str(debian_kernel), "--initrd",
         str(initrd), "--append", "console=ttyS0", "--timeout", str(STOP_TIMEOUT)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STOP_TIMEOUT + 60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr   # a vCPU stopped, not a timeout
    assert "Linux, bzImage, 32-bit boot protocol" in proc.stdout
    assert "vCPU 0 stopped: INTERNAL_ERROR EMULATION" in proc.stdout
    assert_explained_emulation_failure(proc.stdout)


@emulating
def test_lab_load_linux_stops_with_the_explained_emulation_failure(make_lab, debian_kernel):
    lab = make_lab(memory="256M", irqchip=True)
    lab.load_linux(debian_kernel, build_initramfs(log=lambda msg: None), "console=ttyS0")
    lab.bring_up()
    result = lab.run(timeout=STOP_TIMEOUT)
    assert result.stop_reason.startswith("INTERNAL_ERROR EMULATION"), result
    assert lab.exits().histogram().get("INTERNAL_ERROR") == 1
    assert_explained_emulation_failure(result.explanation)


@emulating
def test_boot_linux_stops_within_bounded_time(kvm, debian_kernel):
    result = boot_linux(debian_kernel, build_initramfs(log=lambda msg: None),
                        append="console=ttyS0", timeout=STOP_TIMEOUT)
    assert result.ended_by == BY_VCPU, result.summary()
    assert result.seconds < STOP_TIMEOUT
    assert_explained_emulation_failure(result.vcpus[0].explanation)


@pytest.mark.skipif(detect_backend().emulates_kernel_mode,
                    reason="this KVM backend emulates guest kernel code (kvm_pvm): Linux stops "
                           "in KVM's emulator, which the tests above check")
def test_lab_boots_linux_to_init_and_powers_off(make_lab, debian_kernel):
    """The same stages as any guest, and a Debian kernel reaches the initramfs's /init,
    whose `poweroff -f` ends the run (ACPI S5)."""
    lab = make_lab(memory="256M", irqchip=True)
    lab.load_linux(debian_kernel, build_initramfs(log=lambda msg: None), "console=ttyS0")
    lab.bring_up()
    result = lab.run(timeout=BOOT_TIMEOUT)
    assert MARKER in lab.console, f"{result}\n{lab.console[-3000:]}"
    assert "the guest powered off" in result.stop_reason, result
