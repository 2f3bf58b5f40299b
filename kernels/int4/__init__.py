"""4-bit weight-only matmul: the format (``weight``), the Triton kernels (``triton_kernels``) and
their launch and dispatch (``gemm``) with launch plans (``plans``) and their tuner (``tuning``),
the native CPU entry (``cpu``), and the PyTorch references (``reference``)."""
from .cpu import int4_linear_native, int4_matmul_cpu, int4_matmul_native, quantize_activations_native
from .gemm import int4_matmul, run_plan
from .plans import Int4Plan, candidate_plans, default_plan, plan_for
from .reference import (int4_linear_q8_reference, int4_matmul_q8_reference, int4_matmul_reference,
                        quantize_activations_q8)
from .weight import PACK, Int4Weight, pack_nibbles, quantize_int4

__all__ = [
    "Int4Weight", "PACK", "pack_nibbles", "quantize_int4", "int4_matmul", "run_plan", "Int4Plan", "candidate_plans",
    "default_plan", "plan_for", "int4_matmul_cpu", "int4_matmul_native", "int4_linear_native",
    "quantize_activations_native", "int4_matmul_reference", "int4_matmul_q8_reference", "int4_linear_q8_reference",
    "quantize_activations_q8",
]
