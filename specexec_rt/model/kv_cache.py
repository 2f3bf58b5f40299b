"""A static KV cache: allocated once, indexed by slot; speculation only moves entries around."""
from __future__ import annotations

import torch

from ..errors import ContextLengthError


class KVCache:
    """K and V for every layer: ``[n_layers, max_len, n_kv_heads, head_dim]`` each.

    Slots ``[0, prefix_len)`` hold the committed text; the slots after it are scratch space for
    the current draft tree or verification pass. The caller owns ``prefix_len`` (an int on the
    host), so nothing here needs to read the device.
    """

    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.max_len = int(max_len)
        shape = (n_layers, self.max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def check_fits(self, n_slots: int) -> None:
        if n_slots > self.max_len:
            raise ContextLengthError(
                f"{n_slots} cache slots needed but the KV cache holds max_len={self.max_len}; "
                f"load the model with a larger max_len or use a shorter prompt / smaller budget")

    def commit(self, prefix_len: int, slots: torch.Tensor) -> int:
        """Move the entries at ``slots`` (int64 ``[n]``, in path order) to
        ``prefix_len .. prefix_len + n - 1`` in every layer at once. Returns the new prefix length.

        Slots may overlap their destinations: the gather materialises before the scatter.
        """
        n = int(slots.shape[0])
        self.check_fits(prefix_len + n)
        if n == 0:
            return prefix_len
        slots = slots.to(device=self.k.device, dtype=torch.long)
        dst = slice(prefix_len, prefix_len + n)
        self.k[:, dst] = self.k.index_select(1, slots)
        self.v[:, dst] = self.v.index_select(1, slots)
        return prefix_len + n

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries at slots ``src`` to slots ``dst`` (int64 ``[n]`` each) in every layer
        at once: several requests' commits into their own regions in one call. The gather
        materialises before the scatter, so sources may overlap destinations."""
        self.k[:, dst] = self.k.index_select(1, src)
        self.v[:, dst] = self.v.index_select(1, src)
