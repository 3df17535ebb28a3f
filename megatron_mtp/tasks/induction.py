"""A synthetic induction corpus and the induction metric.

The paper (section 4.1) renames the characters of children's stories with random two-token names and
measures how well a model predicts a name's second token when the name already appeared in the context:
only copying from the context (an induction head) gets it right. That corpus is not available offline, so
this is the closest synthetic equivalent: short stories built from a small set of sentence templates
(lower-case words only) about 2-4 characters, each named by two upper-case letters drawn uniformly from
26 x 26, with distinct first letters within a story. With the byte-level tokenizer a name is exactly two
tokens. Given the name's first letter, its second letter is a uniform guess (1/26) without the context
and certain with it. Every sample records ``repeats``: the byte offsets of the second letter of every
occurrence of a name after its first one.
"""
from __future__ import annotations

import random
import string
from typing import Sequence

from megatron_mtp.tasks.io import write_json, write_jsonl

_TEMPLATES = (  # short sentences that each name two characters: repeated names' second letters are ~10 % of the bytes
    "{A} met {B}.",
    "{A} saw {B}.",
    "{A} and {B} ran.",
    "{B} hugged {A}.",
    "{A} helped {B}.",
    "{A} gave {B} a {thing}.",
    "{B} and {A} went to the {place}.",
    "{A} told {B} a story.",
    "{B} smiled at {A}.",
    "{A} and {B} were {adj}.",
)
_PLACES = ("park", "forest", "river", "house", "garden", "school", "market", "beach", "hill", "town")
_THINGS = ("ball", "cat", "kite", "book", "apple", "box", "dog", "hat", "boat", "cake", "bird", "drum")
_ADJS = ("happy", "big", "small", "red", "sad", "funny", "old", "new", "quiet", "bright")
LETTERS = string.ascii_uppercase


def random_names(rng: random.Random, count: int) -> list:
    firsts = rng.sample(LETTERS, count)  # distinct first letters: the second letter is fixed by the context
    return [first + rng.choice(LETTERS) for first in firsts]


def make_story(rng: random.Random, min_sentences: int = 6, max_sentences: int = 12) -> dict:
    names = random_names(rng, rng.randint(2, 4))
    sentences = []
    for _ in range(rng.randint(min_sentences, max_sentences)):
        a, b = rng.sample(names, 2)
        sentences.append(rng.choice(_TEMPLATES).format(A=a, B=b, place=rng.choice(_PLACES),
                                                       thing=rng.choice(_THINGS), adj=rng.choice(_ADJS)))
    text = " ".join(sentences)
    return {"text": text, "names": names, "repeats": repeated_name_positions(text, names)}


def repeated_name_positions(text: str, names: Sequence[str]) -> list:
    """Byte offsets of the second letter of every occurrence of a name after its first one."""
    positions = []
    for name in names:
        found, start = [], text.find(name)
        while start >= 0:
            found.append(start + 1)
            start = text.find(name, start + 1)
        positions += found[1:]
    return sorted(positions)


def generate_stories(count: int, seed: int, sentences: tuple = (6, 12)) -> list:
    """``count`` stories of ``sentences`` (min, max) sentences each."""
    if not 1 <= sentences[0] <= sentences[1]:
        raise ValueError(f"sentences per story must satisfy 1 <= min <= max, got {sentences[0]}..{sentences[1]}")
    rng = random.Random(seed)
    return [make_story(rng, *sentences) for _ in range(count)]


def induction_hits(predicted_next: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> tuple:
    """(hits, total): ``predicted_next[t]`` is the model's prediction of ``tokens[t + 1]`` from
    ``tokens[: t + 1]``; a repeated name's second letter at position p is a hit when
    ``predicted_next[p - 1] == tokens[p]``."""
    hits = 0
    for p in positions:
        if not 1 <= p < len(tokens):
            raise ValueError(f"position {p} lies outside the sequence of {len(tokens)} tokens")
        hits += int(predicted_next[p - 1] == tokens[p])
    return hits, len(positions)


def write_dataset(out_dir: str, train: int, test: int, sentences: tuple, seed: int) -> dict:
    """Write ``train.jsonl`` and ``test.jsonl`` stories of ``sentences`` (min, max) sentences under ``out_dir``."""
    splits = {"train": generate_stories(train, seed, sentences), "test": generate_stories(test, seed + 1, sentences)}
    paths = {name: write_jsonl(f"{out_dir}/{name}.jsonl", samples) for name, samples in splits.items()}
    info = {"task": "induction", "seed": seed, "sentences": list(sentences),
            "counts": {k: len(v) for k, v in splits.items()}, "paths": paths}
    write_json(f"{out_dir}/dataset.json", info)
    return info
