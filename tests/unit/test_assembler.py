"""Assembling learner code with nasm: bytes, line map, errors in the learner's line numbers."""
import shutil

import pytest

from vlab.machine.assembler import AssemblerNotFound, AssemblyError, assemble

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None,
                                reason="nasm is not installed (apt-get install nasm)")

PROGRAM = """\
start:
  mov ax, 1        ; B8 01 00
  times 3 nop
  db "a string long enough to wrap in the listing", 0
  out 0xe9, al
  jmp start
"""


def test_16_bit_code_with_org_and_line_map():
    asm = assemble(PROGRAM, bits=16, org=0x7C00)
    assert asm.code[:6] == bytes.fromhex("b80100909090")
    assert asm.code[-4:] == bytes.fromhex("e6e9") + bytes([0xEB, (-(len(asm.code)) & 0xFF)])
    assert (asm.bits, asm.org, asm.source) == (16, 0x7C00, PROGRAM)
    string_at = 0x7C06
    out_at = string_at + len("a string long enough to wrap in the listing") + 1
    assert asm.lines == {0x7C00: 2, 0x7C03: 3, string_at: 4, out_at: 5, out_at + 2: 6}


def test_line_for_covers_every_byte_of_a_statement():
    asm = assemble(PROGRAM, org=0x7C00)
    assert asm.line_for(0x7C01) == 2
    assert asm.line_for(0x7C20) == 4  # inside the wrapped string
    assert asm.line_for(0x7C00 + len(asm.code) - 1) == 6
    assert asm.line_for(0x7C00 + len(asm.code)) is None
    assert asm.line_for(0x7BFF) is None
    assert asm.source_line(asm.line_for(0x7C01)).strip().startswith("mov ax, 1")


def test_bits_select_the_encoding():
    assert assemble("mov eax, 1", bits=16).code == bytes.fromhex("66b801000000")
    assert assemble("mov eax, 1", bits=32).code == bytes.fromhex("b801000000")
    assert assemble("mov rax, 0x123456789", bits=64).code == bytes.fromhex("48b88967452301000000")


def test_org_changes_absolute_addresses():
    assert assemble("here: dd here", bits=32, org=0x100000).code == (0x100000).to_bytes(4, "little")


def test_source_directives_win_and_are_reported():
    asm = assemble("[bits 32]\norg 1000h\nmov eax, $\n", bits=16, org=5)
    assert (asm.bits, asm.org) == (32, 0x1000)
    assert asm.code == bytes.fromhex("b800100000")
    assert asm.lines == {0x1000: 3}


def test_warnings_are_kept_with_learner_line_numbers():
    asm = assemble("nop\nadd al, 300\n")
    assert asm.warnings and asm.warnings[0].startswith("line 2: ")


def test_errors_name_learner_lines_and_quote_them():
    source = "  mov ax, 1\n  mov ax, bx, cx\n  nop\n  jmp nowhere\n"
    with pytest.raises(AssemblyError) as info:
        assemble(source, bits=16, org=0x7C00)
    lines = [line for line, _ in info.value.errors]
    assert lines == [2, 4]
    text = str(info.value)
    assert "line 2: invalid combination of opcode and operands\n      mov ax, bx, cx" in text
    assert "line 4: symbol `nowhere' not defined\n      jmp nowhere" in text


def test_error_inside_a_macro_points_at_the_use_and_the_definition():
    source = "%macro m 0\n  mov ax, bx, cx\n%endmacro\n  m\n"
    with pytest.raises(AssemblyError) as info:
        assemble(source)
    assert [line for line, _ in info.value.errors] == [4, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be 16, 32 or 64"):
        assemble("nop", bits=8)
    with pytest.raises(ValueError, match="org must be a non-negative"):
        assemble("nop", org=-1)
    with pytest.raises(AssemblyError, match="cannot read the number"):
        assemble("org start\nstart: nop")


def test_runaway_preprocessor_is_stopped(monkeypatch):
    monkeypatch.setattr("vlab.machine.assembler.NASM_TIMEOUT", 0.2)
    with pytest.raises(AssemblyError, match="did not finish within 0.2 s"):
        assemble("%assign i 0\n%rep 1000000\n%rep 1000000\n%assign i i+1\n%endrep\n%endrep\n")


def test_missing_nasm_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AssemblerNotFound, match="apt-get install nasm") as info:
        assemble("nop")
    assert "conda install -c conda-forge nasm" in str(info.value)
    assert isinstance(info.value, AssemblyError)
