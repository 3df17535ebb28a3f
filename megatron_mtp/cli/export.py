"""Export a checkpoint (any layout) as a HuggingFace Llama directory or in Meta's MTP release layout.

    mtp-export --load runs/tiny --format hf --output exports/tiny-hf
    mtp-export --load runs/tiny/checkpoints/step_00000300 --format meta --output exports/tiny-meta

hf:   config.json (LlamaForCausalLM), model.safetensors or shards + index (trunk + head 1), tokenizer files,
      the extra heads in mtp_heads.safetensors + mtp_config.json, modeling_mtp_llama.py (trust_remote_code:
      every head's logits) and a README.md model card. lm-evaluation-harness takes the directory as it is:
      lm_eval --model hf --model_args pretrained=exports/tiny-hf,dtype=float32 --tasks ...
      Fails, writing nothing, when the run's tokenizer cannot be found.
meta: consolidated.pth + params.json (n_future_tokens = heads), interleaved-RoPE wq/wk.
"""
import argparse
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.errors import UserError, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--load", required=True, help="run directory, step_* directory or HF export")
    parser.add_argument("--format", required=True, choices=("hf", "meta"),
                        help="hf: LlamaForCausalLM directory; meta: Meta's MTP layout")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written tensors")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="hf: above this, weights are split into shards with an index (as save_pretrained)")
    args = parser.parse_args(argv)
    import torch

    from megatron_mtp.checkpoint.export import export, parse_size
    
    try:
        out = export(args.load, args.format, args.output, getattr(torch, args.dtype), parse_size(args.max_shard_size))
    except UserError as exc:
        return report(exc)
    print(f"wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
