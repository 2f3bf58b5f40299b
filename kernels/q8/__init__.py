"""The 8-bit (GGUF Q8_0) weight of LM heads: the format (``weight``), the native CPU matmul and
its dispatch (``cpu``), the PyTorch references (``reference``)."""
from .cpu import q8_linear, q8_linear_native
from .reference import q8_linear_q8_reference, q8_linear_reference
from .weight import Q8Weight, from_gguf_q8_0, quantize_q8_0, with_int8_activations

__all__ = ["Q8Weight", "quantize_q8_0", "from_gguf_q8_0", "with_int8_activations", "q8_linear", "q8_linear_native",
           "q8_linear_reference", "q8_linear_q8_reference"]
