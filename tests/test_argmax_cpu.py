"""The native row-wise argmax (kernels/argmax/, csrc/argmax_cpu.h) that greedy decoding
takes of every vocabulary row: exactly ``torch.argmax``'s index on every ISA path, for ties
(first index), signed zeros, infinities, NaNs (the first NaN), widths not a multiple of the
vector, strided rows; other inputs go to torch."""
from __future__ import annotations

import pytest
import torch

from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.argmax import MIN_WIDTH, argmax_rows, argmax_rows_reference


def _isas():
    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable here: {cpu_native.unavailable_reason()}")
    return [None, *cpu_native.supported_isas()]


def _rows(width: int, seed: int) -> torch.Tensor:
    """Rows that stress the rules: random, ties at the start / middle / tail, a constant row,
    signed zeros as the max, +inf twice, all -inf, NaN early / late / in the tail, a small-
    integer row full of ties."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(width, generator=g) for _ in range(3)]
    r = torch.randn(width, generator=g)
    r[[5, width // 2, width - 1]] = 9.0
    rows.append(r)
    r = torch.randn(width, generator=g)
    r[width - 1] = r.max() + 1
    rows.append(r)                                   # the max in the scalar tail
    rows.append(torch.full((width,), 0.25))
    r = -torch.rand(width, generator=g) - 1
    r[[7, 11]] = torch.tensor([-0.0, 0.0])
    rows.append(r)
    r = torch.randn(width, generator=g)
    r[[3, width - 2]] = float("inf")
    rows.append(r)
    rows.append(torch.full((width,), float("-inf")))
    for at in (0, 9, width // 2, width - 1):
        r = torch.randn(width, generator=g)
        r[at] = float("nan")
        r[min(width - 1, at + 3)] = float("nan")
        r[width - 3] = float("inf")
        rows.append(r)
    rows.append(torch.randint(-3, 4, (width,), generator=g).float())
    return torch.stack(rows)


@pytest.mark.parametrize("width", [MIN_WIDTH, 1031, 4099, 49152])
def test_matches_torch_argmax(width):
    x = _rows(width, width)
    want = argmax_rows_reference(x)
    for isa in _isas():
        assert torch.equal(argmax_rows(x, isa=isa), want), isa
        for i in range(x.shape[0]):
            assert int(argmax_rows(x[i], isa=isa)) == int(want[i]), (isa, i)


def test_strided_rows_and_fallbacks():
    _isas()
    wide = _rows(2051, 1)
    x = wide[:, 3:3 + 1500]                        # rows with a stride past their width
    assert x.stride(0) == 2051
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    for other in (x.double(), x[:, :100], x.t(), x.reshape(1, -1, 100)[:, :, :]):   # torch's own
        assert torch.equal(argmax_rows(other), other.argmax(-1))
    assert argmax_rows(x[0]).dim() == 0
