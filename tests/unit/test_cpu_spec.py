"""QEMU's -cpu MODEL[,+feat][,-feat][,feat=on|off], as `vlab run --cpu` takes it."""
import pytest

from vlab.kvm.state import CpuidEntry
from vlab.lab.cpuid import CpuidTable, parse_cpu_spec

# leaf 1: sse2, avx; 0x80000001: syscall, nx, rdtscp, lm
HOST = [CpuidEntry(0, eax=0xD), CpuidEntry(1, ecx=1 << 28, edx=1 << 26),
        CpuidEntry(0x80000001, edx=(1 << 11) | (1 << 20) | (1 << 27) | (1 << 29))]


def test_spec_is_the_model_then_edits_in_order():
    assert parse_cpu_spec("qemu64, +rdtscp,-lm,avx=on,nx=off") == (
        "qemu64", [("rdtscp", True), ("lm", False), ("avx", True), ("nx", False)])
    assert parse_cpu_spec("max") == ("max", [])


@pytest.mark.parametrize("spec, message", [
    ("pentium", r"unknown CPU model 'pentium'; choose one of host, max, qemu64"),
    ("host,+nosuch", r"unknown CPUID feature 'nosuch'"),
    ("host,rdtscp", r"CPU feature edit 'rdtscp': write \+feat, -feat or feat=on\|off"),
    ("host,lm=yes", r"CPU feature edit 'lm=yes'"),
])
def test_bad_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_cpu_spec(spec)


def test_models_and_edits_build_the_table():
    assert CpuidTable.from_spec("host", HOST).has("rdtscp")
    assert CpuidTable.from_spec("max", HOST).has("avx")
    qemu64 = CpuidTable.from_spec("qemu64", HOST)
    assert not qemu64.has("rdtscp") and not qemu64.has("avx") and qemu64.has("lm")
    edited = CpuidTable.from_spec("qemu64,+rdtscp,-lm", HOST)
    assert edited.has("rdtscp") and not edited.has("lm") and edited.model == "qemu64,+rdtscp,-lm"
    assert not CpuidTable.from_spec("host,avx=off", HOST).has("avx")


def test_a_feature_the_host_lacks_cannot_be_turned_on():
    with pytest.raises(ValueError, match="this host's KVM does not support pni"):
        CpuidTable.from_spec("qemu64,+pni", HOST)
