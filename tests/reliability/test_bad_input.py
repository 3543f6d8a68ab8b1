"""Bad input a careless learner gives: refused at once with a vlab error that says the
limit or the fix in the lab's words, the same on every accelerator; never a traceback from
deep inside, a silent acceptance, or a run of garbage."""
from __future__ import annotations

import shutil
import struct

import pytest

from vlab import Lab, StageError
from vlab.cli import main
from vlab.kvm import KvmError
from vlab.machine.assembler import AssemblyError
from vlab.machine.loaders import LoadError
from vlab.x86 import CR0_PE, CR0_PG

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]


@pytest.fixture
def brought_up(make_lab):
    def make(accel: str, **options) -> Lab:
        lab = make_lab(accel, **options)
        lab.load_assembly("hlt")
        lab.bring_up()
        return lab
    return make


# --- register values: one pre-flight on every accelerator --------------------------------------
@pytest.mark.parametrize("accel", ACCELS)
def test_cr0_pg_without_pe_is_refused_naming_the_bit(brought_up, accel):
    lab = brought_up(accel)
    vcpu = lab.vcpus[0]
    sregs = vcpu.get_sregs()
    with pytest.raises((KvmError, ValueError), match=r"CR0\.PG is set without CR0\.PE"):
        vcpu.set_sregs(sregs.replace(cr0=(sregs.cr0 & ~CR0_PE) | CR0_PG))
    assert vcpu.get_sregs() == sregs
    assert lab.run(timeout=5).stop_reason.startswith("HLT")


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("field, value, words", [
    ("rip", -1, "rip"), ("rsp", 1 << 64, "rsp"), ("rflags", -2, "rflags"),
])
def test_register_value_outside_64_bits_is_refused(brought_up, accel, field, value, words):
    lab = brought_up(accel)
    vcpu = lab.vcpus[0]
    regs = vcpu.get_regs()
    with pytest.raises(ValueError, match=rf"{words}.*64-bit"):
        vcpu.set_regs(regs.replace(**{field: value}))
    assert vcpu.get_regs() == regs


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("change, words", [
    (lambda s: s.replace(cr0=1 << 64), "cr0"),
    (lambda s: s.replace(cs=s.cs.replace(selector=0x10000)), "cs.selector"),
    (lambda s: s.replace(idt=s.idt.replace(limit=-1)), "idt.limit"),
])
def test_special_register_value_that_does_not_fit_is_refused(brought_up, accel, change, words):
    lab = brought_up(accel)
    vcpu = lab.vcpus[0]
    sregs = vcpu.get_sregs()
    with pytest.raises(ValueError, match=rf"{words}"):
        vcpu.set_sregs(change(sregs))
    assert vcpu.get_sregs() == sregs


# --- sizes and counts: say the limit ----------------------------------------------------------
@pytest.mark.parametrize("memory", ["4G", "3400M"])
def test_memory_above_the_board_limit_says_the_limit(memory):
    with pytest.raises(ValueError) as caught:
        Lab(accel="tcg", memory=memory)
    text = str(caught.value)
    assert "3328 MiB" in text and "testdev" not in text and "pc.ram" not in text


@pytest.mark.parametrize("memory", ["0", "-16M", "1000"])
def test_memory_that_is_no_ram_size_is_refused(memory):
    with pytest.raises(ValueError, match="memory"):
        Lab(accel="tcg", memory=memory)


def test_cli_memory_above_the_limit_says_the_limit(tmp_path, capsys):
    guest = tmp_path / "g.asm"
    guest.write_text("hlt\n")
    assert main(["run", str(guest), "--accel", "tcg", "--memory", "4G"]) == 2
    err = capsys.readouterr().err
    assert "3328 MiB" in err and "testdev" not in err


@pytest.mark.parametrize("mode", ["real", "long"])
def test_too_many_vcpus_says_the_limit_before_creating_them(make_lab, mode):
    lab = make_lab("tcg", vcpus=65, mode=mode)
    with pytest.raises(StageError) as caught:
        lab.bring_up()
    text = str(caught.value)
    assert "at most 64" in text and "-0x200" not in text and "does not fit" not in text
    assert lab.vcpus == []


# --- runs to refuse ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["", "; nothing but a comment\n", "bits 32\n"])
def test_empty_assembly_is_refused(source):
    lab = Lab(accel="tcg")
    with pytest.raises(AssemblyError, match="no bytes"):
        lab.load_assembly(source)
    lab.close()


def test_cli_refuses_an_empty_asm_and_an_empty_raw_file(tmp_path, capsys):
    for name in ("empty.asm", "empty.bin"):
        (tmp_path / name).write_text("")
        assert main(["run", str(tmp_path / name), "--accel", "tcg"]) == 2
        err = capsys.readouterr().err
        assert "nothing to run" in err and "Traceback" not in err


def elf32(entry: int, paddr: int = 0x100000, code: bytes = b"\xf4") -> bytes:
    """A minimal ELF32 executable for EM_386: one PT_LOAD of `code` at `paddr`."""
    header = struct.pack("<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, bytes(8), 2, 3, 1,
                         entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 84, paddr, paddr, len(code), len(code), 5, 0x1000)
    return header + phdr + code


def test_elf_whose_entry_is_outside_ram_is_refused(tmp_path, capsys):
    image = elf32(entry=0x40000000)
    lab = Lab(accel="tcg", mode="protected")
    lab.bring_up()
    with pytest.raises(LoadError, match="entry"):
        lab.load_elf(image)
    lab.close()
    path = tmp_path / "far.elf"
    path.write_bytes(image)
    assert main(["run", str(path), "--accel", "tcg"]) == 2
    assert "entry" in capsys.readouterr().err


def test_elf_whose_entry_is_in_ram_still_runs(tmp_path):
    lab = Lab(accel="tcg", mode="protected")
    lab.load_elf(elf32(entry=0x100000))
    lab.bring_up()
    assert lab.run(timeout=5).stop_reason.startswith("HLT")
    lab.close()


@pytest.mark.parametrize("image", [12345, None, 3.5])
def test_load_elf_of_something_that_is_no_image_is_refused(image):
    lab = Lab(accel="tcg")
    with pytest.raises(LoadError, match="bytes or a file path"):
        lab.load_elf(image)
    with pytest.raises(StageError):  # nothing was taken as the guest
        lab.run()
    lab.close()


def test_load_elf_before_bring_up_checks_the_image():
    lab = Lab(accel="tcg")
    with pytest.raises(LoadError, match="not an ELF"):
        lab.load_elf(b"\x00" * 64)
    lab.close()


# --- the command line says what the command line can do --------------------------------------
def test_cli_multiboot_without_kvm_says_what_the_cli_can_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLAB_KVM_DEVICE", str(tmp_path / "no-kvm"))
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf32(entry=0x100000))
    assert main(["run", "--multiboot", str(kernel)]) == 2
    err = capsys.readouterr().err
    assert "vlab.Lab" not in err and "--accel tcg" in err and "KVM" in err
