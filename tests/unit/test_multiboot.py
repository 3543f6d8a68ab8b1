"""Multiboot v1: header checks, kernel placement, and the information structure's bytes."""
import shutil
import struct
import subprocess

import pytest

from vlab.machine.assembler import assemble
from vlab.machine.loaders import LoadError
from vlab.machine.memory import GuestMemory
from vlab.machine.multiboot import MultibootError, load_multiboot, parse_header

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None,
                                reason="nasm is not installed (apt-get install nasm)")

RAM = 8 << 20
MAGIC = 0x1BADB002

KLUDGE_KERNEL = """\
bits 32
org {load_addr:#x}
  times {pad} db 0x90
header:
  dd 0x1BADB002
  dd {flags:#x}
  dd -(0x1BADB002 + {flags:#x})
  dd {header_addr}
  dd {load_addr:#x}
  dd {load_end}
  dd {bss_end}
  dd {entry}
start:
  mov dword [0xb8000], 0x2f4b2f4f
  hlt
load_end:
"""


def kludge_kernel(load_addr=0x100000, pad=0, flags=0x00010003, header_addr="header",
                  load_end="load_end", bss_end="load_end + 0x2000", entry="start"):
    return assemble(KLUDGE_KERNEL.format(**locals())).code


def with_checksum(magic, flags, checksum=None):
    checksum = -(magic + flags) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", magic, flags, checksum)


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_ram(0, RAM)
    m.write(0, b"\xcc" * RAM)  # so zero-fill shows, and so does any stray write
    yield m
    m.close()


def info(mem, address):
    """The information structure's fields a kernel reads."""
    words = struct.unpack("<22I", mem.read(address, 88))
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
             "mods_addr", None, None, None, None, "mmap_length", "mmap_addr", "drives_length",
             "drives_addr", "config_table", "boot_loader_name"]
    return {name: word for name, word in zip(names, words) if name}


def cstring(mem, address):
    data = mem.read(address, 256)
    return data[:data.index(0)].decode()


def test_kludge_kernel_information_structure(mem):
    kernel = kludge_kernel()
    boot = load_multiboot(mem, kernel, cmdline="console=ttyS0 debug",
                          modules=[("initrd.img root=/dev/ram", b"I" * 5000), ("m2", b"22")])
    assert (boot.entry, boot.eax, boot.ebx) == (0x100020, 0x2BADB002, 0x9000)
    assert mem.read(0x100000, len(kernel)) == kernel
    bss = 0x100000 + len(kernel)
    assert mem.read(bss, 0x2000) == bytes(0x2000)
    assert mem.read(bss + 0x2000, 1) == b"\xcc"

    mbi = info(mem, boot.ebx)
    assert mbi["flags"] == 1 | 4 | 8 | 64 | 512  # MEM, CMDLINE, MODS, MMAP, BOOT_LOADER_NAME
    assert (mbi["mem_lower"], mbi["mem_upper"]) == (639, (RAM - 0x100000) // 1024)
    assert cstring(mem, mbi["cmdline"]) == "console=ttyS0 debug"
    assert cstring(mem, mbi["boot_loader_name"]) == "vlab"

    assert mbi["mods_count"] == 2
    mods = [struct.unpack("<IIII", mem.read(mbi["mods_addr"] + 16 * i, 16)) for i in range(2)]
    first = (bss + 0x2000 + 0xFFF) & ~0xFFF
    assert mods[0][:2] == (first, first + 5000)
    assert mods[1][:2] == (first + 0x2000, first + 0x2002)
    assert all(start % 4096 == 0 for start, *_ in mods)
    assert cstring(mem, mods[0][2]) == "initrd.img root=/dev/ram"
    assert cstring(mem, mods[1][2]) == "m2"
    assert mem.read(first, 5000) == b"I" * 5000 and mem.read(first + 0x2000, 2) == b"22"
    assert boot.modules == [("initrd.img root=/dev/ram", first, first + 5000),
                            ("m2", first + 0x2000, first + 0x2002)]

    assert mbi["mmap_length"] == 4 * 24
    raw = mem.read(mbi["mmap_addr"], mbi["mmap_length"])
    entries = [struct.unpack_from("<IQQI", raw, 24 * i) for i in range(4)]
    assert entries == [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2),
                       (20, 0xF0000, 0x10000, 2), (20, 0x100000, RAM - 0x100000, 1)]
    assert boot.mmap == [entry[1:] for entry in entries]

    summary = boot.summary()
    assert "a.out kludge" in summary and "entry 0x00100020" in summary
    assert "eax=0x2badb002 ebx=0x00009000" in summary and "initrd.img" in summary


def test_empty_cmdline_is_still_a_valid_string_and_no_modules(mem):
    boot = load_multiboot(mem, kludge_kernel())
    mbi = info(mem, boot.ebx)
    assert mem.read(mbi["cmdline"], 1) == b"\0"
    assert mbi["mods_count"] == 0 and mbi["flags"] & 8


def test_header_later_in_the_file_and_load_end_zero(mem):
    kernel = kludge_kernel(pad=0x40, load_end=0, bss_end=0)
    header = parse_header(kernel)
    assert (header.offset, header.text_offset, header.load_size) == (0x40, 0, len(kernel))
    boot = load_multiboot(mem, kernel)
    assert boot.entry == 0x100060
    assert mem.read(0x100000, len(kernel)) == kernel
    assert mem.read(0x100000 + len(kernel), 1) == b"\xcc"  # no bss asked for


def test_load_addr_after_file_start_skips_the_leading_bytes(mem):
    # The header sits 0x40 into the file but says it is at load_addr: the 0x40 bytes before
    # it are not loaded (QEMU's mb_kernel_text_offset).
    kernel = kludge_kernel(load_addr=0x100000, pad=0x40, header_addr=0x100000,
                           load_end=0, bss_end=0, entry=0x100000)
    header = parse_header(kernel)
    assert (header.text_offset, header.load_size) == (0x40, len(kernel) - 0x40)
    load_multiboot(mem, kernel)
    assert mem.read(0x100000, 4) == struct.pack("<I", MAGIC)


def test_video_mode_request_is_ignored_with_a_note(mem):
    boot = load_multiboot(mem, kludge_kernel(flags=0x00010007))
    assert "video mode" in boot.header.notes[0]
    assert "video mode" in boot.summary()


@pytest.mark.parametrize("image, message", [
    (bytes(64), r"no Multiboot header: the magic 0x1badb002 is not in the first 8192 bytes"),
    (bytes(2) + with_checksum(MAGIC, 0x10000) + bytes(64), r"no Multiboot header"),  # unaligned
    (bytes(8192) + with_checksum(MAGIC, 0x10000) + bytes(64), r"no Multiboot header"),
    (bytes(8) + with_checksum(MAGIC, 0x10003, 0x12345678) + bytes(64),
     r"header at offset 0x8 has a bad checksum 0x12345678: magic \+ flags \+ checksum = "
     r"0x2de3067d, must be 0 mod 2\^32 \(the checksum should be 0xe4514ffb\)"),
    (with_checksum(MAGIC, 0x8) + bytes(64), r"requires Multiboot features this loader lacks: "
                                            r"flag bits 3 \(flags 0x00000008\)"),
    (with_checksum(MAGIC, 0x10000) + bytes(4), r"five address fields .* are cut off"),
])
def test_bad_headers(mem, image, message):
    with pytest.raises(MultibootError, match=message):
        parse_header(image)
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=message):
        load_multiboot(mem, image)
    assert mem.snapshot() == before


@pytest.mark.parametrize("fields, message", [
    (dict(header_addr="header - 0x10", load_addr=0x100020),
     r"load_addr 0x100020 is above header_addr"),
    (dict(header_addr="header + 0x100"), r"header_addr - load_addr = 0x100, but the header is "
                                         r"only 0x0 bytes into the file"),
    (dict(load_end="header"), r"load_end_addr 0x100000 is not above header_addr"),
    (dict(load_end="load_end + 0x1000"), r"load_end_addr 0x10102b asks for 0x102b bytes .*"
                                         r"the file has only 0x2b bytes"),
    (dict(bss_end="load_end - 1"), r"bss_end_addr 0x10002a is below the end of the loaded text "
                                   r"0x10002b"),
    (dict(entry="load_end + 0x10"), r"entry_addr 0x10003b is outside the loaded text "
                                    r"0x00100000-0x0010002a"),
])
def test_inconsistent_kludge_addresses(mem, fields, message):
    image = kludge_kernel(**fields)
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=message):
        load_multiboot(mem, image)
    assert mem.snapshot() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(load_addr=0x10000000), r"kernel 0x10000000-0x1000202a ends beyond the RAM a 32-bit "
                                 r"kernel is told about \(up to 0x800000\)"),
    (dict(load_addr=0x9F000), r"kernel 0x0009f000-0x000a102a covers part of 0x9fc00-0xfffff "
                              r"\(the EBDA, VGA memory and the BIOS\), which the memory map "
                              r"reports reserved"),
    (dict(load_addr=RAM - 0x1000), r"kernel 0x007ff000-0x0080102a ends beyond the RAM"),
])
def test_kernel_that_does_not_fit_writes_nothing(mem, kwargs, message):
    image = kludge_kernel(**kwargs)
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=message):
        load_multiboot(mem, image)
    assert mem.snapshot() == before


def test_kernel_in_a_hole_below_ram_end_writes_nothing():
    with GuestMemory() as m:
        m.add_ram(0, 0xA0000, "low")
        m.add_ram(0x100000, RAM - 0x100000, "high")
        before = m.snapshot()
        with pytest.raises(MultibootError, match=r"kernel 0x000a0000-0x000a202a covers part "
                                                 r"of 0x9fc00-0xfffff"):
            load_multiboot(m, kludge_kernel(load_addr=0xA0000))
        assert m.snapshot() == before


def test_module_beyond_ram_writes_nothing(mem):
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=r"module 'big' .* ends beyond the RAM"):
        load_multiboot(mem, kludge_kernel(), modules=[("small", b"s"), ("big", bytes(RAM))])
    assert mem.snapshot() == before


def test_strings_that_do_not_fit_anywhere_write_nothing(mem):
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=r"multiboot information 0x00103000-.* ends beyond "
                                             r"the RAM"):
        load_multiboot(mem, kludge_kernel(), cmdline="x" * RAM)
    with pytest.raises(MultibootError, match="contains a NUL byte"):
        load_multiboot(mem, kludge_kernel(), cmdline="a\0b")
    assert mem.snapshot() == before


def test_ram_size_sets_the_upper_memory_reported(mem):
    boot = load_multiboot(mem, kludge_kernel(), ram_size=4 << 20)
    assert boot.mem_upper == 3072 and boot.mmap[-1] == (0x100000, 3 << 20, 1)
    assert info(mem, boot.ebx)["mem_upper"] == 3072


@pytest.mark.parametrize("ram_size, message", [
    (RAM + 0x1000, r"would promise RAM that is not there: .*crosses the end"),
    (0x100000, r"leaves no memory above 1 MiB"),
])
def test_ram_size_checked_against_guest_memory(mem, ram_size, message):
    with pytest.raises(MultibootError, match=message):
        load_multiboot(mem, kludge_kernel(), ram_size=ram_size)


def test_no_ram_at_one_mib():
    with GuestMemory() as m:
        m.add_ram(0, 0xA0000, "low")
        with pytest.raises(MultibootError, match="no RAM at 1 MiB"):
            load_multiboot(m, kludge_kernel())


def test_flat_image_without_kludge_must_be_elf(mem):
    image = kludge_kernel(flags=0x3)
    with pytest.raises(MultibootError, match=r"sets no a.out kludge .* must be an ELF executable,"
                                             r" but: not an ELF image"):
        load_multiboot(mem, image)
    assert issubclass(MultibootError, LoadError)


ELF_KERNEL = """\
section .multiboot
align 4
  dd 0x1BADB002
  dd 0x3
  dd -(0x1BADB002 + 0x3)
section .text
global _start
_start:
  mov esp, stack_top
  hlt
section .bss
  resb 0x4000
stack_top:
"""


def link(tmp_path, fmt, emulation):
    if not shutil.which("ld"):
        pytest.skip("needs ld (binutils) to link an ELF kernel")
    (tmp_path / "k.asm").write_text(ELF_KERNEL)
    subprocess.run(["nasm", "-f", fmt, "-o", tmp_path / "k.o", tmp_path / "k.asm"], check=True)
    (tmp_path / "k.ld").write_text("ENTRY(_start) SECTIONS { . = 0x100000; "
                                   ".text : { *(.multiboot) *(.text) } .bss : { *(.bss) } }")
    subprocess.run(["ld", "-m", emulation, "-T", tmp_path / "k.ld", "-o", tmp_path / "k",
                    tmp_path / "k.o"], check=True, capture_output=True)
    return (tmp_path / "k").read_bytes()


def test_elf_kernel(mem, tmp_path):
    image = link(tmp_path, "elf32", "elf_i386")
    boot = load_multiboot(mem, image, cmdline="elf")
    assert not boot.header.kludge and boot.kernel.elf_class == 32
    assert mem.read(0x100000, 12) == with_checksum(MAGIC, 0x3)
    assert boot.entry == 0x100010  # .text after the header, 16-byte aligned
    assert mem.read(0x100010, 1) == b"\xbc"  # mov esp, imm32
    stack_top = int.from_bytes(mem.read(0x100011, 4), "little")
    assert mem.read(stack_top - 0x4000, 0x4000) == bytes(0x4000)  # .bss zeroed
    assert cstring(mem, info(mem, boot.ebx)["cmdline"]) == "elf"
    assert "ELF32" in boot.summary()


def test_elf64_kernel_refused(mem, tmp_path):
    image = link(tmp_path, "elf64", "elf_x86_64")
    before = mem.snapshot()
    with pytest.raises(MultibootError, match="32-bit ELF kernels; this one is ELF64"):
        load_multiboot(mem, image)
    assert mem.snapshot() == before


def test_information_goes_after_a_kernel_that_covers_0x9000(mem):
    """A kernel loaded at 0x8000-0xa02a (QEMU's 0x9000 under it): the information block
    goes on the first page after the kernel, the modules on the pages after the block."""
    kernel = kludge_kernel(load_addr=0x8000, bss_end="load_end + 0x2000")
    boot = load_multiboot(mem, kernel, cmdline="low", modules=[("m", b"M" * 10)])
    assert boot.ebx == 0xB000 and boot.entry == 0x8020
    assert mem.read(0x8000, len(kernel)) == kernel  # intact: nothing written over it
    mbi = info(mem, boot.ebx)
    assert cstring(mem, mbi["cmdline"]) == "low" and cstring(mem, mbi["boot_loader_name"]) == "vlab"
    assert 0xB000 < mbi["mmap_addr"] < mbi["mods_addr"] < 0xC000
    start, end, string, _ = struct.unpack("<IIII", mem.read(mbi["mods_addr"], 16))
    assert (start, end, cstring(mem, string)) == (0xC000, 0xC00A, "m")
    assert "info    0x0000b000" in boot.summary()


def test_a_long_command_line_moves_the_information_after_the_kernel(mem):
    """0x9000-0x9fbff holds 603 KiB; a longer block follows the kernel instead."""
    boot = load_multiboot(mem, kludge_kernel(), cmdline="x" * 700_000)
    assert boot.ebx == 0x103000
    assert mem.read(info(mem, boot.ebx)["cmdline"], 3) == b"xxx"


def test_information_that_fits_nowhere_writes_nothing(mem):
    """Below a kernel at 0x8000 and above it the block does not fit below the EBDA; at
    1 MiB it would run past the RAM."""
    before = mem.snapshot()
    with pytest.raises(MultibootError, match=r"multiboot information 0x00100000-.* ends beyond "
                                             r"the RAM"):
        load_multiboot(mem, kludge_kernel(load_addr=0x8000), cmdline="x" * RAM)
    assert mem.snapshot() == before


def test_modules_of_a_low_kernel_skip_the_reserved_hole(mem):
    boot = load_multiboot(mem, kludge_kernel(load_addr=0x8000),
                          modules=[("small", b"s"), ("big", bytes(0x98000))])
    assert boot.ebx == 0xB000  # the kernel and its bss: 0x8000-0xa029
    assert boot.modules == [("small", 0xC000, 0xC001), ("big", 0x100000, 0x198000)]
