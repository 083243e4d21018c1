"""What the engine adds to a prompt and what it allows of one, as the catalog tells the gateway.

TensorRT-LLM's preprocessing adds the tokenizer's special tokens (a BOS, for
Llama-family tokenizers) to every prompt unless its `add_special_tokens`
parameter is false, and its engine refuses a prompt over `max_input_len`.
The catalog's `prompt_special_tokens` and `max_input_tokens` carry both, so
the hold's bound, the prompt count and the context check agree with the
engine's own count. The BOS tokenizer here is the development engine's with
a post-processor that prepends a BOS, as a Llama tokenizer.json has: the
count it gives with `add_special_tokens=True` is what such a preprocessing
reports as `num_input_tokens`.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import pytest
from django.forms.models import model_to_dict
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from accounts.errors import ApplicationError
from inference.models import CatalogModel, Job
from inference.services import jobs
from metering.models import Hold
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_tokenizer_caches")]

TOKENIZER = "inference/engine/tokenizer.json"
BOS = "<|endoftext|>"


@pytest.fixture
def bos_tokenizer(tmp_path) -> str:
    """A tokenizer.json that adds a BOS to every prompt it encodes with special tokens."""
    tokenizer = Tokenizer.from_file(TOKENIZER)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture
def sentencepiece_tokenizer(tmp_path) -> str:
    """A tokenizer.json shaped as Llama 2's and Mistral's: a "▁" put in front of the text,
    unknown characters one token a byte, a BOS added with special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁squat": 4}
    vocab |= {f"<0x{byte:02X}>": 5 + byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    path = tmp_path / "sp-tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def _engine_count(tokenizer_file: str, prompt: str) -> int:
    """num_input_tokens as a preprocessing with add_special_tokens on reports it."""
    return len(Tokenizer.from_file(tokenizer_file).encode(prompt, add_special_tokens=True).ids)


def test_the_gateway_counts_a_prompt_as_an_engine_that_adds_a_bos_does(bos_tokenizer):
    # given a catalog entry for an engine whose preprocessing adds a BOS
    assert jobs.tokenizer_special_tokens(bos_tokenizer) == 1
    assert jobs.tokenizer_special_tokens(TOKENIZER) == 0
    model = CatalogModel(name="m", tokenizer_file=bos_tokenizer, prompt_special_tokens=1)

    for prompt in ["Plan my week.", "squat " * 40, "x"]:
        # then the gateway's count is the engine's, and the bytes bound it
        # even for a 1-byte prompt (2 tokens with the BOS)
        engine = _engine_count(bos_tokenizer, prompt)
        assert jobs.prompt_tokens_count(model=model, prompt=prompt) == engine
        assert jobs.prompt_token_bound(prompt, model=model) >= engine
    assert _engine_count(bos_tokenizer, "x") == 2


def test_the_bound_covers_a_tokenizer_that_puts_a_token_in_front_of_the_text(
    sentencepiece_tokenizer,
):
    # given a Llama 2-style tokenizer: one byte of text is "▁" and a byte
    # token, and a BOS: 3 tokens as the engine counts them
    model = CatalogModel(name="m", tokenizer_file=sentencepiece_tokenizer, prompt_special_tokens=1)
    assert _engine_count(sentencepiece_tokenizer, "\x01") == 3

    # then the gateway's bound covers every prompt's count, one byte or many
    for prompt in ["\x01", "a", " ", "é", "squat", "plan my week, then squat", "日本"]:
        engine = _engine_count(sentencepiece_tokenizer, prompt)
        assert jobs.prompt_token_bound(prompt, model=model) >= engine, prompt
        assert jobs.prompt_tokens_count(model=model, prompt=prompt) == engine
    # and the development engine's byte-level tokenizer needs no such slack
    dev = CatalogModel(name="dev", tokenizer_file=TOKENIZER)
    assert jobs.prompt_token_bound("a", model=dev) == 1


def test_a_default_max_tokens_is_cut_to_leave_room_for_the_bos(bos_tokenizer):
    # given a 64-token context, an engine that adds a BOS, and a prompt of
    # 43 text tokens (44 as the engine counts it) whose bytes do not fit
    model = CatalogModel(
        name="m", context_limit=64, tokenizer_file=bos_tokenizer, prompt_special_tokens=1
    )
    prompt = "squat " * 40
    assert _engine_count(bos_tokenizer, prompt) == 44
    bound = jobs.prompt_token_bound(prompt, model=model)

    # when max_tokens is left out, the default is cut so that the engine's
    # count plus it is exactly the context
    assert jobs._within_context(model, prompt, bound, 256, requested=None) == (64 - 44, 44)

    # and one asked for that fits the text but not the BOS is refused, with
    # the engine's count
    with pytest.raises(ApplicationError) as refused:
        jobs._within_context(model, prompt, bound, 21, requested=21)
    assert "you requested 65 tokens (44 in the prompt, 21 for the completion)" in str(refused.value)


def test_the_hold_and_the_quote_cover_the_bos(grant):
    # given a model at 1 credit per prompt token and nothing for output, on
    # an engine that adds a BOS
    model = served_model("gym-bos", input_rate="1000000", output_rate="0", prompt_special_tokens=1)
    org = OrganizationFactory()
    grant(org, credits(100))
    prompt = "Plan my week."  # 13 bytes

    # when a job is submitted, and the same request quoted
    job = submit_job(org, "gym-bos", prompt=prompt, max_tokens=4)
    quote = jobs.job_quote(
        organization=org, model_name=model.name, prompt=prompt, max_tokens=4, priority="standard"
    )

    # then both hold the prompt's bytes plus the BOS: 14 credits
    assert Hold.objects.get(key=job.public_id).amount == credits(14) == job.hold_amount
    assert (quote["max_credits"], quote["prompt_tokens_max"]) == (credits(14), 14)
    assert organization_balance(organization=org).available == credits(100 - 14)


def test_a_prompt_over_the_engines_input_limit_is_refused_before_anything_is_held(grant):
    # given a 4096-token context on an engine that takes prompts of at most
    # 32 tokens (its max_input_len), with the engine's tokenizer
    model = served_model(
        "gym-short", tokenizer_file=TOKENIZER, context_limit=4096, max_input_tokens=32
    )
    org = OrganizationFactory()
    grant(org, credits(10))
    before = organization_balance(organization=org)
    prompt = "squat " * 40  # 43 tokens, 240 bytes
    assert jobs.prompt_tokens_count(model=model, prompt=prompt) == 43

    # when it is submitted, then it is refused with the engine's limit and its count
    with pytest.raises(ApplicationError) as refused:
        submit_job(org, "gym-short", prompt=prompt, max_tokens=4)
    assert refused.value.code == "context_length_exceeded"
    assert str(refused.value) == (
        "This model's maximum prompt length is 32 tokens. However, your prompt is 43 tokens. "
        "Please shorten it."
    )
    # and nothing was held or written
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()

    # and a prompt whose bytes alone prove it over the limit is refused uncounted
    counted = []
    count = jobs.prompt_tokens_count
    jobs_count = lambda **kw: counted.append(kw) or count(**kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs, "prompt_tokens_count", jobs_count)
        with pytest.raises(ApplicationError) as uncounted:
            jobs._within_context(model, "x" * 2000, 2000, 4, requested=4)
    assert "your prompt is 77 tokens or more" in str(uncounted.value)
    assert counted == []

    # and a prompt within it is served as before
    assert submit_job(org, "gym-short", prompt="squat " * 20, max_tokens=4).pk


def test_the_engines_prompt_limit_counts_the_bos_and_yields_to_a_tighter_context(bos_tokenizer):
    # given an engine that adds a BOS and takes prompts of at most 44 tokens
    model = CatalogModel(
        name="m",
        context_limit=4096,
        max_input_tokens=44,
        tokenizer_file=bos_tokenizer,
        prompt_special_tokens=1,
    )
    fits, over = "squat " * 40, "squat " * 41  # 43 and 44 text tokens
    assert [_engine_count(bos_tokenizer, p) for p in (fits, over)] == [44, 45]

    # then the prompt of 44 with its BOS fits, the one of 45 does not
    assert jobs._within_context(model, fits, len(fits) + 1, 8, requested=8) == (8, 44)
    with pytest.raises(ApplicationError) as refused:
        jobs._within_context(model, over, len(over) + 1, 8, requested=8)
    assert "maximum prompt length is 44 tokens. However, your prompt is 45 tokens." in str(
        refused.value
    )

    # and an engine limit at or above the context leaves the context to decide
    model.context_limit, model.max_input_tokens = 64, 64
    with pytest.raises(ApplicationError) as context:
        jobs._within_context(model, over, len(over) + 1, 20, requested=20)
    assert "maximum context length is 64 tokens" in str(context.value)


def test_a_prompt_refused_uncounted_counts_the_bos_too(bos_tokenizer, monkeypatch):
    # given a 64-token context on an engine that adds a BOS, and a prompt of
    # 1638 bytes: 63 tokens at least by its bytes (26 a token), 64 with the BOS
    model = CatalogModel(
        name="m", context_limit=64, tokenizer_file=bos_tokenizer, prompt_special_tokens=1
    )
    assert jobs._longest_token_bytes(bos_tokenizer) == 13
    prompt = "x" * (63 * 26)
    counted = []
    monkeypatch.setattr(jobs, "prompt_tokens_count", lambda **kw: counted.append(kw))

    # then it fills the context alone, and is refused without being tokenized
    with pytest.raises(ApplicationError) as refused:
        jobs._within_context(model, prompt, len(prompt) + 1, 4, requested=4)
    assert "your prompt is 64 tokens or more" in str(refused.value)
    assert counted == []


def test_staff_are_warned_when_special_tokens_differ_from_what_the_tokenizer_adds(
    admin_client, bos_tokenizer
):
    # given a catalog entry with a tokenizer that adds one BOS
    model = served_model("gym-admin-bos", tokenizer_file=bos_tokenizer)
    url = f"/admin/inference/catalogmodel/{model.pk}/change/"
    form = {k: ("" if v is None else v) for k, v in model_to_dict(model).items()}
    warning = "adds 1 special token(s) to a prompt, and prompt_special_tokens is"

    for special, warned in [(1, False), (0, True), (2, True)]:
        # when staff save a value
        saved = admin_client.post(url, {**form, "prompt_special_tokens": special}, follow=True)

        # then it is saved as given (the preprocessing may rightly differ),
        # with a warning when it is not what the tokenizer adds
        assert saved.status_code == 200
        model.refresh_from_db()
        assert model.prompt_special_tokens == special
        page = saved.content.decode()
        assert (f"{warning} {special}:" in page) is warned, (special, page[:500])
