"""Token-by-token generation for the development engine, with TensorRT-LLM's knobs.

Everything a billing gateway can observe behaves like a real engine: tokens
are generated one at a time from a probability distribution; `temperature`,
`top_k`, `top_p`, the penalties and `min_tokens` shape that distribution; a
numpy generator seeded by `seed` draws from it, so a seed fixes the output
(TensorRT-LLM's default seed is a constant too, which is why `seed` defaults
to 0 rather than to fresh entropy); `temperature == 0` or `top_k == 1` is
greedy. Stop words end generation and are cut from the text, and the text of
a token that might begin a stop word is held back until it is known not to.

What must stay true: the output tokens are exactly the tokenizer's encoding
of the output text (`count_tokens(text) == number of token steps`) whenever no
stop word cut the text. Token-level sampling alone does not give that: the
model may pick " sq" + "uat" where BPE encodes " squat" as one token. So a
candidate that would make the text encode differently is rejected and the
next draw is taken.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from inference.engine.ngram import TrigramModel, load_model
from inference.engine.prefix_cache import PrefixCache

# Where BPE may start a fresh word: a space before a letter always begins a new
# pre-token in GPT-2's byte-level scheme, so text before it never re-tokenizes.
_WORD_START = re.compile(r" [A-Za-z]")
# A guard against a pathological distribution: after this many rejected draws
# for one step the sequence ends instead of looping.
_MAX_REDRAWS = 64


class EngineError(ValueError):
    """A request the engine refuses; the message says what to change."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    end_id: int | None = None
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """One generation step.

    `token_id` is None for the step that only releases held-back text after the
    model chose to end; such a step produced no token and counts none.
    `finish_reason` is set on the last step only: "stop" (end token or stop
    word) or "length" (`max_tokens` reached).
    """

    token_id: int | None
    text: str
    logprob: float
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        model: TrigramModel,
        *,
        max_input_len: int = 2048,
        max_seq_len: int = 4096,
        prefix_block_size: int = 16,
        prefix_max_blocks: int = 4096,
    ):
        self.model = model
        self.tokenizer = model.tokenizer
        self.eos_id = model.eos_id
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.prefix_cache = PrefixCache(block_size=prefix_block_size, max_blocks=prefix_max_blocks)
        vocab = self.tokenizer.get_vocab_size()
        # Decoded text of every token: the byte-level decoder maps each token to
        # a fixed string, so decoding one at a time is exact for ASCII output.
        self._pieces = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise EngineError("text_input is empty; send at least one token of prompt.")
        if len(prompt_ids) > self.max_input_len:
            raise EngineError(
                f"Prompt length ({len(prompt_ids)}) exceeds the maximum input length "
                f"({self.max_input_len}); shorten the prompt."
            )
        if params.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1.")
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise EngineError(
                f"Prompt length ({len(prompt_ids)}) plus max_tokens ({params.max_tokens}) "
                f"exceeds the maximum sequence length ({self.max_seq_len}); lower max_tokens."
            )
        if params.temperature < 0:
            raise EngineError("temperature must be >= 0.")
        if params.top_k < 0:
            raise EngineError("top_k must be >= 0 (0 disables it).")
        if not 0 <= params.top_p <= 1:
            raise EngineError("top_p must be between 0 and 1 (0 disables it).")
        if params.repetition_penalty <= 0:
            raise EngineError("repetition_penalty must be > 0 (1 disables it).")
        if params.min_tokens < 0:
            raise EngineError("min_tokens must be >= 0.")
        if params.end_id is not None and not 0 <= params.end_id < len(self._pieces):
            raise EngineError(f"end_id must be a token id below {len(self._pieces)}.")

    def _bad_sequences(self, bad_words: Sequence[str]) -> list[list[int]]:
        sequences = []
        for word in bad_words:
            if not word:
                continue
            # A word inside a sentence carries its leading space in byte-level BPE,
            # so both spellings must be banned for "squat" to never appear.
            variants = {word, word if word.startswith(" ") else " " + word}
            sequences.extend(self.encode(variant) for variant in variants)
        return [sequence for sequence in sequences if sequence]

    def _is_canonical(
        self, out_ids: list[int], word_start: int, text_tail: str, token: int
    ) -> bool:
        """Whether appending `token` keeps `out_ids` equal to the encoding of the text."""
        piece = self._pieces[token]
        if _WORD_START.match(piece):
            return self._word_tokens(piece) == (token,)
        return self._word_tokens(text_tail + piece) == (*out_ids[word_start:], token)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one engine per process, lives as long
    def _word_tokens(self, text: str) -> tuple[int, ...]:
        # Words repeat, and a call into the tokenizer costs more than the model step.
        return tuple(self.encode(text))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Step]:
        """Yield one Step per generated token; the last Step has a finish_reason."""
        self.validate(prompt_ids, params)
        rng = np.random.default_rng(params.seed)
        end_id = self.eos_id if params.end_id is None else params.end_id
        stop_words = [word for word in params.stop_words if word]
        bad_sequences = self._bad_sequences(params.bad_words)
        context = list(prompt_ids)
        seen_in_context = set(context)
        out_ids: list[int] = []
        out_counts: Counter[int] = Counter()
        text = ""
        emitted = 0
        # Token index and text offset where the last word of the output starts.
        word_start, word_start_char = 0, 0
        greedy = params.temperature == 0 or params.top_k == 1

        while True:
            probs = self._penalize(
                self.model.next_token_probs(context), params, seen_in_context, out_counts
            )
            if len(out_ids) < params.min_tokens:
                probs[end_id] = 0.0
                probs[self.eos_id] = 0.0
            for sequence in bad_sequences:
                if len(sequence) == 1 or context[-(len(sequence) - 1) :] == sequence[:-1]:
                    probs[sequence[-1]] = 0.0
            if not greedy:
                probs = self._truncate(probs, params)

            token = None
            for _ in range(_MAX_REDRAWS):
                if probs.sum() <= 0:
                    break
                candidate = int(np.argmax(probs)) if greedy else self._draw(probs, rng)
                if candidate in (end_id, self.eos_id) or self._is_canonical(
                    out_ids, word_start, text[word_start_char:], candidate
                ):
                    token = candidate
                    break
                probs[candidate] = 0.0
            if token is None or token in (end_id, self.eos_id):
                # The end token is not output and not counted, as in TensorRT-LLM.
                yield Step(token_id=None, text=text[emitted:], logprob=0.0, finish_reason="stop")
                return

            logprob = math.log(probs[token] / probs.sum())
            piece = self._pieces[token]
            if _WORD_START.match(piece):
                word_start, word_start_char = len(out_ids), len(text)
            previous_len = len(text)
            out_ids.append(token)
            out_counts[token] += 1
            context.append(token)
            seen_in_context.add(token)
            text += piece

            stop_at = _find_stop(text, stop_words, previous_len)
            if stop_at is not None:
                yield Step(token, text[emitted:stop_at], logprob, finish_reason="stop")
                return
            if len(out_ids) >= params.max_tokens:
                yield Step(token, text[emitted:], logprob, finish_reason="length")
                return
            safe = len(text) - _held_back(text, stop_words)
            yield Step(token, text[emitted:safe], logprob)
            emitted = safe

    @staticmethod
    def _penalize(probs, params: SamplingParams, seen: set[int], out_counts: Counter) -> np.ndarray:
        """Apply the penalties, which TensorRT-LLM defines on logits (log space)."""
        repetition = params.repetition_penalty != 1.0 and seen
        additive = (params.presence_penalty or params.frequency_penalty) and out_counts
        if not (repetition or additive):
            return probs
        with np.errstate(divide="ignore"):
            logits = np.log(probs)
        if repetition:
            ids = np.fromiter(seen, dtype=np.int64)
            values = logits[ids]
            # Log-probabilities are <= 0, so multiplying pushes a seen token down.
            logits[ids] = np.where(
                values < 0,
                values * params.repetition_penalty,
                values / params.repetition_penalty,
            )
        if additive:
            ids = np.fromiter(out_counts.keys(), dtype=np.int64)
            counts = np.fromiter(out_counts.values(), dtype=np.float64)
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
        finite = np.isfinite(logits)
        if not finite.any():
            return np.zeros_like(probs)
        return np.where(finite, np.exp(logits - logits[finite].max()), 0.0)

    @staticmethod
    def _truncate(probs, params: SamplingParams) -> np.ndarray:
        """Unnormalized probabilities after temperature, top_k and top_p."""
        if params.temperature != 1.0:
            # softmax(logits / T) is p ** (1 / T), renormalized; zeros stay zero.
            probs = probs ** (1.0 / params.temperature)
        if params.top_k > 0 and params.top_k < np.count_nonzero(probs):
            cutoff = np.partition(probs, -params.top_k)[-params.top_k]
            probs = np.where(probs >= cutoff, probs, 0.0)
        if 0 < params.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order]) / probs.sum()
            # Keep the smallest head whose mass reaches top_p, including the
            # token that crosses it.
            keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
            trimmed = np.zeros_like(probs)
            trimmed[keep] = probs[keep]
            probs = trimmed
        return probs

    @staticmethod
    def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return min(index, len(probs) - 1)


def _find_stop(text: str, stop_words: Sequence[str], previous_len: int) -> int | None:
    """Offset of the earliest stop word that the newest token completed, if any."""
    found = None
    for word in stop_words:
        # Only a match that ends in the new text is new; earlier ones were checked.
        at = text.find(word, max(0, previous_len - len(word) + 1))
        if at != -1 and (found is None or at < found):
            found = at
    return found


def _held_back(text: str, stop_words: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop word."""
    longest = 0
    for word in stop_words:
        for size in range(min(len(word) - 1, len(text)), longest, -1):
            if text.endswith(word[:size]):
                longest = size
                break
    return longest


def load_engine(**kwargs) -> Engine:
    return Engine(load_model(), **kwargs)
