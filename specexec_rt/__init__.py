"""specexec-rt: SpecExec speculative decoding with an offloaded target model."""
from .config import ModelConfig
from .errors import (ContextLengthError, MemoryBudgetError, ModelLoadError, SamplingParameterError,
                     SpecExecError, UnsupportedModelError, VocabularyMismatchError)
from .loading import load_model, load_tokenizer
from .model import Transformer

__version__ = "0.1.0"

__all__ = [
    "load_model", "load_tokenizer", "Transformer", "ModelConfig", "SpecExecError", "ModelLoadError",
    "UnsupportedModelError", "ContextLengthError", "VocabularyMismatchError", "SamplingParameterError",
    "MemoryBudgetError",
]
