"""A Lab's life: used before bring-up or after close() it says so; dropped without close()
it frees its fds and guest RAM at once, without waiting for the cyclic garbage collector."""
from __future__ import annotations

import shutil

import pytest

from vlab import Lab, StageError

ACCELS = [pytest.param("kvm", marks=pytest.mark.kvm), "tcg"]

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")


@pytest.fixture(params=ACCELS)
def accel(request):
    return request.param


@pytest.mark.kvm
def test_dropped_labs_give_back_their_fds_without_the_cyclic_gc(isolated):
    done = isolated("""
        import gc, os, vlab
        def fds():
            return len(os.listdir("/proc/self/fd"))
        lab = vlab.Lab(accel="kvm"); lab.bring_up(); lab.run(); lab.close()   # imports, caches
        gc.collect()
        gc.disable()
        baseline = fds()
        for i in range(200):
            lab = vlab.Lab(accel="kvm", vcpus=1 + i % 2)
            lab.bring_up()
            if i % 3 == 0:
                lab.run()
            del lab
        print(fds() - baseline)
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 0


@pytest.mark.kvm
def test_dropped_vms_give_back_their_fds_without_the_cyclic_gc(isolated):
    """vlab.kvm's own objects: a VM and its vCPUs dropped without close()."""
    done = isolated("""
        import gc, os
        from vlab.kvm import Kvm
        def fds():
            return len(os.listdir("/proc/self/fd"))
        Kvm().create_vm().create_vcpu(0).get_regs()
        gc.collect()
        gc.disable()
        baseline = fds()
        for i in range(100):
            vm = Kvm().create_vm()
            vcpus = [vm.create_vcpu(n) for n in range(2)]
            del vm, vcpus
        vcpu = Kvm().create_vm().create_vcpu(0)   # the vCPU outlives its VM object
        vcpu.get_regs()
        del vcpu
        print(fds() - baseline)
    """, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 0


def test_dropped_tcg_labs_give_back_their_guest_ram_without_the_cyclic_gc(isolated):
    done = isolated("""
        import gc, vlab
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        lab = vlab.Lab(accel="tcg", memory="64M"); lab.bring_up(); lab.run(); lab.close()
        gc.collect()
        gc.disable()
        baseline = rss()
        for i in range(40):
            lab = vlab.Lab(accel="tcg", memory="64M")
            lab.bring_up()
            lab.machine.memory.write(0x100000, b"x" * (32 << 20))   # make the RAM resident
            del lab
        print((rss() - baseline) >> 20)
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 3 * 64   # 40 leaked Labs would hold 40 x 32 MiB


@pytest.mark.parametrize("call, message", [
    (lambda lab: lab.run(), r"kvm_cpu_exec needs registers .*call lab\.kvm_init\(\) first"),
    (lambda lab: lab.step(), r"cannot run yet"),
    (lambda lab: lab.snapshot(), r"cannot run yet"),
    (lambda lab: lab.restore(None), r"cannot run yet"),
    (lambda lab: lab.break_at(0x8000), r"cannot run yet"),
    (lambda lab: lab.exits(), r"no vCPU yet: kvm_init_vcpu"),
    (lambda lab: lab.memory(0, 4), r"no guest memory yet: pc_memory_init"),
    (lambda lab: lab.step_back(), r"nothing to step back"),
])
def test_a_lab_used_before_bring_up_says_what_to_do_first(call, message):
    with Lab(accel="tcg") as lab:
        with pytest.raises(StageError, match=message):
            call(lab)


@pytest.mark.parametrize("call", [
    lambda lab: lab.run(), lambda lab: lab.step(), lambda lab: lab.snapshot(),
    lambda lab: lab.step_back(), lambda lab: lab.memory(0, 4), lambda lab: lab.restore(None),
    lambda lab: lab.break_at(0x8000), lambda lab: lab.load_assembly("hlt"),
    lambda lab: lab.next_stage(), lambda lab: lab.kvm_cpu_exec(), lambda lab: lab.bring_up(),
    lambda lab: lab.guest_cpuid(0),
])
def test_a_closed_lab_says_it_is_closed(accel, call):
    lab = Lab(accel=accel)
    lab.bring_up()
    lab.close()
    with pytest.raises(StageError, match=r"this Lab is closed"):
        call(lab)
    lab.stop()    # nothing runs: nothing to stop
    lab.close()   # again: nothing left to do
    assert lab.exits().total == 0   # what it did stays readable


def test_next_stage_of_a_lab_closed_half_way_says_it_is_closed(accel):
    lab = Lab(accel=accel)
    lab.kvm_init()
    lab.close()
    with pytest.raises(StageError, match=r"this Lab is closed"):
        lab.next_stage()
    assert "this Lab is closed" in repr(lab)
