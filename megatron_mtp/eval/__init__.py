"""Evaluation: unbiased pass@k, the HumanEval harness (sandboxed execution), per-head perplexity.

See docs/inference.md and tools/eval_humaneval.py, tools/eval_perplexity.py.
"""
from megatron_mtp.eval.pass_at_k import estimate_pass_at_k, mean_pass_at_k, pass_at_k
from megatron_mtp.eval.sandbox import ExecResult, SandboxUnavailable, require_isolation, run_program, run_programs

__all__ = ["ExecResult", "SandboxUnavailable", "estimate_pass_at_k", "mean_pass_at_k", "pass_at_k", "require_isolation",
           "run_program", "run_programs"]
