import itertools

import pytest
import torch

from dflash_core import engine as engine_module
from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams, accept_sampled, filtered_probs
from dflash_core.scheduler import Request, Scheduler
from tests.drafters import TargetAsDrafter
from tests.helpers import assert_close, random_target
from tests.test_engine import prompts, random_drafter

MAX_SEQ_LEN = 96
PROMPT = [5, 17, 42, 8]
SAMPLED = SamplingParams(max_new_tokens=3, temperature=0.9, top_k=4, top_p=0.9)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=4)


def test_filtered_probs_top_k_and_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert (filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2)) > 0).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    probs = logits.softmax(-1)  # [0.64, 0.24, 0.09, 0.03, 0.01]
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.85)) > 0
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:2].sum() >= 0.85
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.1)) > 0
    assert kept.tolist() == [True, False, False, False, False]
    hot = filtered_probs(logits, SamplingParams(temperature=2.0))
    assert_close(hot, (logits / 2).softmax(-1), 1e-6, "temperature")


@pytest.mark.parametrize("mode", ["argmax", "sampled"])
def test_accept_sampled_first_token_follows_target(mode):
    """The first committed token of a block has the target's distribution p_0 exactly."""
    gen = torch.Generator().manual_seed(0)
    target_probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    draft_probs = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    counts = torch.zeros(4)
    runs = 20000
    for _ in range(runs):
        if mode == "argmax":
            drafts, q = [2], None
        else:
            drafts, q = [int(torch.multinomial(draft_probs[0], 1, generator=gen))], draft_probs
        counts[accept_sampled(drafts, q, target_probs, gen)[0]] += 1
    tv = 0.5 * (counts / runs - target_probs[0]).abs().sum()
    assert tv < 0.015, f"total variation {tv:.4f}"


def exact_distribution(target, prompt, params):
    """Exact probability of every continuation of params.max_new_tokens tokens."""
    support = {}
    frontier = {(): 1.0}
    for _ in range(params.max_new_tokens):
        grown = {}
        for prefix, prob in frontier.items():
            ids = torch.tensor([prompt + list(prefix)])
            hidden = target(ids, target.new_cache(1, MAX_SEQ_LEN), torch.tensor([0])).hidden
            probs = filtered_probs(target.logits(hidden[0, -1]), params)
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = prob * float(probs[token])
        frontier = grown
    support.update(frontier)
    return support


def sample_continuations(target, params, mode, samples, drafter_noise=0.2):
    slots = 64
    drafter = TargetAsDrafter(target, 4, slots, MAX_SEQ_LEN, noise=drafter_noise, seed=1)
    engine = SpeculativeEngine(
        target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=slots, proposal=mode
    )
    requests = [
        Request(str(i), PROMPT, SamplingParams(**{**params.__dict__, "seed": 1000 + i}))
        for i in range(samples)
    ]
    results = Scheduler(engine, max_prefills_per_step=slots).run(requests)
    counts = {}
    for result in results:
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


def total_variation(counts, exact):
    total = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / total - exact.get(k, 0.0)) for k in keys)


# The test distribution has 64 outcomes. With 3000 samples, sampling noise alone gives a total
# variation near 0.05, and a sampler that accepts every draft lands near 0.55.
TV_BOUND = 0.075
SAMPLES = 3000


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["argmax", "sampled"])
def test_speculative_sampling_is_lossless(target, mode):
    exact = exact_distribution(target, PROMPT, SAMPLED)
    assert abs(sum(exact.values()) - 1.0) < 1e-5
    assert len(exact) >= 8, "the test needs a spread-out distribution to mean anything"
    counts = sample_continuations(target, SAMPLED, mode, SAMPLES)
    assert set(counts) <= set(exact), "a continuation outside top-k/top-p was sampled"
    tv = total_variation(counts, exact)
    assert tv < TV_BOUND, f"{mode}: total variation {tv:.4f} over {len(exact)} outcomes"


@pytest.mark.slow
def test_lossless_check_catches_a_biased_sampler(target, monkeypatch):
    """The bound above is tight enough to fail a sampler that accepts every draft."""

    def accept_everything(drafts, draft_probs, target_probs, generator):
        return drafts + [int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator))]

    monkeypatch.setattr(engine_module, "accept_sampled", accept_everything)
    exact = exact_distribution(target, PROMPT, SAMPLED)
    counts = sample_continuations(target, SAMPLED, "argmax", SAMPLES, drafter_noise=0.2)
    assert total_variation(counts, exact) > TV_BOUND


def seeded_requests(count, seed):
    return [
        Request(
            str(i),
            prompt,
            SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=seed + i),
        )
        for i, prompt in enumerate(prompts(count, seed=seed))
    ]


@pytest.mark.parametrize("mode", ["argmax", "sampled"])
def test_fixed_seed_repeats_and_ignores_batch(target, mode):
    requests = seeded_requests(5, seed=7)

    def run(batch_size):
        drafter = random_drafter(target, 4, num_slots=batch_size, max_seq_len=MAX_SEQ_LEN)
        engine = SpeculativeEngine(
            target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=batch_size, proposal=mode
        )
        return [r.token_ids for r in Scheduler(engine).run(requests)]

    first = run(3)
    assert run(3) == first, "same seeds, same outputs"
    assert run(1) == first, "outputs must not depend on the other requests in the batch"


def test_reused_slot_behaves_like_fresh_slot(target):
    short = seeded_requests(1, seed=3)[0]
    long = Request(
        "long",
        prompts(1, seed=4)[0] * 2,
        SamplingParams(max_new_tokens=60, temperature=1.0, seed=9),
    )
    size = MAX_SEQ_LEN + 64
    engine = SpeculativeEngine(
        target, random_drafter(target, 4, max_seq_len=size), max_seq_len=size
    )
    reused = Scheduler(engine).run([long, short])[1]
    fresh_engine = SpeculativeEngine(
        target, random_drafter(target, 4, max_seq_len=size), max_seq_len=size
    )
    fresh = Scheduler(fresh_engine).run([short])[0]
    assert reused.token_ids == fresh.token_ids


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_plain_decoding(target, temperature):
    params = SamplingParams(max_new_tokens=20, temperature=temperature, seed=5, logprobs=True)
    speculative = SpeculativeEngine(
        target, TargetAsDrafter(target, 4, 1, MAX_SEQ_LEN, noise=0.2), max_seq_len=MAX_SEQ_LEN
    ).generate(PROMPT, params)
    assert len(speculative.logprobs) == len(speculative.token_ids)
    # Score the same tokens with the target alone, one token at a time.
    plain = SpeculativeEngine(target, None, max_seq_len=MAX_SEQ_LEN)
    expected = []
    for i, token in enumerate(speculative.token_ids):
        ids = torch.tensor([PROMPT + speculative.token_ids[:i]])
        hidden = target(ids, plain.target.new_cache(1, MAX_SEQ_LEN), torch.tensor([0])).hidden
        expected.append(float(target.logits(hidden[0, -1]).log_softmax(-1)[token]))
    assert_close(torch.tensor(speculative.logprobs), torch.tensor(expected), 1e-4, "logprobs")
    if temperature == 0.0:
        reference = plain.generate(PROMPT, params)
        assert reference.token_ids == speculative.token_ids
        assert_close(
            torch.tensor(reference.logprobs),
            torch.tensor(speculative.logprobs),
            1e-4,
            "plain logprobs",
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty=0.5 is not supported"),
        ({"repetition_penalty": 1.2}, "repetition_penalty=1.2 is not supported"),
        ({"frequency_penalty": -1}, "frequency_penalty=-1 is not supported"),
        ({"logit_bias": {"5": 3}}, "logit_bias"),
        ({"n": 2}, "n=2 is not supported"),
        ({"beam_width": 4}, "unknown sampling options \\['beam_width'\\]"),
        ({"temperature": -1}, "temperature must be in \\[0, 100\\], got -1"),
        ({"top_p": 0}, "top_p must be in \\(0, 1\\], got 0"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"stop": [""]}, "stop strings must not be empty"),
    ],
)
def test_unsupported_options_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(fields)


def test_neutral_option_values_are_accepted():
    params = SamplingParams.from_dict(
        {"presence_penalty": 0, "repetition_penalty": 1.0, "n": 1, "max_tokens": 7, "stop": "x"}
    )
    assert params.max_new_tokens == 7
    assert params.stop == ("x",)


def test_exact_distribution_enumerates_all_outcomes(target):
    exact = exact_distribution(target, PROMPT, SAMPLED)
    assert all(len(k) == 3 for k in exact)
    assert len(exact) == len(set(itertools.chain(exact)))
