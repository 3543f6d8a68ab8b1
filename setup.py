"""The one compiled part of vlab: the VM-exit fast path (vlab/kvm/_exitpath.c).

Optional: without a C compiler and Python's headers the build goes on without it and
vlab.kvm decodes every exit in Python (`vlab doctor` says which path is in use).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vlab.kvm._exitpath", ["vlab/kvm/_exitpath.c"], optional=True)])
