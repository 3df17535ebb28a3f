"""Python side of the native kernels in csrc/ and their pure-PyTorch references.

Importing this package never requires the compiled extension: without it the ops run on a pure-PyTorch chunked
path (one warning per process).
"""
from ._extension import extension_available
from .linear_cross_entropy import default_chunk_size, lean_chunk_size, linear_cross_entropy
from .reference import reference_linear_cross_entropy, vocab_parallel_cross_entropy

__all__ = [
    "linear_cross_entropy",
    "default_chunk_size",
    "lean_chunk_size",
    "vocab_parallel_cross_entropy",
    "reference_linear_cross_entropy",
    "extension_available",
]
