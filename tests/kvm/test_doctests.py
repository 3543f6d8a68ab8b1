"""The examples in vlab.kvm's docstrings, run on real KVM: every public method of the
kernel-API layer shows its use, and the example is held true (as kvm-ioctls' are)."""
from __future__ import annotations

import doctest
import importlib

import pytest

import vlab.kvm
from vlab.kvm import abi

MODULES = ["fd", "system", "vm", "vcpu", "vcpu_state", "stats", "trace", "kernel_trace"]
# What an example may name without importing it: the package's API and the kernel's
# constants, as a reader of <linux/kvm.h> would.
NAMESPACE = {**{name: getattr(vlab.kvm, name) for name in vlab.kvm.__all__},
             **{name: value for name, value in vars(abi).items() if name.startswith("KVM_")}}


def examples() -> list:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [pytest.param(test, id=test.name.removeprefix("vlab.kvm."))
            for name in MODULES
            for test in finder.find(importlib.import_module(f"vlab.kvm.{name}"), globs=NAMESPACE)
            if test.examples]


@pytest.mark.kvm
@pytest.mark.parametrize("example", examples())
def test_docstring_example(example):
    if "KernelTrace()" in "".join(e.source for e in example.examples):
        usable, why = vlab.kvm.kernel_trace_usable()
        if not usable:
            pytest.skip(why)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    runner.run(example, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_public_kvm_method_has_an_example():
    """Each public method of the three fd classes has an example of its own, or is called in
    its module's example (the vCPU module's guest shows run() and the completions)."""
    missing = []
    for cls in (vlab.kvm.Kvm, vlab.kvm.VmFd, vlab.kvm.VcpuFd):
        for name in dir(cls):
            member = getattr(cls, name)
            if name.startswith("_") or not callable(member):
                continue
            module_doc = importlib.import_module(member.__module__).__doc__ or ""
            if ">>>" not in (member.__doc__ or "") and f".{name}(" not in module_doc:
                missing.append(f"{cls.__name__}.{name}")
    assert missing == []
