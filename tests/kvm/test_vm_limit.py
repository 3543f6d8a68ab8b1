"""$VLAB_MAX_VMS: the VMs a user's processes may hold at once (a student's kernels on a shared
host), refused before KVM_CREATE_VM with a hint. The count across one student's processes is
checked by tests/hub/test_jupyterhub.py, where each student is a uid of their own (here every
test runs as one user, whose VM count other tests change)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vlab.kvm import KvmError, VmLimitReached
from vlab.kvm.system import MAX_VMS_ENV, vm_fds

pytestmark = pytest.mark.kvm


def test_a_limit_reached_refuses_kvm_create_vm_with_a_hint(kvm, monkeypatch):
    monkeypatch.setenv(MAX_VMS_ENV, "0")
    with pytest.raises(VmLimitReached) as refused:
        kvm.create_vm()
    assert isinstance(refused.value, KvmError) and refused.value.ioctl == "CREATE_VM"
    assert refused.value.limit == 0 and refused.value.held >= 0
    assert "$VLAB_MAX_VMS=0" in str(refused.value) and "lab.close()" in str(refused.value)
    monkeypatch.delenv(MAX_VMS_ENV)
    vms = [kvm.create_vm() for _ in range(3)]   # no variable, no limit
    for vm in vms:
        vm.close()


def test_vm_fds_counts_another_processes_vms():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vlab.kvm import Kvm\n"
         "kvm = Kvm(); vms = [kvm.create_vm(), kvm.create_vm()]\n"
         "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert vm_fds(child.pid) == 2
    finally:
        child.stdin.close()
        child.wait(30)
    assert vm_fds(child.pid) == 0   # gone: its VMs with it
