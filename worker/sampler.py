"""Batched per-request sampling: penalties, bias, temperature, top-k/top-p/min-p, seeded draws, logprobs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from common.protocol import SamplingParams

# Temperatures below this are greedy (as vLLM's _SAMPLING_EPS); dividing by them would overflow.
_GREEDY_EPS = 1e-5
# Truncated rows look at their top tokens first: topk(64) of [64, 49152] costs a few ms on CPU where a full
# sort costs ~100 ms, and a real next-token distribution almost always keeps fewer tokens than that.
# A nucleus wider than the candidates widens to the second size, then to a full sort, for that row only.
_CANDIDATES = (64, 1024)
_NEG_INF = float("-inf")
_DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF (Sampler.draw)


@dataclass
class SamplingState:
    """One live sequence's sampling inputs; owned by the engine, which appends to output_ids after each step."""

    params: SamplingParams
    generator: torch.Generator | None  # from params.seed; None: drawn from the sampler's shared generator
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    # prompt + output ids as a tensor, grown in place, so penalties don't rebuild it from lists every step.
    history: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    history_len: int = field(default=0, init=False, repr=False, compare=False)


@dataclass
class TokenChoice:
    """The chosen token's log-probability and the top-N alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenChoice | None] | None  # None unless some row asked; then one entry per row


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < _GREEDY_EPS or p.top_k == 1


def pick(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without a copy when rows (ascending, as every row list here is) are all of them."""
    return tensor if len(rows) == len(tensor) else tensor[rows]


class Sampler:
    """Picks one token per row. Each stage runs only on the rows that need it, and not at all when none do.

    A row's token depends only on its own logits, parameters, history and generator, never on which other
    rows share the batch: every stage is row-wise, and a seeded row draws from its own generator.
    """

    def __init__(self, vocab_size: int, eos_token_ids: set[int], device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        # Unseeded rows share one generator, seeded at random, so that a torch.manual_seed() elsewhere in the
        # process cannot make "random" requests repeat each other.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(secrets.randbits(64))

    def make_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed % 2**64)  # JSON seeds may be negative or wider than 64 bits
        return generator

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        """logits: [B, V], row i belongs to states[i]. May modify logits in place."""
        assert logits.dim() == 2 and logits.shape[0] == len(states)
        if not states:
            return SampleResult([], None)
        logits = logits.float()  # a no-op for float32
        params = [s.params for s in states]
        if logits.shape[1] > self.vocab_size:  # padded embedding rows are not tokens
            logits[:, self.vocab_size :] = _NEG_INF

        # 1) Processing that logprobs see: penalties, logit_bias, ignore_eos.
        self.apply_penalties(logits, states)
        self.apply_logit_bias(logits, params)
        self.mask_eos(logits, params)

        # Logprobs describe this processed distribution, before temperature and truncation (vLLM's
        # "processed_logits" minus the sampling transforms): the model's view with the request's penalties and
        # bias, comparable across temperatures, rather than the truncated distribution the token came from.
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = pick(logits, logprob_rows).log_softmax(dim=-1) if logprob_rows else None

        # 2) Choose: argmax for greedy rows, the sampling pipeline for the rest.
        sampled_rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        if len(sampled_rows) == len(states):
            tokens = self.sample_rows(logits, states)
        elif not sampled_rows:
            tokens = logits.argmax(dim=-1)
        else:
            greedy_rows = [i for i, p in enumerate(params) if is_greedy(p)]
            tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
            tokens[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
            tokens[sampled_rows] = self.sample_rows(logits[sampled_rows], [states[i] for i in sampled_rows])

        token_ids: list[int] = tokens.tolist()
        if logprobs is None:
            return SampleResult(token_ids, None)
        return SampleResult(token_ids, self.choices(logprobs, logprob_rows, token_ids, params))

    # --- processing -----------------------------------------------------------------------------------

    def apply_penalties(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """Sparse: touches only the (row, token) pairs in the histories, never a [B, V] count tensor."""
        rep_rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
        if rep_rows:
            # HF RepetitionPenaltyLogitsProcessor, over prompt + output: shrink positive logits, push negative
            # ones further down. A token seen twice is written twice, with the same value both times.
            rows, ids, which = self.occurrences(logits, [self.history(states[i]) for i in rep_rows], rep_rows)
            penalty = self.column([states[i].params.repetition_penalty for i in rep_rows], logits)[which, 0]
            values = logits[rows, ids]
            logits[rows, ids] = torch.where(values > 0, values / penalty, values * penalty)
        add_rows = [i for i, s in enumerate(states) if s.params.presence_penalty or s.params.frequency_penalty]
        if add_rows:
            # OpenAI, additive, over output only: presence once per distinct token (same-value writes again),
            # frequency once per occurrence (accumulated).
            outputs = [self.history(states[i])[len(states[i].prompt_ids) :] for i in add_rows]
            rows, ids, which = self.occurrences(logits, outputs, add_rows)
            presence = self.column([states[i].params.presence_penalty for i in add_rows], logits)[which, 0]
            frequency = self.column([states[i].params.frequency_penalty for i in add_rows], logits)[which, 0]
            logits[rows, ids] = logits[rows, ids] - presence
            logits.index_put_((rows, ids), -frequency, accumulate=True)

    @staticmethod
    def occurrences(
        logits: torch.Tensor, histories: list[torch.Tensor], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flatten per-row histories to (logits row, token id, index into rows), one entry per occurrence."""
        lengths = torch.tensor([len(h) for h in histories], device=logits.device)
        which = torch.repeat_interleave(torch.arange(len(rows), device=logits.device), lengths)
        ids = torch.cat(histories)
        keep = ids < logits.shape[1]  # ids the model cannot produce have no logit to penalise
        which, ids = which[keep], ids[keep]
        return torch.tensor(rows, device=logits.device)[which], ids, which

    def history(self, state: SamplingState) -> torch.Tensor:
        """prompt + output ids as a 1-D long tensor; copies only what was generated since the last call."""
        length = len(state.prompt_ids) + len(state.output_ids)
        buf = state.history
        if buf is None or length < state.history_len:  # first use, or the engine rewound the sequence
            buf = torch.empty(max(64, 2 * length), dtype=torch.long, device=self.device)
            buf[:length] = torch.tensor(state.prompt_ids + state.output_ids, dtype=torch.long)
        elif length > state.history_len:
            if length > len(buf):  # double, so appends stay amortised O(1)
                grown = torch.empty(2 * length, dtype=torch.long, device=self.device)
                grown[: state.history_len] = buf[: state.history_len]
                buf = grown
            new = state.output_ids[state.history_len - len(state.prompt_ids) :]
            buf[state.history_len : length] = torch.tensor(new, dtype=torch.long)
        state.history, state.history_len = buf, length
        return buf[:length]

    def apply_logit_bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        vocab = min(logits.shape[1], self.vocab_size)
        rows, ids, values = [], [], []
        for i, p in enumerate(params):
            for token_id, bias in p.logit_bias.items():
                if 0 <= token_id < vocab:  # clients send ids from other tokenizers too; those mean nothing here
                    rows.append(i)
                    ids.append(token_id)
                    values.append(bias)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
            logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)

    def mask_eos(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        """ignore_eos: the engine stops such a request at max_tokens, so eos is never a choice here."""
        rows = [i for i, p in enumerate(params) if p.ignore_eos]
        eos = [t for t in self.eos_token_ids if t < logits.shape[1]]
        if rows and eos:
            rows_t = torch.tensor(rows, device=logits.device).unsqueeze(1)
            logits[rows_t, torch.tensor(eos, device=logits.device).unsqueeze(0)] = _NEG_INF

    # --- sampling -------------------------------------------------------------------------------------

    def sample_rows(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Temperature, then truncation (top-k → top-p → min-p, HF's order), then one inverse-CDF draw per row.

        Every truncation keeps a top set, so a row's three cuts combine into one logit threshold (keep l >= tau),
        and a row whose kept set lies within its top candidates draws among those alone.
        """
        params = [s.params for s in states]
        num_rows, vocab = logits.shape
        logits = logits / self.column([p.temperature for p in params], logits)
        # One uniform per row, whatever path the row takes, so a seeded row's stream advances one step per token.
        uniform = self.uniforms(states)
        tokens = torch.empty(num_rows, dtype=torch.long, device=logits.device)

        cut = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0]
        uncut = [i for i, p in enumerate(params) if i not in set(cut)]
        if cut:
            sub = pick(logits, cut)
            tau, values, ids = self.truncation(sub, [params[i] for i in cut])
            weights = (values - values[:, :1]).exp_().masked_fill_(values < tau, 0.0)
            sub_tokens = ids.gather(1, self.draw(weights, uniform[cut]).unsqueeze(1)).squeeze(1)
            wide = (values[:, -1:] >= tau).squeeze(1).nonzero().squeeze(1)  # kept set reaches past the candidates
            if len(wide):
                rows = sub[wide]
                probs = rows.masked_fill_(rows < tau[wide], _NEG_INF).softmax(dim=-1)
                sub_tokens[wide] = self.draw(probs, uniform[cut][wide])
            tokens[cut] = sub_tokens
        if uncut:
            sub = pick(logits, uncut)
            tokens[uncut] = self.draw(sub.softmax(dim=-1), uniform[uncut])
        return tokens

    def truncation(
        self, logits: torch.Tensor, params: list[SamplingParams]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: the logit threshold tau [R, 1] to keep (l >= tau), and the top candidates (values, ids)."""
        num_rows, vocab = logits.shape
        values, ids = logits.topk(min(_CANDIDATES[0], vocab))
        tau = logits.new_full((num_rows, 1), _NEG_INF)

        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        if any(top_k):  # ties with the k-th stay in, as in HF
            k = torch.tensor(top_k, device=logits.device).clamp_max_(values.shape[1]).unsqueeze(1)
            tau = torch.where(k > 0, values.gather(1, (k - 1).clamp_min_(0)), tau)
            for r in (r for r, k_r in enumerate(top_k) if k_r > values.shape[1]):  # rare: more than the candidates
                tau[r, 0] = logits[r].topk(top_k[r]).values[-1]

        top_p_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            top_p = self.column([params[r].top_p for r in top_p_rows], logits)
            rows_tau = pick(tau, top_p_rows)
            found = self.nucleus(
                pick(logits, top_p_rows), pick(values, top_p_rows), pick(ids, top_p_rows), rows_tau, top_p
            )
            tau[top_p_rows] = torch.maximum(rows_tau, found)

        if any(p.min_p > 0.0 for p in params):  # p / p_max >= min_p  ⇔  l >= l_max + log(min_p)
            tau = torch.maximum(tau, values[:, :1] + self.column([p.min_p for p in params], logits).log())
        return tau, values, ids

    @staticmethod
    def nucleus(
        logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, tau: torch.Tensor, top_p: torch.Tensor
    ) -> torch.Tensor:
        """The logit of the last token of the smallest top set holding top_p of the mass the top-k cut left.

        The result depends only on a row's own sorted values, not on how many candidates were looked at, so
        rows that need a wider look never change the answer for the others.
        """
        # Rows whose top-k cut kept nothing beyond the candidates renormalise over the candidates alone; the
        # rest (mostly rows without top-k) need the softmax of the whole row.
        probs = values.masked_fill(values < tau, _NEG_INF).softmax(dim=-1)
        outside = (values[:, -1] >= tau[:, 0]).nonzero().squeeze(1).tolist()
        full = logits.new_empty(0)
        if outside:
            rows, rows_tau = pick(logits, outside), pick(tau, outside)
            if bool((rows_tau > _NEG_INF).any()):
                rows = rows.masked_fill(rows < rows_tau, _NEG_INF)
            full = rows.softmax(dim=-1)
            probs[outside] = full.gather(1, pick(ids, outside))

        vocab = logits.shape[1]
        wider = iter([*(k for k in _CANDIDATES[1:] if k < vocab), vocab])
        result = tau.clone()
        pending = list(range(len(logits)))  # rows still looking, as indices into logits
        while True:
            cum = probs.cumsum(dim=-1)
            last = (cum < top_p[pending]).sum(dim=-1, keepdim=True).clamp_max_(values.shape[1] - 1)
            result[pending] = values.gather(1, last)  # below tau when the whole kept set is short of top_p
            if values.shape[1] == vocab:
                break
            done = (cum[:, -1] >= top_p[pending, 0]) | (values[:, -1] < tau[pending, 0])
            pending = [r for r, d in zip(pending, done.tolist(), strict=True) if not d]
            if not pending:
                break
            size, rows = next(wider), logits[pending]
            values, wide_ids = rows.sort(dim=-1, descending=True) if size == vocab else rows.topk(size)
            # pending rows are all outside rows (an inside row's candidates hold its whole kept set).
            probs = full[[outside.index(r) for r in pending]].gather(1, wide_ids)
        return result

    @staticmethod
    def draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Inverse CDF: the position each row's uniform falls at in its cumulative weights.

        One uniform per row, where an exponential race (Gumbel-max, torch.multinomial) needs a random number per
        weight: ~70 ms for [64, 49152] on CPU. The CDF is taken in two levels, over blocks of the vocabulary and
        then within the one block the uniform falls in, instead of over the whole row: 3 ms a step less at 16
        rows of a 49k vocabulary (a full-row cumsum measured 2.8 ms in the worker).
        """
        num_rows, width = weights.shape
        size = _DRAW_BLOCK if width > _DRAW_BLOCK else width
        padding = -width % size  # none for the usual vocabularies (multiples of 128): F.pad copies, 3 ms at [16, 49k]
        blocks = (torch.nn.functional.pad(weights, (0, padding)) if padding else weights).reshape(num_rows, -1, size)
        block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)
        target = Sampler._below_total(block_cdf, uniform.unsqueeze(1) * block_cdf[:, -1:])
        block = Sampler._position(block_cdf, target)
        before = block_cdf.gather(1, (block - 1).clamp_min(0)).masked_fill_(block == 0, 0.0)
        inner_cdf = blocks.gather(1, block.unsqueeze(2).expand(-1, -1, size)).squeeze(1).cumsum(dim=-1)
        # target >= before (the same sums), and the block holds weight > 0 because its CDF entry rose past target;
        # its own cumsum may round a hair below the block sum the target was measured against, hence the clamp.
        offset = Sampler._position(inner_cdf, Sampler._below_total(inner_cdf, target - before))
        return (block * size + offset).squeeze(1).clamp_max_(width - 1)

    @staticmethod
    def _below_total(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target [R, 1] kept strictly below each row's total (u * total may round up to it)."""
        return torch.minimum(target, torch.nextafter(cdf[:, -1:], cdf.new_zeros(1)))

    @staticmethod
    def _position(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[R, 1] index of the first cdf entry above target: a weight > 0 while target is below the row's total."""
        return torch.searchsorted(cdf, target, right=True).clamp_max_(cdf.shape[1] - 1)

    @staticmethod
    def column(values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)

    def uniforms(self, states: list[SamplingState]) -> torch.Tensor:
        """One U[0, 1) per row: unseeded rows in one batched draw, seeded rows each from their own generator."""
        result = torch.rand(len(states), generator=self.generator, device=self.device)
        for i, state in enumerate(states):
            if state.generator is not None:
                result[i] = torch.rand(1, generator=state.generator, device=self.device)[0]
        return result

    # --- logprobs -------------------------------------------------------------------------------------

    @staticmethod
    def choices(
        logprobs: torch.Tensor, rows: list[int], token_ids: list[int], params: list[SamplingParams]
    ) -> list[TokenChoice | None]:
        chosen = logprobs.gather(1, torch.tensor([token_ids[i] for i in rows], device=logprobs.device)[:, None])
        num_top = max(params[i].logprobs or 0 for i in rows)
        top_values, top_ids = logprobs.topk(num_top)  # num_top 0 gives empty rows
        chosen_list, values_list, ids_list = chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist()
        result: list[TokenChoice | None] = [None] * len(token_ids)
        for r, i in enumerate(rows):
            n = params[i].logprobs or 0
            result[i] = TokenChoice(
                token_ids[i], chosen_list[r], list(zip(ids_list[r][:n], values_list[r][:n], strict=True))
            )
        return result
