"""vlab: build a real KVM virtual machine step by step, the way QEMU does."""
__version__ = "0.1.0"
