"""Fused Triton kernels of cure_fast, installed as ``cure_fast.kernels``.

Each op family lives in its own module (kernel -> launcher -> autograd.Function -> public function)
and registers itself with :mod:`cure_fast.functional` as the ``triton`` backend.
"""
