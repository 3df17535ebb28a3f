"""The embedded stdlib corpus: deterministic contents, held-out split, build-once cache, racing builders."""
import json
import os
import subprocess
import sys

import numpy as np

from megatron_mtp.data.code_corpus import ensure_stdlib_corpus, heldout_score, iter_stdlib_files, write_code_corpus
from megatron_mtp.data.indexed_dataset import IndexedDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    with open(path) as stream:
        return [json.loads(line) for line in stream]


def test_corpus_is_sorted_deterministic_and_skips_tests(tmp_path):
    files = iter_stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split(os.sep)[:-1])
    a = write_code_corpus(str(tmp_path / "a"), max_docs=60, heldout_fraction=0.2)
    b = write_code_corpus(str(tmp_path / "b"), max_docs=60, heldout_fraction=0.2)
    for key in ("train_jsonl", "heldout_jsonl"):
        assert open(a[key], "rb").read() == open(b[key], "rb").read()
    heldout = read_jsonl(a["heldout_jsonl"])
    assert heldout and all(heldout_score(doc["path"]) < 0.2 for doc in heldout)
    train = read_jsonl(a["train_jsonl"])
    assert {doc["path"] for doc in train}.isdisjoint(doc["path"] for doc in heldout)
    assert all(set(doc) == {"text", "path"} and doc["text"] for doc in train)


def test_ensure_builds_once_and_reuses(tmp_path):
    first = ensure_stdlib_corpus(str(tmp_path), max_docs=25)
    dataset = IndexedDataset(first["train_prefix"])
    heldout = IndexedDataset(first["heldout_prefix"])
    assert len(dataset) > 0 and len(heldout) > 0 and dataset.dtype == np.uint16
    assert dataset[0][-1] == 256  # documents end with the byte tokenizer's EOD
    stamp = os.stat(first["train_prefix"] + ".bin").st_mtime_ns
    assert ensure_stdlib_corpus(str(tmp_path), max_docs=25) == first
    assert os.stat(first["train_prefix"] + ".bin").st_mtime_ns == stamp  # reused, not rebuilt
    assert len(read_jsonl(first["heldout_jsonl"])) == len(heldout)


def test_racing_builders_agree(tmp_path):
    code = ("import json, sys; from megatron_mtp.data.code_corpus import ensure_stdlib_corpus; "
            "print(json.dumps(ensure_stdlib_corpus(sys.argv[1], max_docs=40)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0] == results[1]
    built = [name for name in os.listdir(tmp_path) if not name.endswith(".lock")]
    assert built == [os.path.basename(results[0]["directory"])]  # no temporary directories left
    IndexedDataset(results[0]["train_prefix"])
