"""Kernels of specexec-rt, installed as ``specexec_rt.kernels``: one package per op, each holding
its kernel(s), its native CPU entry (with the ctypes signature beside it), its PyTorch reference
(``reference``) and its plan object where it has one.

| package | op |
| --- | --- |
| ``attention`` | tree-masked attention: Triton kernel (``triton_kernels``), planned launch ``TreeAttentionLaunch`` (``launch``), native CPU call with RoPE and the cache write (``cpu``), references |
| ``int4`` | 4-bit weight-only matmul: format ``Int4Weight`` (``weight``), Triton kernels and dispatch ``int4_matmul`` (``triton_kernels``, ``gemm``), launch plans ``Int4Plan`` and their tuner (``plans``, ``tuning``), native CPU path ``int4_matmul_cpu`` (``cpu``), references |
| ``q8`` | 8-bit (GGUF Q8_0) LM heads: ``Q8Weight`` (``weight``), ``q8_linear`` (``cpu``), references |
| ``dense`` | float32 weights times a few rows, layer ops fused (native CPU), reference |
| ``argmax`` | ``argmax_rows``: greedy decoding's row-wise argmax (native CPU scan), reference |
| ``layers`` | ``NativeLayers``: every transformer layer of a CPU float32 pass in one native call |

Shared by the ops: ``device_info`` (SM count, Triton's interpreter switch), ``linear_checks``
(the input checks of the fused native linears) and ``cpu_native``
(builds on first use and loads the native CPU library ``csrc/specexec_cpu.c``; each op declares
its functions with ``cpu_native.declare``).

Micro-benchmarking needs only the names below, e.g.::

    from specexec_rt.kernels import tree_attention, pack_tree_mask, TreeAttentionLaunch
    from specexec_rt.kernels import int4_matmul, quantize_int4, Int4Weight, Int4Plan, run_plan

and each op's kernel beside its reference, e.g.
``from specexec_rt.kernels.argmax import argmax_rows, argmax_rows_reference``.
"""
if __name__ == "kernels":
    # This directory is imported by its bare name only when a checkout's root is on sys.path
    # (``python -m pytest`` or ``python -c`` run from the repository root). ``kernels`` is also the
    # name of Hugging Face's kernel-hub package, which transformers imports when it is installed:
    # hand the name on to that package, or, where there is none, stay an empty module (no ops, no
    # version), which transformers' probe reads as "not installed". The ops themselves are only
    # ever loaded as ``specexec_rt.kernels``.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this file ran
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
else:
    # Every op package is imported here, so each has declared its native functions before the
    # library is first loaded.
    from . import argmax, attention, dense, int4, layers, q8  # noqa: F401
    from .attention import (TreeAttentionLaunch, pack_tree_mask, prefix_attention_sdpa, tree_attention,
                            tree_attention_packed, tree_attention_reference)
    from .int4 import (Int4Plan, Int4Weight, candidate_plans, default_plan, int4_matmul, int4_matmul_cpu,
                       int4_matmul_reference, plan_for, quantize_int4, run_plan)
    from .q8 import Q8Weight, q8_linear, q8_linear_reference, quantize_q8_0

    __all__ = [
        "tree_attention", "tree_attention_packed", "tree_attention_reference", "TreeAttentionLaunch",
        "pack_tree_mask", "prefix_attention_sdpa",
        "int4_matmul", "int4_matmul_reference", "int4_matmul_cpu", "run_plan", "quantize_int4", "Int4Weight",
        "Int4Plan", "default_plan", "candidate_plans", "plan_for",
        "Q8Weight", "q8_linear", "q8_linear_reference", "quantize_q8_0",
    ]
