"""preprocess_data: bad lines, --strict, interrupted runs, inputs (glob, gzip), workers, multiple keys."""
import gzip
import importlib
import json
import os

import pytest

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_mtp.data.preprocess import preprocess

preprocess_module = importlib.import_module("megatron_mtp.data.preprocess")

GOOD = [json.dumps({"text": f"document number {i} " * (i % 7 + 1), "title": f"t{i}"}) for i in range(60)]


def write_lines(path, lines, opener=open):
    with opener(path, "wb") as stream:
        for line in lines:
            stream.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def corpus_with_bad_lines(tmp_path):
    lines = list(GOOD[:3])
    lines += ["{not json", json.dumps({"other": "no text key"}), b"\xff\xfe invalid utf-8", json.dumps([1, 2]),
              json.dumps({"text": 5}), ""]  # the empty line is blank, not bad
    lines += GOOD[3:6]
    return write_lines(tmp_path / "bad.jsonl", lines)


def test_bad_lines_are_counted_and_reported(tmp_path):
    stats = preprocess(corpus_with_bad_lines(tmp_path), str(tmp_path / "out"), progress=False)
    assert stats.documents == 6 and stats.bad_lines == 5
    assert len(IndexedDataset(stats.output_prefixes["text"])) == 6
    reported = "\n".join(stats.bad_examples)
    for line_number, reason in [(4, "invalid JSON"), (5, "missing key 'text'"), (6, "not valid UTF-8"),
                                (7, "a JSON list, not an object"), (8, "key 'text' must hold a string, not int")]:
        assert f"bad.jsonl:{line_number}: {reason}" in reported
    assert "skipped 5 bad lines" in stats.summary()


def test_strict_fails_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match=r"bad.jsonl:4: invalid JSON"):
        preprocess(corpus_with_bad_lines(tmp_path), str(tmp_path / "out" / "x"), strict=True, progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_strict_cli_exits_non_zero(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_cli", os.path.join(os.path.dirname(__file__), "..", "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    corpus = corpus_with_bad_lines(tmp_path)
    args = ["--input", corpus, "--output-prefix", str(tmp_path / "o" / "x"), "--no-progress"]
    assert cli.main(args + ["--strict", "--tokenizer-type", "byte"]) == 2
    assert capsys.readouterr().err.startswith("data error: ") and os.listdir(tmp_path / "o") == []
    assert cli.main(args) == 2  # no tokenizer named: refused, as in Megatron
    assert "--tokenizer-type byte" in capsys.readouterr().err
    assert cli.main(args + ["--tokenizer-type", "byte"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["x_text_document.bin", "x_text_document.idx",
                                                 "x_text_document.tokenizer_info.json"]


def failing_after_first_chunk(monkeypatch):
    real = preprocess_module._encode_chunk
    calls = []

    def encode(chunk):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("simulated kill")
        return real(chunk)

    monkeypatch.setattr(preprocess_module, "_encode_chunk", encode)


def test_interrupted_run_leaves_no_files(tmp_path, monkeypatch):
    corpus = write_lines(tmp_path / "c.jsonl", GOOD)
    failing_after_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, str(tmp_path / "out" / "x"), progress=False, chunk_bytes=200)
    assert os.listdir(tmp_path / "out") == []


def test_killed_run_leaves_only_temporary_files(tmp_path, monkeypatch):
    # A SIGKILL gives no chance to clean up: model it by disabling the cleanup.
    corpus = write_lines(tmp_path / "c.jsonl", GOOD)
    failing_after_first_chunk(monkeypatch)
    monkeypatch.setattr(IndexedDatasetBuilder, "abort", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, str(tmp_path / "out" / "x"), progress=False, chunk_bytes=200)
    leftovers = os.listdir(tmp_path / "out")
    assert leftovers and all(".tmp-" in name for name in leftovers)
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(str(tmp_path / "out" / "x_text_document"))


def test_glob_and_gzip_inputs_and_workers_agree(tmp_path):
    write_lines(tmp_path / "a.jsonl", GOOD[:30])
    write_lines(tmp_path / "b.jsonl.gz", GOOD[30:], opener=gzip.open)
    single = write_lines(tmp_path / "all.txt", GOOD)
    one = preprocess(single, str(tmp_path / "one"), append_eod=True, progress=False)
    many = preprocess(str(tmp_path / "*.jsonl*"), str(tmp_path / "two"), append_eod=True, workers=2,
                      progress=False, chunk_bytes=300)
    assert one.documents == many.documents == 60
    for suffix in (".bin", ".idx"):
        with open(one.output_prefixes["text"] + suffix, "rb") as a, open(many.output_prefixes["text"] + suffix, "rb") as b:
            assert a.read() == b.read()


def test_multiple_json_keys(tmp_path):
    corpus = write_lines(tmp_path / "c.jsonl", GOOD[:5])
    stats = preprocess(corpus, str(tmp_path / "out"), json_keys=["text", "title"], progress=False)
    assert set(stats.output_prefixes) == {"text", "title"}
    titles = IndexedDataset(stats.output_prefixes["title"])
    assert bytes(titles[4].astype("uint8")).decode() == "t4"


def test_missing_input_is_clear(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        preprocess(str(tmp_path / "*.jsonl"), str(tmp_path / "out"), progress=False)


def test_strict_with_workers_stops_the_pool(tmp_path):
    import multiprocessing

    with pytest.raises(DataError, match="bad.jsonl:4"):
        preprocess(corpus_with_bad_lines(tmp_path), str(tmp_path / "out" / "x"), strict=True, workers=2,
                   progress=False, chunk_bytes=100)
    assert multiprocessing.active_children() == [] and os.listdir(tmp_path / "out") == []
