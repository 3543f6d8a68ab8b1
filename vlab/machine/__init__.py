"""The board: guest memory, loaders for guest code, CPU mode setup and the run loop.

Everything here is pure userspace bookkeeping, testable without `/dev/kvm`; the
accelerator (`vlab.accel`) is what hands these pieces to the kernel.
"""
