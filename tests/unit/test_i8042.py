"""The i8042 as Linux's driver probes it, and its reset line."""
from vlab.devices.i8042 import (AUX_IRQ, CMD_AUX_LOOP, CMD_AUX_SEND, CMD_CTL_RCTR,
                                CMD_CTL_TEST, CMD_CTL_WCTR, CMD_RESET, CMD_WRITE_OUTPORT,
                                I8042_CTR_AUXINT, I8042_CTR_KBDINT, I8042_STR_AUXDATA,
                                I8042_STR_OBF, I8042_STR_SYSFLAG, I8042_STR_TIMEOUT, KBD_IRQ,
                                I8042)

DATA, STATUS = 0, 4     # offsets of ports 0x60 and 0x64


def make():
    lines, resets = [], []
    kbc = I8042(irq=lambda line, level: lines.append((line, level)), on_reset=resets.append)
    return kbc, lines, resets


def command(kbc, cmd, *data):
    kbc.write(STATUS, cmd)
    for byte in data:
        kbc.write(DATA, byte)


def test_self_test_command_byte_and_an_empty_buffer():
    kbc, lines, _ = make()
    assert not kbc.read(STATUS) & I8042_STR_OBF
    command(kbc, CMD_CTL_TEST)
    assert kbc.read(STATUS) & (I8042_STR_OBF | I8042_STR_SYSFLAG) == I8042_STR_OBF | I8042_STR_SYSFLAG
    assert kbc.read(DATA) == 0x55 and not kbc.read(STATUS) & I8042_STR_OBF
    command(kbc, CMD_CTL_WCTR, 0x47)
    command(kbc, CMD_CTL_RCTR)
    assert kbc.read(DATA) == 0x47
    # bytes the driver reads back while polling raise IRQ 1 (KBDINT set) and drop it on read
    assert lines == [(KBD_IRQ, 1), (KBD_IRQ, 0), (KBD_IRQ, 1), (KBD_IRQ, 0)]


def test_aux_loopback_comes_back_as_aux_data_on_irq12():
    kbc, lines, _ = make()
    command(kbc, CMD_CTL_WCTR, I8042_CTR_AUXINT)
    command(kbc, CMD_AUX_LOOP, 0x5A)
    assert kbc.read(STATUS) & I8042_STR_AUXDATA and lines[-1] == (AUX_IRQ, 1)
    assert kbc.read(DATA) == 0x5A and lines[-1] == (AUX_IRQ, 0)


def test_bytes_for_absent_devices_are_answered_with_a_timeout():
    kbc, _, _ = make()
    kbc.write(DATA, 0xF2)                       # keyboard: get ID
    assert kbc.read(STATUS) & (I8042_STR_TIMEOUT | I8042_STR_AUXDATA) == I8042_STR_TIMEOUT
    assert kbc.read(DATA) == 0xFE
    command(kbc, CMD_AUX_SEND, 0xF2)            # mouse: get ID
    assert kbc.read(STATUS) & (I8042_STR_TIMEOUT | I8042_STR_AUXDATA) == (
        I8042_STR_TIMEOUT | I8042_STR_AUXDATA)
    assert kbc.read(DATA) == 0xFE


def test_interrupts_follow_the_command_byte():
    kbc, lines, _ = make()
    command(kbc, CMD_CTL_WCTR, 0)
    command(kbc, CMD_CTL_RCTR)
    assert lines == [] and kbc.read(DATA) == 0
    command(kbc, CMD_CTL_WCTR, I8042_CTR_KBDINT)
    command(kbc, CMD_CTL_RCTR)
    assert lines == [(KBD_IRQ, 1)]


def test_reset_by_pulse_and_by_the_output_port():
    kbc, _, resets = make()
    kbc.read(STATUS)                            # what reboot=k polls first: IBF clear
    command(kbc, CMD_RESET)
    assert resets == ["i8042 command 0xfe pulsed the CPU's reset line"]
    command(kbc, 0xFF)                          # pulses no line
    command(kbc, CMD_WRITE_OUTPORT, 0x02)       # reset line low
    assert len(resets) == 2 and "0x02" in resets[1]
