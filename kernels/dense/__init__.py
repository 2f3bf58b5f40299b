"""Float32 weights times a few rows on the CPU (native, layer ops fused: ``cpu``) and the
reference (``reference``)."""
from .cpu import MAX_ROWS, f32_linear_native
from .reference import f32_linear_reference

__all__ = ["MAX_ROWS", "f32_linear_native", "f32_linear_reference"]
