"""Throughput accounting (FLOPs, MFU) and the run's metrics: one log line, metrics.jsonl, TensorBoard, a plot."""
from __future__ import annotations

import json
import os
import resource
from typing import Optional

import torch

from megatron_mtp.config import ModelConfig, MTPConfig
from megatron_mtp.io_utils import atomic_save_path

# Dense bf16 peak of one H100 SXM (the number MFU is quoted against by Megatron-LM and the paper's peers).
H100_BF16_PEAK = 989e12


def flops_per_token(cfg: ModelConfig, mtp: MTPConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters touched per token) + attention, PaLM's convention
    (12 * layers * hidden * seq for QKᵀ and AV, forward and backward). Every head's unembedding counts: an
    n-head model projects to the vocabulary n times."""
    d, f, hd = cfg.hidden_size, cfg.ffn_size, cfg.head_dim
    attn = d * (cfg.num_attention_heads + 2 * cfg.kv_heads) * hd + cfg.num_attention_heads * hd * d
    mlp = 3 * d * f
    layer = attn + mlp
    if mtp.head_type == "transformer":
        layers, head_params = cfg.num_layers, 0
    else:
        layers, head_params = cfg.num_layers, mtp.n_heads * d * d
    unembed = mtp.n_heads * d * cfg.vocab_size
    matmul_params = layers * layer + head_params + unembed
    return 6.0 * matmul_params + 12.0 * layers * d * seq_length


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return H100_BF16_PEAK
    return None


class MetricsLogger:
    """Rank 0 writes each record to stdout (one line), ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume: bool = False,
                 start_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # On resume, drop events a crashed run logged after its last checkpoint (they are replayed).
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                        purge_step=start_step + 1 if resume else None)
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def log(self, record: dict, total_steps: int) -> None:
        if not self.enabled:
            return
        heads = " ".join(f"{record[k]:.3f}" for k in sorted(k for k in record if k.startswith("loss_head_")))
        line = (
            f"step {record['step']:>5}/{total_steps} | loss {record['loss']:.4f} | heads {heads} | "
            f"lr {record['lr']:.2e} | grad {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
            f"{record['tflops']:.2f} TFLOP/s"
        )
        if record.get("mfu") is not None:
            line += f" | MFU {100 * record['mfu']:.1f}%"
        line += f" | mem {record['memory_gib']:.2f} GiB"
        if record.get("skipped_iters"):  # steps whose loss or gradient norm was not finite (training/guard.py)
            line += f" | skipped {record['skipped_iters']}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_head_losses(run_dir: str, out_path: Optional[str] = None) -> Optional[str]:
    """Loss curve per head from metrics.jsonl into ``loss_per_head.png`` (people look rather than read)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted((k for k in records[0] if k.startswith("loss_head_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in heads:
        ax.plot(steps, [r[key] for r in records], label=f"head {key.rsplit('_', 1)[1]} (t+{key.rsplit('_', 1)[1]})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Training loss per MTP head")
    ax.grid(alpha=0.3)
    ax.legend()
    out_path = out_path or os.path.join(run_dir, "loss_per_head.png")
    fig.tight_layout()
    atomic_save_path(out_path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out_path
