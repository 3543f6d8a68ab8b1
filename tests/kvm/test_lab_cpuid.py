"""The CPU model on real KVM: host versus qemu64, a feature edit seen by KVM_GET_CPUID2 and by
the guest's own CPUID instruction, what clearing LM does to long mode, and the backend's
honest exceptions (on kvm_pvm leaves 1 and 7 come from the host, whatever the table says)."""
from __future__ import annotations

import pytest

from vlab.kvm import Hlt, Shutdown
from vlab.lab import CpuidFrozen, Lab, StageError
from vlab.lab.cpuid import FEATURES, QEMU64_FEATURES

pytestmark = pytest.mark.kvm

EXT = 0x80000001
MSR_EFER, EFER_LME = 0xC0000080, 1 << 8

# Real mode: CPUID leaf 0x80000001, EDX stored at 0x400.
CPUID_GUEST = """
    mov eax, 0x80000001
    cpuid
    mov [0x400], edx
    hlt
"""
# Protected mode, paging off: the guest sets EFER.LME itself, as a boot loader on its way to
# long mode does, then prints 'Y'.
SET_LME_GUEST = f"""
    mov ecx, {MSR_EFER:#x}
    rdmsr
    or eax, {EFER_LME:#x}
    wrmsr
    mov al, 'Y'
    out 0xe9, al
    hlt
"""


def realized(make_lab, **options) -> Lab:
    lab = make_lab(**options)
    lab.kvm_init()
    lab.x86_cpu_realizefn()
    return lab


def bit(value: int, feature: str) -> bool:
    return bool(value >> FEATURES[feature][3] & 1)


def vcpu_entry(lab: Lab, leaf: int, vcpu: int = 0):
    return next(e for e in lab.vcpus[vcpu].get_cpuid2() if e.function == leaf and e.index == 0)


# --- models -----------------------------------------------------------------------------------------
def test_host_model_is_kvm_get_supported_cpuid(make_lab):
    lab = realized(make_lab)
    assert lab.cpuid.model == "host" and lab.cpuid.diff_host() == []
    # KVM_GET_SUPPORTED_CPUID with the hypervisor bit (leaf 1 ECX bit 31) QEMU adds: KVM on
    # VMX and SVM leaves it out; kvm_pvm passes the host's, which has it
    supported = [e.replace(ecx=e.ecx | 1 << 31) if e.function == 1 else e
                 for e in lab.accel.kvm.get_supported_cpuid()]
    assert lab.cpuid.entries == supported
    assert lab.cpuid.has("lm") and lab.cpuid.has("fpu")


def test_qemu64_lacks_what_the_host_has_beyond_the_baseline(make_lab):
    host = realized(make_lab).cpuid
    lab = realized(make_lab, cpu="qemu64")
    beyond = {name for name in host.features() if name not in QEMU64_FEATURES}
    assert beyond, "KVM offers x2apic at least, which qemu64 lacks"
    if host.has("avx"):
        assert "avx" in beyond
    assert set(lab.cpuid.features()) == set(host.features()) - beyond
    assert lab.cpuid.has("lm") and lab.cpuid.has("sse2")
    removed = {f for change in lab.cpuid.diff_host() for f in change.features}
    assert removed == {f"-{name}" for name in beyond}
    assert "registers masked from the host's" in lab.records["x86_cpu_realizefn"].notes[0]


def test_qemu64_table_reaches_kvm_and_runs_the_long_mode_example(make_lab):
    lab = make_lab(cpu="qemu64", mode="long")
    lab.bring_up()
    # KVM keeps the table as given, but for leaves it updates itself: leaf 1 (OSXSAVE, APIC),
    # 0xd (XSAVE sizes) and, on kvm_pvm, the host's bits in leaves 1 and 7.
    runtime = (1, 7, 0xD)
    assert [e for e in lab.vcpus[0].get_cpuid2() if e.function not in runtime] == \
        [e for e in lab.cpuid.entries if e.function not in runtime]
    assert isinstance(lab.run().last_exit, Hlt) and lab.console == "Hello from long mode\n"


# --- an edit in leaf 0x80000001: KVM and the guest both see it -----------------------------------------
@pytest.mark.parametrize("feature", ["nx", "lm", "syscall"])
def test_cleared_feature_is_gone_from_kvm_get_cpuid2_and_from_the_guest(make_lab, feature):
    kept = realized(make_lab)
    edited = realized(make_lab)
    if not kept.cpuid.has(feature):
        pytest.skip(f"KVM here does not offer {feature}")
    edited.cpuid.set_feature(feature, False)
    for lab in (kept, edited):
        lab.load_assembly(CPUID_GUEST)
        lab.bring_up()
        lab.run()
    assert bit(vcpu_entry(kept, EXT).edx, feature) and not bit(vcpu_entry(edited, EXT).edx, feature)
    # The guest's CPUID instruction, on the Lab's own vCPU and in the probe VM.
    assert bit(int.from_bytes(kept.memory(0x400, 4), "little"), feature)
    assert not bit(int.from_bytes(edited.memory(0x400, 4), "little"), feature)
    assert bit(kept.guest_cpuid(EXT)["edx"], feature)
    assert not bit(edited.guest_cpuid(EXT)["edx"], feature)


def test_clearing_lm_refuses_a_long_mode_reset_with_the_reason(make_lab):
    lab = realized(make_lab, mode="long")
    lab.cpuid.set_feature("lm", False)
    for _ in range(3):
        lab.next_stage()
    with lab.tracer.recording() as calls:
        with pytest.raises(StageError) as info:
            lab.kvm_arch_put_registers()
    message = str(info.value)
    assert "no lm" in message and "cannot be reset into long mode" in message
    assert "KVM_SET_SREGS" in message and "WRMSR" in message and "mode='protected'" in message
    assert not [c for c in calls if c.name in ("SET_SREGS", "SET_REGS")]
    assert "kvm_arch_put_registers" not in lab.records
    assert lab.stages[5] == {"stage": "kvm_arch_put_registers", "title": "reset: initial registers",
                             "status": "next"}


def test_without_lm_the_guest_cannot_set_efer_lme(make_lab):
    """KVM checks the CPUID table when the guest writes EFER: #GP, and with no IDT a triple fault."""
    results = {}
    for lm in (True, False):
        lab = realized(make_lab, mode="protected")
        lab.cpuid.set_feature("lm", lm)
        lab.load_assembly(SET_LME_GUEST)
        lab.bring_up()
        results[lm] = (lab, lab.run())
    lab, result = results[True]
    assert isinstance(result.last_exit, Hlt) and lab.console == "Y"
    assert lab.vcpus[0].get_sregs().efer & EFER_LME
    lab, result = results[False]
    assert isinstance(result.last_exit, Shutdown) and lab.console == ""
    assert lab.vcpus[0].get_sregs().efer & EFER_LME == 0
    assert lab.vcpus[0].get_vcpu_events()["exception"]["nr"] == 13  # #GP
    if lab.backend.triple_fault_state == "kept":
        assert result.rip == 0x8000 + 5 + 2 + 5  # at the WRMSR
        assert result.stop_reason.startswith("SHUTDOWN: the guest's WRMSR at 0x800c sets EFER.LME")
        assert "no lm" in result.stop_reason and "#GP" in result.stop_reason
        assert result.stop_reason in "\n".join(lab.records["kvm_cpu_exec"].notes)
    else:  # SVM resets the vCPU at the shutdown: where it faulted is gone, and the text says so
        assert result.rip == 0xFFF0 and "read as at reset" in result.explanation


def test_other_shutdowns_keep_the_generic_reason(make_lab):
    lab = realized(make_lab, mode="protected")
    lab.cpuid.set_feature("lm", False)
    lab.load_assembly("ud2\n")
    lab.bring_up()
    result = lab.run()
    assert isinstance(result.last_exit, Shutdown)
    assert "EFER" not in result.stop_reason and result.stop_reason.startswith("SHUTDOWN")


# --- leaves 1 and 7: what the guest sees depends on the backend ----------------------------------------
# On VMX and SVM the guest's CPUID follows the table. On kvm_pvm (Backend.cpuid_follows_table
# False) it returns the host's bits for most of leaves 1 and 7; the bits KVM itself emulates
# (x2apic, hypervisor, ...) still follow the table.
@pytest.mark.parametrize("feature, ignored_on_pvm", [
    ("sse2", True), ("pae", True), ("x2apic", False), ("umip", True), ("clflushopt", True)])
def test_leaf_1_and_7_edits_are_shown_as_the_guest_sees_them(make_lab, feature, ignored_on_pvm):
    kept = realized(make_lab)
    edited = realized(make_lab)
    if not kept.cpuid.has(feature):
        pytest.skip(f"KVM here does not offer {feature}")
    edited.cpuid.set_feature(feature, False)
    leaf, _, register, _ = FEATURES[feature]
    assert leaf in (1, 7)
    for lab in (kept, edited):
        lab.kvm_init_vcpu()
        lab.kvm_arch_init_vcpu()
    seen = bit(edited.guest_cpuid(leaf)[register], feature)
    if not edited.backend.cpuid_follows_table and ignored_on_pvm:
        assert seen == bit(kept.guest_cpuid(leaf)[register], feature) == 1
    else:
        assert not seen and bit(kept.guest_cpuid(leaf)[register], feature)
    # KVM_GET_CPUID2 tells what the guest will see, on either kind of backend.
    assert bit(getattr(vcpu_entry(edited, leaf), register), feature) == seen
    notes = "\n".join(edited.records["x86_cpu_realizefn"].notes)
    assert ("leaves 1 and 7" in notes) == (not edited.backend.cpuid_follows_table)


# --- editing rules ------------------------------------------------------------------------------------
def test_editing_after_kvm_arch_init_vcpu_raises_cpuid_frozen(make_lab):
    lab = realized(make_lab)
    frozen = []
    lab.cpuid.subscribe(lambda model, **change: frozen.append(change))
    lab.kvm_init_vcpu()
    lab.kvm_arch_init_vcpu()
    assert frozen == [{"frozen": True}]
    before = list(lab.cpuid.entries)
    with pytest.raises(CpuidFrozen) as info:
        lab.cpuid.set_feature("lm", False)
    assert "KVM_SET_CPUID2" in str(info.value) and "kvm_arch_init_vcpu" in str(info.value)
    assert lab.cpuid.entries == before and lab.cpuid.has("lm")
    assert vcpu_entry(lab, EXT).edx == lab.cpuid.find(EXT).edx


def test_unknown_feature_raises_keyerror_with_suggestions(make_lab):
    lab = realized(make_lab)
    with pytest.raises(KeyError, match="unknown CPUID feature 'rdtcsp'.*did you mean.*rdtscp"):
        lab.cpuid.set_feature("rdtcsp", False)
    with pytest.raises(KeyError, match="unknown CPUID feature 'long_mode'"):
        lab.cpuid.set_feature("long_mode", False)
    assert lab.cpuid.diff_host() == []


def test_unknown_model_is_refused_at_x86_cpu_realizefn(make_lab):
    lab = make_lab(cpu="core2duo")
    lab.kvm_init()
    with pytest.raises(ValueError, match="unknown CPU model 'core2duo'"):
        lab.x86_cpu_realizefn()
    assert "x86_cpu_realizefn" not in lab.records
