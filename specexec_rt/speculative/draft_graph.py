"""SpecExec draft steps with static shapes, captured once as a CUDA graph and replayed.

A draft step is a small forward (``beams_per_step`` new tokens over the prefix and the tree
grown so far) whose GPU work is tens of microseconds per layer, so eagerly it costs what the
host spends launching ~30 kernels per layer (42 ms per 7B-shaped call on an H100, the
end-to-end bottleneck; docs/DESIGN.md). Every shape in it is made static so that one graph
serves every step of every pass:

- the new tokens are padded to ``beams`` rows; a padding row keeps an earlier call's (valid)
  token and position, gets a scratch cache slot among the last ``beams`` slots of the cache (never visible: the engine
  keeps the tree below them) and a mask row that sees only the root (slot 0 of the tree
  region, written before any step), so its values stay finite;
- the tree region is ``width`` slots wide (the largest a pass can use); bits past the slots
  used so far are 0;
- the prefix length is an int32 device scalar the attention kernel reads (``prefix_dev``);
  the host passes only its upper bound ``max_len - beams - width``.

On the CPU (or with ``capture=False``) the same static pass runs eagerly: that is how the
tests check it against the dynamic pass. On CUDA the first call runs eagerly (compiling the
kernels) and then captures the graph; the second call replays it and also runs eagerly once,
and the graph is used from then on only if both agree (otherwise it is dropped with a
warning and the runner stays eager): a wrong graph can cost speed, never correctness.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch


class StaticDraftStep:
    """Runs ``model.forward`` for up to ``beams`` draft nodes with static shapes, on ``cache``
    (default the model's own; a draft that reads the target's cache is given the target's)."""

    def __init__(self, model, beams: int, width: int, capture: Optional[bool] = None, cache=None):
        self.model = model
        self.cache = model.cache if cache is None else cache
        self.beams, self.width = int(beams), int(width)
        dev = model.device
        self.bound = self.cache.max_len - self.beams - self.width   # the largest prefix served
        if self.bound < 0:
            raise ValueError(f"a static draft step needs max_len >= beams + width ({self.beams} + {self.width})")
        self.tokens = torch.zeros(self.beams, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.beams, dtype=torch.long, device=dev)
        self.slots = torch.zeros(self.beams, dtype=torch.long, device=dev)
        self.mask = torch.zeros(self.beams, self.width, dtype=torch.bool, device=dev)
        self.prefix = torch.zeros(1, dtype=torch.int32, device=dev)
        self.scratch = torch.arange(self.cache.max_len - self.beams, self.cache.max_len, device=dev)
        # A model whose forward reads the device on the host (mixture-of-experts layers) cannot be
        # captured: its static steps run eagerly.
        self.capture = (dev.type == "cuda" and getattr(model, "capturable", True)) if capture is None \
            else bool(capture)
        self.graph = None
        self.graph_logits = None
        self.verified = False
        self.calls = 0
        self.replays = 0

    def fits(self, prefix_len: int, tree_slots: int) -> bool:
        """Whether a step at this prefix, with the tree using ``tree_slots`` slots after it
        this step included, stays inside the static region."""
        return prefix_len <= self.bound and tree_slots <= self.width

    def _forward(self) -> torch.Tensor:
        return self.model.forward(self.tokens, self.positions, self.cache, self.bound,
                                  tree_mask=self.mask, cache_slots=self.slots, prefix_dev=self.prefix)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Logits ``[m, V]`` of ``m <= beams`` nodes: ``tokens``, absolute ``positions``, cache
        ``slots`` (int64 ``[m]``), ``mask`` bool ``[m, n_slots]`` over the tree region used so
        far (``n_slots <= width``), committed prefix ``prefix_len``. The returned tensor is
        overwritten by the next call."""
        m, n_slots = mask.shape
        if m > self.beams or not self.fits(prefix_len, n_slots):
            raise ValueError(f"static draft step for {self.beams} nodes, a {self.width}-slot tree region and "
                             f"prefixes <= {self.bound}: got {m} nodes, {n_slots} slots, prefix {prefix_len}")
        self.tokens[:m] = tokens       # padding rows keep earlier, valid tokens and positions
        self.positions[:m] = positions
        self.slots.copy_(self.scratch)
        self.slots[:m] = slots
        self.mask.zero_()
        self.mask[:, 0] = True          # padding rows see the root only: finite values
        self.mask[:m, :n_slots] = mask
        self.prefix.fill_(prefix_len)
        self.calls += 1
        if not self.capture:
            return self._forward()[:m]
        if self.graph is None:
            return self._warm_up_and_capture()[:m]
        self.graph.replay()
        self.replays += 1
        if not self.verified:
            self._verify()
            if self.graph is None:
                return self._forward()[:m]
        return self.graph_logits[:m]

    def _warm_up_and_capture(self) -> torch.Tensor:
        """Run eagerly on a side stream (compiles every kernel at these shapes; this is the
        call's real result), then capture the same pass into a graph."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        main = torch.cuda.current_stream(self.model.device)
        with torch.cuda.stream(stream):
            logits = self._forward().clone()
        main.wait_stream(stream)
        if logits.is_cuda:
            logits.record_stream(main)  # allocated on the side stream, consumed on the main one
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls from other threads (a server's) must not void the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.graph_logits = self._forward()
            self.graph = graph
        except Exception as e:  # a capture this build cannot do: stay eager
            self.graph, self.capture = None, False
            warnings.warn(f"specexec-rt: CUDA graph capture of the draft step failed ({type(e).__name__}: {e}); "
                          "drafting eagerly", RuntimeWarning, stacklevel=3)
        return logits

    def _verify(self) -> None:
        """The first replay is checked against an eager run of the same inputs (it rewrites
        the same K/V into the same slots)."""
        replayed = self.graph_logits.clone()
        eager = self._forward()
        tol = 1e-3 if eager.dtype == torch.float32 and self.model.dtype == torch.float32 else 2e-2
        scale = eager.abs().max().clamp_min(1.0)
        if bool(((replayed - eager).abs().max() <= tol * scale).item()):
            self.verified = True
            return
        self.graph, self.graph_logits, self.capture = None, None, False
        warnings.warn("specexec-rt: the captured draft step disagreed with the eager one; drafting eagerly",
                      RuntimeWarning, stacklevel=3)
