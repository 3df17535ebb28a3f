"""Fused, chunked, vocab-parallel linear cross-entropy against float64 full-logits references.

Every case compares loss, d(hidden) and d(weight) with ``F.cross_entropy`` on float64 logits built from the same
(upcast) inputs: float32 within 1e-5 relative, bf16 within 1e-2. Cases cover ignored targets, all targets
ignored (loss 0, zero gradients, no NaN), T not a multiple of the chunk, a vocabulary that is not a multiple of
the kernels' 16-byte vectors, every reduction, the fused (gradient-in-forward) and recompute modes, both the
native extension and the pure-PyTorch chunked path, a padded vocabulary, use under ``torch.autograd.grad``
inside another autograd.Function's forward, and TP = 2 and 4 on gloo with and without sequence parallelism.
CUDA cases run when a GPU and the CUDA build are present.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megatron_mtp.ops import (default_chunk_size, extension_available, linear_cross_entropy,
                              reference_linear_cross_entropy, vocab_parallel_cross_entropy)
from megatron_mtp.ops import _extension

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}

BACKENDS = ["torch"] + (["native"] if extension_available("cpu") else [])
CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# helpers


def make_case(tokens, dim, vocab, seed, dtype=torch.float32, n_ignored=3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * dim ** -0.5 * 2
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    if n_ignored:
        target[torch.randperm(tokens, generator=gen)[:n_ignored]] = IGNORE
    grad_weights = torch.rand(tokens, generator=gen) + 0.5  # upstream gradient for reduction="none"
    to = dict(device=device)
    return hidden.to(dtype).to(**to), weight.to(dtype).to(**to), target.to(**to), grad_weights.to(**to)


def float64_reference(hidden, weight, target, reduction, grad_weights, vocab_size=None):
    """(loss, d(hidden), d(weight)) from full float64 logits and F.cross_entropy."""
    h = hidden.detach().double().cpu().requires_grad_(True)
    w = weight.detach().double().cpu().requires_grad_(True)
    used = w if vocab_size is None else w[:vocab_size]
    loss = F.cross_entropy(h @ used.t(), target.cpu(), ignore_index=IGNORE, reduction=reduction)
    (loss * grad_weights.double().cpu()).sum().backward() if reduction == "none" else loss.backward()
    return loss.detach(), h.grad, w.grad


def run_op(hidden, weight, target, reduction, grad_weights, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, target, ignore_index=IGNORE, reduction=reduction, **kwargs)
    (loss * grad_weights).sum().backward() if reduction == "none" else loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_rel_close(actual, expected, rtol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    if scale == 0:
        assert actual.abs().max().item() == 0, f"{what}: expected exact zeros"
        return
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel <= rtol, f"{what}: relative error {rel:.3g} > {rtol:g}"
    worst = ((actual - expected).abs() - rtol * expected.abs()).max().item()
    assert worst <= rtol * scale, f"{what}: elementwise error {worst:.3g} beyond {rtol:g} (scale {scale:.3g})"


def check_against_reference(hidden, weight, target, reduction, grad_weights, rtol, label, **kwargs):
    got = run_op(hidden, weight, target, reduction, grad_weights, **kwargs)
    ref = float64_reference(hidden, weight, target, reduction, grad_weights, kwargs.get("vocab_size"))
    for name, a, e in zip(("loss", "d(hidden)", "d(weight)"), got, ref):
        assert_rel_close(a, e, rtol, f"{label} {name}")


# ---------------------------------------------------------------------------------------------------------------
# single process, CPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("recompute", [False, True], ids=["fused", "recompute"])
def test_matches_float64_reference(backend, dtype, reduction, recompute):
    # T=37 is not a multiple of the chunk (8); V=53 is not a multiple of any vector width.
    hidden, weight, target, gw = make_case(37, 24, 53, seed=1, dtype=dtype)
    check_against_reference(hidden, weight, target, reduction, gw, TOL[dtype], f"{backend}/{dtype}/{reduction}",
                            chunk_size=8, recompute=recompute, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 16, 64, None])
def test_chunk_sizes_and_vector_friendly_vocab(backend, chunk_size):
    hidden, weight, target, gw = make_case(48, 32, 64, seed=2)
    check_against_reference(hidden, weight, target, "sum", gw, TOL[torch.float32], f"{backend}/chunk={chunk_size}",
                            chunk_size=chunk_size, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("recompute", [False, True], ids=["fused", "recompute"])
def test_all_targets_ignored_gives_zero_loss_and_grads(backend, reduction, recompute):
    hidden, weight, target, gw = make_case(10, 8, 20, seed=3, n_ignored=0)
    target[:] = IGNORE
    loss, dh, dw = run_op(hidden, weight, target, reduction, gw, chunk_size=4, recompute=recompute, backend=backend)
    for name, value in (("loss", loss), ("d(hidden)", dh), ("d(weight)", dw)):
        assert torch.isfinite(value).all(), f"{name} has NaN/inf"
        assert value.abs().max().item() == 0, f"{name} is not zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_reduction_none_shape(backend):
    hidden, weight, target, gw = make_case(24, 16, 30, seed=4)
    h3 = hidden.view(2, 12, 16).clone().requires_grad_(True)
    losses = linear_cross_entropy(h3, weight, target.view(2, 12), reduction="none", ignore_index=IGNORE,
                                  backend=backend)
    assert losses.shape == (2, 12) and losses.dtype == torch.float32
    ref = F.cross_entropy(hidden.double() @ weight.double().t(), target, ignore_index=IGNORE, reduction="none")
    assert_rel_close(losses.view(-1), ref, 1e-5, "per-token losses")
    losses.sum().backward()
    assert h3.grad.shape == h3.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_gradient_of_one_input_only(backend, which):
    hidden, weight, target, _ = make_case(20, 8, 25, seed=5)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    loss = linear_cross_entropy(h, w, target, ignore_index=IGNORE, chunk_size=6, backend=backend)
    loss.backward()
    _, ref_dh, ref_dw = float64_reference(hidden, weight, target, "mean", None)
    if which == "hidden":
        assert_rel_close(h.grad, ref_dh, 1e-5, "d(hidden)")
        assert w.grad is None
    else:
        assert_rel_close(w.grad, ref_dw, 1e-5, "d(weight)")
        assert h.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend):
    hidden, weight, target, _ = make_case(30, 16, 40, seed=6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE, chunk_size=7, backend=backend)
    ref, _, _ = float64_reference(hidden, weight, target, "mean", None)
    assert_rel_close(loss, ref, 1e-5, "no-grad loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabulary_is_masked(backend):
    hidden, weight, target, gw = make_case(26, 16, 48, seed=7)
    target[target >= 41] = 3  # real vocabulary: 41 of the 48 rows
    for recompute in (False, True):
        check_against_reference(hidden, weight, target, "sum", gw, 1e-5, f"{backend}/padded",
                                vocab_size=41, chunk_size=8, recompute=recompute, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaling_by_upstream_gradient(backend):
    """The fused mode's precomputed gradients are scaled by grad_output in backward (here 0.37)."""
    hidden, weight, target, _ = make_case(20, 8, 30, seed=8)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (0.37 * linear_cross_entropy(h, w, target, ignore_index=IGNORE, reduction="sum", backend=backend)).backward()
    _, ref_dh, ref_dw = float64_reference(hidden, weight, target, "sum", None)
    assert_rel_close(h.grad, 0.37 * ref_dh, 1e-5, "scaled d(hidden)")
    assert_rel_close(w.grad, 0.37 * ref_dw, 1e-5, "scaled d(weight)")


class _OuterFunction(torch.autograd.Function):
    """Mimics the memory-efficient MTP heads: loss and gradients computed inside another Function's forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, backend):
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            loss = linear_cross_entropy(h, w, target, ignore_index=IGNORE, reduction="sum", chunk_size=5,
                                        backend=backend)
            dh, dw = torch.autograd.grad(loss, [h, w])
        ctx.save_for_backward(dh, dw)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return grad * dh, grad * dw, None, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_inside_another_function(backend):
    hidden, weight, target, _ = make_case(18, 8, 22, seed=9)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = _OuterFunction.apply(h, w, target, backend)
    (2.0 * loss).backward()
    ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, target, "sum", None)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(h.grad, 2.0 * ref_dh, 1e-5, "d(hidden)")
    assert_rel_close(w.grad, 2.0 * ref_dw, 1e-5, "d(weight)")


def test_native_and_torch_paths_agree_in_bf16():
    if "native" not in BACKENDS:
        pytest.skip("megatron_mtp._C is not built")
    hidden, weight, target, gw = make_case(40, 32, 72, seed=10, dtype=torch.bfloat16)
    a = run_op(hidden, weight, target, "mean", gw, chunk_size=16, backend="native")
    b = run_op(hidden, weight, target, "mean", gw, chunk_size=16, backend="torch")
    for name, x, y in zip(("loss", "d(hidden)", "d(weight)"), a, b):
        assert x.dtype == y.dtype
        assert_rel_close(x, y, 1e-2, f"native vs torch {name}")


def test_fallback_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(_extension, "_native", None)
    monkeypatch.setattr(_extension, "_warned", set())
    hidden, weight, target, gw = make_case(12, 8, 16, seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_against_reference(hidden, weight, target, "mean", gw, 1e-5, "fallback")
        check_against_reference(hidden, weight, target, "sum", gw, 1e-5, "fallback")
    messages = [str(w.message) for w in caught if "pure-PyTorch" in str(w.message)]
    assert len(messages) == 1, messages
    with pytest.raises(RuntimeError, match="cannot serve"):
        linear_cross_entropy(hidden, weight, target, backend="native")


def test_input_errors_are_one_sentence():
    hidden, weight, target, _ = make_case(8, 8, 10, seed=12)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, target, reduction="avg")
    with pytest.raises(TypeError, match="same dtype|cast"):
        linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight[:, :4], target)
    with pytest.raises(ValueError, match="ids for"):
        linear_cross_entropy(hidden, weight, target[:5])


def test_default_chunk_size_balances_chunks():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(0, 100, 4, cpu) == 1
    assert default_chunk_size(10, 100, 4, cpu) == 10  # fits: one chunk
    # The H100-measured default: as many tokens as fit 4 GiB of logits (one chunk where they fit).
    assert default_chunk_size(8192, 131072, 2, gpu) == 8192
    assert default_chunk_size(16384, 131072, 2, gpu) == 16384
    assert default_chunk_size(16384, 32768, 2, gpu) == 16384
    assert default_chunk_size(80000, 32768, 2, gpu) == 40064  # two balanced chunks, rounded up to 128 rows
    assert default_chunk_size(16384, 262144, 2, gpu) == 8192  # the 4 GiB budget binds
    rows = default_chunk_size(40000, 131072, 2, gpu)  # 3 balanced chunks, not 16384 + 16384 + 7232
    assert rows % 128 == 0 and 2 * rows < 40000 <= 3 * rows and rows < 16384


def test_reference_vocab_parallel_ce_single_process():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(3, 5, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 17, (3, 5), generator=gen)
    target[0, 1] = IGNORE
    losses = vocab_parallel_cross_entropy(logits, target, None, IGNORE)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, 17), target.view(-1), ignore_index=IGNORE, reduction="none")
    assert_rel_close(losses.view(-1), ref, 1e-12, "reference losses")
    losses.sum().backward()
    ref.sum().backward()
    assert_rel_close(logits.grad, ref_logits.grad, 1e-12, "reference grads")


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel on gloo (one spawn per world size runs every case)


def _tp_worker(rank, world_size):
    torch.manual_seed(0)
    group = torch.distributed.group.WORLD
    tokens, dim, vocab = 8 * world_size + 0, 16, 12 * world_size  # vocab padded to a multiple of tp
    hidden, weight, target, gw = make_case(tokens, dim, vocab, seed=20 + world_size)
    shard = slice(rank * (vocab // world_size), (rank + 1) * (vocab // world_size))
    rows = slice(rank * (tokens // world_size), (rank + 1) * (tokens // world_size))
    backends = BACKENDS
    for backend in backends:
        for sp in (False, True):
            for reduction in ("mean", "sum", "none"):
                for recompute in (False, True):
                    label = f"tp{world_size}/{backend}/sp={sp}/{reduction}/recompute={recompute}"
                    h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
                    w = weight[shard].clone().requires_grad_(True)
                    loss = linear_cross_entropy(h, w, target, tp_group=group, ignore_index=IGNORE,
                                                reduction=reduction, chunk_size=5, sequence_parallel=sp,
                                                recompute=recompute, backend=backend)
                    (loss * gw).sum().backward() if reduction == "none" else loss.backward()
                    ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, target, reduction, gw)
                    assert_rel_close(loss, ref_loss, 1e-5, f"{label} loss")
                    assert_rel_close(h.grad, ref_dh[rows] if sp else ref_dh, 1e-5, f"{label} d(hidden)")
                    assert_rel_close(w.grad, ref_dw[shard], 1e-5, f"{label} d(weight)")
    # Padded vocabulary whose last shard is partly padding, and the full-logits reference op.
    real = vocab - 7
    tgt = torch.where(target >= real, torch.full_like(target, 1), target)
    for backend in backends:
        h = hidden.clone().requires_grad_(True)
        w = weight[shard].clone().requires_grad_(True)
        linear_cross_entropy(h, w, tgt, tp_group=group, ignore_index=IGNORE, reduction="sum", chunk_size=4,
                             vocab_size=real, backend=backend).backward()
        ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, tgt, "sum", gw, vocab_size=real)
        assert_rel_close(h.grad, ref_dh, 1e-5, f"tp{world_size}/{backend}/padded d(hidden)")
        assert_rel_close(w.grad, ref_dw[shard], 1e-5, f"tp{world_size}/{backend}/padded d(weight)")
    for sp in (False, True):
        h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
        w = weight[shard].clone().requires_grad_(True)
        loss = reference_linear_cross_entropy(h, w, target, tp_group=group, ignore_index=IGNORE, reduction="mean",
                                              sequence_parallel=sp)
        loss.backward()
        ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, target, "mean", gw)
        assert_rel_close(loss, ref_loss, 1e-5, f"tp{world_size}/reference sp={sp} loss")
        assert_rel_close(h.grad, ref_dh[rows] if sp else ref_dh, 1e-5, f"tp{world_size}/reference d(hidden)")
        assert_rel_close(w.grad, ref_dw[shard], 1e-5, f"tp{world_size}/reference d(weight)")
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_matches_float64_reference(world_size):
    assert run_distributed(_tp_worker, world_size) == list(range(world_size))


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    torch.distributed.barrier()  # rank 0 would wait here forever without the fast failure path


def test_run_distributed_propagates_child_exceptions():
    with pytest.raises(Exception, match="planted failure on rank 1"):
        run_distributed(_failing_worker, 2, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (native kernels on the GPU)

needs_cuda = pytest.mark.skipif(not (CUDA and extension_available("cuda")), reason="needs a GPU and the CUDA build")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("recompute", [False, True], ids=["fused", "recompute"])
@pytest.mark.parametrize("vocab", [1000, 4099], ids=["vec", "scalar"])  # 4099: no 16-byte vectors
def test_cuda_matches_float64_reference(dtype, reduction, recompute, vocab):
    hidden, weight, target, gw = make_case(333, 64, vocab, seed=30, dtype=dtype, n_ignored=20, device="cuda")
    check_against_reference(hidden, weight, target, reduction, gw, TOL[dtype], f"cuda/{dtype}/{reduction}",
                            chunk_size=128, recompute=recompute, backend="native")


@needs_cuda
@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_cuda_bf16_large_rows_and_weight_grad_accumulators(fp32_weight_grad):
    # Rows long enough for the fused kernel's L2-sized grid and many chunks of d(weight) accumulation.
    hidden, weight, target, gw = make_case(2048, 256, 32000, seed=31, dtype=torch.bfloat16, n_ignored=100,
                                           device="cuda")
    check_against_reference(hidden, weight, target, "sum", gw, 1e-2, f"cuda/bf16/fp32acc={fp32_weight_grad}",
                            chunk_size=256, fp32_weight_grad=fp32_weight_grad, backend="native")


@needs_cuda
def test_cuda_all_ignored_and_padding():
    hidden, weight, target, gw = make_case(64, 32, 256, seed=32, dtype=torch.bfloat16, n_ignored=0, device="cuda")
    ignored = torch.full_like(target, IGNORE)
    loss, dh, dw = run_op(hidden, weight, ignored, "mean", gw, chunk_size=16, backend="native")
    assert loss.item() == 0 and dh.abs().max().item() == 0 and dw.abs().max().item() == 0
    target = torch.where(target >= 250, torch.zeros_like(target), target)
    check_against_reference(hidden, weight, target, "mean", gw, 1e-2, "cuda/padded", vocab_size=250,
                            chunk_size=16, backend="native")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("upstream", [1.0, 0.37, 0.0])
def test_cuda_grad_scaling_on_device(dtype, upstream):
    """The fused backward scales by grad_output on the device (skipped when it is 1): every value must come out
    right, including odd sizes whose tail is not a whole 16-byte vector (d = 20, V = 33: 660 d(weight) values)."""
    hidden, weight, target, _ = make_case(45, 20, 33, seed=33, dtype=dtype, device="cuda")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, target, ignore_index=IGNORE, reduction="sum", backend="native")
    (upstream * loss).backward()
    _, ref_dh, ref_dw = float64_reference(hidden, weight, target, "sum", None)
    tol = TOL[dtype]
    if upstream == 0.0:
        assert h.grad.abs().max().item() == 0 and w.grad.abs().max().item() == 0
    else:
        assert_rel_close(h.grad, upstream * ref_dh, tol, "scaled d(hidden)")
        assert_rel_close(w.grad, upstream * ref_dw, tol, "scaled d(weight)")


@needs_cuda
def test_cuda_long_rows_fewer_blocks_than_rows():
    """256 KiB rows (V = 131072 bf16): the fused kernel's grid is sized to the L2 (about 100 blocks on an H100),
    so each block strides over several of the 300 rows."""
    hidden, weight, target, gw = make_case(300, 64, 131072, seed=34, dtype=torch.bfloat16, n_ignored=7,
                                           device="cuda")
    check_against_reference(hidden, weight, target, "mean", gw, 1e-2, "cuda/bf16/long-rows", backend="native")


@needs_cuda
def test_cuda_accumulating_gemm_tuned_on_the_first_chunk(monkeypatch):
    """Later chunks' bf16 d(weight) updates (beta = 1) use a kernel timed on the first chunk's d(weight) buffer
    before that chunk overwrites it: the call that tunes (a shape no other test uses) must give exactly what the
    cached choice gives afterwards, and both the float64 reference; with tuning off (ATen) too."""
    hidden, weight, target, gw = make_case(1000, 384, 6016, seed=36, dtype=torch.bfloat16, n_ignored=25,
                                           device="cuda")
    kwargs = dict(chunk_size=200, fp32_weight_grad=False, backend="native")
    tuning_call = run_op(hidden, weight, target, "sum", gw, **kwargs)
    cached_call = run_op(hidden, weight, target, "sum", gw, **kwargs)
    for name, a, b in zip(("loss", "d(hidden)", "d(weight)"), tuning_call, cached_call):
        assert torch.equal(a, b), f"the tuning call's {name} differs from the cached call's"
    check_against_reference(hidden, weight, target, "sum", gw, 1e-2, "cuda/bf16/tuned-accumulate", **kwargs)
    monkeypatch.setenv("MTP_GEMM_AUTOTUNE", "0")
    check_against_reference(hidden, weight, target, "sum", gw, 1e-2, "cuda/bf16/untuned-accumulate", **kwargs)


@needs_cuda
def test_cuda_shared_memory_row_kernel_matches_the_rereading_one(monkeypatch):
    """Rows that fit in shared memory (bf16 V = 32000: 62.5 KiB) are read once and parked there; the result must
    be bit-identical to the kernel that reads each row twice (MTP_CE_ROW_KERNEL=reread), ignored rows included."""
    dtype = torch.bfloat16
    hidden, weight, target, gw = make_case(700, 64, 32000, seed=37, dtype=dtype, n_ignored=30, device="cuda")
    kwargs = dict(fp32_weight_grad=False, backend="native")
    parked = run_op(hidden, weight, target, "mean", gw, **kwargs)
    monkeypatch.setenv("MTP_CE_ROW_KERNEL", "reread")
    reread = run_op(hidden, weight, target, "mean", gw, **kwargs)
    for name, a, b in zip(("loss", "d(hidden)", "d(weight)"), parked, reread):
        assert torch.equal(a, b), f"the shared-memory row kernel changed {name}"
    ref = float64_reference(hidden, weight, target, "mean", gw)
    for name, a, e in zip(("loss", "d(hidden)", "d(weight)"), parked, ref):
        assert_rel_close(a, e, TOL[dtype], f"cuda/{dtype}/smem-rows {name}")


@needs_cuda
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 32000), (torch.bfloat16, 100008), (torch.bfloat16, 131072),
                                         (torch.float32, 131072)],
                         ids=["fp32-32000-2blocks", "bf16-100008-4blocks-short-last", "bf16-131072-4blocks",
                              "fp32-131072-8blocks"])
def test_cuda_cluster_row_kernel(monkeypatch, dtype, vocab):
    """Rows too long for one block's shared memory are split over a 2-, 4- or 8-block cluster, each block parking
    its slice; the blocks exchange partial statistics through distributed shared memory. Against float64, and
    against the re-reading kernel to rounding: the merge order differs, so agreement is close, not bit-exact.
    V = 100008 leaves the last block a shorter slice; 300 rows exceed the resident clusters, so clusters stride."""
    hidden, weight, target, gw = make_case(300, 64, vocab, seed=38, dtype=dtype, n_ignored=11, device="cuda")
    kwargs = dict(fp32_weight_grad=False, backend="native")
    clustered = run_op(hidden, weight, target, "mean", gw, **kwargs)
    ref = float64_reference(hidden, weight, target, "mean", gw)
    for name, a, e in zip(("loss", "d(hidden)", "d(weight)"), clustered, ref):
        assert_rel_close(a, e, TOL[dtype], f"cuda/{dtype}/V={vocab}/cluster {name}")
    monkeypatch.setenv("MTP_CE_ROW_KERNEL", "reread")
    reread = run_op(hidden, weight, target, "mean", gw, **kwargs)
    close = 1e-6 if dtype == torch.float32 else 1e-3
    for name, a, b in zip(("loss", "d(hidden)", "d(weight)"), clustered, reread):
        assert_rel_close(a, b, close, f"cluster vs re-reading kernel, {name}")


@needs_cuda
def test_cuda_gemm_candidate_timing_diagnostic():
    """tools/probe_gemm_tuning.py's binding: one finite time per cuBLASLt candidate plus ATen's last, and the
    product it leaves in `out` is the product (every candidate computes the same GEMM)."""
    from megatron_mtp import _C

    a = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16).t()
    out = torch.empty(256, 64, device="cuda", dtype=torch.bfloat16)
    times = _C.time_gemm_candidates(out, a, b, 2, 2)
    assert len(times) >= 1 and all(t > 0 for t in times) and any(t != float("inf") for t in times)
    assert_rel_close(out, (a.double() @ b.double()), 1e-2, "GEMM left by the timing")
    with pytest.raises(RuntimeError, match="calls and rounds must be positive"):
        _C.time_gemm_candidates(out, a, b, 0, 1)
