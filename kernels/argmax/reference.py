"""PyTorch reference of ``cpu.argmax_rows``: ``torch.argmax`` (the first index of the largest
value, or of the first NaN)."""
import torch


def argmax_rows_reference(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(-1)
