"""The Linux boot protocol without KVM: the bzImage setup header read and checked, malformed
and truncated images refused by field, the zero page, e820, command line and initrd placement,
the 32-bit entry state; PVH's hvm_start_info; the busybox initramfs."""
from __future__ import annotations

import gzip
import struct

import pytest

from linux_images import HEADER_END, make_bzimage, make_pvh_elf
from vlab.machine import bootparams as bp
from vlab.machine.bootparams import BzImageError, parse_setup_header, read_e820
from vlab.machine.cpu_modes import decode_descriptor
from vlab.machine.linux import (BOOT_CS, BOOT_DS, BOOT_INFO, CMDLINE, HEAP_END_PTR,
                                HVM_MEMMAP_ENTRY, HVM_MODLIST_ENTRY, HVM_START_INFO,
                                HVM_START_MAGIC, KERNEL_LOAD, LinuxBootError, boot_gdt,
                                entry_sregs, load_linux_image, plan_linux, pvh_entry)
from vlab.machine.memory import GuestMemory
from vlab.kvm.state import Sregs
from vlab.x86 import CR0_PE, CR0_PG

MiB = 1 << 20
KERNEL = bytes(range(256)) * 3   # the protected-mode part: recognisable bytes


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add_ram(0, 64 * MiB, "pc.ram")
    yield mem
    mem.close()


def field(page: bytes, name: str):
    offset, fmt, _ = bp.FIELDS[name]
    return struct.unpack_from("<" + fmt, page, offset)[0]


# --- the setup header -----------------------------------------------------------------------

def test_header_fields_are_read_at_their_offsets():
    header = parse_setup_header(make_bzimage(KERNEL, setup_sects=7, init_size=0x345000,
                                             cmdline_size=2047, initrd_addr_max=0x37FFFFFF))
    assert header.version == 0x20F and header.header == b"HdrS"
    assert header.setup_size == 8 * 512 and header.kernel_size == len(KERNEL)
    assert (header.init_size, header.cmdline_size, header.initrd_max) == (0x345000, 2047,
                                                                         0x37FFFFFF)
    assert header.relocatable and header.alignment == 0x200000
    assert len(header.raw) == HEADER_END - bp.SETUP_HEADER
    assert "boot protocol 2.15" in header.describe() and "LOADED_HIGH" in header.describe()


def test_setup_sects_zero_means_four():
    assert parse_setup_header(make_bzimage(setup_sects=0)).setup_size == 5 * 512


def test_fields_newer_than_the_protocol_are_absent():
    header = parse_setup_header(make_bzimage(version=0x206))
    assert "cmdline_size" in header.fields and "init_size" not in header.fields
    assert header.preferred == 0x100000   # pref_address arrived in 2.10
    assert header.memory_needed == header.kernel_size


@pytest.mark.parametrize("change, message", [
    (dict(boot_flag=0), "not a bzImage: boot_flag (offset 0x1fe) is 0x0000, must be 0xaa55"),
    (dict(magic=b"HdrT"), "magic (offset 0x202) is b'HdrT', must be b'HdrS'"),
    (dict(version=0x205), "boot protocol 2.05 (version 0x0205) is older than 2.06"),
    (dict(loadflags=0), "LOADED_HIGH) is clear: a zImage"),
    (dict(syssize=0), "syssize is 0"),
    (dict(syssize=0x1000), "syssize says 65536 bytes of protected-mode kernel"),
    (dict(kernel_alignment=0x300000), "kernel_alignment 0x300000 of a relocatable kernel is "
                                      "not a power of two"),
])
def test_malformed_headers_are_refused_by_field(change, message):
    with pytest.raises(BzImageError) as refused:
        parse_setup_header(make_bzimage(KERNEL, **change))
    assert message in str(refused.value)


def test_setup_sects_beyond_the_file():
    image = make_bzimage(setup_sects=63)[:13 * 512]
    with pytest.raises(BzImageError, match="setup_sects says 63 sectors but the file has 12 "
                                           "after the boot sector"):
        parse_setup_header(image)


def test_every_truncation_is_refused_naming_what_is_missing():
    """Cut anywhere, an image gives a BzImageError (never an IndexError or struct.error)."""
    image = make_bzimage(KERNEL)
    for size in range(len(image)):
        with pytest.raises(BzImageError, match="bzImage"):
            parse_setup_header(image[:size])
    parse_setup_header(image)


def test_filled_header_keeps_the_kernels_fields_and_writes_the_loaders():
    header = parse_setup_header(make_bzimage(KERNEL, loadflags=bp.LOADED_HIGH | bp.KEEP_SEGMENTS))
    raw = bp.fill_header(header, cmd_line_ptr=0x20000, ramdisk_image=0x3000000,
                         ramdisk_size=1234, code32_start=0x100000, heap_end_ptr=0xFE00)
    page = bytes(bp.SETUP_HEADER) + raw
    assert field(page, "type_of_loader") == 0xFF
    assert field(page, "loadflags") == bp.LOADED_HIGH | bp.CAN_USE_HEAP   # KEEP_SEGMENTS cleared
    assert (field(page, "heap_end_ptr"), field(page, "cmd_line_ptr")) == (0xFE00, 0x20000)
    assert (field(page, "ramdisk_image"), field(page, "ramdisk_size")) == (0x3000000, 1234)
    assert field(page, "vid_mode") == bp.NORMAL_VGA
    for name in ("setup_sects", "syssize", "header", "version", "root_dev", "init_size"):
        assert field(page, name) == header.fields[name], name


# --- the zero page, e820, command line, initrd ---------------------------------------------

def test_zero_page_holds_the_header_e820_and_nothing_else(memory):
    initrd = b"INIT" * 1000
    boot = load_linux_image(memory, make_bzimage(KERNEL), initrd, "console=ttyS0 quiet")
    page = memory.read(BOOT_INFO, 4096)
    assert boot.boot_info == BOOT_INFO and boot.entry == KERNEL_LOAD
    assert page[0x202:0x206] == b"HdrS"
    assert field(page, "cmd_line_ptr") == CMDLINE
    assert field(page, "heap_end_ptr") == HEAP_END_PTR
    assert field(page, "loadflags") & bp.CAN_USE_HEAP
    assert (field(page, "ramdisk_image"), field(page, "ramdisk_size")) == boot.initrd
    assert field(page, "code32_start") == KERNEL_LOAD
    assert page[bp.SENTINEL] == 0
    # the loader's part below the header is zeros, but for the e820 count
    assert page[:bp.E820_ENTRIES] == bytes(bp.E820_ENTRIES)
    assert read_e820(page) == boot.e820
    table_end = bp.E820_TABLE + 20 * len(boot.e820)
    assert page[table_end:] == bytes(4096 - table_end)


def test_e820_reserves_the_legacy_hole_and_reports_all_ram(memory):
    boot = load_linux_image(memory, make_bzimage(KERNEL))
    assert boot.e820 == [(0, 0x9FC00, bp.E820_RAM), (0x9FC00, 0x400, bp.E820_RESERVED),
                         (0xF0000, 0x10000, bp.E820_RESERVED),
                         (0x100000, 63 * MiB, bp.E820_RAM)]


def test_kernel_and_command_line_are_placed(memory):
    image = make_bzimage(KERNEL)
    load_linux_image(memory, image, None, "root=/dev/vda rw")
    assert memory.read(KERNEL_LOAD, len(KERNEL)) == KERNEL
    assert memory.read(CMDLINE, 17) == b"root=/dev/vda rw\0"
    page = memory.read(BOOT_INFO, 4096)
    assert (field(page, "ramdisk_image"), field(page, "ramdisk_size")) == (0, 0)


def test_command_line_limits(memory):
    image = make_bzimage(KERNEL, cmdline_size=15)
    load_linux_image(memory, image, None, "x" * 15)
    with pytest.raises(LinuxBootError, match="the command line is 16 bytes; the kernel's "
                                             "cmdline_size allows 15"):
        plan_linux(image, None, "x" * 16, 64 * MiB)
    with pytest.raises(LinuxBootError, match="NUL byte"):
        plan_linux(image, None, "a\0b", 64 * MiB)


@pytest.mark.parametrize("initrd_addr_max, ram, top", [
    (0x7FFFFFFF, 64 * MiB, 64 * MiB),          # RAM ends first
    (0x2FFFFFF, 64 * MiB, 0x3000000),          # initrd_addr_max is the last byte allowed
    (0x2FFF7FF, 64 * MiB, 0x2FFF800),          # ... and need not be page aligned
])
def test_initrd_goes_as_high_as_fits(initrd_addr_max, ram, top):
    initrd = bytes(range(256)) * 40 + b"end"
    boot, _ = plan_linux(make_bzimage(KERNEL, initrd_addr_max=initrd_addr_max), initrd, "", ram)
    start, size = boot.initrd
    assert size == len(initrd) and start % 4096 == 0
    assert start + size <= top < start + size + 4096


def test_initrd_is_written_where_the_header_says(memory):
    initrd = b"\x1f\x8b" + bytes(range(256)) * 50
    boot = load_linux_image(memory, make_bzimage(KERNEL), initrd)
    assert memory.read(boot.initrd[0], len(initrd)) == initrd


def test_what_does_not_fit_is_refused_and_nothing_is_written(memory):
    image = make_bzimage(KERNEL, pref_address=0x1000000, init_size=0x2000000)
    with pytest.raises(LinuxBootError, match=r"the kernel needs 0x2000000 bytes \(init_size\) "
                                             r"from 0x1000000.*RAM ends at 0x2000000"):
        plan_linux(image, None, "", 32 * MiB)
    with pytest.raises(LinuxBootError, match="the initrd .* does not fit"):
        load_linux_image(memory, image, bytes(40 * MiB))
    assert memory.read(KERNEL_LOAD, 4096) == bytes(4096)
    assert memory.read(BOOT_INFO, 4096) == bytes(4096)


def test_runtime_start_follows_head_64():
    header = parse_setup_header(make_bzimage(pref_address=0x1000000, kernel_alignment=0x200000))
    assert header.runtime_start(0x100000) == 0x1000000   # not below LOAD_PHYSICAL_ADDR
    assert header.runtime_start(0x1100000) == 0x1200000  # aligned up
    fixed = parse_setup_header(make_bzimage(relocatable=0, pref_address=0x1000000))
    assert fixed.runtime_start(0x100000) == 0x1000000


# --- the 32-bit entry -----------------------------------------------------------------------

def test_entry_state_is_the_32_bit_boot_protocols():
    sregs = entry_sregs(Sregs())
    assert sregs.cs.selector == BOOT_CS == 0x10 and sregs.ds.selector == BOOT_DS == 0x18
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        assert (seg.base, seg.limit, seg.g, seg.db) == (0, 0xFFFFFFFF, 1, 1)
    assert sregs.cs.type & 0b1010 == 0b1010 and sregs.ds.type & 0b0010   # x/r code, r/w data
    assert sregs.cr0 & CR0_PE and not sregs.cr0 & CR0_PG
    assert (sregs.cr4, sregs.efer, sregs.idt.limit) == (0, 0, 0)
    gdt = boot_gdt()
    for seg in (sregs.cs, sregs.ds, sregs.tr):   # the GDT holds what the caches say
        loaded = decode_descriptor(gdt[seg.selector:seg.selector + 8], seg.selector)
        assert loaded == seg.replace(unusable=0)


def test_bzimage_registers(memory):
    boot = load_linux_image(memory, make_bzimage(KERNEL))
    regs = boot.regs
    assert (regs.rip, regs.rsi, regs.rflags) == (KERNEL_LOAD, BOOT_INFO, 0x2)   # IF clear
    assert regs.rbx == regs.rbp == regs.rdi == 0


# --- PVH ------------------------------------------------------------------------------------

def test_pvh_entry_note_is_found():
    assert pvh_entry(make_pvh_elf(b"\xf4", entry=0x100010)) == 0x100010
    assert pvh_entry(make_pvh_elf(b"\xf4", note=False)) is None


def test_pvh_start_info_memmap_modules_and_cmdline(memory):
    code = b"\x90" * 32 + b"\xf4"
    initrd = b"INITRD" * 100
    boot = load_linux_image(memory, make_pvh_elf(code, entry=0x100020), initrd, "console=hvc0")
    assert boot.header is None and boot.entry == 0x100020
    assert (boot.regs.rbx, boot.regs.rsi) == (BOOT_INFO, 0)
    assert memory.read(0x100000, len(code)) == code
    info = HVM_START_INFO.unpack(memory.read(BOOT_INFO, HVM_START_INFO.size))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = info
    assert (magic, version, nr_modules, cmdline, rsdp) == (HVM_START_MAGIC, 1, 1, CMDLINE, 0)
    assert memory.read(cmdline, 13) == b"console=hvc0\0"
    table = [HVM_MEMMAP_ENTRY.unpack(memory.read(memmap + i * 24, 24))[:3] for i in range(entries)]
    assert table == boot.e820
    paddr, size, _, _ = HVM_MODLIST_ENTRY.unpack(memory.read(modlist, 32))
    assert (paddr, size) == boot.initrd and memory.read(paddr, size) == initrd


def test_elf_without_pvh_note_is_refused():
    with pytest.raises(LinuxBootError, match="no XEN_ELFNOTE_PHYS32_ENTRY note"):
        plan_linux(make_pvh_elf(b"\xf4", note=False), None, "", 64 * MiB)


# --- the initramfs --------------------------------------------------------------------------

def read_newc(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) of a newc archive."""
    files, offset = {}, 0
    while True:
        assert archive[offset:offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_at = offset + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(name_at + namesize) % 4)
        if name == "TRAILER!!!":
            return files
        files[name] = (fields[1], archive[data_at:data_at + filesize], (fields[9], fields[10]))
        offset = data_at + filesize + (-(data_at + filesize) % 4)


def test_initramfs_holds_busybox_console_and_init(tmp_path):
    from vlab.machine.initramfs import (BUSYBOX, CHAR, MARKER, POWEROFF_MARKER,
                                        build_initramfs)
    if not BUSYBOX.exists():
        pytest.skip("no /bin/busybox (Debian's busybox-static, which tools/setup.sh installs)")
    path = build_initramfs("check", cache=tmp_path, log=lambda msg: None)
    files = read_newc(gzip.decompress(path.read_bytes()))
    assert files["dev/console"][0] == CHAR and files["dev/console"][2] == (5, 1)
    assert files["bin/busybox"][1] == BUSYBOX.read_bytes()
    assert files["bin/sh"][1] == b"busybox" and files["bin/poweroff"][1] == b"busybox"
    init = files["init"][1].decode()
    assert files["init"][0] & 0o111 and init.startswith("#!/bin/sh")
    assert f'echo "{MARKER}"' in init and "head -n" in init and "/proc/cpuinfo" in init
    assert init.index(POWEROFF_MARKER) < init.index("poweroff -f")
    shell = read_newc(gzip.decompress(
        build_initramfs("shell", cache=tmp_path, log=lambda msg: None).read_bytes()))
    assert "setsid cttyhack sh" in shell["init"][1].decode()


def test_initramfs_is_reproducible_and_cached(tmp_path):
    from vlab.machine.initramfs import BUSYBOX, build_initramfs
    if not BUSYBOX.exists():
        pytest.skip("no /bin/busybox (Debian's busybox-static, which tools/setup.sh installs)")
    first = build_initramfs(cache=tmp_path / "a", log=lambda msg: None)
    second = build_initramfs(cache=tmp_path / "b", log=lambda msg: None)
    assert first.read_bytes() == second.read_bytes() and first.name == second.name
    mtime = first.stat().st_mtime_ns
    assert build_initramfs(cache=tmp_path / "a", log=lambda msg: None) == first
    assert first.stat().st_mtime_ns == mtime


def test_initramfs_variant_is_checked():
    from vlab.machine.initramfs import init_script
    with pytest.raises(ValueError, match="choose one of check, shell"):
        init_script("rescue")


# --- Lab.load_linux and vlab run --linux refuse what cannot boot, before anything runs -----

def test_lab_load_linux_needs_the_irqchip_one_vcpu_and_room():
    from vlab import Lab
    image = make_bzimage(KERNEL, pref_address=0x1000000, init_size=0x2000000)
    with Lab(accel="tcg", memory="64M") as lab, pytest.raises(ValueError, match="irqchip=True"):
        lab.load_linux(image)
    with Lab(accel="tcg", memory="64M", vcpus=2, irqchip=True) as lab, \
            pytest.raises(ValueError, match="vcpus=2: a Lab boots Linux on one vCPU"):
        lab.load_linux(image)
    with Lab(accel="tcg", memory="16M", irqchip=True) as lab, \
            pytest.raises(LinuxBootError, match=r"init_size.*RAM ends at 0x1000000"):
        lab.load_linux(image)
    assert lab.guest is None


def test_lab_load_linux_on_tcg_says_linux_needs_kvm():
    from vlab import Lab, StageError
    with Lab(accel="tcg", memory="64M", irqchip=True) as lab:
        lab.load_linux(make_bzimage(KERNEL))
        with pytest.raises(StageError, match="Linux needs KVM: its timer and interrupts come "
                                             "from KVM's in-kernel irqchip and PIT"):
            lab.bring_up()


@pytest.mark.parametrize("argv, message", [
    (["--linux", "k", "--module", "m"], "--module goes with --multiboot (Linux takes --initrd)"),
    (["f.asm", "--initrd", "i"], "--initrd goes with --linux"),
    (["f.asm", "--linux", "k"], "give one of FILE, --multiboot KERNEL or --linux KERNEL"),
])
def test_vlab_run_linux_arguments(capsys, argv, message):
    from vlab import cli
    assert cli.main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_vlab_run_linux_refuses_a_malformed_kernel_before_making_a_vm(capsys, tmp_path):
    from vlab import cli
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(KERNEL)[:3000])
    assert cli.main(["run", "--linux", str(kernel), "--accel", "kvm"]) == 2
    err = capsys.readouterr().err
    assert "vlab run: truncated bzImage: syssize says 768 bytes" in err, err


def test_every_truncation_of_a_pvh_kernel_is_refused():
    """Cut anywhere, an ELF kernel gives a LoadError naming what is wrong, never another
    exception (pyelftools' own included)."""
    from vlab.machine.loaders import LoadError
    image = make_pvh_elf(b"\x90" * 64 + b"\xf4")
    for size in range(0, len(image), 7):
        with pytest.raises(LoadError):
            plan_linux(image[:size], None, "", 64 * MiB)


def test_initramfs_with_an_init_of_ones_own(tmp_path):
    from vlab.machine.initramfs import BUSYBOX, MARKER, PROLOGUE, build_initramfs
    if not BUSYBOX.exists():
        pytest.skip("no /bin/busybox (Debian's busybox-static, which tools/setup.sh installs)")
    init = PROLOGUE.format(marker=MARKER) + "cat /proc/interrupts\npoweroff -f\n"
    path = build_initramfs(cache=tmp_path, init=init, log=lambda msg: None)
    assert path.name.startswith("busybox-custom-")
    assert read_newc(gzip.decompress(path.read_bytes()))["init"][1] == init.encode()
