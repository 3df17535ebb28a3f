"""Self-speculative decoding with the MTP heads: greedy output identical to plain greedy (k = 2..n, batch 1
and 4 with prompts of different lengths, per-sequence acceptance and rollback), and speculative sampling
distributed exactly as plain sampling from head 1 — a chi-square test against the exact distribution of
the first three tokens, powerful enough to reject deliberately wrong acceptance rules."""

import numpy as np
import pytest
import torch
from scipy import stats as sstats

from megatron_mtp.config import ModelConfig, MTPConfig
from megatron_mtp.inference import SamplingParams, generate, probabilities
from megatron_mtp.inference import generation as gen_mod
from megatron_mtp.inference.sampling import sample
from megatron_mtp.model.mtp_model import MTPModel
from megatron_mtp.parallel.layers import initialize_parameters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(vocab, n_heads, layers, seed, sharpen, dtype=torch.float64, hidden=32):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=2 * hidden, make_vocab_size_divisible_by=8)
    model = MTPModel(cfg, MTPConfig(n_heads=n_heads), dtype=dtype)
    initialize_parameters(model, seed)
    with torch.no_grad():
        model.output.output_weight.mul_(sharpen)
    return model.eval()


def prompts_of(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------------
# Greedy: lossless


@pytest.mark.parametrize("lengths", [[6], [3, 9, 1, 6]], ids=["batch1", "batch4"])
def test_greedy_speculative_equals_plain_greedy(lengths):
    n = 4
    model = tiny_model(vocab=5, n_heads=n, layers=6, seed=3, sharpen=20.0)
    prompts = prompts_of(lengths, 5, seed=len(lengths))
    plain = generate(model, prompts, 24)
    accepted = proposed = 0
    for k in range(2, n + 1):
        spec = generate(model, prompts, 24, heads=k)
        assert spec.tokens == plain.tokens, f"k={k}"
        assert spec.stats.tokens == plain.stats.tokens
        assert spec.stats.forwards <= plain.stats.forwards
        accepted += sum(spec.stats.accepted)
        proposed += sum(spec.stats.proposed)
    assert 0 < accepted < proposed  # both accepted and rejected drafts were exercised (rollback)
    # With an EOD token in play (sequences stop at different forwards), still identical.
    eod = plain.tokens[0][5]
    plain_eod = generate(model, prompts, 24, eod=eod)
    for k in range(2, n + 1):
        spec = generate(model, prompts, 24, heads=k, eod=eod)
        assert spec.tokens == plain_eod.tokens and spec.finished_by_eod == plain_eod.finished_by_eod


def test_per_sequence_acceptance_lengths_differ_in_a_batch(monkeypatch):
    model = tiny_model(vocab=5, n_heads=3, layers=5, seed=1, sharpen=20.0)
    prompts = prompts_of([2, 7, 4, 5], 5, seed=9)
    seen = []
    original = gen_mod.verify_greedy

    def spy(logits1, drafts):
        a, y = original(logits1, drafts)
        seen.append(a.tolist())
        return a, y

    monkeypatch.setattr(gen_mod, "verify_greedy", spy)
    out = generate(model, prompts, 20, heads=3)
    monkeypatch.undo()
    assert out.tokens == generate(model, prompts, 20).tokens
    assert any(len(set(step)) > 1 for step in seen)  # sequences advanced by different amounts


def test_heads_must_not_exceed_n():
    model = tiny_model(vocab=5, n_heads=2, layers=4, seed=0, sharpen=1.0)
    with pytest.raises(ValueError, match="1..2"):
        generate(model, [[1, 2]], 4, heads=3)


# ---------------------------------------------------------------------------------------------------------
# Sampling: exact in distribution

VOCAB, N_HEADS, NEW = 8, 3, 3
PROMPT = [1, 5, 2, 7]


@pytest.fixture(scope="module")
def sampling_model():
    return tiny_model(vocab=VOCAB, n_heads=N_HEADS, layers=4, seed=12, sharpen=15.0, hidden=16)


def exact_joint(model, params):
    """P(t1, t2, t3) of plain sampling from head 1: 512 cells, from full forwards over all prefixes."""
    seqs = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])  # [64, 6]
    p = probabilities(model.logits(seqs)[0], params).double()  # [64, 6, V]
    p1 = p[0, len(PROMPT) - 1]  # [V]
    p2 = p[:: VOCAB, len(PROMPT)]  # [V(a), V]
    p3 = p[:, len(PROMPT) + 1].view(VOCAB, VOCAB, VOCAB)
    return (p1[:, None, None] * p2[:, :, None] * p3).numpy().ravel()


def chi_square_pvalue(tokens, expected_probs):
    codes = [a * VOCAB * VOCAB + b * VOCAB + c for a, b, c in tokens]
    observed = np.bincount(codes, minlength=VOCAB ** 3).astype(float)
    expected = expected_probs / expected_probs.sum() * len(codes)  # (probabilities are float32)
    if observed[expected == 0].sum():
        return 0.0  # a sequence of probability zero was generated (top-k / top-p excluded it)
    order = np.argsort(expected)  # pool the rarest cells until every pooled cell expects >= 5
    obs_cells, exp_cells, o_acc, e_acc = [], [], 0.0, 0.0
    for i in order:
        if expected[i] == 0:
            continue
        o_acc += observed[i]
        e_acc += expected[i]
        if e_acc >= 5:
            obs_cells.append(o_acc)
            exp_cells.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc:
        obs_cells[-1] += o_acc
        exp_cells[-1] += e_acc
    assert len(obs_cells) >= 20, "too few cells for a meaningful test"
    return sstats.chisquare(obs_cells, exp_cells).pvalue


def draw(model, params, heads, count, seed):
    out = generate(model, [PROMPT] * count, NEW, params, heads=heads, generator=torch.Generator().manual_seed(seed))
    assert all(len(t) == NEW for t in out.tokens)
    return out


def accept_always(p, q, drafts, generator):
    """Wrong: takes every draft (the drafts' own distribution leaks into the output)."""
    b, k = p.shape[0], p.shape[1]
    accepted = torch.full((b,), k - 1, dtype=torch.long)
    return accepted, sample(p[:, -1], generator)


def resample_from_p(p, q, drafts, generator):
    """Wrong: the right acceptance test, but on rejection resamples from p instead of norm(max(0, p - q))."""
    b, k = p.shape[0], p.shape[1]
    pd = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    ok = torch.rand(qd.shape, generator=generator, dtype=qd.dtype) * qd < pd
    accepted = ok.long().cumprod(1).sum(1)
    return accepted, sample(p[torch.arange(b), accepted], generator)


def accept_with_prob_p(p, q, drafts, generator):
    """Wrong: accepts a draft with probability p(x) (forgets to divide by q(x)), residual as it should."""
    b, k = p.shape[0], p.shape[1]
    pd = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
    accepted = (torch.rand(pd.shape, generator=generator, dtype=pd.dtype) < pd).long().cumprod(1).sum(1)
    rows = torch.arange(b)
    p_a, q_a = p[rows, accepted], q[rows, accepted.clamp(max=k - 2)]
    residual = torch.where((accepted < k - 1)[:, None], (p_a - q_a).clamp(min=0), p_a)
    return accepted, sample(residual / residual.sum(-1, keepdim=True).clamp(min=1e-30), generator)


@pytest.mark.parametrize("params", [SamplingParams(greedy=False),
                                    SamplingParams(greedy=False, temperature=0.8, top_k=6, top_p=0.9)],
                         ids=["t1", "t0.8-topk-topp"])
def test_speculative_sampling_matches_plain_distribution(sampling_model, params, monkeypatch):
    count = 4000
    expected = exact_joint(sampling_model, params)
    plain = draw(sampling_model, params, 1, count, seed=1)
    assert chi_square_pvalue(plain.tokens, expected) > 1e-3
    spec = draw(sampling_model, params, N_HEADS, count, seed=2)
    assert chi_square_pvalue(spec.tokens, expected) > 1e-3
    acc = spec.stats.acceptance
    assert 0.1 < acc[0] < 0.9 and 0.1 < acc[1] < 0.9  # accepted and rejected at both draft depths
    for broken in (accept_always, resample_from_p, accept_with_prob_p):
        monkeypatch.setattr(gen_mod, "verify_sampled", broken)
        bad = draw(sampling_model, params, N_HEADS, count, seed=3)
        assert chi_square_pvalue(bad.tokens, expected) < 1e-6, broken.__name__
    monkeypatch.undo()


def shared_noise(p, generator):
    """Wrong: one uniform draw per sequence shared by every node (each node's marginal is right, but the draws
    along a path are dependent)."""
    u = torch.rand(p.shape[0], 1, 1, generator=generator, dtype=p.dtype)
    return (p.cumsum(-1) < u).sum(-1).clamp(max=p.size(-1) - 1)


def argmax_below_root(p, generator):
    """Wrong: draws at the root, then accepts a node when it is head 1's argmax (greedy verification)."""
    pred = p.argmax(-1)
    pred[:, 0] = sample(p[:, 0], generator)
    return pred


@pytest.mark.parametrize("params, dynamic", [(SamplingParams(greedy=False), False),
                                             (SamplingParams(greedy=False, temperature=0.8, top_k=6, top_p=0.9), False),
                                             (SamplingParams(greedy=False, temperature=0.8, top_k=6, top_p=0.9), True)],
                         ids=["t1", "t0.8-topk-topp", "t0.8-topk-topp-dynamic"])
def test_draft_tree_sampling_matches_plain_distribution(sampling_model, params, dynamic, monkeypatch):
    """Sampling over a draft tree (a draw from head 1 at every node, the tree followed while the draws match)
    is distributed as plain sampling, the tree static or chosen per step from the draft probabilities; wrong
    node-draw rules are rejected."""
    from megatron_mtp.inference import DraftTree

    tree = DraftTree.parse("0;1;2;0,0;0,1;1,0;2,0")
    tree = tree.dynamic(5) if dynamic else tree
    expected = exact_joint(sampling_model, params)
    count = 4000
    out = generate(sampling_model, [PROMPT] * count, NEW, params, tree=tree,
                   generator=torch.Generator().manual_seed(6))
    assert all(len(t) == NEW for t in out.tokens)
    assert chi_square_pvalue(out.tokens, expected) > 1e-3
    assert 0.1 < out.stats.acceptance[0] < 0.95 and out.stats.accepted[1] > 0  # both depths accept and reject
    for broken in (shared_noise, argmax_below_root):
        monkeypatch.setattr(gen_mod, "sample_tree_nodes", broken)
        bad = generate(sampling_model, [PROMPT] * count, NEW, params, tree=tree,
                       generator=torch.Generator().manual_seed(7))
        assert chi_square_pvalue(bad.tokens, expected) < 1e-6, broken.__name__
    monkeypatch.undo()


def test_verify_sampled_first_token_is_exactly_p():
    """The rule itself on synthetic distributions: the first emitted token of a forward is ~ p[0]."""
    g = torch.Generator().manual_seed(0)
    rows = 200_000
    p0 = torch.tensor([0.45, 0.05, 0.3, 0.2], dtype=torch.float64)
    q0 = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    p = torch.stack([p0, torch.tensor([0.25] * 4, dtype=torch.float64)])[None].expand(rows, 2, 4).contiguous()
    q = q0[None, None].expand(rows, 1, 4).contiguous()
    drafts = sample(q[:, 0], g)[:, None]
    accepted, y = gen_mod.verify_sampled(p, q, drafts, g)
    first = torch.where(accepted > 0, drafts[:, 0], y)
    freq = torch.bincount(first, minlength=4).double() / rows
    torch.testing.assert_close(freq, p0, atol=4e-3, rtol=0)
    expected_accept = torch.minimum(p0, q0).sum()  # P(accept) = sum_x min(p(x), q(x))
    assert abs(accepted.double().mean() - expected_accept) < 4e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_speculative_sampling_with_cuda_graphs_matches_plain_distribution(sampling_model):
    """The captured sampling step (its generator registered with the graph, so every replay draws fresh
    numbers) keeps plain sampling's distribution, plain, speculative and over a draft tree."""
    import copy

    params = SamplingParams(greedy=False, temperature=0.8, top_k=6, top_p=0.9)
    expected = exact_joint(sampling_model, params)
    model = copy.deepcopy(sampling_model).float().cuda()
    for heads, seed in ((1, 4), (N_HEADS, 5)):
        out = generate(model, [PROMPT] * 4000, NEW, params, heads=heads, graphs=True,
                       generator=torch.Generator(device="cuda").manual_seed(seed))
        assert all(len(t) == NEW for t in out.tokens)
        assert chi_square_pvalue(out.tokens, expected) > 1e-3, heads
        again = generate(model, [PROMPT] * 4000, NEW, params, heads=heads, graphs=True,
                         generator=torch.Generator(device="cuda").manual_seed(seed + 10))
        assert again.tokens != out.tokens  # replays draw new numbers
    from megatron_mtp.inference import DraftTree

    out = generate(model, [PROMPT] * 4000, NEW, params, tree=DraftTree.parse("0;1;2;0,0;0,1;1,0"), graphs=True,
                   generator=torch.Generator(device="cuda").manual_seed(6))
    assert chi_square_pvalue(out.tokens, expected) > 1e-3, "tree"
