"""Layer 1 without /dev/kvm: exits decoded from hand-built `kvm_run` bytes, the binary stats
fd parsed from a hand-built image, and the backend named from a fake /sys/module.

`kvm_run` is shared with the guest's side of the world: a corrupt or hostile value in it must
give `ExitDecodeError` naming the field, never a read outside the mapping.
"""
from __future__ import annotations

import os
import shutil
import struct
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from vlab.kvm import (Debug, Exception_, Exit, ExitDecodeError, FailEntry, Hlt, Hypercall,
                      InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, OtherExit,
                      Shutdown, StatsFd, SystemEvent, Unknown, X86Rdmsr, X86Wrmsr, decode,
                      detect_backend)
from vlab.kvm.abi import (KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, ExitReason, InternalErrorSuberror,
                          StatType, StatUnit, SystemEventType, ffi)
from vlab.kvm import vcpu as vcpu_module
from vlab.kvm.exits import IoapicEoi, Notify, TprAccess

PAGE = 4096
MAPPING = 3 * PAGE        # x86 KVM_GET_VCPU_MMAP_SIZE: kvm_run, the PIO page, coalesced MMIO
PIO_OFFSET = PAGE         # where KVM puts port I/O data (KVM_PIO_PAGE_OFFSET)
RUN_SIZE = ffi.sizeof("struct kvm_run")
UNION = ffi.offsetof("struct kvm_run", "io")
UNION_SIZE = ffi.offsetof("struct kvm_run", "kvm_valid_regs") - UNION  # the exit union
PATTERN = bytes(i & 0xFF for i in range(MAPPING))


def kvm_run(reason: int, size: int = MAPPING):
    """A zeroed mapping with `exit_reason` set; returns (cdata view, buffer)."""
    buf = bytearray(size)
    run = ffi.from_buffer("struct kvm_run *", buf)
    run.exit_reason = reason
    return run, buf


def decoded(run, buf) -> Exit:
    return decode(run, len(buf), buf)


def io(direction: int, port: int, size: int, count: int, data: bytes = b"",
       data_offset: int = PIO_OFFSET):
    run, buf = kvm_run(ExitReason.IO)
    run.io.direction, run.io.port, run.io.size, run.io.count = direction, port, size, count
    run.io.data_offset = data_offset
    buf[data_offset:data_offset + len(data)] = data
    return run, buf


# --- port I/O ------------------------------------------------------------------------------
def test_io_out_byte():
    exit = decoded(*io(KVM_EXIT_IO_OUT, 0xE9, 1, 1, b"H"))
    assert exit == IoOut(port=0xE9, size=1, count=1, data=b"H")
    assert exit.value == ord("H") and exit.reason is ExitReason.IO and exit.name == "IO"


def test_io_out_string_carries_every_element():
    data = bytes.fromhex("0102 0304 0506")
    exit = decoded(*io(KVM_EXIT_IO_OUT, 0x3F8, 2, 3, data))
    assert (exit.port, exit.size, exit.count, exit.data) == (0x3F8, 2, 3, data)
    assert exit.value == 0x0201
    assert "x3" in exit.describe()


def test_io_out_data_at_the_very_end_of_the_mapping():
    data = b"\xAA\xBB\xCC\xDD"
    exit = decoded(*io(KVM_EXIT_IO_OUT, 0x80, 4, 1, data, data_offset=MAPPING - 4))
    assert exit.data == data


def test_io_in_gives_where_the_answer_goes():
    exit = decoded(*io(KVM_EXIT_IO_IN, 0x60, 2, 5, data_offset=PIO_OFFSET + 8))
    assert exit == IoIn(port=0x60, size=2, count=5, data_offset=PIO_OFFSET + 8)
    assert exit.reason is ExitReason.IO


@pytest.mark.parametrize("size", [0, 3, 8, 255])
def test_io_size_other_than_1_2_4_is_rejected(size):
    with pytest.raises(ExitDecodeError, match=rf"io\.size is {size}\b"):
        decoded(*io(KVM_EXIT_IO_OUT, 0xE9, size, 1))


def test_io_count_zero_is_rejected():
    with pytest.raises(ExitDecodeError, match=r"io\.count is 0"):
        decoded(*io(KVM_EXIT_IO_IN, 0xE9, 1, 0))


def test_io_direction_other_than_in_or_out_is_rejected():
    with pytest.raises(ExitDecodeError, match=r"io\.direction is 7"):
        decoded(*io(7, 0xE9, 1, 1, b"H"))


@pytest.mark.parametrize("data_offset", [MAPPING, MAPPING - 3, 2**63, 2**64 - 1])
def test_io_data_offset_beyond_the_mapping_is_rejected(data_offset):
    with pytest.raises(ExitDecodeError, match=r"io\.data_offset"):
        decoded(*io(KVM_EXIT_IO_OUT, 0xE9, 4, 1, data_offset=data_offset))


def test_io_size_times_count_overflowing_the_mapping_is_rejected():
    with pytest.raises(ExitDecodeError, match=r"io\.data_offset .* 4294967295 x 4 bytes"):
        decoded(*io(KVM_EXIT_IO_OUT, 0xE9, 4, 2**32 - 1))


# --- MMIO ----------------------------------------------------------------------------------
def mmio(address: int, length: int, is_write: int, data: bytes = b""):
    run, buf = kvm_run(ExitReason.MMIO)
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = address, length, is_write
    ffi.memmove(run.mmio.data, data, len(data))
    return run, buf


def test_mmio_write():
    exit = decoded(*mmio(0xFEE0_0000, 4, 1, b"\x78\x56\x34\x12\xFF\xFF\xFF\xFF"))
    assert exit == MmioWrite(address=0xFEE0_0000, length=4, data=b"\x78\x56\x34\x12")
    assert exit.value == 0x12345678 and exit.reason is ExitReason.MMIO


def test_mmio_read():
    exit = decoded(*mmio(0xD000_0008, 8, 0))
    assert exit == MmioRead(address=0xD000_0008, length=8)


@pytest.mark.parametrize("length", [0, 9, 2**32 - 1])
@pytest.mark.parametrize("is_write", [0, 1])
def test_mmio_len_outside_1_to_8_is_rejected(length, is_write):
    with pytest.raises(ExitDecodeError, match=rf"mmio\.len is {length}\b"):
        decoded(*mmio(0x1000, length, is_write))


# --- exits with payloads ------------------------------------------------------------------------
def test_fail_entry():
    run, buf = kvm_run(ExitReason.FAIL_ENTRY)
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x80000021, 3
    assert decoded(run, buf) == FailEntry(hardware_entry_failure_reason=0x80000021, cpu=3)


@pytest.mark.parametrize("suberror", list(InternalErrorSuberror))
def test_internal_error_names_its_suberror(suberror):
    run, buf = kvm_run(ExitReason.INTERNAL_ERROR)
    run.internal.suberror, run.internal.ndata = suberror, 3
    run.internal.data[0:3] = [0x11, 0x22, 2**64 - 1]
    exit = decoded(run, buf)
    assert isinstance(exit, InternalError)
    assert (exit.suberror_name, exit.data) == (suberror.name, (0x11, 0x22, 2**64 - 1))
    assert suberror.name in exit.describe()


def test_internal_error_unknown_suberror_and_oversized_ndata():
    run, buf = kvm_run(ExitReason.INTERNAL_ERROR)
    run.internal.suberror, run.internal.ndata = 99, 2**32 - 1
    run.internal.data[0:16] = list(range(100, 116))
    exit = decoded(run, buf)
    assert exit.suberror_name == "UNKNOWN_99"
    assert exit.data == tuple(range(100, 116))  # clamped to the 16 words kvm_run holds


EMULATION_FLAG_INSTRUCTION_BYTES = 1  # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES


@pytest.mark.parametrize("insn_size, expected", [(3, b"\x0f\xc7\x0e"), (255, None)])
def test_emulation_failure_instruction_bytes(insn_size, expected):
    run, buf = kvm_run(ExitReason.INTERNAL_ERROR)
    failure = run.emulation_failure
    failure.suberror, failure.ndata = InternalErrorSuberror.EMULATION, 4
    failure.flags, failure.insn_size = EMULATION_FLAG_INSTRUCTION_BYTES, insn_size
    insn = bytes(range(0x40, 0x40 + 15)) if expected is None else expected
    ffi.memmove(failure.insn_bytes, insn, len(insn))
    exit = decoded(run, buf)
    assert exit.suberror_name == "EMULATION"
    assert exit.insn_bytes == insn  # an oversized insn_size stops at the 15-byte field


def test_emulation_failure_without_the_flag_has_no_instruction_bytes():
    run, buf = kvm_run(ExitReason.INTERNAL_ERROR)
    failure = run.emulation_failure
    failure.suberror, failure.ndata, failure.flags, failure.insn_size = 1, 4, 0, 3
    ffi.memmove(failure.insn_bytes, b"\x90\x90\x90", 3)
    assert decoded(run, buf).insn_bytes == b""


def test_debug():
    run, buf = kvm_run(ExitReason.DEBUG)
    arch = run.debug.arch
    arch.exception, arch.pc, arch.dr6, arch.dr7 = 1, 0x1003, 0xFFFF4FF0, 0x401
    assert decoded(run, buf) == Debug(exception=1, pc=0x1003, dr6=0xFFFF4FF0, dr7=0x401)


@pytest.mark.parametrize("event", list(SystemEventType))
def test_system_event(event):
    run, buf = kvm_run(ExitReason.SYSTEM_EVENT)
    run.system_event.type, run.system_event.ndata = event, 2
    run.system_event.data[0:2] = [7, 8]
    exit = decoded(run, buf)
    assert exit == SystemEvent(type=event, data=(7, 8))
    assert exit.type_name == event.name and event.name in exit.describe()


def test_rdmsr_and_wrmsr():
    run, buf = kvm_run(ExitReason.X86_RDMSR)
    run.msr.index, run.msr.reason = 0xC0000103, 4
    assert decoded(run, buf) == X86Rdmsr(index=0xC0000103, msr_reason=4)
    run.exit_reason = ExitReason.X86_WRMSR
    run.msr.data = 0x1122334455667788
    assert decoded(run, buf) == X86Wrmsr(index=0xC0000103, data=0x1122334455667788, msr_reason=4)


def test_hypercall():
    run, buf = kvm_run(ExitReason.HYPERCALL)
    run.hypercall.nr, run.hypercall.longmode = 12, 1
    run.hypercall.args = [1, 2, 3, 4, 5, 2**64 - 1]
    assert decoded(run, buf) == Hypercall(nr=12, args=(1, 2, 3, 4, 5, 2**64 - 1), longmode=1)


def test_exception_unknown_tpr_eoi_notify():
    run, buf = kvm_run(ExitReason.EXCEPTION)
    run.ex.exception, run.ex.error_code = 13, 0x18
    assert decoded(run, buf) == Exception_(exception=13, error_code=0x18)
    run, buf = kvm_run(ExitReason.UNKNOWN)
    run.hw.hardware_exit_reason = 0x30
    assert decoded(run, buf) == Unknown(hardware_exit_reason=0x30)
    run, buf = kvm_run(ExitReason.TPR_ACCESS)
    run.tpr_access.rip, run.tpr_access.is_write = 0xFFFF_FFFF_8100_0000, 1
    assert decoded(run, buf) == TprAccess(rip=0xFFFF_FFFF_8100_0000, is_write=1)
    run, buf = kvm_run(ExitReason.IOAPIC_EOI)
    run.eoi.vector = 0xEC
    assert decoded(run, buf) == IoapicEoi(vector=0xEC)
    run, buf = kvm_run(ExitReason.NOTIFY)
    run.notify.flags = 1
    assert decoded(run, buf) == Notify(flags=1)


@pytest.mark.parametrize("reason, kind", [(ExitReason.HLT, Hlt), (ExitReason.SHUTDOWN, Shutdown),
                                          (ExitReason.INTR, Interrupted)])
def test_exits_without_payload(reason, kind):
    assert decoded(*kvm_run(reason)) == kind()


_PAYLOAD_FREE_OTHERS = {ExitReason.IRQ_WINDOW_OPEN, ExitReason.SET_TPR, ExitReason.NMI,
                        ExitReason.DIRTY_RING_FULL, ExitReason.S390_SIEIC, ExitReason.XEN}


@pytest.mark.parametrize("reason", list(ExitReason), ids=lambda r: r.name)
def test_every_exit_reason_decodes_to_an_exit_naming_it(reason):
    run, buf = io(KVM_EXIT_IO_OUT, 0xE9, 1, 1, b"x")  # a valid IO payload ...
    run.mmio.len = 1                                   # ... and MMIO one share the union
    run.exit_reason = reason
    exit = decoded(run, buf)
    assert exit.reason is reason and exit.name == reason.name
    if reason in _PAYLOAD_FREE_OTHERS:
        assert exit == OtherExit(reason) and exit.describe() == reason.name


@pytest.mark.parametrize("reason", [max(ExitReason) + 1, 1000, 2**32 - 1])
def test_unknown_exit_reason_is_a_decode_error(reason):
    with pytest.raises(ExitDecodeError, match=rf"exit_reason {reason} is not a KVM_EXIT_"):
        decoded(*kvm_run(reason))


# --- fuzzing: whatever kvm_run holds, decode stays inside it ---------------------------------
_reasons = st.one_of(st.sampled_from(list(ExitReason)), st.integers(0, 2**32 - 1))
_hostile_u64 = st.one_of(st.integers(0, 2 * MAPPING), st.integers(0, 2**64 - 1),
                         st.sampled_from([2**64 - 1, 2**63, MAPPING - 1, MAPPING]))


@settings(max_examples=2000, deadline=None)
@given(reason=_reasons, union=st.binary(min_size=UNION_SIZE, max_size=UNION_SIZE),
       size=st.sampled_from([0, 1, 2, 3, 4, 8, 255]), count=st.integers(0, 2**32 - 1),
       data_offset=_hostile_u64, mapping=st.integers(RUN_SIZE, MAPPING),
       with_io_fields=st.booleans())
def test_decode_of_random_kvm_run_returns_an_exit_or_a_decode_error(
        reason, union, size, count, data_offset, mapping, with_io_fields):
    run, buf = kvm_run(reason, mapping)
    buf[UNION:UNION + UNION_SIZE] = union
    if with_io_fields:
        run.io.size, run.io.count, run.io.data_offset = size, count, data_offset
    buf[RUN_SIZE:] = PATTERN[RUN_SIZE:mapping]
    try:
        exit = decoded(run, buf)
    except ExitDecodeError:
        return
    assert isinstance(exit, Exit)
    if isinstance(exit, IoOut):
        start = run.io.data_offset
        assert start + exit.size * exit.count <= mapping
        assert exit.data == bytes(buf[start:start + exit.size * exit.count])
        assert len(exit.data) == exit.size * exit.count
    elif isinstance(exit, IoIn):
        assert exit.data_offset + exit.size * exit.count <= mapping
    elif isinstance(exit, MmioWrite):
        assert 1 <= exit.length <= 8 and len(exit.data) == exit.length
    elif isinstance(exit, MmioRead):
        assert 1 <= exit.length <= 8
    elif isinstance(exit, InternalError):
        assert len(exit.data) <= 16 and len(exit.insn_bytes) <= 15
    elif isinstance(exit, SystemEvent):
        assert len(exit.data) <= 16


# --- the binary stats fd, from a hand-built image ---------------------------------------------
NAME_SIZE = 48  # KVM_STATS_NAME_SIZE
STATS = [  # name, type, unit, exponent, number of u64 values, bucket_size
    ("exits", StatType.CUMULATIVE, StatUnit.NONE, 0, 1, 0),
    ("halt_wait_ns", StatType.CUMULATIVE, StatUnit.SECONDS, -9, 1, 0),
    ("max_mmu_page_hash_collisions", StatType.PEAK, StatUnit.NONE, 0, 1, 0),
    ("halt_wait_hist", StatType.LOG_HIST, StatUnit.SECONDS, -9, 4, 0),
    ("guest_mode", StatType.INSTANT, StatUnit.BOOLEAN, 0, 1, 0),
]


def stats_image(values: list[int], stats=STATS, stats_id: str = "kvm-1234/vcpu-0") -> bytes:
    """What `read()` on a KVM stats fd returns: header, id, descriptors, data block."""
    header = ffi.new("struct kvm_stats_header *")
    desc_size = ffi.sizeof("struct kvm_stats_desc") + NAME_SIZE
    header.name_size, header.num_desc = NAME_SIZE, len(stats)
    header.id_offset = ffi.sizeof("struct kvm_stats_header")
    header.desc_offset = header.id_offset + NAME_SIZE
    header.data_offset = header.desc_offset + desc_size * len(stats)
    image = bytearray(ffi.buffer(header)) + stats_id.encode().ljust(NAME_SIZE, b"\0")
    offset = 0
    for name, kind, unit, exponent, size, bucket in stats:
        image += struct.pack("<IhHII", kind | unit << 4, exponent, size, offset, bucket)
        image += name.encode().ljust(NAME_SIZE, b"\0")
        offset += 8 * size
    assert len(image) == header.data_offset and len(values) == offset // 8
    return bytes(image + struct.pack(f"<{len(values)}Q", *values))


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "stats"

    def write(values, **kwargs):
        path.write_bytes(stats_image(values, **kwargs))
        return path
    return write


def test_stats_fd_names_types_units_and_values(stats_file):
    path = stats_file([5, 1500, 9, 1, 2, 3, 4, 1])
    with StatsFd(os.open(path, os.O_RDONLY), "vcpu0") as stats:
        assert stats.id == "kvm-1234/vcpu-0"
        assert stats.names() == [s[0] for s in STATS]
        assert [(d.type, d.unit, d.exponent, d.size) for d in stats.descriptors] == \
            [s[1:5] for s in STATS]
        assert [d.is_histogram for d in stats.descriptors] == [False] * 3 + [True, False]
        assert stats.read() == {"exits": 5, "halt_wait_ns": 1500,
                                "max_mmu_page_hash_collisions": 9,
                                "halt_wait_hist": (1, 2, 3, 4), "guest_mode": 1}


def test_stats_fd_delta_names_only_changed_scalars(stats_file):
    path = stats_file([5, 1500, 9, 1, 2, 3, 4, 1])
    with StatsFd(os.open(path, os.O_RDONLY), "vcpu0") as stats:
        before = stats.read_raw()
        path.write_bytes(stats_image([8, 1500, 9, 1, 2, 3, 9, 0]))  # same inode, new data
        after = stats.read_raw()
        assert stats.delta(before, after) == {"exits": 3, "guest_mode": -1}
        assert stats.scalars(after) == {"exits": 8, "halt_wait_ns": 1500,
                                        "max_mmu_page_hash_collisions": 9, "guest_mode": 0}


def test_stats_fd_with_no_descriptors(stats_file):
    with StatsFd(os.open(stats_file([], stats=[], stats_id="kvm-1"), os.O_RDONLY), "vm") as stats:
        assert (stats.id, stats.names(), stats.read()) == ("kvm-1", [], {})


def test_stats_fd_close_is_idempotent(stats_file):
    stats = StatsFd(os.open(stats_file([0] * 8), os.O_RDONLY), "vm")
    fd = stats.fd
    stats.close()
    stats.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# --- backend detection from a fake /sys/module --------------------------------------------------
def fake_sys_module(tmp_path, module: str | None, nested: str | None = None):
    (tmp_path / "kvm").mkdir()  # the generic module is always there with KVM
    if module:
        (tmp_path / module / "parameters").mkdir(parents=True)
        if nested is not None:
            (tmp_path / module / "parameters" / "nested").write_text(nested + "\n")
    return tmp_path


@pytest.mark.parametrize("module, nested, hardware, nested_flag", [
    ("kvm_intel", "Y", "VMX", True), ("kvm_intel", "N", "VMX", False),
    ("kvm_amd", "1", "SVM", True), ("kvm_amd", "0", "SVM", False),
    ("kvm_pvm", None, "none", None)])
def test_detect_backend(tmp_path, module, nested, hardware, nested_flag):
    backend = detect_backend(fake_sys_module(tmp_path, module, nested))
    assert (backend.module, backend.hardware, backend.nested) == (module, hardware, nested_flag)
    assert backend.emulates_kernel_mode == (module == "kvm_pvm")
    assert backend.caveats and backend.describe().startswith(f"backend: {module} ")
    assert all(f"  - {caveat}" in backend.describe() for caveat in backend.caveats)


def test_detect_kvm_pvm_states_its_caveats(tmp_path):
    caveats = " ".join(detect_backend(fake_sys_module(tmp_path, "kvm_pvm")).caveats)
    for fact in ("emulator", "CPUID", "HLT", "io_exits"):
        assert fact in caveats


def test_detect_without_a_backend_module(tmp_path):
    backend = detect_backend(fake_sys_module(tmp_path, None))
    assert (backend.kind, backend.module, backend.caveats, backend.hardware) == ("unknown", None, [], "none")
    assert backend.describe().startswith("backend: unknown")
    assert detect_backend(tmp_path / "missing").module is None


def test_detect_an_unrecognised_backend_says_so(tmp_path):
    backend = detect_backend(fake_sys_module(tmp_path, "kvm_riscv_something"))
    assert backend.module == "kvm_riscv_something"
    assert "unrecognised backend kvm_riscv_something" in backend.caveats[0]


# --- the compiled exit path (vlab/kvm/_exitpath.c) agrees with decode -------------------------
def _compiled_exit_path():
    """The C module, where it can be built; the reason to skip where it cannot."""
    if vcpu_module._exitpath is not None:
        return vcpu_module._exitpath
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None \
            or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("no C compiler or no Python.h here: vlab.kvm decodes every exit in Python")
    pytest.fail("a C compiler and Python.h exist, but vlab.kvm._exitpath was not built: "
                "reinstall vlab (pip install -e .) and read the compiler's error")


@settings(max_examples=2000, deadline=None)
@given(reason=st.one_of(st.just(int(ExitReason.IO)), _reasons),
       direction=st.sampled_from([KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, 7]),
       port=st.integers(0, 0xFFFF), size=st.sampled_from([0, 1, 2, 3, 4, 8, 255]),
       count=st.integers(0, 2**32 - 1), data_offset=_hostile_u64,
       mapping=st.integers(RUN_SIZE, MAPPING))
def test_compiled_exit_path_decodes_as_decode_does(reason, direction, port, size, count,
                                                   data_offset, mapping):
    exitpath = _compiled_exit_path()
    run, buf = kvm_run(reason, mapping)
    run.io.direction, run.io.port = direction, port
    run.io.size, run.io.count, run.io.data_offset = size, count, data_offset
    buf[RUN_SIZE:] = PATTERN[RUN_SIZE:mapping]
    compiled = exitpath.decode_io(int(ffi.cast("uintptr_t", run)), mapping, IoOut, IoIn)
    try:
        expected = decoded(run, buf)
    except ExitDecodeError:
        expected = None
    if compiled is None:  # left to decode: anything but a well-formed port-I/O exit
        assert not isinstance(expected, (IoOut, IoIn))
    else:
        assert type(compiled) is type(expected) and compiled == expected


def test_compiled_exit_path_refuses_a_mapping_smaller_than_kvm_run():
    exitpath = _compiled_exit_path()
    run, buf = kvm_run(ExitReason.IO)
    with pytest.raises(ValueError, match="smaller than struct kvm_run"):
        exitpath.decode_io(int(ffi.cast("uintptr_t", run)), RUN_SIZE - 1, IoOut, IoIn)
