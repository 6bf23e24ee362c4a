"""Stop strings and output text, with the real SmolLM2 tokenizer over a tiny random target."""

from functools import partial

import pytest
from transformers import AutoTokenizer

from dflash_core.detokenize import OutputText
from dflash_core.engine import SpeculativeEngine
from dflash_core.fetch import DEFAULT_MODEL, resolve_model
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler
from tests.drafters import TargetAsDrafter
from tests.helpers import random_target

MAX_SEQ_LEN = 128
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(
        tmp_path_factory.mktemp("wide"), "llama", vocab_size=VOCAB, num_hidden_layers=2
    )


def make_engine(target, tokenizer, num_slots=1, block_size=8):
    return SpeculativeEngine(
        target,
        TargetAsDrafter(target, block_size, num_slots, MAX_SEQ_LEN),
        max_seq_len=MAX_SEQ_LEN,
        num_slots=num_slots,
        decode=partial(tokenizer.decode, skip_special_tokens=True),
    )


PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"


def reference(target, tokenizer, prompt=PROMPT, max_new_tokens=30):
    engine = SpeculativeEngine(
        target,
        None,
        max_seq_len=MAX_SEQ_LEN,
        decode=partial(tokenizer.decode, skip_special_tokens=True),
    )
    return engine.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens))


def spanning_stop(tokenizer, token_ids, at):
    """A stop string made of the end of token `at` and the start of token `at + 1`."""
    left = tokenizer.decode(token_ids[at : at + 1])
    right = tokenizer.decode(token_ids[at + 1 : at + 2])
    assert len(left) >= 1
    assert len(right) >= 1
    return left[-2:] + right[:2]


def test_stop_string_spanning_two_tokens(target, tokenizer):
    plain = reference(target, tokenizer)
    stop = spanning_stop(tokenizer, plain.token_ids, 6)
    full_text = tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    cut = full_text.find(stop)
    result = make_engine(target, tokenizer).generate(
        PROMPT, SamplingParams(max_new_tokens=30, stop=(stop,))
    )
    assert result.finish_reason == "stop"
    assert result.text == full_text[:cut]
    assert stop not in result.text
    # Tokens stop at the one that completed the stop string; nothing after it is counted.
    assert result.token_ids == plain.token_ids[: len(result.token_ids)]
    completed = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    shorter = tokenizer.decode(result.token_ids[:-1], skip_special_tokens=True)
    assert stop in completed
    assert stop not in shorter
    assert sum(result.acceptance_lengths) == len(result.token_ids) - 1


def test_earliest_of_several_stop_strings_wins(target, tokenizer):
    plain = reference(target, tokenizer)
    early = spanning_stop(tokenizer, plain.token_ids, 3)
    late = spanning_stop(tokenizer, plain.token_ids, 9)
    full_text = tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    result = make_engine(target, tokenizer).generate(
        PROMPT, SamplingParams(max_new_tokens=30, stop=(late, early))
    )
    assert result.text == full_text[: full_text.find(early)]


def test_stop_strings_in_a_batch(target, tokenizer):
    prompts = [PROMPT, [1, 2, 3], [9, 8, 7, 6, 5, 4]]
    requests, expected = [], []
    for i, prompt in enumerate(prompts):
        plain = reference(target, tokenizer, prompt)
        full_text = tokenizer.decode(plain.token_ids, skip_special_tokens=True)
        stop = spanning_stop(tokenizer, plain.token_ids, 4 + i)
        requests.append(Request(str(i), prompt, SamplingParams(max_new_tokens=30, stop=(stop,))))
        expected.append(full_text[: full_text.find(stop)])
    results = Scheduler(make_engine(target, tokenizer, num_slots=3, block_size=16)).run(requests)
    assert [r.text for r in results] == expected
    assert all(r.finish_reason == "stop" for r in results)


def test_text_without_stop_matches_plain(target, tokenizer):
    plain = reference(target, tokenizer)
    result = make_engine(target, tokenizer).generate(PROMPT, SamplingParams(max_new_tokens=30))
    assert result.text == plain.text
    assert result.text == tokenizer.decode(plain.token_ids, skip_special_tokens=True)


def test_stop_token_is_left_out_of_text(target, tokenizer):
    plain = reference(target, tokenizer)
    stop = plain.token_ids[5]
    cut = plain.token_ids.index(stop)
    result = make_engine(target, tokenizer).generate(
        PROMPT, SamplingParams(max_new_tokens=30, stop_token_ids=(stop,))
    )
    assert result.token_ids == plain.token_ids[: cut + 1]
    assert result.text == tokenizer.decode(plain.token_ids[:cut], skip_special_tokens=True)


def test_stable_text_never_ends_in_half_a_character(tokenizer):
    ids = tokenizer.encode("naïve café 😊 日本語")
    text = OutputText(partial(tokenizer.decode, skip_special_tokens=True))
    streamed = ""
    for token in ids:
        text.add(token)
        stable = text.stable_text()
        assert stable.startswith(streamed)
        streamed = stable
    assert streamed == "naïve café 😊 日本語"
