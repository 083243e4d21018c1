"""A token-level trigram language model, counted from the shipped corpus at load time.

It stands in for a transformer: given the tokens so far it returns a
probability for every token in the vocabulary. Trigram, bigram and unigram
estimates are interpolated so that every context, even one the corpus never
saw, has a proper distribution over the tokens the corpus contains.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from inference.engine.tokenizer import END_OF_TEXT, corpus_paragraphs, load_tokenizer

# Interpolation weights (trigram, bigram, unigram). The unigram share keeps
# sampling from ever getting stuck; it is small so that text stays corpus-like.
WEIGHTS = (0.85, 0.14, 0.01)


@dataclass(frozen=True)
class _Row:
    """Next-token ids and their probabilities after one context."""

    ids: np.ndarray
    probs: np.ndarray


def _rows(counts: dict) -> dict:
    rows = {}
    for context, counter in counts.items():
        ids = np.fromiter(counter.keys(), dtype=np.int64, count=len(counter))
        freq = np.fromiter(counter.values(), dtype=np.float64, count=len(counter))
        rows[context] = _Row(ids=ids, probs=freq / freq.sum())
    return rows


class TrigramModel:
    """Interpolated trigram probabilities over the tokenizer's vocabulary."""

    def __init__(self, tokenizer: Tokenizer, documents: Sequence[str]):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(END_OF_TEXT)
        unigram: Counter = Counter()
        bigram: dict[int, Counter] = defaultdict(Counter)
        trigram: dict[tuple[int, int], Counter] = defaultdict(Counter)
        for document in documents:
            # Two end-of-text tokens on the left model "start of a document",
            # the one on the right teaches the model where documents end.
            ids = [self.eos_id, self.eos_id]
            ids += tokenizer.encode(document, add_special_tokens=False).ids
            ids.append(self.eos_id)
            for a, b, c in zip(ids, ids[1:], ids[2:], strict=False):
                unigram[c] += 1
                bigram[b][c] += 1
                trigram[(a, b)][c] += 1
        self._unigram = np.zeros(self.vocab_size, dtype=np.float64)
        for token, count in unigram.items():
            self._unigram[token] = count
        self._unigram /= self._unigram.sum()
        self._bigram = _rows(bigram)
        self._trigram = _rows(trigram)

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:
        """P(next token | last two tokens of `context`), a fresh array summing to 1."""
        padded = [self.eos_id, self.eos_id, *context[-2:]]
        a, b = padded[-2], padded[-1]
        w_tri, w_bi, w_uni = WEIGHTS
        probs = self._unigram * w_uni
        weight = w_uni
        bi = self._bigram.get(b)
        if bi is not None:
            probs[bi.ids] += w_bi * bi.probs
            weight += w_bi
        tri = self._trigram.get((a, b))
        if tri is not None:
            probs[tri.ids] += w_tri * tri.probs
            weight += w_tri
        # An unseen context gives its weight back to the estimates that exist.
        return probs / weight


def load_model() -> TrigramModel:
    """The model over the shipped tokenizer and corpus (counting takes a few ms)."""
    return TrigramModel(load_tokenizer(), corpus_paragraphs())
