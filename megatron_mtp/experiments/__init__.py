"""The paper's small-scale controlled comparisons, one command each (docs/reproduction.md):

    python -m megatron_mtp.experiments run {polynomial,induction,bytes,finetune} [--size smoke|small]
        [--device cuda|cpu] [--seeds 0 1 2] [--jobs N] [--out DIR]

Every run trains through the project's own loop (``megatron_mtp.training.loop.train``) and writes
``results.json``, ``results.md`` (the table) and plots into the output directory.
"""

EXPERIMENTS = ("polynomial", "induction", "bytes", "finetune")
