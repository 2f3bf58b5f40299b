"""Row-wise argmax of greedy decoding: the native CPU scan (``cpu``) and the reference."""
from .cpu import MIN_WIDTH, argmax_rows
from .reference import argmax_rows_reference

__all__ = ["MIN_WIDTH", "argmax_rows", "argmax_rows_reference"]
