"""Tensor and sequence parallelism against one process (gloo on CPU, float32, tiny shapes).

One spawned process group per world size (a module-scoped fixture; spawning costs seconds on busy cores)
runs every check and each claim is its own test: for TP = 2 (grouped-query attention, 2 KV heads: one KV
group per rank) and TP = 4 (4 KV heads), with and without sequence parallelism, with 1 and 4 heads,
through both the memory-efficient and the plain MTP loss (linear heads and tied embeddings once), the
loss, every gradient and the logits equal the TP=1 model's from the same seed and batch within 1e-5
relative; init equals TP=1 init shard by shard; dropout keeps the replicated stream identical across TP
ranks while TP regions draw per-rank masks, and activation checkpointing replays them; the vocab-parallel
cross-entropies equal ``F.cross_entropy`` on the gathered logits. Invalid layouts each give their one
sentence without spawning anything.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_distributed
from megatron_mtp.config import Config, ConfigError, load_config, validate, validate_layout
from megatron_mtp.model.mtp_loss import IGNORE
from megatron_mtp.model.mtp_model import MTPModel
from megatron_mtp.parallel import state
from megatron_mtp.parallel.layers import initialize_parameters, shard_of, unshard
from megatron_mtp.parallel.random import get_rng_tracker, model_parallel_seed
from megatron_mtp.parallel.state import LayoutError
from megatron_mtp.training.grads import allreduce_sequence_parallel_grads

VOCAB, SEQ, BATCH, SEED = 100, 16, 2, 11
RTOL = 1e-5

# (sequence_parallel, n_heads, head_type, memory_efficient, extra model keys): both SP settings x n in {1, 4},
# each through both loss paths; linear heads once; tied embeddings once.
CASES = [
    (False, 1, "transformer", True, {}),
    (False, 1, "transformer", False, {}),
    (False, 4, "transformer", True, {}),
    (False, 4, "transformer", False, {}),
    (True, 1, "transformer", True, {}),
    (True, 1, "transformer", False, {}),
    (True, 4, "transformer", True, {}),
    (True, 4, "transformer", False, {}),
    (True, 2, "linear", True, {}),
    (False, 2, "transformer", True, {"tie_embeddings": True}),
]


def tiny_cfg(tp=1, kv_heads=4, sequence_parallel=False, n_heads=1, head_type="transformer",
             memory_efficient=True, **model) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads = VOCAB, 64, 5, 4, kv_heads
    m.ffn_hidden_size, m.make_vocab_size_divisible_by, m.max_seq_length = 128, 8, 64  # vocab 100 pads
    for key, value in model.items():
        setattr(m, key, value)
    cfg.mtp.n_heads, cfg.mtp.head_type, cfg.mtp.memory_efficient = n_heads, head_type, memory_efficient
    cfg.mtp.loss_weights = [1.0 / (i + 1) for i in range(n_heads)]  # non-trivial weights
    cfg.parallel.tp, cfg.parallel.sequence_parallel = tp, sequence_parallel
    cfg.data.seq_length = SEQ
    validate(cfg)
    return cfg


def build(cfg, activation_checkpointing="none") -> MTPModel:
    model = MTPModel(cfg.model, cfg.mtp, sequence_parallel=cfg.parallel.sequence_parallel,
                     activation_checkpointing=activation_checkpointing, dtype=torch.float32)
    initialize_parameters(model, SEED)
    return model


def batch(seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


single_process = state.single_process_layout  # TP=1 references inside the TP world


def loss_and_grads(model, tokens) -> tuple:
    model.zero_grad(set_to_none=True)
    loss, per_head = model(tokens)
    loss.backward()
    allreduce_sequence_parallel_grads(model)  # the engine's step: norm grads summed over TP under SP
    return loss.detach(), per_head, {name: p.grad for name, p in model.named_parameters()}


def gather_full(tensors: dict, params: dict) -> dict:
    """TP-sharded tensors (grads) as TP=1 tensors via ``layers.unshard``: one all-gather of them all
    (one collective per tensor would cost seconds with 4 ranks on 2 busy cores)."""
    tp = state.tp_size()
    sharded = [n for n in tensors if tp > 1 and getattr(params[n], "partition_dim", -1) >= 0]
    full = {n: t for n, t in tensors.items() if n not in sharded}
    if sharded:
        flat = torch.cat([tensors[n].reshape(-1) for n in sharded])
        parts = [torch.empty_like(flat) for _ in range(tp)]
        dist.all_gather(parts, flat, group=state.tp_group())
        pieces = [p.split([tensors[n].numel() for n in sharded]) for p in parts]
        for i, n in enumerate(sharded):
            full[n] = unshard([p[i].view_as(tensors[n]) for p in pieces], params[n])
    return full


def assert_close(actual, expected, what):
    """Elementwise within RTOL of the value, or of the tensor's scale for entries near zero. (Not
    torch.testing.assert_close: its first call costs about a CPU-second of imports in every process.)"""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    diff = (actual - expected).abs()
    allowed = RTOL * (expected.abs() + expected.abs().max())
    bad = ~(diff <= allowed)  # NaN counts as bad
    if bad.any():
        worst = torch.where(bad, diff.nan_to_num(float("inf")), 0.0).argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, diff.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} of {diff.numel()} entries differ; at {index} got "
                             f"{actual[index].item():.8g}, expected {expected[index].item():.8g} "
                             f"(allowed difference {allowed[index].item():.3g})")


def compare_to_reference(tp_model, tp_grads, ref_grads):
    assert tp_grads.keys() == ref_grads.keys()
    params = dict(tp_model.named_parameters())
    for name, full in gather_full(tp_grads, params).items():
        ref = ref_grads[name]
        if getattr(params[name], "logical_size", None) is not None:  # padded vocabulary: the real rows
            assert not full[VOCAB:].any() and not ref[VOCAB:].any(), f"{name}: gradient in vocabulary padding"
            full, ref = full[:VOCAB], ref[:VOCAB]
        assert_close(full, ref, f"grad of {name}")


# ---------------------------------------------------------------------------------------------------------
# Checks run inside one process group


def check_init_equals_tp1(tp, kv_heads):
    """TP=k init equals TP=1 init shard by shard (vocabulary padding aside, which is zero)."""
    cfg = tiny_cfg(tp, kv_heads, n_heads=4)
    with single_process():
        ref = dict(build(tiny_cfg(1, kv_heads, n_heads=4)).named_parameters())
    model = build(cfg)
    for name, param in model.named_parameters():
        master = ref[name].detach()
        if getattr(param, "logical_size", None) is not None:
            padded = torch.zeros(param.shape[0] * tp, master.shape[1])
            padded[:VOCAB] = master[:VOCAB]
            assert not master[VOCAB:].any(), name
            master = padded
        assert torch.equal(param.detach(), shard_of(master, param, tp, state.tp_rank())), name


def check_case(tp, kv_heads, sequence_parallel, n_heads, head_type, memory_efficient, extra):
    """Loss, per-head losses, every gradient and the inference logits of every head equal TP=1's."""
    tokens = batch()
    kwargs = dict(kv_heads=kv_heads, sequence_parallel=sequence_parallel, n_heads=n_heads,
                  head_type=head_type, memory_efficient=memory_efficient, **extra)
    with single_process():
        ref_model = build(tiny_cfg(1, **kwargs))
        ref_loss, ref_heads, ref_grads = loss_and_grads(ref_model, tokens)
        ref_logits = ref_model.logits(tokens[:, :-1], heads="all")
    model = build(tiny_cfg(tp, **kwargs))
    loss, heads, grads = loss_and_grads(model, tokens)
    what = f"tp={tp} sp={sequence_parallel} n={n_heads} {head_type} memory_efficient={memory_efficient} {extra}"
    assert_close(loss, ref_loss, f"{what}: loss")
    assert_close(heads, ref_heads, f"{what}: per-head losses")
    try:
        compare_to_reference(model, grads, ref_grads)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None
    for i, (got, ref) in enumerate(zip(model.logits(tokens[:, :-1], heads="all"), ref_logits)):
        assert got.shape == ref.shape == (BATCH, SEQ, VOCAB)
        assert_close(got, ref, f"{what}: logits of head {i + 1}")


def all_equal_over_tp(tensor) -> bool:
    parts = [torch.empty_like(tensor) for _ in range(state.tp_size())]
    dist.all_gather(parts, tensor.contiguous(), group=state.tp_group())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def check_rng_streams(tp):
    """The default stream agrees over TP, the tracker's stream differs per TP rank, a fork leaves the
    default stream where it was, and replicated activations stay identical under dropout."""
    model_parallel_seed(SEED)
    with get_rng_tracker().fork():
        in_fork = torch.rand(8)
    outside = torch.rand(8)
    assert all_equal_over_tp(outside)
    assert not all_equal_over_tp(in_fork)
    cfg = tiny_cfg(tp, n_heads=1, hidden_dropout=0.2, attention_dropout=0.2)
    model = build(cfg).train()
    model_parallel_seed(SEED)
    inputs = batch()[:, :-1]
    cos, sin = model.rope(torch.arange(SEQ), torch.float32)
    z = model.trunk_forward(inputs, cos, sin)
    assert all_equal_over_tp(z.detach()), "the replicated residual stream diverged across TP ranks"
    with torch.no_grad():
        assert not torch.equal(z, model.eval().trunk_forward(inputs, cos, sin)), "dropout did nothing"


def check_vocab_parallel_cross_entropy(tp, multiple, masked):
    """The reference vocab-parallel CE equals F.cross_entropy on the gathered logits (values and grads), with
    ignored targets and a vocabulary of 100 padded to a multiple of ``multiple`` x tp; the padded columns
    hold ordinary logits, or -inf when ``masked`` (compared with F.cross_entropy over the real vocabulary)."""
    from megatron_mtp.ops.reference import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, VOCAB, (12,), generator=gen)
    target[[2, 7]] = IGNORE
    padded = tiny_cfg(tp, make_vocab_size_divisible_by=multiple).model.padded_vocab_size(tp)
    assert padded > VOCAB
    real = VOCAB if masked else padded
    full = torch.randn(12, padded, generator=gen) * 3
    full[:, real:] = float("-inf")
    local = full.chunk(tp, dim=1)[state.tp_rank()].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, state.tp_group(), IGNORE)
    loss.sum().backward()
    ref_logits = full[:, :real].clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, target, ignore_index=IGNORE, reduction="none")
    ref.sum().backward()
    what = f"vocab-parallel CE, vocabulary {VOCAB} padded to {padded}, {padded - real} columns masked"
    assert_close(loss, ref, what)
    ref_grad = torch.cat([ref_logits.grad, torch.zeros(12, padded - real)], dim=1)
    assert_close(local.grad, ref_grad.chunk(tp, dim=1)[state.tp_rank()], f"{what}: grad")


def check_linear_cross_entropy_masks_padding(tp, sequence_parallel):
    """The fused op with ``vocab_size=`` equals F.cross_entropy over the real vocabulary (loss, d(hidden),
    d(weight)), for padding to a multiple of 8 x tp and of 128 x tp (whole shards of padding)."""
    from megatron_mtp.ops.linear_cross_entropy import linear_cross_entropy

    gen = torch.Generator().manual_seed(4)
    rank = state.tp_rank()
    for multiple in (8, 128):
        padded = tiny_cfg(tp, make_vocab_size_divisible_by=multiple).model.padded_vocab_size(tp)
        hidden = torch.randn(BATCH * SEQ, 64, generator=gen)
        weight = torch.randn(padded, 64, generator=gen) * 0.3
        target = torch.randint(0, VOCAB, (BATCH * SEQ,), generator=gen)
        target[[1, 5]] = IGNORE
        rows = hidden.chunk(tp, dim=0)[rank] if sequence_parallel else hidden
        h = rows.clone().requires_grad_(True)
        w = weight.chunk(tp, dim=0)[rank].clone().requires_grad_(True)
        total = linear_cross_entropy(h, w, target, tp_group=state.tp_group(), ignore_index=IGNORE,
                                     reduction="sum", sequence_parallel=sequence_parallel, vocab_size=VOCAB)
        total.backward()
        h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ref = F.cross_entropy(h_ref @ w_ref[:VOCAB].t(), target, ignore_index=IGNORE, reduction="sum")
        ref.backward()
        what = f"linear CE, vocabulary {VOCAB} padded to {padded}"
        assert_close(total, ref, what)
        ref_h = h_ref.grad.chunk(tp, dim=0)[rank] if sequence_parallel else h_ref.grad
        assert_close(h.grad, ref_h, f"{what}: d(hidden)")
        assert_close(w.grad, w_ref.grad.chunk(tp, dim=0)[rank], f"{what}: d(weight)")


def _tp_worker(rank, world_size, kv_heads) -> dict:
    """Every check in one process group (spawning costs seconds); returns {check: None or its failure}, so
    one broken piece hides no other and each claim is its own test below."""
    state.initialize_model_parallel(world_size, 1)
    checks = {"init": (check_init_equals_tp1, (world_size, kv_heads))}
    checks.update({f"model {case}": (check_case, (world_size, kv_heads, *case)) for case in CASES})
    checks["rng streams"] = (check_rng_streams, (world_size,))
    checks.update({f"vocab-parallel CE {m} {masked}": (check_vocab_parallel_cross_entropy, (world_size, m, masked))
                   for m in (8, 128) for masked in (False, True)})
    checks.update({f"linear CE {sp}": (check_linear_cross_entropy_masks_padding, (world_size, sp))
                   for sp in (False, True)})
    results = {}
    try:
        for name, (check, args) in checks.items():
            try:
                check(*args)
                results[name] = None
            except Exception as exc:  # noqa: BLE001 - reported by the test owning the check
                results[name] = f"[rank {rank}] {name}: {type(exc).__name__}: {exc}"
    finally:
        state.destroy_model_parallel()
        get_rng_tracker().reset()
    return results


@pytest.fixture(scope="module", params=[(2, 2), (4, 4)], ids=["tp2-gqa", "tp4"])
def tp_results(request) -> dict:
    """TP=2 with grouped-query attention (2 KV heads: one KV group per rank) and TP=4 (4 KV heads)."""
    tp, kv_heads = request.param
    merged: dict = {}
    for rank_results in run_distributed(_tp_worker, tp, kv_heads):
        for name, failure in rank_results.items():
            merged[name] = merged.get(name) or failure
    return merged


def _assert_passed(results: dict, prefix: str) -> None:
    names = [name for name in results if name.startswith(prefix)]
    assert names, prefix
    failures = [results[name] for name in names if results[name]]
    assert not failures, "\n".join(failures)


def test_tp_init_equals_tp1_shard_by_shard(tp_results):
    _assert_passed(tp_results, "init")


def test_tp_loss_gradients_and_logits_equal_tp1(tp_results):
    _assert_passed(tp_results, "model ")


def test_dropout_streams_over_tp(tp_results):
    _assert_passed(tp_results, "rng streams")


def test_fused_linear_cross_entropy_masks_vocab_padding(tp_results):
    _assert_passed(tp_results, "linear CE")


def test_reference_vocab_parallel_cross_entropy(tp_results):
    _assert_passed(tp_results, "vocab-parallel CE 8 ")
    _assert_passed(tp_results, "vocab-parallel CE 128 False")
    _assert_passed(tp_results, "vocab-parallel CE 128 True")  # a TP rank whose whole shard is padding


# ---------------------------------------------------------------------------------------------------------
# Single-process checks


def test_fork_leaves_the_default_stream_untouched():
    model_parallel_seed(5)
    expected = torch.rand(4), torch.rand(4)
    model_parallel_seed(5)
    first = torch.rand(4)
    with get_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(first, expected[0]) and torch.equal(torch.rand(4), expected[1])
    assert not torch.equal(forked, expected[1])
    get_rng_tracker().reset()


def test_checkpointing_replays_dropout():
    """Recomputation under activation checkpointing redraws the same masks, the tracker's (attention
    dropout) included: loss and grads equal the run without checkpointing. One process: the replay does
    not depend on tp, and torch's checkpoint imports torch._dynamo (seconds) in every process using it."""
    cfg = tiny_cfg(n_heads=1, hidden_dropout=0.2, attention_dropout=0.2)
    tokens = batch(1)
    results = []
    for setting in ("full", "none"):
        model = build(cfg, activation_checkpointing=setting).train()
        model_parallel_seed(SEED)
        results.append(loss_and_grads(model, tokens))
    (loss_ckpt, _, grads_ckpt), (loss_plain, _, grads_plain) = results
    assert torch.equal(loss_ckpt, loss_plain)
    for name in grads_plain:
        assert_close(grads_ckpt[name], grads_plain[name], f"checkpointed grad of {name}")
    get_rng_tracker().reset()


def test_world_size_not_divisible_by_tp_times_pp():
    cfg = tiny_cfg()
    cfg.parallel.tp, cfg.parallel.pp = 4, 1
    with pytest.raises(ConfigError, match=r"^the world size \(6\) must be divisible by parallel.tp x "
                                          r"parallel.pp \(4 x 1\)\.$"):
        validate_layout(cfg, 6)
    with pytest.raises(LayoutError, match=r"^the world size \(1\) must be divisible by parallel.tp x "
                                          r"parallel.pp \(2 x 1\)\.$"):
        state.initialize_model_parallel(2, 1)  # no process group: a world of one


@pytest.mark.parametrize("overrides,tp,message", [
    (["--model.num_attention_heads", "6", "--model.num_kv_heads", "6", "--model.hidden_size", "48"], 4,
     r"parallel.tp \(4\) must divide model.num_attention_heads \(6\)."),
    (["--model.num_kv_heads", "2"], 4, r"parallel.tp \(4\) must divide model.num_kv_heads \(2\)."),
    (["--model.ffn_hidden_size", "102"], 4, r"parallel.tp \(4\) must divide .*ffn.* \(102\)."),
])
def test_tp_must_divide_what_it_shards(overrides, tp, message):
    base = ["--model.hidden_size", "64", "--model.num_attention_heads", "4", "--model.num_kv_heads", "4",
            "--model.ffn_hidden_size", "128", "--model.num_layers", "5", "--mtp.n_heads", "1"]
    with pytest.raises(ConfigError, match=r"^" + message + r"$"):  # the config catches it first ...
        load_config(None, base + overrides + ["--parallel.tp", str(tp)])
    cfg = load_config(None, base + overrides)
    with pytest.raises(LayoutError, match=r"^" + message + r"$"):  # ... and the model layout check too
        state.check_model_layout(cfg.model, tp)


def test_padded_vocabulary_and_sequence_layout_errors():
    # Config padding makes the vocabulary a multiple of tp by construction; the check guards other callers.
    odd = SimpleNamespace(num_attention_heads=4, kv_heads=4, ffn_size=128, padded_vocab_size=lambda tp: 102)
    with pytest.raises(LayoutError, match=r"^parallel.tp \(4\) must divide the padded vocabulary .*\(102\)\.$"):
        state.check_model_layout(odd, 4)
    assert tiny_cfg().model.padded_vocab_size(4) % 4 == 0
    with pytest.raises(LayoutError, match=r"^parallel.tp \(4\) must divide data.seq_length \(18\) under "
                                          r"parallel.sequence_parallel\.$"):
        state.check_model_layout(tiny_cfg().model, 4, seq_length=18, sequence_parallel=True)
    state.check_model_layout(tiny_cfg().model, 4, seq_length=18, sequence_parallel=False)


def test_dropout_probability_is_checked():
    with pytest.raises(ConfigError, match=r"^model.hidden_dropout must lie in \[0, 1\), got 1.0\.$"):
        tiny_cfg(hidden_dropout=1.0)  # the config's range check
    cfg = tiny_cfg()
    cfg.model.hidden_dropout = 1.0  # past validation: the layer checks again
    with pytest.raises(ConfigError, match=r"^model.hidden_dropout must lie in \[0, 1\), got 1.0\.$"):
        MTPModel(cfg.model, cfg.mtp)


@pytest.mark.parametrize("name", ["copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region",
                                  "gather_from_tp_region", "scatter_to_sequence_region",
                                  "gather_from_sequence_region", "reduce_scatter_to_sequence_region"])
def test_mappings_stay_out_of_torch_compile_graphs(name, monkeypatch):
    """train.compile compiles each TransformerLayer. Traced into the compiled graphs, the TP/SP collectives lost
    gradients over NCCL (TP = 2 + SP: step-1 grad norm 25.8 against 206.7; benchmarks/tp_compile_check_2xh100.json),
    which gloo on CPU does not reproduce; so with TP > 1 every mapping must be a graph break that runs eagerly.
    At TP = 1 a mapping is the identity and no break at all (a compiled layer stays one graph)."""
    from megatron_mtp.parallel import mappings

    mapping = getattr(mappings, name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: torch.cos(mapping(torch.sin(x))))(torch.randn(2, 4, 6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    monkeypatch.setattr(mappings.state, "tp_size", lambda: 2)  # the eager call itself sees no group: identity
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: torch.cos(mapping(torch.sin(x))))(torch.randn(2, 4, 6))
    assert explanation.graph_break_count == 1, explanation.break_reasons
    assert "disable" in str(explanation.break_reasons[0].reason)
