"""Port 0x92 and the PIIX3 reset control register: which writes ask for a reset."""
from vlab.devices.reset import Port92, ResetControl


def test_port92_resets_on_a_rising_bit0_and_reads_back():
    causes = []
    port = Port92(on_reset=causes.append)
    assert port.read(0) == 0x02  # A20 on from the start
    port.write(0, 0x02)
    assert causes == []
    port.write(0, 0x03)
    assert causes == ["port 0x92 fast reset (wrote 0x03)"] and port.read(0) == 0x03
    port.write(0, 0x03)  # bit 0 already set: no new request
    assert len(causes) == 1
    port.reset()
    assert port.read(0) == 0x02
    port.write(0, 0x01)
    assert len(causes) == 2


def test_rcr_resets_on_bit2_and_keeps_only_bit1():
    causes = []
    rcr = ResetControl(on_reset=causes.append)
    rcr.write(0, 0x02)
    assert causes == [] and rcr.read(0) == 0x02
    rcr.write(0, 0xFB)  # every bit but RST_CPU
    assert causes == [] and rcr.read(0) == 0x02
    rcr.write(0, 0x06)
    assert causes == ["port 0xcf9 reset control (wrote 0x06)"] and rcr.read(0) == 0x02
