"""Task generators: polynomial answers against an independent numpy evaluator; the induction metric on a
hand-built sequence; the recorded repeated-name positions against a regex."""
import json
import re

import numpy as np
import pytest
from numpy.polynomial import polynomial as P

from megatron_mtp.tasks import induction, polynomial
from megatron_mtp.tasks.io import read_jsonl

MOD, DEG = 7, 5


def _reduce(coefficients) -> list:
    """Mod X^5 (drop degree >= 5) and mod 7, as integers; numpy's float results are exact at these sizes."""
    c = np.rint(np.asarray(coefficients, dtype=np.float64)).astype(np.int64)
    c = np.concatenate([c, np.zeros(DEG, dtype=np.int64)])[:DEG]
    return [int(v) % MOD for v in c]


def numpy_value(tree) -> list:
    """An evaluator that shares no code with the generator: numpy polynomial arithmetic, composition as
    sum_i a_i * b^i over the integers, reduced at the end."""
    if not isinstance(tree[0], str):
        return list(tree)
    op = tree[0]
    if op == "neg":
        return _reduce(-np.asarray(numpy_value(tree[1])))
    a, b = numpy_value(tree[1]), numpy_value(tree[2])
    if op == "add":
        return _reduce(P.polyadd(a, b))
    if op == "mul":
        return _reduce(P.polymul(a, b))
    assert op == "comp"
    total = np.zeros(1)
    for i, coefficient in enumerate(a):
        total = P.polyadd(total, coefficient * P.polypow(b, i))
    return _reduce(total)


def test_answers_match_an_independent_numpy_evaluator():
    samples = polynomial.generate_split(400, 1, 6, seed=3)
    assert {s["ops"] for s in samples} == set(range(1, 7))
    seen_ops = set()
    for s in samples:
        assert s["answer"] == numpy_value(s["tree"]), s["text"]
        head, answer = polynomial.prompt_and_answer(s["text"])
        assert answer == "".join(map(str, s["answer"])) and head.endswith("=")
        assert polynomial.parse(head[:-1]) == s["tree"]
        seen_ops |= set(re.findall(r"neg|add|mul|comp", json.dumps(s["tree"])))
    assert seen_ops == {"neg", "add", "mul", "comp"}


def test_composition_uses_canonical_representatives():
    x2, one_plus_x = [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]
    assert polynomial.evaluate(["comp", x2, one_plus_x]) == [1, 2, 1, 0, 0]  # (1 + X)^2
    assert polynomial.evaluate(["comp", [0, 0, 0, 0, 1], one_plus_x]) == [1, 4, 6, 4, 1]  # (1 + X)^4
    assert polynomial.evaluate(["comp", [0, 0, 0, 1, 0], x2]) == [0, 0, 0, 0, 0]  # X^6 = 0 mod X^5
    assert polynomial.evaluate(["comp", [3, 0, 0, 0, 0], one_plus_x]) == [3, 0, 0, 0, 0]  # a constant
    assert polynomial.evaluate(["mul", [0, 0, 0, 4, 0], [0, 0, 5, 0, 0]]) == [0] * 5
    assert polynomial.evaluate(["neg", [1, 0, 6, 0, 3]]) == [6, 0, 1, 0, 4]
    assert polynomial.render(["comp", x2, ["add", one_plus_x, x2]]) == "(00100o(11000+00100))"


@pytest.mark.parametrize("bad", [["pow", [1] * 5, [1] * 5], ["neg", [1, 2, 3]], ["add", [7, 0, 0, 0, 0], [0] * 5]])
def test_bad_trees_are_refused(bad):
    with pytest.raises(ValueError):
        polynomial.evaluate(bad)


def test_dataset_splits_are_disjoint(tmp_path):
    from megatron_mtp.tasks.__main__ import main

    assert main(["polynomial", "--out", str(tmp_path), "--train", "300", "--test", "50",
                 "--in-ops", "1-2", "--ood-ops", "3-4"]) == 0
    splits = {name: read_jsonl(str(tmp_path / f"{name}.jsonl")) for name in ("train", "test_in", "test_ood")}
    train_texts = {s["text"] for s in splits["train"]}
    assert len(splits["test_in"]) == 50 and not train_texts & {s["text"] for s in splits["test_in"]}
    assert {s["ops"] for s in splits["train"]} <= {1, 2} and {s["ops"] for s in splits["test_ood"]} <= {3, 4}


def test_induction_metric_on_a_hand_built_sequence():
    text = "AB saw CD. AB met CD."
    tokens = list(text.encode())
    assert induction.repeated_name_positions(text, ["AB", "CD"]) == [12, 19]
    predicted = [0] * len(tokens)  # predicted[t] guesses tokens[t + 1]
    predicted[11] = ord("B")  # right: after the second "A", "B"
    predicted[18] = ord("X")  # wrong: after the second "C", not "D"
    predicted[0] = ord("B")  # a first occurrence is not scored, right or wrong
    assert induction.induction_hits(predicted, tokens, [12, 19]) == (1, 2)
    with pytest.raises(ValueError):
        induction.induction_hits(predicted, tokens, [len(tokens)])


def test_induction_stories_record_every_repeat():
    for story in induction.generate_stories(50, seed=1):
        names = story["names"]
        assert 2 <= len(names) <= 4 and len({n[0] for n in names}) == len(names)
        assert all(re.fullmatch(r"[A-Z]{2}", n) for n in names)
        assert not re.search(r"[A-Z]", re.sub("|".join(names), "", story["text"]))  # no other capitals
        expected = sorted(m.start() + 1 for n in names for m in list(re.finditer(n, story["text"]))[1:])
        assert story["repeats"] == expected and expected


def test_story_length_is_set_by_the_sentence_range(tmp_path):
    from megatron_mtp.tasks.__main__ import main

    short = induction.generate_stories(40, seed=2, sentences=(2, 2))
    assert all(s["text"].count(".") == 2 for s in short)
    with pytest.raises(ValueError):
        induction.generate_stories(1, seed=0, sentences=(3, 2))
    assert main(["induction", "--out", str(tmp_path), "--train", "20", "--test", "5", "--sentences", "3-4"]) == 0
    assert all(3 <= s["text"].count(".") <= 4 for s in read_jsonl(str(tmp_path / "train.jsonl")))
