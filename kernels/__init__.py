"""Triton kernels of specexec-rt, installed as ``specexec_rt.kernels``.

Each module holds a kernel, its launcher and a plain PyTorch reference.
"""
