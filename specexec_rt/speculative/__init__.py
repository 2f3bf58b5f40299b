"""The speculative engine: draft trees grown by a small model, verified by the target in one pass.

| module | what |
| --- | --- |
| ``engine`` | ``Engine``: the generation loop (autoregressive, chain, SpecInfer, SpecExec), acceptance, commits |
| ``tree`` | ``DraftTree`` (best-first growth on device), ``VerifyTree``, the exact acceptance walk |
| ``sampling`` | logits processing, seeded draws, rejection-sampling rules |
| ``budget`` | ``budget="auto"``: the per-pass budget and depth from online cost fits |
| ``drafts`` | drafts derived from the target (``default_draft``: int4 re-quantized) |
| ``draft_graph`` | static-shape draft steps captured as CUDA graphs |
| ``memory`` | working-memory estimates and checks |
"""
from .drafts import default_draft, int4_draft, layer_dropped_draft
from .engine import METHODS, Engine, GenerationResult, GenerationStats, RequestHandle
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "GenerationStats", "RequestHandle", "METHODS", "SamplingParams", "default_draft",
           "int4_draft", "layer_dropped_draft"]
