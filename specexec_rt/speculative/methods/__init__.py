"""The decoding methods, one class each behind one interface (``base.Method``), and the registry
that maps a ``method=`` name to its class: the only place a method is looked up by name.

| module | method |
| --- | --- |
| ``autoregressive`` | ``Autoregressive``: the tree is the root alone; no draft |
| ``chains`` | ``Chain`` (``k`` draft tokens per pass), ``SpecInfer`` (``n`` candidates x ``depth``) |
| ``specexec`` | ``SpecExec``: the best-first tree under a budget (tree policies: ``tree_policy.py``) |

Every method verifies through the same target pass and commits the same way (runner.py).
"""
from .autoregressive import Autoregressive
from .base import Method, PassContext
from .chains import Chain, SpecInfer
from .specexec import SpecExec

METHODS = {m.name: m for m in (Autoregressive, Chain, SpecInfer, SpecExec)}
# The parameters each method takes (what Engine(..., **method_params) and the CLI's flags check).
METHOD_PARAMS = {name: cls.param_names for name, cls in METHODS.items()}


def method_class(name: str) -> type:
    """The class registered as ``name``; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "METHOD_PARAMS", "Method", "PassContext", "Autoregressive", "Chain", "SpecInfer", "SpecExec",
           "method_class"]
