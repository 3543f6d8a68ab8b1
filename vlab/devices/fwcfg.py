"""QEMU's firmware configuration device, legacy I/O port interface (docs/specs/fw_cfg.rst).

fw_cfg is how QEMU hands firmware the facts of the machine (RAM size, CPU count, kernel
command line, ACPI tables, named files) without emulating any real hardware: the guest
writes a 16-bit item key to the selector port 0x510, then reads the item's bytes one at a
time from the data port 0x511. SeaBIOS's `qemu_cfg_init` begins by reading key 0 and
checking for "QEMU".

The two ports overlap (the 16-bit selector spans the data port), so, as in QEMU, this is
one device covering both: offset 0 is the selector, offset 1 the data register. QEMU's
combined I/O region (fw_cfg_comb_read/write/valid in hw/nvram/fw_cfg.c) decides by access
size alone, and so does this model: a 2-byte write selects an item and resets the data
offset; a 1-byte read returns the item's next byte, 0 past its end; a 1-byte write is a
data write, ignored since QEMU 2.4; any other access is invalid and reads as 0. The DMA
interface (port 0x514) is not modelled, so FW_CFG_ID reports the traditional interface
only.
"""
from __future__ import annotations

import struct

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NB_CPUS = 0x0005
FW_CFG_FILE_DIR = 0x0019
FW_CFG_FILE_FIRST = 0x0020

FW_CFG_WRITE_CHANNEL = 0x4000  # selector bit 14: "write mode", ignored since QEMU 2.4

FW_CFG_VERSION = 0x01  # FW_CFG_ID bit 0: the traditional interface (bit 1 would be DMA)

FW_CFG_MAX_FILE_PATH = 56  # `char name[56]` in struct FWCfgFile, NUL included

# struct FWCfgFile { be32 size; be16 select; be16 reserved; char name[56]; }
_FILE_ENTRY = struct.Struct(">IHH56s")


class FwCfg:
    """fw_cfg with signature, ID, RAM size, CPU count and a file directory."""

    IOBASE = 0x510
    SIZE = 2

    def __init__(self, ram_size: int, nb_cpus: int, name: str = "fw_cfg") -> None:
        self.name = name
        self._items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: FW_CFG_VERSION.to_bytes(4, "little"),
            FW_CFG_RAM_SIZE: ram_size.to_bytes(8, "little"),
            FW_CFG_NB_CPUS: nb_cpus.to_bytes(2, "little"),
        }
        self._files: dict[str, bytes] = {}
        self._publish_files()
        self.selector = FW_CFG_SIGNATURE
        self.offset = 0

    def add_file(self, name: str, data: bytes) -> None:
        """Publish a named blob, e.g. "opt/org.example/greeting", in the file directory.

        As QEMU does, the directory is kept sorted by name and file keys follow that order
        from FW_CFG_FILE_FIRST, so adding a file may move others: guests look keys up in
        the directory rather than assuming them.
        """
        encoded = name.encode("ascii")
        if len(encoded) >= FW_CFG_MAX_FILE_PATH:
            raise ValueError(f"fw_cfg file name {name!r} is longer than "
                             f"{FW_CFG_MAX_FILE_PATH - 1} bytes")
        if name in self._files:
            raise ValueError(f"fw_cfg file {name!r} already exists")
        self._files[name] = bytes(data)
        self._publish_files()

    def _publish_files(self) -> None:
        directory = [len(self._files).to_bytes(4, "big")]
        for key, name in enumerate(sorted(self._files), FW_CFG_FILE_FIRST):
            data = self._files[name]
            self._items[key] = data
            directory.append(_FILE_ENTRY.pack(len(data), key, 0, name.encode("ascii")))
        self._items[FW_CFG_FILE_DIR] = b"".join(directory)

    def read(self, offset: int, size: int = 1) -> int:
        if size != 1:
            return 0
        item = self._item()
        if self.offset >= len(item):
            return 0
        self.offset += 1
        return item[self.offset - 1]

    def write(self, offset: int, value: int, size: int = 1) -> None:
        if size == 2:
            self.selector = value & 0xFFFF
            self.offset = 0

    def _item(self) -> bytes:
        # Bit 14 asks for write mode, which changes nothing for reads. Unknown keys,
        # including every architecture-specific one (bit 15), read as all zeroes.
        return self._items.get(self.selector & ~FW_CFG_WRITE_CHANNEL, b"")

    def state(self) -> dict:
        return {"selector": self.selector, "offset": self.offset,
                "item_size": len(self._item())}
