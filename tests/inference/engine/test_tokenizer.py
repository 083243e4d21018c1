"""The shipped tokenizer is the one the code builds, and it counts like a byte-level BPE."""

from __future__ import annotations

import json

from inference.engine.tokenizer import (
    END_OF_TEXT,
    TOKENIZER_PATH,
    build_tokenizer,
    count_tokens,
    load_tokenizer,
)


def test_shipped_tokenizer_is_what_build_tokenizer_produces():
    # when
    built = build_tokenizer()

    # then: regenerate with `python inference/engine/tokenizer.py` after editing the corpus
    assert json.loads(built.to_str()) == json.loads(TOKENIZER_PATH.read_text())


def test_counts_are_tokens_not_bytes_and_never_exceed_bytes():
    # given
    texts = ["The gym opens at six in the morning.", "Ünïcödé and emoji 🏋️ count too", ""]

    # when
    counts = [count_tokens(text) for text in texts]

    # then
    assert counts[0] < len(texts[0].encode())
    assert all(count <= len(text.encode()) for count, text in zip(counts, texts, strict=True))
    assert counts[2] == 0
    assert load_tokenizer().decode(load_tokenizer().encode(texts[1]).ids) == texts[1]
    assert load_tokenizer().token_to_id(END_OF_TEXT) is not None
