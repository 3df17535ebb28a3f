"""Shared pytest set-up: markers and a tiny preprocessed dataset built once per session.

Markers:
  slow8   an 8-process distributed test (3D parallel). It runs in CI on the tiniest shape; deselect it on a
          laptop with ``-m "not slow8"``.
"""
import os

import numpy as np
import pytest

# DeepSpeed picks its accelerator at import; the distributed tests run on CPU with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY_VOCAB = 64


def pytest_configure(config):
    config.addinivalue_line("markers", "slow8: an 8-process distributed test (runs in CI on the tiniest shape)")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: more threads only contend on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compile_with_eager_backend(monkeypatch):
    """``torch.compile`` with dynamo's eager backend (tracing, guards and graph breaks as ever, no inductor: fast
    on a CPU), dynamo's caches reset before and after."""
    import torch
    import torch._dynamo

    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: original(fn, **{**kw, "backend": "eager", "options": None}))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A Megatron ``.bin/.idx`` of 200 random documents over ``TINY_VOCAB`` token ids, and a cache dir for
    sample indexes: ``{"prefix": ..., "cache_dir": ..., "vocab_size": TINY_VOCAB}``."""
    from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("tiny_dataset")
    prefix = str(root / "tokens")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(200):
            builder.add_document(rng.integers(0, TINY_VOCAB, size=int(rng.integers(10, 60))))
        builder.finalize()
    return {"prefix": prefix, "cache_dir": str(root / "cache"), "vocab_size": TINY_VOCAB}
