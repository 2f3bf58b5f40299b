"""Greedy decoding's row-wise argmax over a 49152-wide vocabulary: the native scan against its
reference, ``torch.argmax``."""
from __future__ import annotations

import pytest
import torch

from micro_common import run_case
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.argmax import argmax_rows, argmax_rows_reference

VOCAB = 49152


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_argmax_rows_cpu(benchmark, impl, rows):
    if impl == "ours" and cpu_native.library() is None:
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    x = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows))
    fn = (lambda: argmax_rows(x)) if impl == "ours" else (lambda: argmax_rows_reference(x))
    y = run_case(benchmark, fn, group=f"argmax cpu rows={rows} width={VOCAB}", impl=impl,
                 shape=dict(rows=rows, width=VOCAB), nbytes=x.nbytes, flops=rows * VOCAB, bound="memory")
    assert torch.equal(y, argmax_rows_reference(x))
