"""Every transformer layer of a CPU float32 pass in one native call (``cpu.NativeLayers``). Its
reference is the per-op path of ``specexec_rt.model.transformer``, which it matches bit for bit
(tests/test_attention_cpu.py)."""
from .cpu import NativeLayers

__all__ = ["NativeLayers"]
