"""specexec-rt: SpecExec speculative decoding with an offloaded target model.

    from specexec_rt import load_model, default_draft, Engine
    target = load_model("smollm2-135m")
    engine = Engine(target, default_draft(target), budget="auto")
    print(engine.generate("The capital of France is", max_new_tokens=16).text)

Layers, top to bottom (imports only run downward): ``serving`` (CLI, server) ->
``speculative`` (engine, tree, sampling, budget, drafts) -> ``loading`` (checkpoints,
tokenizers, hub) -> ``offload`` (layer streaming) -> ``model`` (config, weights, KV cache, ops,
transformer) -> ``kernels`` (Triton kernels and references; also ``specexec_rt.kernels``).
"""
from .errors import (ChatTemplateError, ContextLengthError, InvalidParameterError, MemoryBudgetError, ModelLoadError,
                     NonFiniteLogitsError, SamplingParameterError, SpecExecError, UnsupportedModelError,
                     VocabularyMismatchError)
from .loading import load_model, load_tokenizer
from .model import ModelConfig, Transformer
from .speculative import Engine, GenerationResult, GenerationStats, SamplingParams, default_draft

__version__ = "0.1.0"

__all__ = [
    "load_model", "load_tokenizer", "Engine", "default_draft", "GenerationResult", "GenerationStats",
    "SamplingParams", "Transformer", "ModelConfig",
    "SpecExecError", "ModelLoadError", "UnsupportedModelError", "ContextLengthError", "VocabularyMismatchError",
    "SamplingParameterError", "InvalidParameterError", "ChatTemplateError", "MemoryBudgetError",
    "NonFiniteLogitsError",
]
