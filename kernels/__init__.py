"""Kernels of specexec-rt, installed as ``specexec_rt.kernels``.

Each module holds a kernel, its launcher and the plain PyTorch reference the tests compare it
with:

| module | what |
| --- | --- |
| ``attention`` | tree-masked attention (Triton): ``tree_attention``, the planned ``TreeAttentionLaunch``, ``tree_attention_reference``, flash-SDPA decode path |
| ``int4_weight`` | the 4-bit format ``Int4Weight``, ``quantize_int4``, ``int4_matmul_reference`` |
| ``int4_gemm`` | ``int4_matmul`` (Triton GEMV / tensor-core / dequantise + cuBLAS), ``run_plan`` |
| ``int4_plans`` | ``Int4Plan`` launch plans and the table of measured plans |
| ``int4_tuning`` | ``tune_shape``: measures the candidate plans on this GPU |
| ``int4_cpu`` | ``int4_matmul_cpu``: the CPU path (native kernel, aten fallback); ``int4_matmul_q8_reference`` |
| ``q8_weight`` | the 8-bit (GGUF Q8_0) format ``Q8Weight`` for LM heads, ``q8_linear`` (native CPU kernel), its references |
| ``argmax_cpu`` | ``argmax_rows``: greedy decoding's row-wise argmax (native CPU scan), its reference |
| ``cpu_native`` | builds (on first use) and loads the native CPU library ``csrc/int4_cpu.c`` (+ ``q8_cpu.h``) |
| ``triton_env`` | where the Triton launchers run: ``sm_count``, ``interpreting`` |

Micro-benchmarking needs only the names below, e.g.::

    from specexec_rt.kernels import tree_attention, pack_tree_mask, TreeAttentionLaunch
    from specexec_rt.kernels import int4_matmul, quantize_int4, Int4Weight, Int4Plan, run_plan
"""
from .attention import (TreeAttentionLaunch, pack_tree_mask, prefix_attention_sdpa, tree_attention,
                        tree_attention_packed, tree_attention_reference)
from .int4_cpu import int4_matmul_cpu
from .int4_gemm import int4_matmul, run_plan
from .int4_plans import Int4Plan, candidate_plans, default_plan, plan_for
from .int4_weight import Int4Weight, int4_matmul_reference, quantize_int4
from .q8_weight import Q8Weight, q8_linear, q8_linear_reference, quantize_q8_0

__all__ = [
    "tree_attention", "tree_attention_packed", "tree_attention_reference", "TreeAttentionLaunch",
    "pack_tree_mask", "prefix_attention_sdpa",
    "int4_matmul", "int4_matmul_reference", "int4_matmul_cpu", "run_plan", "quantize_int4", "Int4Weight",
    "Int4Plan", "default_plan", "candidate_plans", "plan_for",
    "Q8Weight", "q8_linear", "q8_linear_reference", "quantize_q8_0",
]
