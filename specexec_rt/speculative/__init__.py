"""The speculative engine: draft trees grown by a small model, verified by the target in one pass.

| module | what |
| --- | --- |
| ``engine`` | ``Engine``: the facade (generate, stream, submit, step) and the one loop |
| ``scheduler`` | ``Scheduler``: requests, cache regions, admission, prefill chunks; ``SchedulerOutput`` per pass |
| ``runner`` | ``Runner``: one pass on the device (grow, verify, accept, one read, commit); ``PassResult`` |
| ``methods`` | the decoding methods (autoregressive, chain, SpecInfer, SpecExec) and their registry |
| ``tree_policy`` | SpecExec's tree policies (calibrated, softmax, Sequoia) and their registry |
| ``tree`` | ``DraftTree`` (best-first growth on device), ``VerifyTree``, the exact acceptance walk |
| ``sampling`` | logits processing, seeded draws, position noise, rejection-sampling rules |
| ``auto``, ``budget`` | ``budget="auto"``: the per-pass plan, and the budget and depth from online cost fits |
| ``config`` | the engine's arguments checked together; what fits the caches |
| ``drafts`` | drafts derived from the target (``default_draft``: int4 re-quantized) |
| ``draft_graph`` | static-shape draft steps captured as CUDA graphs |
| ``memory`` | working-memory estimates and checks |
"""
from .drafts import default_draft, int4_draft, layer_dropped_draft
from .engine import METHODS, Engine, GenerationResult, GenerationStats, RequestHandle
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "GenerationStats", "RequestHandle", "METHODS", "SamplingParams", "default_draft",
           "int4_draft", "layer_dropped_draft"]
