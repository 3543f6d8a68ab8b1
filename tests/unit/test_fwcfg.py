"""fw_cfg over its legacy ports: selector at offset 0 (0x510), data at offset 1 (0x511)."""
from __future__ import annotations

import struct

import pytest

from vlab.devices import Bus, FwCfg
from vlab.devices.fwcfg import (FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST, FW_CFG_ID,
                                FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE)


def select(fw: FwCfg, key: int) -> None:
    fw.write(0, key, 2)


def read_bytes(fw: FwCfg, n: int) -> bytes:
    return bytes(fw.read(1, 1) for _ in range(n))


def read_item(fw: FwCfg, key: int, n: int) -> bytes:
    select(fw, key)
    return read_bytes(fw, n)


@pytest.fixture
def fw() -> FwCfg:
    return FwCfg(ram_size=128 << 20, nb_cpus=2)


def test_signature_is_qemu(fw):
    assert read_item(fw, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_id_announces_the_traditional_interface_only(fw):
    assert read_item(fw, FW_CFG_ID, 4) == b"\x01\x00\x00\x00"


def test_ram_size_is_u64_little_endian(fw):
    assert read_item(fw, FW_CFG_RAM_SIZE, 8) == (128 << 20).to_bytes(8, "little")
    big = FwCfg(ram_size=5 << 32, nb_cpus=1)
    assert read_item(big, FW_CFG_RAM_SIZE, 8) == bytes([0, 0, 0, 0, 5, 0, 0, 0])


def test_cpu_count_is_u16_little_endian(fw):
    assert read_item(fw, FW_CFG_NB_CPUS, 2) == b"\x02\x00"


def test_reads_past_the_end_return_zero(fw):
    assert read_item(fw, FW_CFG_SIGNATURE, 7) == b"QEMU\0\0\0"
    assert fw.state()["offset"] == 4


def test_selecting_resets_the_offset(fw):
    assert read_item(fw, FW_CFG_SIGNATURE, 2) == b"QE"
    assert read_item(fw, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_unknown_and_arch_keys_read_zero_but_write_bit_is_ignored(fw):
    assert read_item(fw, 0x0123, 4) == b"\0" * 4
    assert read_item(fw, 0x8000, 4) == b"\0" * 4
    assert read_item(fw, 0x4000 | FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_only_a_16_bit_write_selects(fw):
    select(fw, FW_CFG_NB_CPUS)
    fw.write(0, FW_CFG_SIGNATURE, 1)  # a data write, ignored
    fw.write(0, FW_CFG_SIGNATURE, 4)  # invalid
    assert fw.state()["selector"] == FW_CFG_NB_CPUS
    assert read_bytes(fw, 2) == b"\x02\x00"


def test_data_is_read_a_byte_at_a_time(fw):
    select(fw, FW_CFG_SIGNATURE)
    assert fw.read(1, 2) == 0  # invalid width: no data, no progress
    assert fw.read(0, 1) == ord("Q")  # the combined region answers byte reads on either port
    assert fw.read(1, 1) == ord("E")
    assert fw.state() == {"selector": 0, "offset": 2, "item_size": 4}


def parse_directory(raw: bytes) -> list[tuple[int, int, str]]:
    (count,) = struct.unpack_from(">I", raw)
    entries = []
    for i in range(count):
        size, key, reserved, name = struct.unpack_from(">IHH56s", raw, 4 + 64 * i)
        assert reserved == 0
        entries.append((size, key, name.rstrip(b"\0").decode()))
    return entries


def test_empty_file_directory(fw):
    assert read_item(fw, FW_CFG_FILE_DIR, 8) == b"\0" * 8


def test_file_directory_is_big_endian_and_sorted_by_name(fw):
    fw.add_file("opt/vlab/zeta", b"last")
    fw.add_file("etc/boot-fail-wait", b"\x05\x00\x00\x00\x00")
    select(fw, FW_CFG_FILE_DIR)
    raw = read_bytes(fw, fw.state()["item_size"])
    assert len(raw) == 4 + 2 * 64
    assert raw[:4] == b"\x00\x00\x00\x02"
    assert raw[4:12] == b"\x00\x00\x00\x05\x00\x20\x00\x00"  # size 5, key 0x20
    assert raw[12:12 + 19] == b"etc/boot-fail-wait\0"
    assert parse_directory(raw) == [(5, FW_CFG_FILE_FIRST, "etc/boot-fail-wait"),
                                    (4, FW_CFG_FILE_FIRST + 1, "opt/vlab/zeta")]


def test_files_are_read_through_their_directory_key(fw):
    fw.add_file("opt/vlab/b", b"bee")
    fw.add_file("opt/vlab/a", b"ay")
    select(fw, FW_CFG_FILE_DIR)
    entries = parse_directory(read_bytes(fw, 4 + 2 * 64))
    contents = {name: read_item(fw, key, size) for size, key, name in entries}
    assert contents == {"opt/vlab/a": b"ay", "opt/vlab/b": b"bee"}


def test_add_file_refuses_long_and_duplicate_names(fw):
    fw.add_file("x" * 55, b"")
    with pytest.raises(ValueError, match="longer than 55 bytes"):
        fw.add_file("y" * 56, b"")
    with pytest.raises(ValueError, match="already exists"):
        fw.add_file("x" * 55, b"again")


def test_seabios_style_probe_through_the_port_bus(fw):
    io = Bus("pio")
    io.register(FwCfg.IOBASE, FwCfg.SIZE, fw)
    assert io.mappings() == [(0x510, 0x512, "fw_cfg")]
    io.write(0x510, FW_CFG_SIGNATURE, 2)
    data, claimed = io.pio_in(0x511, 1, 4)  # rep insb
    assert (data, claimed) == (b"QEMU", fw)
    io.pio_out(0x510, 2, 1, FW_CFG_RAM_SIZE.to_bytes(2, "little"))
    assert io.pio_in(0x511, 1, 8)[0] == (128 << 20).to_bytes(8, "little")
