"""Draft trees (``inference.tree``): the tree's structure and its choice from head accuracies, a forward over
a tree equal to each path decoded alone, tree decoding equal to plain greedy with the cache left as a fresh
prefill's, a tree accepting at least its chain, the accuracy calibration, and the argument checks."""
import itertools
import math

import pytest
import torch

from megatron_mtp.errors import InputError
from megatron_mtp.inference import DraftTree, KVCache, SamplingParams, generate, head_accuracy
from megatron_mtp.inference.kv_cache import tree_bias

from test_generation import (assert_cache_is_a_fresh_prefill, full_logits, random_prompts, recompute_greedy,
                             tiny_model)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TREE = DraftTree.parse("0;1;2;0,0;0,1;1,0;0,0,0;0,0,1;0,1,0;1,0,0")


def test_tree_structure_and_its_index_tensors():
    t = DraftTree.parse("1,0;0;1;0,0")  # any order in, (depth, ranks) order kept
    assert t.paths == ((0,), (1,), (0, 0), (1, 0)) and t.spec() == "0;1;0,0;1,0"
    assert (t.nodes, t.depth, t.heads, t.ranks) == (5, 2, 3, 2)
    x = t.tensors("cpu")
    assert x["parent"].tolist() == [0, 0, 0, 1, 2] and x["depth"].tolist() == [0, 1, 1, 2, 2]
    assert x["path"].tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3], [0, 2, 4]]
    assert x["head"].tolist() == [0, 0, 1, 1] and x["rank"].tolist() == [0, 1, 0, 0]
    assert x["ancestors"][4].tolist() == [True, False, True, False, True]
    chain = DraftTree.chain(4).tensors("cpu")  # a chain is the causal (lower-triangular) case
    assert torch.equal(chain["ancestors"], torch.ones(4, 4, dtype=torch.bool).tril())
    for spec, match in (("0,1", "lacks its parent"), ("0;0", "twice"), ("0;-1", ">= 0"), ("a", "cannot read"),
                        ("", "at least one node")):
        with pytest.raises(InputError, match=match):
            DraftTree.parse(spec)


def test_from_accuracy_keeps_the_most_probable_paths():
    """Against brute force: the chosen paths are the N - 1 most probable of every rank combination, and so
    maximise the expected accepted length (the sum of path probabilities) among trees of N nodes."""
    acc = [[0.61, 0.23, 0.07], [0.52, 0.19, 0.05], [0.43, 0.17], [0.31, 0.11]]
    every = {}
    for depth in range(1, len(acc) + 1):
        for ranks in itertools.product(*(range(len(acc[d])) for d in range(depth))):
            every[ranks] = math.prod(acc[d][r] for d, r in enumerate(ranks))
    for nodes in (2, 5, 12, 30):
        tree = DraftTree.from_accuracy(acc, nodes)
        assert tree.nodes == nodes
        best = sorted(every, key=every.get, reverse=True)[: nodes - 1]
        assert set(tree.paths) == set(best), nodes
        assert tree.expected_tokens(acc) == pytest.approx(1 + sum(every[p] for p in best))
    assert DraftTree.from_accuracy([[0.9], [0.8], [0.7]], 4).paths == DraftTree.chain(4).paths
    assert DraftTree.chain(4).expected_tokens([[0.9], [0.8], [0.7]]) == pytest.approx(1 + 0.9 + 0.72 + 0.504)
    assert DraftTree.from_accuracy([[0.5]], 10).nodes == 2  # no more paths than the table allows
    dynamic = DraftTree.from_accuracy(acc, 5, dynamic=True)
    assert (dynamic.select, dynamic.candidates, dynamic.nodes) == (5, 20, 5)
    assert set(dynamic.paths) == set(DraftTree.from_accuracy(acc, 20).paths)
    assert DraftTree.from_accuracy([[0.5, 0.3]], 3, dynamic=True) == DraftTree.parse("0;1")  # 3 candidates only
    with pytest.raises(InputError, match="at least 2 nodes"):
        DraftTree.from_accuracy(acc, 1)


def test_a_forward_over_a_tree_equals_each_path_decoded_alone():
    """Every node of a tree forward (batch 2, left padding, GQA) gives every head the logits of a full forward
    over the prompt followed by that node's path — the tree mask and the depth positions make each path see
    exactly its own prefix."""
    model = tiny_model(n_heads=4, layers=5)
    prompts = random_prompts([6, 3], 16, seed=3)
    cache = KVCache(2, 48, "cpu", start=[0, 3])
    tokens = torch.tensor([p if len(p) == 6 else [0] * 3 + p for p in prompts])
    model.logits(tokens, heads="all", positions=cache.positions(6), kv_cache=cache, attn_mask=cache.attention_mask(6))
    cache.advance(6)
    t = TREE.tensors("cpu")
    nodes = torch.randint(0, 16, (2, TREE.nodes), generator=torch.Generator().manual_seed(1))
    bias = tree_bias(cache.lengths, cache.start, t["ancestors"][None].expand(2, -1, -1), cache.capacity, 1,
                     torch.float64)
    positions = (cache.lengths - cache.start)[:, None] + t["depth"][None]
    out = model.logits(nodes, heads="all", positions=positions, kv_cache=cache, attn_mask=bias)
    for b, p in enumerate(prompts):
        for i in range(TREE.nodes):
            path = [int(nodes[b, j]) for j in t["path"][i, : int(t["depth"][i]) + 1]]
            for h, ref in enumerate(full_logits(model, p + path)):
                torch.testing.assert_close(out[h][b, i], ref)


@pytest.mark.parametrize("tree", [TREE, DraftTree.chain(3), DraftTree.parse("0;1;2;3;4;5"), TREE.dynamic(5)],
                         ids=["tree", "chain", "one_level_wide", "dynamic"])
def test_tree_decoding_equals_plain_greedy_and_leaves_the_cache_a_fresh_prefill(tree):
    """Greedy tokens of tree decoding equal recomputation for a batch of mixed prompt lengths (sequences
    accept different paths), with an EOD in play; afterwards every layer's committed keys and values equal a
    fresh prefill over each sequence's committed tokens: the accepted path was moved into place, the rest left
    no trace."""
    from megatron_mtp.inference.generation import decoder_for

    model = tiny_model(n_heads=4, layers=6, sharpen=8.0)
    prompts = random_prompts([3, 9, 1, 6], 16, seed=2)
    ref = [recompute_greedy(model, p, 14) for p in prompts]
    out = generate(model, prompts, 14, tree=tree)
    assert out.tokens == ref
    assert 0 < sum(out.stats.accepted) < sum(out.stats.proposed)  # drafts were accepted and rejected
    assert out.stats.heads == tree.heads and out.stats.forwards < 14
    st = next(reversed(decoder_for(model)._states.values()))
    assert_cache_is_a_fresh_prefill(model, st, prompts, heads=tree.heads)
    eod = ref[0][4]
    with_eod = generate(model, prompts, 14, tree=tree, eod=eod)
    assert with_eod.tokens == [recompute_greedy(model, p, 14, eod=eod) for p in prompts]


def test_dynamic_selection_keeps_each_steps_most_probable_paths():
    """Per sequence, the selected nodes are the candidates' n - 1 most probable paths under that sequence's
    draft log-probabilities (brute force), and the returned tree (rows, parents, ancestors, depths, paths, heads
    and ranks) is the candidate tree restricted to them."""
    from megatron_mtp.inference.tree import select_nodes

    cand = DraftTree.from_accuracy([[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.2]], 16)
    t = cand.tensors("cpu")
    logq = torch.log_softmax(torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(2)) * 2, -1)
    got = select_nodes(logq, t, 7)
    for b in range(3):
        prob = {p: sum(float(logq[b, d, r]) for d, r in enumerate(p)) for p in cand.paths}
        best = set(sorted(cand.paths, key=prob.get, reverse=True)[:6])
        rows = [()] + sorted(best, key=lambda p: (len(p), p))  # the candidates' order
        assert [len(p) for p in rows] == got["depth"][b].tolist()
        assert [rows.index(p[:-1]) if p else 0 for p in rows] == got["parent"][b].tolist()
        assert [[rows[j] == p[: len(rows[j])] for j in range(7)] for p in rows] == got["ancestors"][b].tolist()
        assert [[rows.index(p[:d]) for d in range(len(p) + 1)] for p in rows] == \
            [row[: len(p) + 1] for row, p in zip(got["path"][b].tolist(), rows)]
        assert [len(p) - 1 for p in rows[1:]] == got["head"][b].tolist()
        assert [p[-1] for p in rows[1:]] == got["rank"][b].tolist()
    certain = torch.zeros(1, 3, 3).log_softmax(-1)  # ties everywhere: parents still come first
    tied = select_nodes(certain.masked_fill(torch.arange(3) > 0, -50.0), t, 4)
    assert tied["depth"][0].tolist() == [0, 1, 2, 3]


def test_a_tree_accepts_at_least_its_chain_and_sometimes_more():
    """From the same prefill, one step of a tree that contains the chain accepts at least as many tokens per
    sequence as the chain's, and more for some (its second and third choices hit where the first missed)."""
    from megatron_mtp.inference.generation import Decoder

    model = tiny_model(n_heads=4, layers=6, sharpen=8.0)
    prompts = random_prompts([5] * 16, 16, seed=9)
    gained = {}
    for name, tree in (("chain", DraftTree.chain(4)), ("tree", TREE)):
        dec = Decoder(model, graphs=False, compile=False)
        st = dec.state(16, 64)
        st.prompt_buffer(5).copy_(torch.tensor(prompts))
        st.cache.reset([0] * 16)
        st.budget.fill_(50)
        dec.prefill(st, 5, tree.heads, SamplingParams(), None, tree)
        dec.tree_step(st, tree, SamplingParams(), None)
        gained[name] = st.out_len.clone()
    assert bool((gained["tree"] >= gained["chain"]).all())
    assert int((gained["tree"] > gained["chain"]).sum()) > 0


def test_head_accuracy_counts_each_rank_against_the_token_ahead():
    """Per draft head and rank, the share of targets (at index >= targets_from) equal to that rank's candidate,
    against a loop over full forwards."""
    model = tiny_model(n_heads=3, layers=4, sharpen=3.0)
    seqs = random_prompts([12, 9], 16, seed=5)
    got = head_accuracy(model, seqs, ranks=3, targets_from=4)
    hits = [[0] * 3 for _ in range(2)]
    counts = [0, 0]
    for seq in seqs:
        for t in range(len(seq)):
            logits = full_logits(model, seq[: t + 1])
            for d in range(2):
                target = t + d + 2
                if 4 <= target < len(seq):
                    top = logits[d + 1].topk(3).indices.tolist()
                    counts[d] += 1
                    for r in range(3):
                        hits[d][r] += int(top[r] == seq[target])
    want = [[h / c for h in row] for row, c in zip(hits, counts)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tree=DraftTree.chain(5)), "needs 5 heads"),
    (dict(tree=TREE, heads=2), "disagrees"),
    (dict(tree=DraftTree.parse("0;20")), "more than the vocabulary"),
    (dict(tree="0;1"), "must be a DraftTree"),
], ids=["too_deep", "heads", "ranks", "type"])
def test_tree_arguments_are_checked(kwargs, match):
    model = tiny_model(n_heads=4, layers=5)
    with pytest.raises(InputError, match=match):
        generate(model, [[1, 2, 3]], 4, **kwargs)


def test_compiled_tree_step_gives_the_eager_tokens(compile_with_eager_backend):
    """The tree's programs (mask, verification, cache compaction, dynamic selection) as torch.compile traces
    them (fullgraph, dynamo's eager backend on a CPU) emit the eager tokens, greedy and sampled."""
    model = tiny_model(n_heads=4, layers=5, dtype=torch.float32)
    prompts = random_prompts([3, 9, 1, 6], 16, seed=2)
    eager = generate(model, prompts, 12, graphs=False, compile=False)
    for tree in (TREE, DraftTree.chain(3), TREE.dynamic(6)):
        assert generate(model, prompts, 12, tree=tree, graphs=False, compile=True).tokens == eager.tokens
    sampled = {}
    for compiled in (False, True):  # the same draws: sampling's lines run eagerly in both
        sampled[compiled] = generate(model, prompts, 12, SamplingParams(greedy=False, temperature=0.8),
                                     tree=TREE.dynamic(6),
                                     graphs=False, compile=compiled, generator=torch.Generator().manual_seed(3)).tokens
    assert sampled[True] == sampled[False]


def test_tree_programs_compile_once_for_every_tree_and_batch(compile_with_eager_backend):
    """The tree's compiled programs are traced once for the first tree and batch and serve trees of other sizes
    and depths, static or dynamic, and other batch sizes (a new tree would otherwise cost a compilation)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from megatron_mtp.inference import generation
    from megatron_mtp.inference.tree import select_nodes

    programs = {"tree_inputs": generation.tree_inputs, "tree_verify": generation.tree_verify,
                "compact": generation.compact_slots, "select": select_nodes}

    def graphs():
        return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in programs.items()}

    model = tiny_model(n_heads=4, layers=2, dtype=torch.float32)
    generate(model, random_prompts([4], 16), 5, tree=TREE.dynamic(5), graphs=False, compile=True)
    first = graphs()
    for b, tree in ((1, TREE), (3, TREE.dynamic(7)), (2, DraftTree.parse("0;1;2;3")), (3, DraftTree.chain(4))):
        generate(model, random_prompts([4, 6, 3][:b], 16, seed=b), 5, tree=tree, graphs=False, compile=True)
        assert graphs() == first, (b, tree.describe())
