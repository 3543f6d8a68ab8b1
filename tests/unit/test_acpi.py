"""The ACPI tables Linux finds at 0xF0000, and the PM1 registers that power the machine off."""
import struct

from vlab.devices.acpi_pm import (PM1_CNT, PM1_CNT_SCI_EN, PM1_CNT_SLP_EN, PM1_EN, PM1_STS,
                                  PM1A_CNT_BLK, PM1A_EVT_BLK, AcpiPm)
from vlab.devices.reset import RCR
from vlab.machine import acpi


def tables(cpus=2):
    blob = acpi.build_tables(cpus)
    base = acpi.BASE

    def at(addr):
        off = addr - base
        signature, length = struct.unpack_from("<4sI", blob, off)
        return signature, blob[off:off + length]

    return blob, at


def test_the_rsdp_leads_to_every_table_and_each_sums_to_zero():
    blob, at = tables()
    assert blob[:8] == b"RSD PTR " and sum(blob[:20]) % 256 == 0 and acpi.BASE % 16 == 0
    signature, rsdt = at(struct.unpack_from("<I", blob, 16)[0])
    assert signature == b"RSDT" and sum(rsdt) % 256 == 0
    found = {}
    for addr in struct.unpack_from("<II", rsdt, 36):
        signature, data = at(addr)
        assert sum(data) % 256 == 0, signature
        found[signature] = data
    assert set(found) == {b"FACP", b"APIC"}
    facs_addr, dsdt_addr = struct.unpack_from("<II", found[b"FACP"], 36)
    signature, dsdt = at(dsdt_addr)
    assert signature == b"DSDT" and sum(dsdt) % 256 == 0
    assert dsdt[36:] == b"\x08_S5_\x12\x06\x04\x00\x00\x00\x00"   # Name(_S5, Package(4){0,0,0,0})
    assert facs_addr % 64 == 0 and at(facs_addr) == (b"FACS", blob[facs_addr - acpi.BASE:][:64])


def test_the_fadt_names_the_pm_ports_reset_register_and_legacy_devices():
    blob, at = tables()
    rsdt = at(struct.unpack_from("<I", blob, 16)[0])[1]
    fadt = at(struct.unpack_from("<I", rsdt, 36)[0])[1]
    assert len(fadt) == 244 and fadt[8] == 3
    sci, smi_cmd = struct.unpack_from("<HI", fadt, 46)
    assert (sci, smi_cmd) == (9, 0)             # no SMI_CMD: already in ACPI mode
    assert struct.unpack_from("<I", fadt, 56)[0] == PM1A_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == PM1A_CNT_BLK
    assert fadt[88:90] == bytes([4, 2])
    assert struct.unpack_from("<I", fadt, 76)[0] == 0   # no PM timer
    assert fadt[108] == 0x32 and struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_8042
    space, width, _, _, address = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, address, fadt[128]) == (1, RCR, 0x06)


def test_the_madt_has_a_local_apic_per_cpu_and_the_ioapic():
    blob, at = tables(3)
    rsdt = at(struct.unpack_from("<I", blob, 16)[0])[1]
    madt = at(struct.unpack_from("<I", rsdt, 40)[0])[1]
    entries, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        entries.append((kind, madt[off:off + length]))
        off += length
    apics = [e for kind, e in entries if kind == acpi.MADT_LAPIC]
    assert [(e[3], e[4] & 1) for e in apics] == [(0, 1), (1, 1), (2, 1)]
    (ioapic,) = [e for kind, e in entries if kind == acpi.MADT_IOAPIC]
    assert struct.unpack_from("<II", ioapic, 4) == (acpi.IOAPIC_ADDRESS, 0)


def test_s5_through_pm1a_cnt_powers_off():
    causes = []
    pm = AcpiPm(on_poweroff=causes.append)
    assert pm.read(PM1_CNT, 2) & PM1_CNT_SCI_EN
    pm.write(PM1_EN, 0x0120, 2)
    assert pm.read(PM1_EN, 2) == 0x0120
    pm.write(PM1_CNT, PM1_CNT_SCI_EN | 5 << 10, 2)      # SLP_TYP 5 without SLP_EN: kept
    assert causes == [] and pm.read(PM1_CNT, 2) == PM1_CNT_SCI_EN | 5 << 10
    pm.write(PM1_CNT, PM1_CNT_SCI_EN | 5 << 10 | PM1_CNT_SLP_EN, 2)   # S5 is SLP_TYP 0 here
    assert causes == []
    pm.write(PM1_CNT, PM1_CNT_SCI_EN | PM1_CNT_SLP_EN, 2)
    assert causes == ["ACPI S5 (soft off): PM1a_CNT written 0x2001"]
    assert not pm.read(PM1_CNT, 2) & PM1_CNT_SLP_EN     # write-only


def test_pm1_status_bits_clear_when_written_with_one():
    pm = AcpiPm()
    pm.regs[PM1_STS] = 0x8100
    pm.write(PM1_STS, 0x8000, 2)
    assert pm.read(PM1_STS, 2) == 0x0100
    pm.write(PM1_STS + 1, 0x01, 1)              # byte access to the high half
    assert pm.read(PM1_STS, 2) == 0x0000
