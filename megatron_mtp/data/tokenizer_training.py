"""Training a byte-level BPE tokenizer (HuggingFace ``tokenizers``) on a JSONL corpus.

Byte-level BPE never produces unknown tokens, so any UTF-8 text round-trips. The end-of-document
token ``<|endoftext|>`` gets id 0 and a padding token id 1, so ``build_tokenizer("hf", path)`` finds them.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from megatron_mtp.io_utils import atomic_save_path

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_path: str, min_frequency: int = 2,
                        show_progress: bool = True, length: Optional[int] = None) -> str:
    """Train on ``texts`` and write ``tokenizer.json`` to ``output_path`` (atomically); return the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: code is whitespace-sensitive; keep the text exactly as written.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    atomic_save_path(output_path, tokenizer.save)
    return output_path
