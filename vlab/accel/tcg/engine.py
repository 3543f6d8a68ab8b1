"""One Unicorn engine: QEMU's TCG x86-64 CPU with its own map of guest-physical memory.

Unicorn's 64-bit engine is used for every CPU mode: its register API reads RAX and RIP
whatever mode the guest switched to, where a 16- or 32-bit engine would read 0 after the
guest enters long mode. `cpustate` puts it in real or protected mode.

Guest RAM and ROM are the host memory the loaders write (`uc_mem_map_ptr`, no copy); every
guest-physical page no region backs is an MMIO hole (`uc_mmio_map`, on first touch), so a
guest access anywhere else reaches the vCPU's callbacks, as a KVM access outside every
memory slot becomes KVM_EXIT_MMIO.

Below the binding's documented API, and only here: the per-exit calls (emu_start, reg_read,
the IN, OUT and CPUID hooks) go straight to the C library through the binding's `uclib`
prototypes, because the binding's per-call layers cost as much as the rest of an exit; the
hooks are registered with `uc_hook_add` and report exceptions through the binding's
`_hook_exception`, as its own hooks do; `close` runs its finalizer; and
`uc_vmem_read`/`uc_vmem_write` (MMU-translated access, new in Unicorn 2.1 and not wrapped
by the binding) are declared here. This ties the module to Unicorn 2.1's Python binding.
The IN and OUT hooks are C functions (`_insnhooks.c`) where vlab was built with a compiler:
a ctypes callback, the RIP and CS reads and the exit object made in Python cost as much as
the rest of a port access handled inside emulation. Without it, ctypes trampolines do the
same at Python speed.
"""
from __future__ import annotations

import ctypes

from unicorn import (UC_ARCH_X86, UC_ERR_OK, UC_HOOK_INSN, UC_HOOK_MEM_FETCH_UNMAPPED,
                     UC_HOOK_MEM_READ_UNMAPPED, UC_HOOK_MEM_WRITE_UNMAPPED,
                     UC_MEM_FETCH_UNMAPPED, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC,
                     UC_PROT_READ, Uc, UcError)
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from ...kvm.exits import IoIn, IoOut
from ...x86 import MAX_INSN, PAGE_SIZE

try:
    from . import _insnhooks
except ImportError:   # built without a C compiler: the ctypes trampolines of `hook_insn`
    _insnhooks = None


uclib.uc_vmem_read.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_size_t)
uclib.uc_vmem_write.argtypes = uclib.uc_vmem_read.argtypes
uclib.uc_vmem_read.restype = uclib.uc_vmem_write.restype = ctypes.c_int
_emu_start, _emu_stop, _reg_read = uclib.uc_emu_start, uclib.uc_emu_stop, uclib.uc_reg_read
_RIP, _CS = x86.UC_X86_REG_RIP, x86.UC_X86_REG_CS
_REG_READ = ctypes.cast(_reg_read, ctypes.c_void_p).value
_PORT_IO = {x86.UC_X86_INS_IN: IoIn, x86.UC_X86_INS_OUT: IoOut}
_C_HOOKS = ({} if _insnhooks is None else
            {x86.UC_X86_INS_IN: _insnhooks.IN, x86.UC_X86_INS_OUT: _insnhooks.OUT})
# <unicorn/unicorn.h> uc_cb_insn_in_t, uc_cb_insn_out_t; <unicorn/x86.h> uc_cb_insn_cpuid_t
_INSN_HOOKS = {
    x86.UC_X86_INS_IN: ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32,
                                        ctypes.c_int, ctypes.c_void_p),
    x86.UC_X86_INS_OUT: ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.c_uint32, ctypes.c_void_p),
    x86.UC_X86_INS_CPUID: ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p),
}


class Engine:
    """A Unicorn x86-64 engine and the guest-physical memory map it sees."""

    def __init__(self, mmio_read, mmio_write):
        """`mmio_read(address, size) -> int` and `mmio_write(address, size, value)` receive
        every access to a hole, with its guest-physical address."""
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # No `until` address: Unicorn would stop at it, and after each run it translates it
        # through the guest's page tables, which sets CR2 when it is not mapped. With
        # Unicorn's list of exits enabled and empty, only a stop ends emulation.
        self.uc.ctl_exits_enabled(True)
        self._handle = self.uc._uch
        self._word = ctypes.c_uint64()
        self._word_ref = ctypes.byref(self._word)
        # RIP and CS in one uc_reg_read_batch, for the ctypes IN and OUT trampolines
        self._rip_cs = (ctypes.c_uint64 * 2)()
        self._rip_cs_args = ((ctypes.c_int * 2)(_RIP, _CS),
                             (ctypes.c_void_p * 2)(ctypes.addressof(self._rip_cs),
                                                   ctypes.addressof(self._rip_cs) + 8))
        self._hooks: list = []           # what Unicorn calls, kept alive as long as the engine
        self._port_hooks: list = []      # the C IN and OUT hooks (`_insnhooks.Hook`)
        self._mmio = (lambda uc, offset, size, base: mmio_read(base + offset, size),
                      lambda uc, offset, size, value, base: mmio_write(base + offset, size, value))
        self._backed: set[int] = set()   # gpa of each region mapped
        self._regions: tuple = ()        # the regions themselves, by address
        self._holes: set[int] = set()    # hole pages mapped so far
        self.uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED
                         | UC_HOOK_MEM_FETCH_UNMAPPED, self._on_unmapped)

    # --- the per-exit path --------------------------------------------------------------------
    def start(self, count: int) -> int:
        """`uc_emu_start` at RIP for at most `count` instructions; returns the uc_err status.
        An exception raised in a hook stopped emulation and is re-raised here."""
        uc, handle = self.uc, self._handle
        uc._hook_exception = None
        _reg_read(handle, _RIP, self._word_ref)
        status = _emu_start(handle, self._word.value, 0, 0, count)  # `until` unused
        if uc._hook_exception is not None:
            raise uc._hook_exception
        return status

    def hook_insn(self, insn: int, callback) -> None:
        """UC_HOOK_INSN for IN, OUT or CPUID. IN and OUT call `callback(exit, rip, cs)` with
        the access as KVM_RUN would return it, `IoIn(port, size, 1, 0)` or
        `IoOut(port, size, 1, data)`, and RIP and CS's selector at the instruction; an IN's
        callback returns the value read. CPUID calls `callback()` (True: it answered). Like
        the binding's own hooks, an exception raised in the callback stops emulation and is
        re-raised by `start`."""
        exit_class = _PORT_IO.get(insn)
        if insn in _C_HOOKS:
            hook = _insnhooks.Hook(callback, self._hook_failed, _REG_READ, _RIP, _CS, exit_class)
            self._add_insn_hook(insn, _C_HOOKS[insn], id(hook), hook)
            self._port_hooks.append(hook)
            return
        batch, (ids, pointers) = uclib.uc_reg_read_batch, self._rip_cs_args
        rip_cs, handle = self._rip_cs, self._handle

        def trampoline(uc, *args):   # the last argument is Unicorn's user data
            try:
                if exit_class is None:
                    return callback()
                batch(handle, ids, pointers, 2)
                port, size = args[:2]
                exit = (IoOut(port, size, 1, args[2].to_bytes(size, "little"))
                        if exit_class is IoOut else IoIn(port, size, 1, 0))
                return callback(exit, rip_cs[0], rip_cs[1] & 0xFFFF)
            except BaseException as error:
                self._hook_failed(error)
                return 0
        function = _INSN_HOOKS[insn](trampoline)
        self._add_insn_hook(insn, function, None, function)

    def attach_port_io(self, inline, *where) -> bool:
        """Offer each IN and OUT to `inline` (the run loop's compiled handling of one access,
        `_runloop.InlinePortIo`) before the callback; `where` is what the C hooks need to know
        whether the vCPU would dispatch it inline (see `_insnhooks.c`). None detaches it.
        False: the hooks are ctypes trampolines, which take no such offer."""
        for hook in self._port_hooks:
            hook.attach(inline, inline.entry, *where) if inline is not None else hook.attach(None)
        return bool(self._port_hooks)

    def _add_insn_hook(self, insn: int, function, user_data: int | None, keep) -> None:
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._handle, ctypes.byref(handle), UC_HOOK_INSN, function,
                                   user_data, ctypes.c_uint64(1), ctypes.c_uint64(0),
                                   ctypes.c_int(insn))
        if status != UC_ERR_OK:
            raise UcError(status)
        self._hooks.append(keep)

    def _hook_failed(self, error: BaseException) -> None:
        """A hook raised: keep the first exception for `start` to raise, stop emulation."""
        if self.uc._hook_exception is None:
            self.uc._hook_exception = error
        self.stop()

    def stop(self) -> None:
        """`uc_emu_stop`: safe from any thread and from hooks; ignored when not running."""
        _emu_stop(self._handle)

    def read(self, reg: int) -> int:
        """A 64-bit register (RAX..R15, RIP, RFLAGS)."""
        _reg_read(self._handle, reg, self._word_ref)
        return self._word.value

    def write(self, reg: int, value: int) -> None:
        self._word.value = value
        uclib.uc_reg_write(self._handle, reg, self._word_ref)

    def rip(self) -> int:
        return self.read(_RIP)

    def read_many(self, regs: tuple[int, ...]) -> tuple[int, ...]:
        """Several 64-bit registers in one `uc_reg_read_batch`."""
        ids = (ctypes.c_int * len(regs))(*regs)
        values = (ctypes.c_uint64 * len(regs))()
        pointers = (ctypes.c_void_p * len(regs))(
            *(ctypes.addressof(values) + 8 * i for i in range(len(regs))))
        uclib.uc_reg_read_batch(self._handle, ids, pointers, len(regs))
        return tuple(values)

    # --- guest memory through the MMU ---------------------------------------------------------
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

    # --- the memory map -----------------------------------------------------------------------
    def set_memory(self, regions) -> None:
        """Map `regions` (non-overlapping, page-aligned; each with gpa, size, host_address,
        readonly) that are not mapped yet; a hole page in the way is unmapped first.

        ROM is mapped read+execute: a guest store to it reaches the UC_HOOK_MEM_WRITE_PROT
        hook, as KVM_MEM_READONLY turns it into an MMIO exit."""
        self._regions = tuple(regions)
        for region in regions:
            if region.gpa in self._backed:
                continue
            for page in [p for p in self._holes if region.gpa <= p < region.gpa + region.size]:
                self.uc.mem_unmap(page, PAGE_SIZE)
                self._holes.remove(page)
            perms = UC_PROT_READ | UC_PROT_EXEC if region.readonly else UC_PROT_ALL
            self.uc.mem_map_ptr(region.gpa, region.size, perms, region.host_address)
            self._backed.add(region.gpa)
        self.flush_translations()

    def backs(self, address: int, size: int, write: bool = False) -> bool:
        """Whether guest-physical [address, address+size) is RAM (or, to read, ROM): what
        the host may access without reaching a device's callback."""
        return all(any(r.gpa <= a < r.gpa + r.size and not (write and r.readonly)
                       for r in self._regions) for a in (address, address + size - 1))

    def _on_unmapped(self, uc, access, address, size, value, _) -> bool:
        """First touch of a page no region backs: make it a hole page (`uc_mmio_map`) and
        let Unicorn retry the access there. Unicorn walks its mapping page by page to
        unmap, so the holes are mapped as they are used, not as one huge region."""
        if access == UC_MEM_FETCH_UNMAPPED:
            return False  # code cannot run from MMIO: Unicorn stops with an error
        page = address & ~(PAGE_SIZE - 1)
        self.uc.mmio_map(page, PAGE_SIZE, self._mmio[0], page, self._mmio[1], page)
        self._holes.add(page)
        return True

    def flush_translations(self) -> None:
        """Drop translated code. TCG notices the guest rewriting its own code, but not the
        host writing guest memory behind its back (a loader copying a new program in)."""
        self.uc.ctl_flush_tb()

    def close(self) -> None:
        """`uc_close` now, rather than when the binding's finalizer runs at garbage collection
        (hooks make reference cycles, so that can be late); the engine is unusable after."""
        self.uc._Uc__finalizer()
