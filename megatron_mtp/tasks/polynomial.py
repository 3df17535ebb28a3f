"""Polynomial arithmetic over F7[X]/(X^5): expression trees, their values, their text.

A polynomial is its canonical representative: five coefficients ``[c0, c1, c2, c3, c4]`` in 0..6, the
coefficient of X^i at index i. Operations:

* ``["neg", a]``      -a
* ``["add", a, b]``   a + b
* ``["mul", a, b]``   a * b, truncated mod X^5
* ``["comp", a, b]``  a(b(X)). Composition is not well defined on the quotient ring when b has a constant
  term (X^5 = 0 does not imply b^5 = 0), so we compose the canonical representatives (degree < 5) in
  F7[X] and then reduce mod X^5 (and mod 7, as everywhere).

Text grammar (bytes; fully parenthesised so it parses without precedence rules)::

    sample  := expr "=" poly
    expr    := poly | "(-" expr ")" | "(" expr "+" expr ")" | "(" expr "*" expr ")" | "(" expr "o" expr ")"
    poly    := digit digit digit digit digit        coefficients c0 c1 c2 c3 c4, each digit 0..6

e.g. ``(01000o(21000+00100))=21100`` is X composed with (2 + X) + X^2. The number of operations of a sample
is the number of internal nodes of its tree.
"""
from __future__ import annotations

import random
from typing import Iterable, Optional

from megatron_mtp.tasks.io import write_json, write_jsonl

MOD = 7
DEGREE = 5  # coefficients per polynomial: X^5 = 0
OPS = ("neg", "add", "mul", "comp")
_SYMBOL = {"add": "+", "mul": "*", "comp": "o"}


def poly_neg(a: list) -> list:
    return [(-c) % MOD for c in a]


def poly_add(a: list, b: list) -> list:
    return [(x + y) % MOD for x, y in zip(a, b)]


def poly_mul(a: list, b: list) -> list:
    out = [0] * DEGREE
    for i, x in enumerate(a):
        if x:
            for j in range(DEGREE - i):
                out[i + j] = (out[i + j] + x * b[j]) % MOD
    return out


def poly_comp(a: list, b: list) -> list:
    """a(b(X)) by Horner's rule on the canonical representatives; truncating every product at X^5 gives
    the same result as composing in F7[X] and reducing at the end (truncation is a ring homomorphism)."""
    out = [0] * DEGREE
    for coefficient in reversed(a):
        out = poly_mul(out, b)
        out[0] = (out[0] + coefficient) % MOD
    return out


def evaluate(tree) -> list:
    """The canonical coefficient list of an expression tree (a leaf is a coefficient list)."""
    if not isinstance(tree, list) or not tree:
        raise ValueError(f"not an expression tree: {tree!r}")
    if not isinstance(tree[0], str):
        if len(tree) != DEGREE or not all(isinstance(c, int) and 0 <= c < MOD for c in tree):
            raise ValueError(f"a leaf must be {DEGREE} coefficients in 0..{MOD - 1}, got {tree!r}")
        return list(tree)
    op, args = tree[0], tree[1:]
    if op == "neg" and len(args) == 1:
        return poly_neg(evaluate(args[0]))
    if op in ("add", "mul", "comp") and len(args) == 2:
        a, b = evaluate(args[0]), evaluate(args[1])
        return {"add": poly_add, "mul": poly_mul, "comp": poly_comp}[op](a, b)
    raise ValueError(f"unknown operation or wrong arity: {tree!r}")


def count_ops(tree) -> int:
    if not isinstance(tree[0], str):
        return 0
    return 1 + sum(count_ops(child) for child in tree[1:])


def render_poly(coefficients: Iterable[int]) -> str:
    return "".join(str(c) for c in coefficients)


def render(tree) -> str:
    """The expression's text (grammar in the module docstring)."""
    if not isinstance(tree[0], str):
        return render_poly(tree)
    if tree[0] == "neg":
        return f"(-{render(tree[1])})"
    return f"({render(tree[1])}{_SYMBOL[tree[0]]}{render(tree[2])})"


def parse(text: str):
    """The tree of an expression's text (the inverse of ``render``); ValueError on anything else."""
    tree, end = _parse(text, 0)
    if end != len(text):
        raise ValueError(f"trailing characters at {end} in {text!r}")
    return tree


def _parse(text: str, i: int):
    if i < len(text) and text[i].isdigit():
        digits = text[i: i + DEGREE]
        if len(digits) != DEGREE or not all(c in "0123456" for c in digits):
            raise ValueError(f"bad polynomial literal at {i} in {text!r}")
        return [int(c) for c in digits], i + DEGREE
    if not text.startswith("(", i):
        raise ValueError(f"expected '(' or a digit at {i} in {text!r}")
    if text.startswith("(-", i):
        child, j = _parse(text, i + 2)
        if not text.startswith(")", j):
            raise ValueError(f"expected ')' at {j} in {text!r}")
        return ["neg", child], j + 1
    left, j = _parse(text, i + 1)
    op = {v: k for k, v in _SYMBOL.items()}.get(text[j: j + 1])
    if op is None:
        raise ValueError(f"expected an operator at {j} in {text!r}")
    right, k = _parse(text, j + 1)
    if not text.startswith(")", k):
        raise ValueError(f"expected ')' at {k} in {text!r}")
    return [op, left, right], k + 1


def random_tree(rng: random.Random, n_ops: int):
    """A uniformly random operation at every internal node, ``n_ops`` internal nodes in all; the remaining
    operations are split uniformly between a binary node's two children."""
    if n_ops == 0:
        return [rng.randrange(MOD) for _ in range(DEGREE)]
    op = rng.choice(OPS)
    if op == "neg":
        return ["neg", random_tree(rng, n_ops - 1)]
    left = rng.randint(0, n_ops - 1)
    return [op, random_tree(rng, left), random_tree(rng, n_ops - 1 - left)]


def make_sample(tree) -> dict:
    answer = evaluate(tree)
    return {"text": f"{render(tree)}={render_poly(answer)}", "tree": tree, "answer": answer,
            "ops": count_ops(tree)}


def prompt_and_answer(text: str) -> tuple:
    """Split a sample's text into the prompt (up to and including '=') and the answer digits."""
    head, _, answer = text.rpartition("=")
    return head + "=", answer


def generate_split(count: int, min_ops: int, max_ops: int, seed: int, exclude: Optional[set] = None) -> list:
    """``count`` samples with a number of operations uniform in [min_ops, max_ops]; texts in ``exclude``
    (e.g. the training set) are skipped so test samples are never seen in training."""
    if not 0 <= min_ops <= max_ops:
        raise ValueError(f"operations range must satisfy 0 <= min <= max, got {min_ops}..{max_ops}")
    rng = random.Random(seed)
    exclude = exclude if exclude is not None else set()
    samples, seen, attempts = [], set(), 0
    while len(samples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"could not draw {count} distinct samples with {min_ops}..{max_ops} operations")
        sample = make_sample(random_tree(rng, rng.randint(min_ops, max_ops)))
        if sample["text"] in exclude or sample["text"] in seen:
            continue
        seen.add(sample["text"])
        samples.append(sample)
    return samples


def write_dataset(out_dir: str, train: int, test: int, in_ops: tuple, ood_ops: tuple, seed: int) -> dict:
    """Write ``train.jsonl`` (in-domain), ``test_in.jsonl`` (in-domain, disjoint from train) and
    ``test_ood.jsonl`` (more operations) under ``out_dir``; return their paths and the settings."""
    train_samples = generate_split(train, *in_ops, seed=seed)
    train_texts = {s["text"] for s in train_samples}
    splits = {"train": train_samples,
              "test_in": generate_split(test, *in_ops, seed=seed + 1, exclude=train_texts),
              "test_ood": generate_split(test, *ood_ops, seed=seed + 2, exclude=train_texts)}
    paths = {}
    for name, samples in splits.items():
        paths[name] = write_jsonl(f"{out_dir}/{name}.jsonl", samples)
    info = {"task": "polynomial", "modulus": MOD, "degree_bound": DEGREE, "in_ops": list(in_ops),
            "ood_ops": list(ood_ops), "seed": seed, "counts": {k: len(v) for k, v in splits.items()},
            "paths": paths}
    write_json(f"{out_dir}/dataset.json", info)
    return info
