"""Synthetic task data for the paper's controlled experiments (``megatron_mtp.experiments``).

* ``polynomial``: arithmetic on polynomials over F7[X]/(X^5) (paper section 4.2);
* ``induction``: stories in which two-token names recur, and the induction metric (paper section 4.1).

Both write JSONL with a ``text`` field that ``megatron_mtp.data.preprocess`` turns into ``.bin/.idx``:
``python -m megatron_mtp.tasks polynomial --out data/poly`` (see docs/reproduction.md).
"""
