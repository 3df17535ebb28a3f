"""Data pipeline: tokenizers, Megatron-compatible indexed datasets, GPT sampling, blending, loading.

The names below are imported lazily (PEP 562) so that preprocessing workers, which only need the
tokenizers and the writer, never pay for importing torch. Preprocessing itself lives in
``megatron_mtp.data.preprocess.preprocess`` (not re-exported: the module and the function share a name).
"""
import importlib

_PUBLIC = {
    "DataError": "errors",
    "Tokenizer": "tokenizers",
    "build_tokenizer": "tokenizers",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "GPTDataset": "gpt_dataset",
    "BlendedDataset": "blended_dataset",
    "build_datasets": "builder",
    "MicroBatchIterator": "loader",
    "ensure_stdlib_corpus": "code_corpus",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_PUBLIC[name]}")
    return getattr(module, name)
