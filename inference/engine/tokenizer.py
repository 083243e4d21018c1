"""The development engine's tokenizer: a byte-level BPE trained on the shipped corpus.

`tokenizer.json` is committed, so counts never depend on a download (tiktoken
fetches its files at first use and fails offline). `build_tokenizer()`
regenerates it; training is deterministic, and a test holds it to that, so the
shipped file is always the one this code produces.

Byte-level BPE has a property the gateway relies on for holds: it never yields
more tokens than the UTF-8 bytes of the text.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENGINE_DIR = Path(__file__).resolve().parent
CORPUS_PATH = ENGINE_DIR / "corpus.txt"
TOKENIZER_PATH = ENGINE_DIR / "tokenizer.json"

END_OF_TEXT = "<|endoftext|>"
# Small on purpose: the corpus is a few KB, and a vocabulary much larger than
# its distinct words would only add merges seen once.
VOCAB_SIZE = 1024


def corpus_paragraphs(path: Path = CORPUS_PATH) -> list[str]:
    """The corpus split on blank lines; each paragraph is one training document."""
    text = path.read_text(encoding="utf-8")
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def build_tokenizer(
    *, corpus_path: Path = CORPUS_PATH, output_path: Path | None = None
) -> Tokenizer:
    """Train the byte-level BPE on the corpus; write it to `output_path` when given."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's scheme: words keep their leading space, so " gym" and "gym" are
    # different tokens and decoding is an exact inverse of encoding.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        # All 256 bytes, so any text (not only the corpus' ASCII) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_paragraphs(corpus_path), trainer=trainer)
    if output_path is not None:
        tokenizer.save(str(output_path), pretty=True)
    return tokenizer


@functools.cache
def load_tokenizer(path: Path = TOKENIZER_PATH) -> Tokenizer:
    """The shipped tokenizer (cached: loading parses a ~60 KB JSON file)."""
    return Tokenizer.from_file(str(path))


def count_tokens(text: str) -> int:
    """Tokens the development engine counts for `text`, as it reports them to billing."""
    return len(load_tokenizer().encode(text, add_special_tokens=False).ids)


if __name__ == "__main__":
    build_tokenizer(output_path=TOKENIZER_PATH)
