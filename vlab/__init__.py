"""vlab: build a real KVM virtual machine step by step, the way QEMU does."""
__version__ = "0.1.0"


def __getattr__(name):
    # `vlab.Lab` without importing the whole lab (and its dependencies) for `vlab.kvm` users.
    if name in ("Lab", "StageError"):
        from . import lab
        return getattr(lab, name)
    raise AttributeError(f"module 'vlab' has no attribute {name!r}")
