"""vlab's compiled parts: the VM-exit fast path (vlab/kvm/_exitpath.c), the run loop with
the exit log's rows (vlab/machine/_runloop.c) and the tcg vCPU's IN and OUT hooks
(vlab/accel/tcg/_insnhooks.c).

Optional: without a C compiler and Python's headers the build goes on without them;
vlab.kvm then decodes every exit in Python and VcpuRunner runs its Python loop (`vlab doctor`
says which path and which loop are in use).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vlab.kvm._exitpath", ["vlab/kvm/_exitpath.c"], optional=True),
                   Extension("vlab.machine._runloop", ["vlab/machine/_runloop.c"], optional=True),
                   Extension("vlab.accel.tcg._insnhooks", ["vlab/accel/tcg/_insnhooks.c"],
                             optional=True)])
