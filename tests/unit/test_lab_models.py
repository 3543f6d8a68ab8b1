"""Layer-3 models without /dev/kvm: the CPUID table, the register model, stage records as
text and HTML, the stage graph, and the Lab's refusals before anything is brought up."""
from __future__ import annotations

import re

import pytest

from vlab.kvm.state import CpuidEntry, Regs, Segment, Sregs
from vlab.kvm.trace import IoctlRecord
from vlab.lab import (CPU_MODELS, STAGES, CpuidFrozen, CpuidTable, Lab, RegisterModel, StageError,
                      StageRecord)
from vlab.lab.cpuid import FEATURES, QEMU64_FEATURES
from vlab.lab.registers import cpu_mode, describe_segment
from vlab.lab.stages import STAGE_BY_NAME
from vlab.machine.snapshot import RegisterSnapshot

SIGNIFICANT_INDEX = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


def vendor_leaf(vendor: str) -> CpuidEntry:
    raw = vendor.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(0, eax=0xD, ebx=ebx, ecx=ecx, edx=edx)


# A small host table: leaf 1 with fpu, pae, sse2 | pni, avx, hypervisor; leaf 7.0 with avx2
# and 7.1 empty; 0x80000001 with syscall, nx, rdtscp, lm | lahf_lm.
HOST = [
    vendor_leaf("GenuineIntel"),
    CpuidEntry(1, eax=0x806F8, ecx=bits(0, 28, 31), edx=bits(0, 6, 26)),
    CpuidEntry(7, 0, SIGNIFICANT_INDEX, eax=1, ebx=bits(5)),
    CpuidEntry(7, 1, SIGNIFICANT_INDEX),
    CpuidEntry(0x80000000, eax=0x80000008),
    CpuidEntry(0x80000001, ecx=bits(0), edx=bits(11, 20, 27, 29)),
]


# --- CPUID table --------------------------------------------------------------------------------
def test_host_model_is_the_supported_table():
    table = CpuidTable.for_model("host", HOST)
    assert table.entries == HOST and table.diff_host() == []
    assert table.vendor == "GenuineIntel"
    assert set(table.features()) == {"fpu", "pae", "sse2", "pni", "avx", "hypervisor", "avx2",
                                     "syscall", "nx", "rdtscp", "lm", "lahf_lm"}
    assert table.features(0x80000001) == ["syscall", "nx", "rdtscp", "lm", "lahf_lm"]


def test_every_model_has_the_hypervisor_bit_kvm_leaves_out_as_qemu_adds_it():
    kvm_answer = [e.replace(ecx=e.ecx & ~bits(31)) if e.function == 1 else e for e in HOST]
    for model in CPU_MODELS:
        table = CpuidTable.for_model(model, kvm_answer)
        assert table.has("hypervisor") and table.find(1).ecx & bits(31)
        assert not any("+hypervisor" in c.features for c in table.diff_host())


def test_qemu64_masks_to_its_baseline_and_diff_host_names_what_went():
    table = CpuidTable.for_model("qemu64", HOST)
    assert set(table.features()) == {"fpu", "pae", "sse2", "pni", "hypervisor", "syscall", "nx",
                                     "lm", "lahf_lm"}
    assert set(table.features()) <= QEMU64_FEATURES
    changed = {(c.leaf, c.subleaf, c.register): c.features for c in table.diff_host()}
    assert changed == {(1, 0, "ecx"): ["-avx"], (7, 0, "ebx"): ["-avx2"],
                       (0x80000001, 0, "edx"): ["-rdtscp"]}
    assert "qemu64" in CPU_MODELS and "lm" in CPU_MODELS["qemu64"]
    assert table.host == HOST  # the supported table is kept for the diff


def test_unknown_model_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown CPU model 'pentium'.*host, max, qemu64"):
        CpuidTable.for_model("pentium", HOST)


def test_set_feature_clears_and_sets_one_bit_and_notifies():
    table = CpuidTable.for_model("host", HOST)
    seen = []
    table.subscribe(lambda model, **change: seen.append((model, change)))
    table.set_feature("lm", False)
    entry = table.find(0x80000001)
    assert entry.edx == bits(11, 20, 27) and entry.ecx == bits(0)
    assert not table.has("lm") and table.has("nx")
    assert seen == [(table, {"feature": "lm", "enabled": False})]
    [change] = table.diff_host()
    assert (change.leaf, change.register, change.features) == (0x80000001, "edx", ["-lm"])
    table.set_feature("lm", True)
    assert table.diff_host() == [] and table.find(0x80000001).edx == HOST[-1].edx
    assert HOST[-1].edx == bits(11, 20, 27, 29)  # the host table itself is never edited


def test_set_feature_can_add_a_feature_the_host_lacks():
    table = CpuidTable.for_model("host", HOST)
    table.set_feature("x2apic", True)
    assert table.has("x2apic")
    assert [c.features for c in table.diff_host()] == [["+x2apic"]]


def test_feature_in_a_leaf_the_table_lacks_is_refused():
    table = CpuidTable.for_model("host", [e for e in HOST if e.function != 7])
    with pytest.raises(KeyError, match="no leaf 0x7 for feature 'avx2'"):
        table.set_feature("avx2", True)


@pytest.mark.parametrize("typo, suggestion", [("avx51", "avx512f"), ("LM", "lm"),
                                              ("rdtcsp", "rdtscp"), ("sse42", "sse4_2")])
def test_unknown_feature_raises_keyerror_with_suggestions(typo, suggestion):
    table = CpuidTable.for_model("host", HOST)
    for call in (lambda: table.set_feature(typo, False), lambda: table.has(typo)):
        with pytest.raises(KeyError) as info:
            call()
        message = str(info.value)
        assert f"unknown CPUID feature {typo!r}" in message and suggestion in message


def test_frozen_table_refuses_edits_and_says_why():
    table = CpuidTable.for_model("host", HOST)
    table.frozen = True
    with pytest.raises(CpuidFrozen) as info:
        table.set_feature("lm", False)
    message = str(info.value)
    assert "KVM_SET_CPUID2" in message and "kvm_arch_init_vcpu" in message
    assert "before" in message
    assert table.has("lm")


def test_find_honours_significant_index():
    table = CpuidTable.for_model("host", HOST)
    assert table.find(7, 0).ebx == bits(5) and table.find(7, 1).ebx == 0
    assert table.find(7, 2) is None            # subleaves matter for leaf 7
    assert table.find(1, 5) is table.find(1)   # leaf 1 ignores ECX
    assert table.find(0x40000000) is None


def test_rows_and_text_name_the_features_per_leaf():
    table = CpuidTable.for_model("host", HOST)
    rows = {(r["leaf"], r["subleaf"]): r for r in table.rows()}
    assert rows[(0x80000001, 0)]["features"] == "syscall nx rdtscp lm lahf_lm"
    assert rows[(7, 1)]["features"] == ""
    text = str(table)
    assert text.startswith("CPUID model host: 6 entries, vendor GenuineIntel")
    assert re.search(r"0x80000001\.0 .*edx=28100800  syscall nx rdtscp lm lahf_lm", text)


def test_feature_names_are_unique_and_cover_the_three_leaves():
    leaves = {leaf for leaf, _, _, _ in FEATURES.values()}
    assert leaves == {1, 7, 0x80000001}
    assert FEATURES["lm"] == (0x80000001, 0, "edx", 29)
    assert FEATURES["avx"] == (1, 0, "ecx", 28)
    assert FEATURES["avx2"] == (7, 0, "ebx", 5)


# --- register model -------------------------------------------------------------------------------
REAL = RegisterSnapshot(Regs(rip=0x8000, rsp=0x8000), Sregs(cr0=0x30))
CODE64 = Segment(selector=0x18, type=11, l=1, g=1, limit=0xFFFFFFFF)
LONG = RegisterSnapshot(
    Regs(rax=42, rip=0x8010, rsp=0x8000, rflags=0x246),
    Sregs(cs=CODE64, cr0=0x80000033, cr3=0x1000, cr4=0x20, efer=0x500))


def test_register_model_diff_and_notify():
    model = RegisterModel(1)
    assert str(model) == "vCPU 1: no registers read yet" and model.rows() == []
    seen = []
    model.subscribe(lambda m, **change: seen.append(change["changed"]))
    model.update(REAL)
    assert model.changed == {} and seen == [{}]
    model.update(LONG)
    assert model.previous is REAL and model.current is LONG
    assert model.changed["rax"] == (0, 42) and model.changed["rip"] == (0x8000, 0x8010)
    assert model.changed["efer"] == (0, 0x500) and model.changed["cs"] == (0, 0x18)
    assert "rsp" not in model.changed
    assert seen[-1] is model.changed
    rows = {name: (value, changed) for name, value, changed in model.rows()}
    assert rows["rax"] == (42, True) and rows["rsp"] == (0x8000, False)
    assert rows["cr3"] == (0x1000, True)


def test_register_model_decodes_flags_and_control_bits():
    model = RegisterModel()
    model.update(LONG)
    decoded = model.decoded()
    assert decoded["rflags"] == ["PF", "ZF", "IF"]   # 0x246 without the reserved bit 1
    assert decoded["cr0"] == ["PE", "MP", "ET", "NE", "PG"]
    assert decoded["cr4"] == ["PAE"] and decoded["efer"] == ["LME", "LMA"]
    text = str(model)
    assert text.startswith("vCPU 0 in long (64-bit) mode")
    assert "rflags=00000246 [PF ZF IF]" in text and "efer=0x500 [LME LMA]" in text
    assert "cs: sel=0x0018 base=0x0 limit=0xffffffff code XR, accessed, 64-bit" in text


def test_register_model_marks_changed_registers_in_text():
    model = RegisterModel()
    model.update(REAL)
    model.update(RegisterSnapshot(REAL.regs.replace(rax=7, rip=0x8003), REAL.sregs))
    text = str(model)
    assert "rax=0000000000000007*" in text and "rbx=0000000000000000 " in text
    assert "rip=0000000000008003*" in text
    assert text.endswith("changed: rax 0x0->0x7, rip 0x8000->0x8003")


@pytest.mark.parametrize("sregs, mode", [
    (Sregs(cr0=0x30), "real"),
    (Sregs(cr0=0x31), "protected"),
    (Sregs(cr0=0x80000031), "protected, paged"),
    (Sregs(cr0=0x80000031, efer=0x500, cs=CODE64), "long (64-bit)"),
    (Sregs(cr0=0x80000031, efer=0x500), "long (compatibility)"),
])
def test_cpu_mode_from_control_registers(sregs, mode):
    assert cpu_mode(RegisterSnapshot(Regs(), sregs)) == mode


def test_describe_segment_decodes_attributes():
    data32 = Segment(selector=0x10, type=3, db=1, g=1, limit=0xFFFFFFFF)
    assert describe_segment(data32) == ("sel=0x0010 base=0x0 limit=0xffffffff data RW, accessed, "
                                        "32-bit, DPL0, present, 4K-granular")
    tss = Segment(selector=0x20, type=11, s=0, limit=0x67, base=0x600)
    assert describe_segment(tss).endswith("32/64-bit TSS (busy), DPL0, present")
    assert describe_segment(Segment(unusable=1, present=0)).endswith("not present, unusable")


# --- stage records --------------------------------------------------------------------------------
def ioctl(kind, name, args="", result=0, errno=None, vcpu=None):
    return IoctlRecord(kind, 3, name, 0, args, result, errno, 12.5e-6, vcpu)


def test_record_text_names_qemu_kernel_qom_ioctls_and_changes():
    record = StageRecord(STAGE_BY_NAME["kvm_init"], "kvm",
                         ioctls=[ioctl("system", "GET_API_VERSION", result=12),
                                 ioctl("system", "CREATE_VM", "type=0", result=4)],
                         actions=["open('/dev/kvm', O_RDWR|O_CLOEXEC) = fd 3"],
                         before={"accelerator": None}, after={"accelerator": "kvm", "VM fd": 4},
                         notes=["backend: kvm_pvm"])
    text = str(record)
    lines = text.splitlines()
    assert lines[0] == "== kvm_init (accelerator init) on kvm =="
    assert lines[1] == "QEMU: kvm_init in accel/kvm/kvm-all.c; QEMU 5.0: same (accel/kvm/kvm-all.c)"
    assert lines[2].startswith("kernel: kvm_dev_ioctl -> kvm_dev_ioctl_create_vm")
    assert "QOM on the way:" in lines and any("kvm-accel" in line for line in lines)
    assert "ioctls (2):" in lines
    assert re.search(r"system KVM_GET_API_VERSION\(\) = 12 +\[12\.5 us\]", text)
    assert "other system calls:" in lines
    assert "  accelerator: None -> 'kvm'" in lines and "  VM fd: None -> 4" in lines
    assert lines[-1] == "note: backend: kvm_pvm"
    assert record.ioctl_names() == ["KVM_GET_API_VERSION", "KVM_CREATE_VM"]
    assert record.name == "kvm_init"


def test_record_changes_list_only_what_differs():
    record = StageRecord(STAGES[0], "kvm", before={"a": 1, "b": 2}, after={"a": 1, "b": 3, "c": 4})
    assert record.changes() == {"b": (2, 3), "c": (None, 4)}


def test_record_rows_use_qemu_trace_events_and_show_errno():
    record = StageRecord(STAGE_BY_NAME["kvm_arch_put_registers"], "kvm",
                         ioctls=[ioctl("vcpu", "SET_SREGS", "efer=0x500", errno=22, result=None, vcpu=1),
                                 ioctl("vm", "SET_TSS_ADDR", "0xfeffd000"),
                                 ioctl("system", "GET_API_VERSION", result=12)])
    rows = record.rows()
    assert [(r["event"], r["fd"], r["ioctl"], r["result"]) for r in rows] == [
        ("kvm_vcpu_ioctl", "vcpu1", "KVM_SET_SREGS", "errno 22"),
        ("kvm_vm_ioctl", "vm", "KVM_SET_TSS_ADDR", 0),
        ("kvm_ioctl", "system", "KVM_GET_API_VERSION", 12)]
    assert rows[0]["us"] == 12.5
    assert "vcpu1 KVM_SET_SREGS(efer=0x500) -> EINVAL" in str(record)


def test_record_html_escapes_and_carries_the_same_facts():
    record = StageRecord(STAGE_BY_NAME["x86_cpu_realizefn"], "kvm",
                         ioctls=[ioctl("system", "GET_SUPPORTED_CPUID", "nent=256")],
                         before={}, after={"CPUID entries": 75},
                         notes=["a <b>bold</b> & plain note"])
    page = record._repr_html_()
    assert page.startswith("<div class='vlab-stage'>") and page.endswith("</div>")
    for fact in ("x86_cpu_realizefn", "target/i386/cpu.c", "kvm_dev_ioctl_get_cpuid",
                 "KVM_GET_SUPPORTED_CPUID", "kvm_ioctl", "nent=256", "CPUID entries",
                 "QOM on the way", "x86_cpu_common_class_init"):
        assert fact in page, fact
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; plain note" in page and "<b>bold</b>" not in page
    assert "<table>" in page and page.count("<tr>") == 2


def test_record_on_tcg_says_what_replaced_the_ioctls():
    record = StageRecord(STAGE_BY_NAME["kvm_init"], "tcg", actions=["uc_open(UC_ARCH_X86, UC_MODE_64)"])
    assert "in place of ioctls (software accelerator):" in str(record)
    assert "in place of ioctls (software accelerator)" in record._repr_html_()
    assert "\nioctls (" not in str(record) and "<table>" not in record._repr_html_()


# --- the stage graph ------------------------------------------------------------------------------
QEMU_ORDER = ["kvm_init", "x86_cpu_realizefn", "kvm_init_vcpu", "kvm_arch_init_vcpu",
              "pc_memory_init", "kvm_arch_put_registers", "kvm_cpu_exec"]


def test_stages_in_qemu_order_each_need_provided_earlier():
    assert [s.name for s in STAGES] == QEMU_ORDER
    provided: set[str] = set()
    for stage in STAGES:
        assert set(stage.needs) <= provided, stage.name
        assert stage.provides and not set(stage.provides) & provided, stage.name
        provided |= set(stage.provides)
    assert STAGES.index(STAGE_BY_NAME["kvm_init_vcpu"]) < STAGES.index(STAGE_BY_NAME["pc_memory_init"])


def test_every_stage_names_its_qemu_file_kernel_handler_and_summary():
    for stage in STAGES:
        assert re.fullmatch(r"(accel|target|hw)/[\w/.-]+\.c.*", stage.qemu_file), stage.name
        assert stage.qemu50 and stage.summary and stage.title
        assert re.search(r"\.c\)?$|kvm_\w+", stage.kernel), stage.name
    assert STAGE_BY_NAME["kvm_init"].qom and STAGE_BY_NAME["x86_cpu_realizefn"].qom


def test_a_new_lab_opens_nothing_and_lists_every_stage_waiting():
    lab = Lab(accel="kvm")
    assert lab.accel is None and lab.vm is None and lab.records == {}
    assert [(row["stage"], row["status"]) for row in lab.stages] == \
        [("kvm_init", "next")] + [(name, "waiting") for name in QEMU_ORDER[1:]]
    text = str(lab)
    assert "[>] kvm_init" in text and "[ ] kvm_cpu_exec" in text
    assert lab.console == ""


@pytest.mark.parametrize("stage, needs", [
    ("x86_cpu_realizefn", "kvm (from kvm_init)"),
    ("kvm_init_vcpu", "vm (from kvm_init), cpu_model (from x86_cpu_realizefn)"),
    ("kvm_arch_init_vcpu", "vcpus (from kvm_init_vcpu), cpu_model (from x86_cpu_realizefn)"),
    ("pc_memory_init", "vm (from kvm_init), vcpus (from kvm_init_vcpu)"),
    ("kvm_arch_put_registers", "vcpus (from kvm_init_vcpu), cpuid_set (from kvm_arch_init_vcpu), "
                               "memory (from pc_memory_init), guest (from pc_memory_init)"),
    ("kvm_cpu_exec", "registers (from kvm_arch_put_registers)"),
])
def test_stage_out_of_order_names_the_first_stage_to_run(stage, needs):
    """The advice names the earliest stage missing, not one that would itself refuse."""
    lab = Lab(accel="kvm")
    with pytest.raises(StageError) as info:
        getattr(lab, stage)()
    assert str(info.value) == f"{stage} needs {needs}: call lab.kvm_init() first (or lab.next_stage())"
    assert lab.records == {} and lab.accel is None


@pytest.mark.parametrize("action", [
    lambda lab: lab.run(), lambda lab: lab.step(), lambda lab: lab.snapshot(),
    lambda lab: lab.break_at(0x8000), lambda lab: lab.kvm_cpu_exec(),
])
def test_running_before_reset_is_refused(action):
    lab = Lab(accel="kvm")
    with pytest.raises(StageError) as info:
        action(lab)
    assert "kvm_init" in str(info.value) or "kvm_arch_put_registers" in str(info.value)
    assert lab.accel is None


def test_step_before_reset_lists_the_missing_stages():
    with pytest.raises(StageError, match="the guest cannot run yet: do kvm_init, x86_cpu_realizefn, "
                                         "kvm_init_vcpu, kvm_arch_init_vcpu, pc_memory_init, "
                                         "kvm_arch_put_registers first"):
        Lab(accel="kvm").step()


def test_step_back_with_nothing_to_undo_and_guest_cpuid_without_a_model():
    lab = Lab(accel="kvm")
    with pytest.raises(StageError, match="nothing to step back"):
        lab.step_back()
    with pytest.raises(StageError, match="x86_cpu_realizefn"):
        lab.guest_cpuid(1)


def test_lab_arguments_are_checked_up_front():
    with pytest.raises(ValueError, match="at least one vCPU"):
        Lab(vcpus=0)
    with pytest.raises(ValueError):
        Lab(mode="virtual-8086")
    with pytest.raises(ValueError, match="memory size"):
        Lab(memory="lots")
    assert Lab(memory="1G").memory_size == 1 << 30


def test_observable_unsubscribe_stops_notifications():
    model = RegisterModel()
    seen = []
    unsubscribe = model.subscribe(lambda m, **change: seen.append(change))
    model.update(REAL)
    unsubscribe()
    unsubscribe()  # twice is harmless
    model.update(LONG)
    assert len(seen) == 1
