"""The multi-GPU suite's driver, run on CPU with gloo: a DP=2 ZeRO-1 layout against the single-process run,
and save at DP=2 ZeRO-1 -> reshard -> resume at PP=2 (fp32, 1e-4 relative per step)."""
import json
import subprocess
import sys


def test_multi_gpu_suite_cpu_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/multi_gpu_suite.py", "--cpu", "--layouts", "dp2_zero1", "--iters", "14",
         "--output-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "multi_gpu_cpu.json").read_text())
    assert result["layouts"]["dp2_zero1"]["passed"]
    assert result["layouts"]["dp2_zero1"]["max_rel_loss_diff"] <= 1e-4
    resume = result["resume"]
    assert resume["passed"] and resume["steps_after_resume"] == [11, 12, 13, 14]
