"""Draft trees: self-speculative decoding that verifies several candidates per head in one forward.

Linear drafting (``generate(..., heads=k)``) proposes one token per draft head: head i's argmax. When head i's
first choice is wrong but its second is right, the forward still stops there. A draft tree proposes, per
head, its top few candidates and verifies a tree of their combinations in the same forward (Medusa, Cai et
al. 2024, section 2.1.2; SpecInfer, Miao et al. 2024):

* node 0 is the root, the last sampled token y; a node at depth d >= 1 is the candidate of rank r of draft
  head d + 1 (made at the previous forward's last accepted position), and its parent is the node of the
  path's earlier ranks. ``DraftTree.paths`` lists every non-root node as its tuple of ranks, one per depth
  (``(0,)`` head 2's first choice, ``(0, 1)`` head 3's second choice after it);
* every node is one input row of the forward; the attention mask lets a node see the committed cache and
  its own ancestors only, and its RoPE position is its depth, so each root-to-node path is computed exactly
  as if it were the only continuation (a linear chain is the tree whose paths are ``(0,), (0, 0), ...``);
* greedy verification accepts the deepest node whose every token equals head 1's argmax at its parent; its
  tokens, then head 1's argmax at it, are emitted — the output is still identical to plain greedy decoding
  (at most one node per depth can match, since a head's candidates are distinct). Sampling draws one token
  per node from head 1 there and follows the tree while a node's token is its parent's draw: the emitted
  tokens are draws given exactly their prefixes, so the output is distributed as plain sampling
  (``generation.sample_tree_nodes``);
* the accepted path's keys and values are moved to consecutive cache slots (``KVCache.compact``) and the
  rest are dropped, as linear drafting drops the rejected suffix.

Which tree? Best is the one with the largest expected accepted length for its node count. With ``acc[h][r]``
the probability that head h + 2's rank-r candidate is the greedy token (``head_accuracy`` measures it), a
path's probability is taken as the product of its ranks' accuracies (Medusa's independence assumption), the
expected accepted length is the sum over nodes of their path probabilities, and the best tree of N nodes is
the N most probable paths (``DraftTree.from_accuracy``; a child is never more probable than its parent, so
they form a tree). A dynamic tree (``select`` = N) applies the same rule at every step and for every sequence
with that step's own draft probabilities in place of the averages, choosing N of its candidate paths
(``select_nodes``; EAGLE-2, Li et al. 2024, chooses its trees this way).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from megatron_mtp.errors import InputError


# A dynamic tree of N nodes selects from the N x this most probable paths (on the CPU model of docs/inference.md,
# 2 gave ~2 % fewer tokens per forward than 4, and 8 the same as 4).
DYNAMIC_CANDIDATES = 4


@dataclass(frozen=True)
class DraftTree:
    """A draft tree: ``paths`` holds every non-root node as its tuple of candidate ranks, one per depth (depth
    d's rank is a rank of draft head d + 1's candidates); every prefix of a path is itself a path. Nodes are
    kept in the order (depth, ranks), so a parent always comes before its children."""

    paths: tuple
    select: int = 0  # 0: verify every path; N: a dynamic tree, the N nodes a step's draft probabilities favour

    def __post_init__(self):
        paths = [tuple(int(r) for r in p) for p in self.paths]
        if not paths:
            raise InputError("a draft tree needs at least one node besides the root.")
        if any(len(p) == 0 for p in paths):
            raise InputError("a draft tree's paths need at least one rank each (the root is implicit).")
        if any(r < 0 for p in paths for r in p):
            raise InputError("a draft tree's ranks must be >= 0 (0 is a head's first choice).")
        if len(set(paths)) != len(paths):
            raise InputError("a draft tree lists a path twice.")
        known = set(paths)
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in known]
        if missing:
            raise InputError(f"draft tree path {missing[0]} lacks its parent {missing[0][:-1]}: every prefix of a "
                             f"path must be a path too.")
        object.__setattr__(self, "paths", tuple(sorted(paths, key=lambda p: (len(p), p))))
        if isinstance(self.select, bool) or not isinstance(self.select, int) or not (
                self.select == 0 or 2 <= self.select <= 1 + len(paths)):
            raise InputError(f"a dynamic tree selects 2..{1 + len(paths)} of its {1 + len(paths)} candidate nodes per "
                             f"step, got {self.select}.")

    # ---- shape ------------------------------------------------------------------------------------------

    @property
    def nodes(self) -> int:
        """Input rows of a verifying forward: the root and every path, or a dynamic tree's selection."""
        return self.select or self.candidates

    @property
    def candidates(self) -> int:
        """The root and every path: the nodes a dynamic tree selects from."""
        return 1 + len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def heads(self) -> int:
        """Heads the tree uses: head 1 and one draft head per depth."""
        return self.depth + 1

    @property
    def ranks(self) -> int:
        """Candidates drawn from each draft head (its top-``ranks``)."""
        return 1 + max(r for p in self.paths for r in p)

    def describe(self) -> str:
        widths = [sum(len(p) == d for p in self.paths) for d in range(1, self.depth + 1)]
        if self.select:
            return (f"dynamic: {self.select} of {self.candidates} candidate nodes per step, depth up to {self.depth}, "
                    f"candidates per depth {widths}")
        return f"{self.nodes} nodes, depth {self.depth}, nodes per depth {widths}"

    def dynamic(self, nodes: int) -> "DraftTree":
        """This tree's paths as the candidates of a dynamic tree verifying ``nodes`` of them per step."""
        return DraftTree(self.paths, select=nodes)

    # ---- construction -----------------------------------------------------------------------------------

    @classmethod
    def chain(cls, k: int) -> "DraftTree":
        """Linear drafting with heads 2..k as a tree (each head's first choice after the previous one's)."""
        if k < 2:
            raise InputError(f"a draft chain needs k >= 2 heads, got {k}.")
        return cls(tuple((0,) * d for d in range(1, k)))

    @classmethod
    def from_accuracy(cls, accuracy: Sequence[Sequence[float]], nodes: int, dynamic: bool = False) -> "DraftTree":
        """The ``nodes``-node tree (root included) of the most probable paths, a path's probability being the
        product of ``accuracy[d][r]`` over its ranks (``accuracy[d]``: draft head d + 2, rank r). Ties keep the
        shallower, lower-rank path. ``dynamic``: a dynamic tree of ``nodes`` nodes whose candidates are the
        DYNAMIC_CANDIDATES x ``nodes`` most probable paths (the static tree of them all where the table allows
        no more than ``nodes``)."""
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise InputError(f"a draft tree needs at least 2 nodes (the root and one draft), got {nodes}.")
        if dynamic:
            candidates = cls.from_accuracy(accuracy, DYNAMIC_CANDIDATES * nodes)
            return candidates.dynamic(nodes) if candidates.candidates > nodes else candidates
        acc = [[float(a) for a in row] for row in accuracy]
        if not acc or any(not row for row in acc):
            raise InputError("head accuracies need at least one draft head with at least one rank.")
        if any(not 0.0 <= a <= 1.0 for row in acc for a in row):
            raise InputError("head accuracies must lie in [0, 1].")
        # Best-first over the implicit tree of every rank combination: pop the most probable path, push its
        # children (next depth, any rank) and its next sibling, so each candidate is pushed once.
        heap = [(-acc[0][0], (0,), 1.0)]  # (-probability, path, its parent's probability)
        chosen = []
        while heap and len(chosen) < nodes - 1:
            neg, path, parent = heapq.heappop(heap)
            chosen.append(path)
            d, r = len(path) - 1, path[-1]
            if r + 1 < len(acc[d]):  # the sibling of the next rank
                heapq.heappush(heap, (-parent * acc[d][r + 1], path[:-1] + (r + 1,), parent))
            if d + 1 < len(acc):  # the first child
                heapq.heappush(heap, (neg * acc[d + 1][0], path + (0,), -neg))
        return cls(tuple(chosen))

    def expected_tokens(self, accuracy: Sequence[Sequence[float]]) -> float:
        """Tokens a forward is expected to emit under ``accuracy`` (as in ``from_accuracy``): the next token,
        plus each node's path probability — what the tree is chosen to maximise. (For every path: a dynamic
        tree's selection depends on each step's probabilities.)"""
        total = 1.0
        for p in self.paths:
            prob = 1.0
            for d, r in enumerate(p):
                row = accuracy[d] if d < len(accuracy) else []
                prob *= row[r] if r < len(row) else 0.0
            total += prob
        return total

    @classmethod
    def parse(cls, spec: str) -> "DraftTree":
        """A tree from text: paths as rank lists separated by ``;``, ranks by ``,`` (``"0;1;0,0;0,1"``)."""
        try:
            paths = [tuple(int(r) for r in part.split(",")) for part in spec.split(";") if part.strip()]
        except ValueError:
            raise InputError(f"cannot read draft tree {spec!r}: write paths of ranks like '0;1;0,0;0,1'.") from None
        return cls(tuple(paths))

    def spec(self) -> str:
        """The paths as ``parse`` reads them (a dynamic tree's selection is not part of it)."""
        return ";".join(",".join(map(str, p)) for p in self.paths)

    # ---- the tensors a decoder uses ---------------------------------------------------------------------

    def tensors(self, device) -> dict:
        """Index tensors of the tree, or of a dynamic tree's candidates (node 0 the root, node i >= 1
        ``paths[i - 1]``):

        ``ancestors`` bool [N, N]: node j is node i's ancestor or i itself; ``depth`` [N];
        ``parent`` [N] (the root its own); ``path`` [N, depth + 1]: node i's ancestor at each depth (i itself
        past its own depth); ``head`` / ``rank`` [N - 1]: which draft head (0 = head 2) and which of its
        candidates each non-root node holds."""
        index = {(): 0, **{p: i + 1 for i, p in enumerate(self.paths)}}
        nodes, depth = self.candidates, self.depth  # (a dynamic tree's: its candidates')
        ancestors = torch.zeros(nodes, nodes, dtype=torch.bool)
        path = torch.zeros(nodes, depth + 1, dtype=torch.long)
        parent = torch.zeros(nodes, dtype=torch.long)
        for p, i in index.items():
            for d in range(len(p) + 1):
                ancestors[i, index[p[:d]]] = True
                path[i, d] = index[p[:d]]
            path[i, len(p) + 1:] = i
            parent[i] = index[p[:-1]] if p else 0
        return {
            "ancestors": ancestors.to(device), "depth": torch.tensor([0] + [len(p) for p in self.paths], device=device),
            "parent": parent.to(device), "path": path.to(device),
            "head": torch.tensor([len(p) - 1 for p in self.paths], device=device),
            "rank": torch.tensor([p[-1] for p in self.paths], device=device),
        }


def select_nodes(logq: torch.Tensor, candidates: dict, n: int) -> dict:
    """A dynamic tree's nodes for each sequence: the ``n - 1`` candidate paths (``DraftTree.tensors`` of the
    candidates) of the highest probability under this step's draft distributions, ``logq`` [b, depth, ranks]
    (log-probabilities of each draft head's top candidates), a path's probability being the product of its
    nodes' (the same rule as ``DraftTree.from_accuracy``, with each step's own numbers). Returns the per-sequence
    tree in ``DraftTree.tensors``' form with a leading batch dim ([b, n, n] ancestors, ...), the nodes kept in
    the candidates' order (parents before children). A pure function of tensors (static shapes)."""
    b = logq.size(0)
    depth_c, anc_c = candidates["depth"], candidates["ancestors"]
    # (a floor, not -inf: the sums below multiply by 0 for non-ancestors; and a child strictly below its parent
    # even where a head is certain, so a selection never keeps a child without its parent)
    lq = logq.float().clamp(min=-1e4)[:, candidates["head"], candidates["rank"]]  # [b, M - 1]
    score = lq @ anc_c[1:, 1:].to(lq.dtype).t() - 1e-3 * depth_c[1:].to(lq.dtype)
    idx = score.topk(n - 1, dim=1).indices.sort(dim=1).values + 1  # [b, n - 1]: candidate indices, in order
    sel = torch.cat([torch.zeros_like(idx[:, :1]), idx], 1)  # [b, n], the root first
    where = torch.zeros(b, anc_c.size(0), dtype=torch.long, device=logq.device)
    where.scatter_(1, sel, torch.arange(n, device=logq.device).expand(b, n))  # candidate index -> row
    path_c = candidates["path"][sel]  # [b, n, depth + 1] candidate indices
    return {
        "ancestors": anc_c[sel[:, :, None], sel[:, None, :]], "depth": depth_c[sel],
        "parent": where.gather(1, candidates["parent"][sel]),
        "path": where.gather(1, path_c.view(b, -1)).view(path_c.shape),
        "head": candidates["head"][idx - 1], "rank": candidates["rank"][idx - 1],
    }


def tree_option(spec: Optional[str], dynamic: bool = False, speculative: bool = True) -> int:
    """Check a command line's ``--tree`` (None when not given; a node count, or explicit paths ``"0;1;0,0"``),
    ``--dynamic-tree`` and ``--speculative`` before anything runs; returns the node count, or 0 for explicit
    paths or no tree."""
    if spec is None:
        if dynamic:
            raise InputError("--dynamic-tree needs --tree NODES.")
        return 0
    if not speculative:
        raise InputError("--tree needs --speculative.")
    if not spec.strip().isdigit():
        DraftTree.parse(spec)
        if dynamic:
            raise InputError("--dynamic-tree takes a node count (--tree 32), not explicit paths.")
        return 0
    nodes = int(spec)
    if nodes < 2:
        raise InputError(f"--tree needs at least 2 nodes (the root and one draft), got {nodes}.")
    return nodes


def tree_for(model, spec: str, prompts: Sequence[Sequence[int]], heads: int = 0, dynamic: bool = False,
             max_new_tokens: int = 64, report=None, **generate_kwargs) -> DraftTree:
    """The tree a command line's ``--tree`` asks for: explicit paths as given, or for a node count the most
    probable tree (``dynamic``: a dynamic one) under the accuracies of the first ``heads`` heads (0: all) on
    plain greedy continuations of ``prompts`` (``continuation_accuracy``); ``report(accuracy)`` sees them."""
    if heads == 1:
        raise InputError("--tree needs at least 2 heads (--heads).")
    nodes = tree_option(spec, dynamic)
    if not nodes:
        return DraftTree.parse(spec)
    accuracy = continuation_accuracy(model, prompts, max_new_tokens, heads=heads, **generate_kwargs)
    if report is not None:
        report(accuracy)
    return DraftTree.from_accuracy(accuracy, nodes, dynamic=dynamic)


def describe_accuracy(accuracy: Sequence[Sequence[float]], ranks: int = 4) -> str:
    """One line of per-head, per-rank accuracies (the first ``ranks``) for a log."""
    return "head accuracy by rank (calibration): " + "; ".join(
        f"head {d + 2} " + " ".join(f"{a:.2f}" for a in row[:ranks]) for d, row in enumerate(accuracy))


def continuation_accuracy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, ranks: int = 8,
                          heads: int = 0, **generate_kwargs) -> list:
    """The draft heads' per-rank acceptance rates (``head_accuracy``) on the plain greedy continuations of
    ``prompts`` (``max_new_tokens`` each; ``generate_kwargs`` go to ``generate``: eod, pad_id, compile, ..):
    the calibration a tree is chosen from. Raises InputError when the continuations are too short to measure."""
    from megatron_mtp.inference.generation import generate  # (generation imports this module)

    out = generate(model, prompts, max_new_tokens, **generate_kwargs)
    sequences = [list(p) + t for p, t in zip(prompts, out.tokens)]
    return head_accuracy(model, sequences, ranks=ranks, heads=heads, targets_from=[len(p) for p in prompts])


@torch.no_grad()
def head_accuracy(model, sequences: Sequence[Sequence[int]], ranks: int = 4, heads: int = 0,
                  targets_from: Union[int, Sequence[int]] = 0) -> list:
    """``acc[d][r]``: how often draft head d + 2's rank-r candidate at position t is the token at t + d + 2 of
    ``sequences`` (teacher-forced, one forward per sequence), over targets at index ``targets_from`` (one for
    all, or one per sequence) and later. On text the model generated greedily (``targets_from`` = the prompts'
    lengths), that token is head 1's own argmax there — what verification compares with — so the numbers are
    exactly the per-rank acceptance rates a tree's nodes see (a node's rate given that its parent was accepted
    is taken as the unconditional one). ``heads`` 0 measures every draft head."""
    n = model.mtp.n_heads
    heads = n if heads == 0 else heads
    ranks = min(ranks, model.cfg.vocab_size)  # (a head has no more candidates than the vocabulary)
    if not 2 <= heads <= n:
        raise InputError(f"head accuracies need 2..{n} heads (the model's mtp.n_heads), got {heads}.")
    limit = model.cfg.max_seq_length
    if any(len(seq) > limit for seq in sequences):
        raise InputError(f"a calibration sequence is longer than the model's max_seq_length {limit}: cut it.")
    device = model.embedding.weight.device
    hits = torch.zeros(heads - 1, ranks, dtype=torch.float64)
    counts = torch.zeros(heads - 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        firsts = [targets_from] * len(sequences) if isinstance(targets_from, int) else list(targets_from)
        for seq, first in zip(sequences, firsts):
            tokens = torch.tensor(list(seq), dtype=torch.long, device=device)[None]
            logits = model.logits(tokens, heads="all")
            for d in range(heads - 1):
                offset = d + 2  # head d + 2 at position t predicts token t + d + 2
                t_count = tokens.size(1) - offset
                if t_count <= 0:
                    continue
                top = logits[d + 1][0, :t_count].float().topk(ranks, dim=-1).indices  # [t, ranks]
                target = tokens[0, offset:]
                keep = (offset + torch.arange(t_count, device=device)) >= first
                hits[d] += ((top == target[:, None]) & keep[:, None]).sum(0).double().cpu()
                counts[d] += int(keep.sum())
    finally:
        model.train(was_training)
    if not bool((counts > 0).all()):
        raise InputError(f"the calibration text is too short to measure {heads - 1} draft heads: give sequences "
                         f"of more than {heads + 1} tokens past the prompt.")
    return (hits / counts[:, None]).tolist()
