"""A checkpoint written before format ids and checksums existed (commit 418f5b6: format 2, engine named by its
class, ``LocalEngine`` or ``DeepSpeedEngine``, no SHA-256s) still resumes exactly: the resumed steps reproduce, bit for bit, the losses of
the old code's uninterrupted run (tests/data/checkpoint_418f5b6*/expected.json), for LocalEngine and for
DeepSpeed (ZeRO 1) files."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import REPO, _train_in_process, losses, tiny_overrides

FIXTURES = os.path.join(REPO, "tests", "data")


@pytest.mark.parametrize("fixture, tag, fmt, files", [
    ("checkpoint_418f5b6", "LocalEngine", "local-v1", "model_tp00.pt"),
    ("checkpoint_418f5b6_deepspeed", "DeepSpeedEngine", "deepspeed-v1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_checkpoint_of_the_previous_format_resumes_exactly(tmp_path, capsys, fixture, tag, fmt, files):
    from megatron_mtp.checkpoint.store import engine_format, read_meta, verify_checkpoint

    if tag == "DeepSpeedEngine":
        pytest.importorskip("deepspeed")
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURES, fixture), run)
    ckpt = os.path.join(run, "checkpoints", "step_00000004")
    meta = read_meta(ckpt)
    assert (meta["format"], meta["engine"], "sha256" in meta, files in meta["files"]) == (2, tag, False, True)
    assert engine_format(meta) == fmt
    verify_checkpoint(ckpt)  # sizes only: it has no checksums

    with open(os.path.join(run, "expected.json")) as f:
        expected = json.load(f)
    capsys.readouterr()
    _train_in_process(tiny_overrides(run, str(tmp_path / "data"), **expected["overrides"]))
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 4" in out and "step     1/8" not in out  # it continued, not restarted
    got = losses(run)
    want = [tuple(r) for r in expected["losses"]]
    assert [r[0] for r in got] == list(range(1, 9))
    assert got == want  # steps 1-4 kept from the old run's log, steps 5-8 resumed: bit for bit
    assert read_meta(os.path.join(run, "checkpoints", "step_00000008"))["engine"] == fmt  # saved in the new format


def test_every_previous_engine_tag_maps_to_a_format_id():
    from megatron_mtp.checkpoint.store import (DEEPSPEED_FORMAT, LEGACY_FORMAT_IDS, LOCAL_FORMAT, UNIVERSAL_FORMAT,
                                               engine_format)

    assert {tag: engine_format({"engine": tag}) for tag in ("LocalEngine", "DeepSpeedEngine", "Universal")} == {
        "LocalEngine": LOCAL_FORMAT, "DeepSpeedEngine": DEEPSPEED_FORMAT, "Universal": UNIVERSAL_FORMAT}
    assert engine_format({}) == LOCAL_FORMAT  # format 1 had no tag: LocalEngine files
    assert set(LEGACY_FORMAT_IDS.values()) == {LOCAL_FORMAT, DEEPSPEED_FORMAT, UNIVERSAL_FORMAT}
