"""Raw and ELF loaders: right bytes at the right place, and nothing written on any error."""
import shutil
import struct
import subprocess

import pytest

from vlab.machine.loaders import LoadError, load_elf, load_raw, parse_elf
from vlab.machine.memory import GuestMemory

RAM = 4 << 20
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183


def make_elf(segments, entry, elf_class=32, machine=EM_386, e_type=2):
    """An ELF executable: `segments` are (paddr, file bytes, memsz) PT_LOAD entries."""
    wide = elf_class == 64
    ehsize, phentsize = (64, 56) if wide else (52, 32)
    offset = ehsize + phentsize * len(segments)
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        if wide:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), memsz, 16)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, offset, paddr, paddr, len(data), memsz, 7, 16)
        blobs += data
        offset += len(data)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)
    fmt = "<HHIQQQIHHHHHH" if wide else "<HHIIIIIHHHHHH"
    header = ident + struct.pack(fmt, e_type, machine, 1, entry, ehsize, 0, 0, ehsize,
                                 phentsize, len(segments), 0, 0, 0)
    return header + phdrs + blobs


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_ram(0, RAM)
    m.add_mmio(0xFEC00000, 0x1000, "ioapic")
    yield m
    m.close()


def dirty(mem):
    """Fill the first 4 MiB with a pattern, so zero-fill and 'nothing written' both show."""
    mem.write(0, b"\xcc" * RAM)
    return mem.snapshot()


def test_raw_image(mem):
    image = load_raw(mem, 0x7C00, b"\xf4\x90")
    assert (image.entry, image.segments, image.format) == (0x7C00, [(0x7C00, 2)], "raw")
    assert mem.read(0x7C00, 2) == b"\xf4\x90"
    assert "raw image, entry 0x00007c00" in image.summary()


def test_raw_image_outside_ram_writes_nothing(mem):
    before = dirty(mem)
    with pytest.raises(LoadError, match=r"raw image does not fit: load of 16 bytes at "
                                        r"0x003ffff8: crosses the end"):
        load_raw(mem, RAM - 8, bytes(16))
    with pytest.raises(LoadError, match="in MMIO hole 'ioapic'"):
        load_raw(mem, 0xFEC00000, b"x")
    assert mem.snapshot() == before


@pytest.mark.parametrize("elf_class, machine", [(32, EM_386), (64, EM_X86_64)])
def test_elf_segments_land_at_paddr_with_bss_zeroed(mem, elf_class, machine):
    dirty(mem)
    text, data = b"\xb8\x2a\x00\x00\x00\xf4", b"DATA"
    elf = make_elf([(0x100000, text, len(text)), (0x101000, data, 0x1000)],
                   entry=0x100000, elf_class=elf_class, machine=machine)
    image = load_elf(mem, elf)
    assert (image.entry, image.format, image.elf_class) == (0x100000, "elf", elf_class)
    assert image.machine == ("EM_386" if elf_class == 32 else "EM_X86_64")
    assert image.segments == [(0x100000, len(text)), (0x101000, 0x1000)]
    assert mem.read(0x100000, len(text)) == text
    assert mem.read(0x101000, 4) == data
    assert mem.read(0x101004, 0x1000 - 4) == bytes(0x1000 - 4)  # bss
    assert mem.read(0x102000, 1) == b"\xcc"  # and not one byte further
    assert mem.read(0x100000 + len(text), 1) == b"\xcc"
    assert f"ELF{elf_class}" in image.summary() and "0x00101000-0x00101fff" in image.summary()


def test_elf_from_a_path(mem, tmp_path):
    path = tmp_path / "kernel.elf"
    path.write_bytes(make_elf([(0x200000, b"\xf4", 1)], entry=0x200000))
    assert load_elf(mem, path).entry == 0x200000
    assert load_elf(mem, str(path)).segments == [(0x200000, 1)]


def test_segment_that_fills_ram_to_its_last_byte(mem):
    load_elf(mem, make_elf([(RAM - 4, b"end!", 4)], entry=RAM - 4))
    assert mem.read(RAM - 4, 4) == b"end!"


GOOD = make_elf([(0x100000, b"\x90" * 16, 16), (0x101000, b"d" * 16, 32)], entry=0x100000)


@pytest.mark.parametrize("image, message", [
    (b"", r"not an ELF image: .* starts with nothing"),
    (b"MZ\x90\x00" + bytes(60), r"not an ELF image: .* starts with 4d 5a 90 00"),
    (b"\x7fELF\x03" + bytes(60), r"EI_CLASS\) must be 1 \(32-bit\) or 2"),
    (GOOD[:40], r"truncated ELF image: the ELF header needs 52 bytes, the image has 40"),
    (GOOD[:60], r"truncated ELF image: its 2 program headers end at byte 116, the image has 60"),
    (GOOD[:-1], r"ELF segment 1 \(PT_LOAD at 0x00101000\): its file bytes 0x84-0x94 lie beyond "
                r"the end of the image \(0x93 bytes\)"),
    (make_elf([(0x100000, b"x" * 32, 16)], entry=0), r"ELF segment 0 .*p_filesz 0x20 exceeds "
                                                      r"p_memsz 0x10"),
    (make_elf([(0x100000, b"x", 1)], 0, machine=EM_AARCH64), r"built for EM_AARCH64"),
    (make_elf([(0x100000, b"x", 1)], 0, e_type=1), r"object file \(ET_REL\).*link it first"),
    (make_elf([(0x100000, b"x", 1)], 0, e_type=3), r"\(ET_DYN\).*-no-pie"),
    (make_elf([], 0), r"no PT_LOAD segment"),
])
def test_malformed_elf_is_refused_and_nothing_written(mem, image, message):
    before = dirty(mem)
    with pytest.raises(LoadError, match=message):
        load_elf(mem, image)
    assert mem.snapshot() == before


@pytest.mark.parametrize("segments, message", [
    ([(0x100000, b"ok", 2), (RAM - 8, b"y" * 8, 16)],
     r"ELF segment 1 \(PT_LOAD at 0x003ffff8\) does not fit: load of 16 bytes at 0x003ffff8: "
     r"crosses the end"),
    ([(0x100000, b"ok", 2), (0x10000000, b"y", 1)],
     r"ELF segment 1 .* does not fit: .*outside guest memory"),
    ([(0x100000, b"ok", 2), (0xFEC00000, b"y", 1)], r"in MMIO hole 'ioapic'"),
    ([(0x100000, b"a" * 16, 0x2000), (0x101000, b"b", 1)],
     r"ELF segment 0 .* 0x00100000-0x00101fff overlaps ELF segment 1"),
])
def test_segments_outside_ram_or_overlapping_write_nothing(mem, segments, message):
    before = dirty(mem)
    with pytest.raises(LoadError, match=message):
        load_elf(mem, make_elf(segments, entry=0x100000))
    assert mem.snapshot() == before  # the good first segment was not copied either


def test_every_truncation_and_header_corruption_is_a_load_error_or_loads(mem):
    """pyelftools' own exceptions never escape, whatever the damage."""
    for length in range(len(GOOD)):
        with pytest.raises(LoadError):
            parse_elf(GOOD[:length])
    for position in range(52 + 2 * 32):
        for value in (0x00, 0x01, 0x80, 0xFF):
            damaged = bytearray(GOOD)
            damaged[position] = value
            try:
                load_elf(mem, bytes(damaged))
            except LoadError:
                pass


def test_an_executable_linked_by_ld(mem, tmp_path):
    if not (shutil.which("nasm") and shutil.which("ld")):
        pytest.skip("needs nasm and ld (binutils) to build an ELF")
    (tmp_path / "k.asm").write_text("global _start\nsection .text\n_start: mov eax, msg\nhlt\n"
                                    "section .data\nmsg: db 'hi'\nsection .bss\nbuf: resb 4096\n")
    subprocess.run(["nasm", "-f", "elf32", "-o", tmp_path / "k.o", tmp_path / "k.asm"], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext=0x100000", "-o", tmp_path / "k",
                    tmp_path / "k.o"], check=True, capture_output=True)
    dirty(mem)
    image = load_elf(mem, tmp_path / "k")
    assert (image.entry, image.elf_class, image.machine) == (0x100000, 32, "EM_386")
    ((start, size),) = image.segments
    msg = int.from_bytes(mem.read(0x100001, 4), "little")  # mov eax, imm32
    assert mem.read(msg, 2) == b"hi"
    assert mem.read(start + size - 4096, 4096) == bytes(4096)  # .bss zeroed
