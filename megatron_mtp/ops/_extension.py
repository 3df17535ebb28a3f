"""Import-safe access to the compiled extension ``megatron_mtp._C``.

The ops must import (and work) on machines where the extension was never built, e.g. a fresh checkout without
``pip install -e .``: callers then get the pure-PyTorch chunked path and one warning per reason.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

try:
    from megatron_mtp import _C as _native
    _IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # not built, or built against another torch
    _native = None
    _IMPORT_ERROR = exc

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def extension_available(device_type: str = "cpu") -> bool:
    """Whether the native kernels serve tensors of ``device_type`` ("cpu" or "cuda")."""
    if _native is None:
        return False
    if device_type == "cuda":
        return bool(_native.built_with_cuda())
    return device_type == "cpu"


def native_backend(hidden: torch.Tensor) -> ModuleType | None:
    """The extension module if it can run on ``hidden``'s device and dtype, else None (after a one-time warning)."""
    if _native is None:
        _warn_once(
            "not-built",
            f"megatron_mtp._C is not available ({_IMPORT_ERROR}); linear_cross_entropy falls back to the slower "
            "pure-PyTorch chunked path. Build it with `pip install --no-build-isolation -e .`.",
        )
        return None
    device_type = hidden.device.type
    if device_type == "cuda" and not _native.built_with_cuda():
        _warn_once(
            "no-cuda",
            "megatron_mtp._C was built without CUDA (no nvcc or a CPU-only torch at build time); "
            "linear_cross_entropy on CUDA tensors uses the pure-PyTorch chunked path. Rebuild with nvcc on PATH.",
        )
        return None
    if device_type == "cuda" and hidden.dtype == torch.float64:
        _warn_once("cuda-fp64", "linear_cross_entropy: float64 on CUDA runs on the pure-PyTorch chunked path.")
        return None
    if device_type not in ("cpu", "cuda"):
        _warn_once(f"device-{device_type}", f"linear_cross_entropy: no native kernels for {device_type} tensors; "
                   "using the pure-PyTorch chunked path.")
        return None
    return _native
