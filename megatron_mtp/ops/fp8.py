"""FP8 GEMMs for the trunk's and heads' linear layers (``train.fp8``): ``torch._scaled_mm`` with dynamic
per-tensor scaling, the recipe of torchao's float8 "tensorwise" training and Transformer Engine's current
scaling.

One linear y = x Wᵀ is three GEMMs, each on FP8 operands with an fp32 scale per tensor:

  forward      y      = x   · Wᵀ   x, W in e4m3 (3 mantissa bits: precision for values)
  backward     dx     = dy  · W    dy in e5m2 (5 exponent bits: range for gradients), W in e4m3
               dW     = dyᵀ · x    dy in e5m2, x in e4m3

Each tensor's scale is ``fp8_max / amax(|t|)``, taken from the tensor itself in the same step ("dynamic"), so
there is no scaling state: nothing to save in a checkpoint, nothing that lags behind a changing tensor (the
price is one amax reduction per cast, which torch.compile fuses with the cast's neighbours). The GEMMs
accumulate in fp32 inside the tensor cores and write bf16 (or the input's dtype); master weights, optimizer
state and the residual stream stay as they were. The unembedding and the fused cross-entropy never come here.

Tensor parallelism: each rank scales its own shard (its weight slice, its gradient slice); the GEMM outputs
are already dequantized, so the all-reduce / reduce-scatter that follows adds ordinary bf16 partial sums. A
TP=k run is therefore not bit-identical to TP=1 under FP8 (the scales differ per shard), only equal within
FP8's rounding.

``torch._scaled_mm`` wants the first operand row-major, the second column-major and every dimension a
multiple of 16; the layer's feature sizes are checked when FP8 is switched on (``apply_fp8``), and a call
whose token count is not a multiple of 16 (an odd evaluation batch) runs the plain bf16 GEMM instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_mtp.errors import ConfigError
from megatron_mtp.parallel.layers import ColumnParallelLinear, RowParallelLinear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Below this amax a tensor is treated as zero (its scale would overflow fp32); torchao uses the same floor.
AMAX_FLOOR = 1e-12
MIN_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) have FP8 tensor cores


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(t scaled and saturated into ``dtype``, the fp32 inverse scale that undoes it).

    The scale is the dynamic one, ``finfo(dtype).max / amax(|t|)``: the largest value maps to the format's
    largest, so no value overflows and small ones keep as many bits as the format allows."""
    fmax = torch.finfo(dtype).max
    scale = fp8_scale(t, dtype)
    t8 = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return t8, scale.reciprocal()


def fp8_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    amax = t.detach().abs().amax().float()
    return torch.finfo(dtype).max / amax.clamp(min=AMAX_FLOOR)


def _scaled_mm(a8, a_inv, b8, b_inv, out_dtype, fast_accum: bool):
    return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def fp8_shape_ok(tokens: int, in_features: int, out_features: int) -> bool:
    """Every GEMM dimension a multiple of 16 (cuBLASLt's FP8 requirement; dW's inner dimension is the
    token count)."""
    return tokens % 16 == 0 and in_features % 16 == 0 and out_features % 16 == 0


def to_float8_pair(t: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(t in ``dtype``, the same values transposed and made contiguous, the fp32 inverse scale): one dynamic
    scale, both layouts a GEMM of the linear needs.

    ``torch._scaled_mm`` takes its operands "TN" only: the reduction dimension contiguous in both. The forward
    GEMM reduces over features, the weight-gradient GEMM over tokens, so x and dy are each needed in both
    layouts. Making both copies from the one scaled tensor lets inductor write them from one read of the bf16
    source (a 2-D tiled kernel) instead of casting, then re-reading the FP8 copy to transpose it in backward."""
    t8, inv = to_float8(t, dtype)
    return t8, t8.t().contiguous(), inv


class _Float8Linear(torch.autograd.Function):
    """y = x Wᵀ with FP8 operands in all three GEMMs (module docstring).

    Each operand is cast once: the forward casts x and W, in both layouts (``to_float8_pair``), and saves only
    the transposed copies the backward GEMMs read (x in e4m3 is half the bytes of a bf16 input); the backward
    casts dy once. The weight is not cast again in backward: dx uses the FP8 weight the forward used."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, need_dx: bool, need_dw: bool) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # the dtype F.linear would have produced under autocast
            out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            out_dtype = x.dtype
        x2 = x.reshape(-1, x.size(-1))
        if need_dw:
            x8, x8_t, x_inv = to_float8_pair(x2, E4M3)
        else:
            (x8, x_inv), x8_t = to_float8(x2, E4M3), None
        if need_dx:
            w8, w8_t, w_inv = to_float8_pair(weight, E4M3)
        else:
            (w8, w_inv), w8_t = to_float8(weight, E4M3), None
        # Forward accumulates in the tensor cores' fast mode (as torchao and TE do): the output error it adds is
        # far below e4m3's own rounding; the gradient GEMMs below keep full fp32 accumulation.
        y = _scaled_mm(x8, x_inv, w8.t(), w_inv, out_dtype, fast_accum=True)
        ctx.save_for_backward(x8_t, x_inv, w8_t, w_inv)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8_t, x_inv, w8_t, w_inv = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.size(-1))
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            g8, g8_t, g_inv = to_float8_pair(g2, E5M2)
            # dW = dyᵀ · x: dyᵀ row-major [out, tokens], x column-major [tokens, in] (x8_t is [in, tokens])
            grad_w = _scaled_mm(g8_t, g_inv, x8_t.t(), x_inv, ctx.w_dtype, fast_accum=False)
        else:
            g8, g_inv = to_float8(g2, E5M2)
        if ctx.needs_input_grad[0]:
            # dx = dy · W: W [out, in] as the column-major second operand (w8_t is [in, out])
            grad_x = _scaled_mm(g8, g_inv, w8_t.t(), w_inv, ctx.x_dtype, fast_accum=False)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) through FP8 GEMMs; the plain GEMM when a dimension does not suit
    FP8 tensor cores (see the module docstring)."""
    tokens = x.numel() // x.size(-1) if x.size(-1) else 0
    if not fp8_shape_ok(tokens, weight.size(1), weight.size(0)):
        return F.linear(x, weight)
    grad = torch.is_grad_enabled()  # no transposed copies when nothing will run backward (evaluation)
    return _Float8Linear.apply(x, weight, grad and x.requires_grad, grad and weight.requires_grad)


def check_fp8_device(device, capability=None) -> None:
    """A clear error when ``device`` has no FP8 tensor cores. ``capability`` overrides the queried one
    (tests)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"train.fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: "
                          f"Ada, Hopper), but this run is on {device.type}; set train.fp8 false.")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        raise ConfigError(f"train.fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper), but "
                          f"{name} has {capability[0]}.{capability[1]}; set train.fp8 false.")


def apply_fp8(model: torch.nn.Module) -> int:
    """Route every column- and row-parallel linear of ``model`` (the trunk's and heads' projections; the
    unembedding is not one) through :func:`fp8_linear`; returns how many. Call before ``apply_compile`` so the
    casts are traced into the compiled layers. Parameters, names and state dicts are unchanged."""
    count = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            out_f, in_f = module.weight.shape
            if in_f % 16 or out_f % 16:
                key = getattr(module.weight, "init_key", "a linear layer")
                raise ConfigError(f"train.fp8 needs every linear layer's dimensions divisible by 16 (FP8 tensor-core "
                                  f"GEMMs), but {key} is {out_f} x {in_f} on this rank; change the model's sizes or "
                                  f"set train.fp8 false.")
            module.gemm = fp8_linear
            count += 1
    return count
