"""Sampler: greedy, truncation, penalties, bias, ignore_eos, seeded batch-invariance, logprobs."""

from __future__ import annotations

import math
import time

import pytest
import torch

from common.protocol import SamplingParams
from worker.sampler import Sampler, SamplingState

CPU = torch.device("cpu")
EOS = 2


def make_sampler(vocab: int) -> Sampler:
    return Sampler(vocab_size=vocab, eos_token_ids={EOS}, device=CPU)


def make_state(sampler: Sampler, params: SamplingParams, prompt: list[int] | None = None) -> SamplingState:
    return SamplingState(params, sampler.make_generator(params.seed), prompt or [], [])


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax() -> None:
    sampler = make_sampler(1000)
    logits = random_logits(8, 1000, seed=0)
    states = [make_state(sampler, SamplingParams(temperature=0.0)) for _ in range(8)]
    assert sampler.sample(logits.clone(), states).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_and_tiny_top_p_are_greedy(temperature: float) -> None:
    sampler = make_sampler(1000)
    logits = random_logits(16, 1000, seed=1)
    expected = logits.argmax(dim=-1).tolist()
    top_k = [make_state(sampler, SamplingParams(temperature=temperature, top_k=1)) for _ in range(16)]
    top_p = [make_state(sampler, SamplingParams(temperature=temperature, top_p=1e-6)) for _ in range(16)]
    assert sampler.sample(logits.clone(), top_k).token_ids == expected
    assert sampler.sample(logits.clone(), top_p).token_ids == expected


KNOWN_PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(min_p=0.5), {0, 1}),  # keeps p >= 0.25
        (SamplingParams(min_p=0.15), {0, 1, 2}),  # keeps p >= 0.075
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(top_k=3, top_p=0.6), {0, 1}),  # top_p over the renormalised top 3
    ],
)
def test_truncation_keeps_exactly_the_allowed_tokens(params: SamplingParams, allowed: set[int]) -> None:
    sampler = make_sampler(5)
    logits = torch.tensor(KNOWN_PROBS).log().repeat(400, 1)
    sampled = set(sampler.sample(logits, [make_state(sampler, params) for _ in range(400)]).token_ids)
    assert sampled == allowed


def test_penalties_change_exactly_the_intended_logits() -> None:
    vocab = 10
    sampler = make_sampler(vocab)
    logits = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.7, 0.0, 3.0, -2.0, 1.5, 0.3]] * 3)
    prompt, output = [1, 2, 2], [2, 3, 3, 4]
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=1.0),
    ]
    states = [SamplingState(p, None, prompt, list(output)) for p in params]

    expected = logits.clone()
    for row, p in enumerate(params):
        for token in set(prompt + output):  # HF: prompt and output, multiplicative, once per distinct token
            value = expected[row, token].item()
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(output):  # OpenAI: output only, additive
            expected[row, token] -= p.presence_penalty + p.frequency_penalty * output.count(token)

    processed = logits.clone()
    sampler.apply_penalties(processed, states)
    torch.testing.assert_close(processed, expected)
    untouched = [t for t in range(vocab) if t not in prompt + output]
    assert torch.equal(processed[:, untouched], logits[:, untouched])

    # The cached history follows the output as the engine appends to it.
    for state in states:
        state.output_ids.append(9)
    processed = logits.clone()
    sampler.apply_penalties(processed, states)
    assert processed[0, 9] == logits[0, 9] / 1.5
    assert processed[1, 9] == logits[1, 9] - 0.75


def test_no_penalty_rows_are_untouched() -> None:
    sampler = make_sampler(10)
    logits = random_logits(2, 10, seed=2)
    processed = logits.clone()
    states = [SamplingState(SamplingParams(), None, [1, 2], [3]), SamplingState(SamplingParams(), None, [4], [5])]
    sampler.apply_penalties(processed, states)
    assert torch.equal(processed, logits)


def test_logit_bias_forces_a_token_and_ignores_foreign_ids() -> None:
    sampler = make_sampler(1000)
    logits = random_logits(8, 1000, seed=3)
    params = SamplingParams(temperature=1.0, logit_bias={7: 100.0, 5000: 100.0, -1: 100.0})
    assert sampler.sample(logits, [make_state(sampler, params) for _ in range(8)]).token_ids == [7] * 8


def test_ignore_eos_never_samples_eos() -> None:
    sampler = make_sampler(100)
    logits = random_logits(64, 100, seed=4)
    logits[:, EOS] = 20.0
    assert sampler.sample(logits.clone(), [make_state(sampler, SamplingParams())] * 64).token_ids == [EOS] * 64
    greedy = [make_state(sampler, SamplingParams(temperature=0.0, ignore_eos=True))] * 64
    sampled = [make_state(sampler, SamplingParams(temperature=2.0, ignore_eos=True))] * 64
    assert EOS not in sampler.sample(logits.clone(), greedy).token_ids
    assert EOS not in sampler.sample(logits.clone(), sampled).token_ids


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, min_p=0.01, seed=1234, repetition_penalty=1.1)
NEIGHBOURS = [
    SamplingParams(temperature=0.0),
    SamplingParams(),
    SamplingParams(seed=7, temperature=1.5),
    SamplingParams(top_p=0.5, min_p=0.2, logprobs=5),
    SamplingParams(top_k=5, presence_penalty=1.0, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias={3: 5.0}, ignore_eos=True),
    SamplingParams(seed=1234, temperature=0.5, top_p=0.9),  # the same seed, its own generator
    SamplingParams(top_p=0.99, temperature=2.0),
]


def run_seeded(vocab: int, scale: float, neighbours: list[SamplingParams], steps: int = 12) -> list[int]:
    """Generate `steps` tokens for SEEDED at row 3 among `neighbours`, each step on fresh random logits."""
    sampler = make_sampler(vocab)
    params = [*neighbours[:3], SEEDED, *neighbours[3:]]
    states = [make_state(sampler, p, prompt=[5, 6, 7]) for p in params]
    row = min(3, len(neighbours))
    for step in range(steps):
        logits = random_logits(len(states), vocab, seed=100 + step, scale=scale)
        logits[row] = random_logits(1, vocab, seed=step, scale=scale)[0]  # the seeded row's own logits
        for state, token in zip(states, sampler.sample(logits, states).token_ids, strict=True):
            state.output_ids.append(token)
    return states[row].output_ids


@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["flat", "peaky"])  # flat: nucleus wider than the top-k path
def test_seeded_row_ignores_its_batch(scale: float) -> None:
    alone = run_seeded(4096, scale, [])
    assert run_seeded(4096, scale, []) == alone  # reproducible run to run
    assert run_seeded(4096, scale, NEIGHBOURS) == alone
    assert run_seeded(4096, scale, NEIGHBOURS[::-1]) == alone
    assert len(set(alone)) > 1


def test_unseeded_rows_are_random() -> None:
    sampler = make_sampler(1000)
    logits = random_logits(1, 1000, seed=5, scale=0.5).repeat(64, 1)
    states = [make_state(sampler, SamplingParams()) for _ in range(64)]
    first = sampler.sample(logits.clone(), states).token_ids
    second = sampler.sample(logits.clone(), states).token_ids
    assert len(set(first)) > 10
    assert first != second


def test_different_seeds_differ_and_same_seed_repeats() -> None:
    sampler = make_sampler(1000)
    logits = random_logits(1, 1000, seed=6, scale=0.5).repeat(32, 1)
    tokens = sampler.sample(logits, [make_state(sampler, SamplingParams(seed=s)) for s in range(32)]).token_ids
    again = sampler.sample(logits, [make_state(sampler, SamplingParams(seed=s)) for s in range(32)]).token_ids
    assert tokens == again
    assert len(set(tokens)) > 10


def test_logprobs_are_log_softmax_of_processed_logits() -> None:
    vocab = 500
    sampler = make_sampler(vocab)
    logits = random_logits(4, vocab, seed=7)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=3, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_p=0.5, logit_bias={11: 2.5}, logprobs=20),
    ]
    result = sampler.sample(logits.clone(), [make_state(sampler, p) for p in params])
    assert result.logprobs is not None
    assert result.logprobs[2] is None
    biased = logits.clone()
    biased[3, 11] += 2.5
    expected = biased.log_softmax(dim=-1)  # before temperature and truncation
    for row, choice in enumerate(result.logprobs):
        if choice is None:
            continue
        n = params[row].logprobs
        assert choice.token_id == result.token_ids[row]
        assert math.isclose(choice.logprob, expected[row, choice.token_id].item(), rel_tol=1e-5)
        assert len(choice.top) == n
        top_values, top_ids = expected[row].topk(n) if n else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in choice.top] == top_ids.tolist()
        values = [v for _, v in choice.top]
        assert values == sorted(values, reverse=True)
        torch.testing.assert_close(torch.tensor(values), top_values)


def test_no_logprobs_unless_asked() -> None:
    sampler = make_sampler(100)
    assert sampler.sample(random_logits(2, 100, seed=8), [make_state(sampler, SamplingParams())] * 2).logprobs is None


def test_padded_vocab_columns_are_never_chosen() -> None:
    sampler = make_sampler(100)
    logits = random_logits(8, 128, seed=9)
    logits[:, 100:] = 50.0
    states = [make_state(sampler, SamplingParams(temperature=t)) for t in (0.0, 1.0) * 4]
    assert max(sampler.sample(logits, states).token_ids) < 100


def mixed_params(rows: int) -> list[SamplingParams]:
    choices = [SEEDED, *NEIGHBOURS]
    return [choices[i % len(choices)] for i in range(rows)]


def time_sample(sampler: Sampler, logits: torch.Tensor, states: list[SamplingState], repeats: int = 5) -> float:
    sampler.sample(logits.clone(), states)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(logits.clone(), states)
    return (time.perf_counter() - start) / repeats * 1000


def test_large_batch_at_full_vocab() -> None:
    vocab = 49152
    sampler = make_sampler(vocab)
    for rows in (1, 16, 64):
        logits = random_logits(rows, vocab, seed=10, scale=8.0)
        greedy = [make_state(sampler, SamplingParams(temperature=0.0)) for _ in range(rows)]
        mixed = [make_state(sampler, p, prompt=list(range(200))) for p in mixed_params(rows)]
        result = sampler.sample(logits.clone(), mixed)
        assert len(result.token_ids) == rows
        assert all(0 <= t < vocab for t in result.token_ids)
        print(  # visible with pytest -s
            f"B={rows}: greedy {time_sample(sampler, logits, greedy):.2f} ms, "
            f"mixed {time_sample(sampler, logits, mixed):.2f} ms"
        )


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What top-k → top-p → min-p keep of one row of temperature-scaled logits, by full sorts (HF's order)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    if 0 < p.top_k < len(logits):
        keep &= logits >= logits.sort(descending=True).values[p.top_k - 1]
    if p.top_p < 1.0:
        probs = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        ordered = probs.sort(descending=True).values
        last = min(int((ordered.cumsum(dim=-1) < p.top_p).sum()), len(logits) - 1)
        keep &= probs >= ordered[last]
    if p.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        keep &= probs >= p.min_p * probs.max()
    return keep


TRUNCATIONS = [
    SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    for top_k in (0, 10, 100, 2000)  # 100 and 2000: more than the first and second candidate sizes
    for top_p in (1.0, 0.5, 0.9, 0.99)
    for min_p in (0.0, 0.05)
    if (top_k, top_p, min_p) != (0, 1.0, 0.0)
]


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])  # 0.3: nuclei of thousands of tokens
def test_truncation_matches_full_sorts(scale: float) -> None:
    vocab = 5000
    sampler = make_sampler(vocab)
    logits = random_logits(len(TRUNCATIONS), vocab, seed=11, scale=scale)
    tau, _, _ = sampler.truncation(logits, TRUNCATIONS)
    for row, params in enumerate(TRUNCATIONS):
        assert torch.equal(logits[row] >= tau[row], reference_kept(logits[row], params)), params


def test_wide_nucleus_draws_from_the_whole_kept_set() -> None:
    vocab = 5000
    sampler = make_sampler(vocab)
    logits = random_logits(1, vocab, seed=12, scale=0.3).repeat(512, 1)
    params = SamplingParams(top_p=0.9)
    kept = reference_kept(logits[0], params)
    tokens = torch.tensor(sampler.sample(logits.clone(), [make_state(sampler, params)] * 512).token_ids)
    assert kept[tokens].all()
    rank = logits[0].argsort(descending=True).argsort()  # 0 for the most likely token
    assert int(rank[tokens].max()) > 1024  # beyond every candidate size, so the full-row draw ran


def test_two_level_draw_agrees_with_the_flat_inverse_cdf() -> None:
    generator = torch.Generator().manual_seed(3)
    weights = torch.rand(64, 1000, generator=generator) ** 8  # 1000: not a multiple of the block size
    weights[weights < 0.01] = 0.0  # whole runs of zeros, some blocks nearly empty
    uniform = torch.rand(64, generator=generator)
    uniform[:3] = torch.tensor([0.0, 1.0 - 2**-24, 0.5])
    tokens = Sampler.draw(weights, uniform)
    assert bool((weights.gather(1, tokens[:, None]) > 0).all())
    cdf = weights.cumsum(dim=-1)
    flat = torch.searchsorted(cdf, (uniform[:, None] * cdf[:, -1:]), right=True).squeeze(1)
    assert int((tokens == flat).sum()) >= 62  # only a rounding hair at a boundary may tell them apart


def test_two_level_draw_of_a_single_nonzero_weight() -> None:
    weights = torch.zeros(2, 49152)
    weights[0, 49151], weights[1, 0] = 1e-30, 3.0  # the last entry of the last block; the first of the first
    for u in (0.0, 0.999999):
        assert Sampler.draw(weights, torch.tensor([u, u])).tolist() == [49151, 0]
