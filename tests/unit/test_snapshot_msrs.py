"""MSRs in a snapshot, against a vCPU with KVM_GET_MSRS/KVM_SET_MSRS's semantics: both stop
at the first MSR KVM refuses and say how many they did."""
from __future__ import annotations

import pytest

from vlab.kvm.state import Regs, Sregs
from vlab.machine.snapshot import VcpuState, read_msrs, write_msrs


class MsrVcpu:
    """MSRs by index; `unreadable` and `unwritable` are refused as KVM refuses them."""

    def __init__(self, values, unreadable=(), unwritable=()):
        self.values, self.unreadable, self.unwritable = dict(values), set(unreadable), set(unwritable)
        self.calls = 0

    def get_msrs(self, indices):
        self.calls += 1
        out = {}
        for index in indices:
            if index in self.unreadable:
                break
            out[index] = self.values[index]
        return out

    def set_msrs(self, values):
        self.calls += 1
        for done, (index, value) in enumerate(values.items()):
            if index in self.unwritable:
                return done
            self.values[index] = value
        return len(values)

    def get_regs(self):
        return Regs()

    def set_regs(self, regs):
        pass

    def get_sregs(self):
        return Sregs()

    def set_sregs(self, sregs):
        pass


def test_read_skips_each_msr_kvm_refuses_and_reads_on():
    vcpu = MsrVcpu({1: 10, 2: 20, 3: 30, 4: 40, 5: 50}, unreadable={2, 5})
    assert read_msrs(vcpu, [1, 2, 3, 4, 5]) == {1: 10, 3: 30, 4: 40}
    assert vcpu.calls == 2  # one KVM_GET_MSRS per refusal, the last one ends the list
    assert read_msrs(vcpu, []) == {}


def test_write_goes_on_past_a_refused_msr_and_names_it():
    vcpu = MsrVcpu({1: 0, 2: 0, 3: 0}, unwritable={2})
    assert write_msrs(vcpu, {1: 11, 2: 22, 3: 33}) == [2]
    assert vcpu.values == {1: 11, 2: 0, 3: 33}


def test_restore_accepts_a_refused_msr_that_kept_its_value():
    vcpu = MsrVcpu({1: 1, 2: 0, 3: 3}, unwritable={2})
    state = VcpuState.capture(vcpu, [1, 2, 3])
    vcpu.values.update({1: 100, 3: 300})
    state.restore(vcpu)
    assert vcpu.values == {1: 1, 2: 0, 3: 3}


def test_restore_names_a_refused_msr_that_changed():
    vcpu = MsrVcpu({1: 1, 2: 0, 3: 3}, unwritable={2})
    state = VcpuState.capture(vcpu, [1, 2, 3])
    vcpu.values.update({2: 5, 3: 300})
    with pytest.raises(ValueError, match="MSRs that have changed since: 0x2=0x0"):
        state.restore(vcpu)
    assert vcpu.values[3] == 3  # the others are restored first
