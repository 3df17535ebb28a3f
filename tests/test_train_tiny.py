"""The README's main job, shortened: the tiny config trains on CPU and every head learns."""
import json
import os
import subprocess
import sys

from megatron_mtp.training.metrics import read_metrics


def test_tiny_config_trains_every_head(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.train", "--config", "configs/tiny.yaml", "--train.iters", "40",
         "--logging.interval", "1", "--optimizer.warmup_iters", "5", "--train.run_dir", str(run_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(str(run_dir))
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0], records[-1]
    for head in range(1, 5):
        key = f"loss_head_{head}"
        assert last[key] < 0.65 * first[key], (key, first[key], last[key])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "memory_gib"):
        assert key in last
    # the run directory holds the resolved config, TensorBoard events, the plot and a final checkpoint
    assert (run_dir / "config.yaml").is_file()
    assert any(name.startswith("events") for name in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "loss_per_head.png").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["step"] == 40
    assert "step    40/40" in proc.stdout
