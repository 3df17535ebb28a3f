"""The compiled master-weight optimizer step (``MasterWeightAdamW(compiled_step=True)``, ``train.compile``'s
optimizer) against today's eager path: torch's AdamW on fp32 masters, then a bf16 copy.

Tolerance: masters within rtol 1e-6, atol 1e-7 of the eager path (the compiled step computes the bias
corrections in fp32 on the device, as torch's capturable AdamW does; the eager one in doubles on the host),
gradient norms within rtol 1e-6; Adam moments within rtol 1e-6 and an atol of 1e-6 times the moment's largest
magnitude (inductor's lerp and fused multiply-adds round differently from ATen's: a few ulps near
cancellation); the bf16 parameters equal the masters rounded, exactly. Inductor compiles for the CPU here; each
distinct parameter list compiles once (seconds).
"""
import copy
import io

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_mtp.config import Config, ModelConfig, OptimizerConfig
from megatron_mtp.training.master_weights import MasterWeightAdamW

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def tiny_model(width: int = 24) -> torch.nn.Module:
    """Matrices (weight decay) and vectors (none): both parameter groups."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.LayerNorm(width),
                               torch.nn.Linear(width, 8)).to(torch.bfloat16)


def optimizers(width: int = 24):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    model = tiny_model(width)
    return (MasterWeightAdamW(copy.deepcopy(model), cfg, CPU),
            MasterWeightAdamW(model, cfg, CPU, compiled_step=True))


def backward(opt: MasterWeightAdamW, grads: list, last: bool) -> None:
    """What backward leaves in the bf16 parameters' ``.grad``, then the engine's per-micro-batch fold."""
    for p, g in zip(opt.params, grads):
        p.grad = g.clone()
    opt.accumulate_grads(last=last)


def assert_same(ref: MasterWeightAdamW, opt: MasterWeightAdamW) -> None:
    for a, b in zip(ref.masters, opt.masters):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            want = ref.state[a][key]
            torch.testing.assert_close(opt.state[b][key], want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        assert float(opt.state[b]["step"]) == float(ref.state[a]["step"])
    for p, m in zip(opt.params, opt.masters):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))


def train(ref, opt, steps: int, micro_batches: int, first_step: int = 0, skip_at: int = -1) -> None:
    """The engine's step for both optimizers on the same gradients: an LR schedule, clipping active on odd
    steps (max norm 0.5 against norms of ~25) and inactive on even ones, a skipped step at ``skip_at``."""
    gen = torch.Generator().manual_seed(first_step)
    for step in range(first_step, first_step + steps):
        micro = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in ref.params]
                 for _ in range(micro_batches)]
        norms = []
        for o in (ref, opt):
            o.zero_grad()
            for i, grads in enumerate(micro):
                backward(o, grads, last=i == micro_batches - 1)
            norms.append(o.clip_grad_norm_(0.5 if step % 2 else 100.0))
        if micro_batches == 1 and opt.compiled_step is not None:  # no fp32 copy of the bf16 gradients
            assert all(m.grad is None for m in opt.masters)
            assert all(p.grad is not None for p in opt.params)
            assert all(g.dtype == torch.bfloat16 for g in (t.grad for t in opt.grad_view.parameters()))
        else:
            assert all(m.grad is not None and p.grad is None for p, m in zip(opt.params, opt.masters))
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
        for o in (ref, opt):
            if step == skip_at:  # LocalEngine's non-finite path: drop the gradients, no update
                o.zero_grad()
                continue
            for group in o.param_groups:
                group["lr"] = 1e-2 * (1 + step) / (4 + step)
            o.step()
        assert_same(ref, opt)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_compiled_step_matches_eager_and_never_recompiles(micro_batches):
    ref, opt = optimizers()
    train(ref, opt, 1, micro_batches)  # compiles (or reuses this parameter list's graph)
    assert opt.compiled_step is not None
    graphs = counters["stats"]["unique_graphs"]
    train(ref, opt, 4, micro_batches, first_step=1, skip_at=2)  # a new lr and step count every step
    assert counters["stats"]["unique_graphs"] == graphs, "the LR schedule or the step count recompiled the step"
    assert opt.compiled_step is not None  # no fallback happened
    assert float(opt.state[opt.masters[0]]["step"]) == 4  # 5 steps, one skipped


def saved(sd: dict) -> dict:
    """``sd`` through a checkpoint file (a state dict holds the optimizer's live tensors)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_is_torch_adamw_and_resumes_both_ways():
    ref, opt = optimizers()
    train(ref, opt, 2, 1)
    sd_ref, sd = ref.state_dict(), opt.state_dict()
    assert sd.keys() == sd_ref.keys() == {"state", "param_groups", "master_weights"}
    assert sd["param_groups"] == sd_ref["param_groups"]
    assert {i: set(s) for i, s in sd["state"].items()} == {i: set(s) for i, s in sd_ref["state"].items()}
    # a compiled-step checkpoint resumes on the eager path and an eager one on the compiled path
    ref2, opt2 = optimizers()
    ref2.load_state_dict(saved(sd))
    opt2.load_state_dict(saved(sd_ref))
    assert_same(ref, ref2)
    assert_same(ref, opt2)
    train(ref, opt2, 2, 1, first_step=2)
    train(ref2, opt, 2, 1, first_step=2)
    assert_same(ref2, opt2)


def test_engine_with_train_compile_uses_the_compiled_step():
    from megatron_mtp.model.mtp_model import MTPModel
    from megatron_mtp.parallel.layers import initialize_parameters
    from megatron_mtp.training.local_engine import LocalEngine

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                            ffn_hidden_size=64, make_vocab_size_divisible_by=64)
    cfg.mtp.n_heads = 2
    cfg.optimizer.warmup_iters = 2
    cfg.train.iters = 6
    model = MTPModel(cfg.model, cfg.mtp)
    initialize_parameters(model, 3)
    ref = LocalEngine(copy.deepcopy(model), cfg, CPU, torch.bfloat16, master_weights=True)
    cfg.train.compile = True  # the model itself stays eager: only the optimizer step is compiled here
    assert LocalEngine(copy.deepcopy(model), cfg, CPU, torch.bfloat16, master_weights=True) \
        .optimizer.compiled_step is None  # off by default (not yet timed on a GPU)
    cfg.optimizer.compiled_step = True  # the switch
    eng = LocalEngine(model, cfg, CPU, torch.bfloat16, master_weights=True)
    assert ref.optimizer.compiled_step is None and eng.optimizer.compiled_step is not None
    gen = torch.Generator().manual_seed(0)
    for step, micro_batches in enumerate((1, 1, 2, 1)):
        # each step from the same state: a master one fp32 ulp apart can round to another bf16 weight
        ref.load_state_dict(saved(eng.state_dict()))
        mbs = [torch.randint(0, 64, (2, 9), generator=gen) for _ in range(micro_batches)]
        r_ref, r = ref.train_step(mbs, step), eng.train_step(mbs, step)
        torch.testing.assert_close(r.loss, r_ref.loss, rtol=0, atol=0)  # the same weights: the same forward
        torch.testing.assert_close(r.grad_norm, r_ref.grad_norm, rtol=1e-6, atol=0)
        assert_same(ref.optimizer, eng.optimizer)
    assert eng.optimizer.compiled_step is not None


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    ref, opt = optimizers(width=20)  # shapes no other test compiled, so the step must compile now
    with pytest.warns(RuntimeWarning, match=r"^the compiled optimizer step failed \(.*no compiler here\), so "
                                            r"this run uses torch's AdamW and a separate bf16 copy instead") as rec:
        train(ref, opt, 1, 1)
    assert len(rec) == 1 and opt.compiled_step is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        train(ref, opt, 2, 1, first_step=1)


def test_memory_planner_counts_bf16_gradients_with_the_compiled_step():
    from megatron_mtp.training import memory_model as mm

    cfg = Config()

    def after_backward(**kw) -> dict:  # a tiny batch: the peak is after the backward, every gradient alive
        stage = max(mm.estimate(cfg, mm.Layout(micro_batch=1, seq_length=16, precision="bf16_master", **kw)),
                    key=lambda s: s.total)
        assert stage.phase == "after_backward"
        return {k: v / stage.params for k, v in stage.bytes.items() if k in ("weights", "master", "grads")}

    assert after_backward(compiled=True, compiled_step=True) == {"weights": 2, "master": 4, "grads": 2}
    assert after_backward(compiled=True, compiled_step=True, grad_accum=2)["grads"] == 4  # fp32 accumulation stays
    assert after_backward(compiled=True)["grads"] == 4  # the default: torch's AdamW on fp32 gradients
    assert after_backward(compiled=False)["grads"] == 4
