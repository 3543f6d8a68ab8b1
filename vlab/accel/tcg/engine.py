"""One Unicorn engine: QEMU's TCG x86-64 CPU with its own map of guest-physical memory.

Unicorn's 64-bit engine is used for every CPU mode: its register API reads RAX and RIP
whatever mode the guest switched to, where a 16- or 32-bit engine would read 0 after the
guest enters long mode. `cpustate` puts it in real or protected mode.

Guest RAM and ROM are the host memory the loaders write (`uc_mem_map_ptr`, no copy); every
guest-physical address no region backs is an MMIO hole (`uc_mmio_map` over the gaps), so a
guest access anywhere else reaches the vCPU's callbacks, as a KVM access outside every
memory slot becomes KVM_EXIT_MMIO.

Below the binding's documented API, and only here: the per-exit calls go to the C library
through the binding's own `uclib` prototypes (the binding's `reg_read` dispatch costs more
than the rest of an exit), and `uc_vmem_read`/`uc_vmem_write`/`uc_vmem_translate` (Unicorn
2.1's MMU-translated access, which the binding does not wrap) are declared here.
"""
from __future__ import annotations

import ctypes

from unicorn import (UC_ARCH_X86, UC_ERR_OK, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC,
                     UC_PROT_READ, Uc, UcError)
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

PHYSICAL_LIMIT = 1 << 52   # QEMU's TARGET_PHYS_ADDR_SPACE_BITS for x86-64
UNTIL = (1 << 64) - 1      # `until` is an address emulation stops at; this one is never reached
MAX_INSN = 15              # longest x86 instruction

uclib.uc_vmem_read.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_size_t)
uclib.uc_vmem_write.argtypes = uclib.uc_vmem_read.argtypes
uclib.uc_vmem_translate.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_uint64))
for _f in (uclib.uc_vmem_read, uclib.uc_vmem_write, uclib.uc_vmem_translate):
    _f.restype = ctypes.c_int


class Engine:
    """A Unicorn x86-64 engine and the guest-physical memory map it sees."""

    def __init__(self, mmio_read, mmio_write):
        """`mmio_read(address, size) -> int` and `mmio_write(address, size, value)` receive
        every access to a hole, with its guest-physical address."""
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._handle = self.uc._uch
        self._word = ctypes.c_uint64()
        self._word_ref = ctypes.byref(self._word)
        self._mmio = (lambda uc, offset, size, base: mmio_read(base + offset, size),
                      lambda uc, offset, size, value, base: mmio_write(base + offset, size, value))
        self._backed: set[int] = set()        # gpa of each region mapped
        self._holes: list[tuple[int, int]] = []

    # --- the per-exit path ---------------------------------------------------------------
    def start(self, rip: int, count: int) -> int:
        """`uc_emu_start` at `rip` for at most `count` instructions; returns the uc_err status.
        An exception raised in a hook stopped emulation and is re-raised here."""
        uc = self.uc
        uc._hook_exception = None
        status = uclib.uc_emu_start(self._handle, rip, UNTIL, 0, count)
        if uc._hook_exception is not None:
            raise uc._hook_exception
        return status

    def stop(self) -> None:
        """`uc_emu_stop`: safe from any thread and from hooks; ignored when not running."""
        uclib.uc_emu_stop(self._handle)

    def read(self, reg: int) -> int:
        """A 64-bit register (RAX..R15, RIP, RFLAGS)."""
        uclib.uc_reg_read(self._handle, reg, self._word_ref)
        return self._word.value

    def write(self, reg: int, value: int) -> None:
        self._word.value = value
        uclib.uc_reg_write(self._handle, reg, self._word_ref)

    def rip(self) -> int:
        return self.read(x86.UC_X86_REG_RIP)

    # --- guest memory through the MMU ------------------------------------------------------
    def read_linear(self, address: int, size: int, prot: int = UC_PROT_READ) -> bytes:
        """Up to `size` bytes at a linear address, as far as they are mapped (paging applies)."""
        buffer = ctypes.create_string_buffer(size)
        if uclib.uc_vmem_read(self._handle, address, prot, buffer, size) == UC_ERR_OK:
            return buffer.raw
        out = bytearray()
        while len(out) < size and uclib.uc_vmem_read(
                self._handle, address + len(out), prot, buffer, 1) == UC_ERR_OK:
            out += buffer.raw[:1]
        return bytes(out)

    def fetch(self, address: int) -> bytes:
        """The bytes an instruction at this linear address could occupy."""
        return self.read_linear(address, MAX_INSN, UC_PROT_EXEC)

    def write_linear(self, address: int, data: bytes) -> None:
        status = uclib.uc_vmem_write(self._handle, address, UC_PROT_READ, data, len(data))
        if status != UC_ERR_OK:
            raise UcError(status)

    def physical(self, address: int) -> int:
        """The guest-physical address a linear address maps to now."""
        status = uclib.uc_vmem_translate(self._handle, address, UC_PROT_READ, self._word_ref)
        if status != UC_ERR_OK:
            raise UcError(status)
        return self._word.value

    # --- the memory map ----------------------------------------------------------------------
    def set_memory(self, regions) -> None:
        """Map `regions` (sorted, non-overlapping, page-aligned; each with gpa, size,
        host_address, readonly) and make every gap between them an MMIO hole.

        ROM is mapped read+execute: a guest store to it reaches the UC_HOOK_MEM_WRITE_PROT
        hook, as KVM_MEM_READONLY turns it into an MMIO exit."""
        for gpa, size in self._holes:
            self.uc.mem_unmap(gpa, size)
        self._holes = []
        cursor = 0
        for region in regions:
            if region.gpa not in self._backed:
                perms = UC_PROT_READ | UC_PROT_EXEC if region.readonly else UC_PROT_ALL
                self.uc.mem_map_ptr(region.gpa, region.size, perms, region.host_address)
                self._backed.add(region.gpa)
            self._map_hole(cursor, region.gpa)
            cursor = region.gpa + region.size
        self._map_hole(cursor, PHYSICAL_LIMIT)
        self.flush_translations()

    def _map_hole(self, start: int, end: int) -> None:
        if end > start:
            self.uc.mmio_map(start, end - start, self._mmio[0], start, self._mmio[1], start)
            self._holes.append((start, end - start))

    def flush_translations(self) -> None:
        """Drop translated code. TCG notices the guest rewriting its own code, but not the
        host writing guest memory behind its back (a loader copying a new program in)."""
        self.uc.ctl_flush_tb()

    def close(self) -> None:
        """`uc_close` now (the binding would do it when the engine is garbage-collected)."""
        if self.uc is not None:
            self.uc._Uc__finalizer()
            self.uc = None
