"""The fallback runner: a model the native runner does not compute, through its own forward pass over our paged KV.

The attention layers of most transformers models hand their new K/V to `cache.update(...)` and attend over what it
returns; transformers' own continuous batching plugs its paged cache in there. So does this runner, with the
scheduler's block tables: `update` writes the step's K/V into our blocks and returns each sequence's whole context,
and every chunk of a step runs in one forward — the chunks flattened into one row of tokens, a block-diagonal causal
mask (sliding where a layer slides) keeping each sequence to its own keys. Prefix caching and preemption work as in
the native runner. The cost: the model's attention scores every query against the keys of the whole step and masks
most of them away, so steps with many long contexts are split into several forwards (MAX_MASK_ELEMENTS).

A model whose forward does not route its K/V through that hook fails `probe` at start; worker/runners.py then
serves it one sequence at a time (worker/fallback_serial.py).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from worker.runner import SeqChunk

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Queries x keys of one forward. The mask and the attention scores grow with their product (64 sequences decoding
# at 1000 tokens of context: 64 x 64000); past this, the step's chunks run as several forwards, each reading the
# weights again but scoring far fewer masked-out keys.
MAX_MASK_ELEMENTS = 1 << 22
LAYER_TYPES = ("full_attention", "sliding_attention")  # the attention kinds a mask here expresses


class ProbeFailed(Exception):
    """The model's forward does not reproduce itself through the paged cache; the message says how."""


@dataclass(frozen=True)
class KVShape:
    """One layer's K/V per token, as the layer handed them to the cache."""

    num_heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.num_heads * (self.key_dim + self.value_dim) * self.dtype.itemsize


class PagedKV:
    """Stands in for transformers' Cache inside the model's forward: each layer's K/V in flat slots (block * size +
    offset). `write` and `read` are the step's slots: where its new tokens go, and each chunk's whole context."""

    def __init__(self, num_slots: int, device: torch.device, shapes: dict[int, KVShape] | None) -> None:
        self.num_slots, self.device = num_slots, device
        self.learning = shapes is None  # the probe learns each layer's shape from its first update
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for layer, shape in (shapes or {}).items():
            self._allocate(layer, shape)
        self.write = self.read = torch.empty(0, dtype=torch.long, device=device)

    def _allocate(self, layer: int, shape: KVShape) -> None:
        # Zeroed, not empty: a masked-out key still meets its value in the softmax product, and 0 * NaN would be NaN.
        k = (self.num_slots, shape.num_heads, shape.key_dim)
        self.keys[layer] = torch.zeros(k, device=self.device, dtype=shape.dtype)
        self.values[layer] = torch.zeros((*k[:2], shape.value_dim), device=self.device, dtype=shape.dtype)

    def shapes(self) -> dict[int, KVShape]:
        return {
            layer: KVShape(k.shape[1], k.shape[2], self.values[layer].shape[2], k.dtype)
            for layer, k in self.keys.items()
        }

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        """[1, heads, T, dim] new K and V in; [1, heads, sum of contexts, dim] out, each chunk's context in turn."""
        if key_states.shape[0] != 1:
            raise ValueError(f"expected one flat row of tokens, got a batch of {key_states.shape[0]}")
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [T, heads, dim]
        if layer_idx not in self.keys:
            if not self.learning:
                raise ValueError(f"layer {layer_idx} updates a cache the probe did not see it use")
            self._allocate(layer_idx, KVShape(k.shape[1], k.shape[2], v.shape[2], k.dtype))
        cache_k, cache_v = self.keys[layer_idx], self.values[layer_idx]
        cache_k.index_copy_(0, self.write, k.to(cache_k.dtype))
        cache_v.index_copy_(0, self.write, v.to(cache_v.dtype))
        k_all, v_all = cache_k.index_select(0, self.read), cache_v.index_select(0, self.read)
        return k_all.transpose(0, 1).unsqueeze(0), v_all.transpose(0, 1).unsqueeze(0)


class FallbackRunner:
    """Runs one engine step through the model's own forward: all chunks in one flat batch over the paged cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        shapes: dict[int, KVShape] | None,
    ) -> None:
        self.model, self.device = model, device
        self.num_blocks, self.block_size = num_blocks, block_size
        config: Any = model.config
        self.dtype: torch.dtype = model.dtype
        # Which mask each layer kind gets: transformers' own convention (its continuous batching's, too): the
        # config's layer_types, else every layer slides where the config sets a window (and does not switch it off).
        self.layer_types: list[str] | None = getattr(config, "layer_types", None)
        self.window: int | None = getattr(config, "sliding_window", None)
        if self.layer_types is None and getattr(config, "use_sliding_window", True) is False:
            self.window = None
        unknown = set(self.layer_types or ()) - set(LAYER_TYPES)
        if unknown:
            raise ProbeFailed(f"layer types {sorted(unknown)} have no mask here")
        rope = _length_dependent_rope(model)
        if rope:
            # The rotary module rescales by the longest position it is given: a step's neighbours would change it.
            raise ProbeFailed(f"its rope scaling ({rope}) depends on the sequence's length, which a step would mix")
        _use_maskable_attention(model)
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        self.cache = PagedKV(num_blocks * block_size, device, shapes)

    @staticmethod
    def bytes_per_block(shapes: dict[int, KVShape], block_size: int) -> int:
        return block_size * sum(shape.bytes_per_token for shape in shapes.values())

    def forward(self, chunks: list[SeqChunk]) -> Tensor:
        """Float32 logits [len(chunks), vocab] at the last token of each chunk; writes the chunks' KV."""
        if not chunks:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return torch.cat([self._forward(group) for group in _groups(chunks)])

    @torch.inference_mode()
    def _forward(self, chunks: list[SeqChunk]) -> Tensor:
        step = self._prepare(chunks)
        self.cache.write, self.cache.read = step.write, step.read
        kwargs: dict[str, Any] = {self._cache_argument: self.cache, "use_cache": False}
        if self._logits_to_keep:  # the lm_head runs on the sampled rows only (a prefill chunk has hundreds)
            kwargs["logits_to_keep"] = step.last_rows
        output = self.model(
            input_ids=step.input_ids[None], position_ids=step.positions[None], attention_mask=step.mask, **kwargs
        )
        logits = output.logits[0]
        return (logits if self._logits_to_keep else logits.index_select(0, step.last_rows)).float()

    def _prepare(self, chunks: list[SeqChunk]) -> _Step:
        """The step's index tensors, built on the CPU (many small ops per chunk) and moved to the device at once."""
        bs = self.block_size
        input_ids: list[int] = []
        last_rows: list[int] = []
        positions, write, read, row_seq, col_seq, col_pos = [], [], [], [], [], []
        offsets = torch.arange(bs)
        for index, chunk in enumerate(chunks):
            if not chunk.token_ids:
                raise ValueError("a chunk has no tokens")
            end = chunk.start_pos + len(chunk.token_ids)
            if len(chunk.block_table) * bs < end:
                raise ValueError(f"block table of chunk {index} covers {len(chunk.block_table) * bs} < {end} positions")
            slots = (torch.tensor(chunk.block_table)[:, None] * bs + offsets).flatten()[:end]
            context = torch.arange(end)
            input_ids += chunk.token_ids
            last_rows.append(len(input_ids) - 1)
            positions.append(context[chunk.start_pos :])
            write.append(slots[chunk.start_pos :])
            read.append(slots)
            row_seq.append(torch.full((len(chunk.token_ids),), index))
            col_seq.append(torch.full((end,), index))
            col_pos.append(context)
        on_device = [torch.cat(parts).to(self.device) for parts in (positions, write, read, row_seq, col_seq, col_pos)]
        rows_pos, write_slots, read_slots, rows_seq, cols_seq, cols_pos = on_device
        # Each query sees its own sequence's keys up to its position (and within the window, where one slides).
        visible = (rows_seq[:, None] == cols_seq[None, :]) & (cols_pos[None, :] <= rows_pos[:, None])
        return _Step(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=rows_pos,
            write=write_slots,
            read=read_slots,
            mask=self._masks(visible, rows_pos, cols_pos),
            last_rows=torch.tensor(last_rows, dtype=torch.long, device=self.device),
        )

    def _masks(self, visible: Tensor, rows_pos: Tensor, cols_pos: Tensor) -> Tensor | dict[str, Tensor]:
        """Additive masks [1, 1, T, K] (0 or the dtype's minimum, as eager attention adds them): one per layer kind."""
        sliding = visible
        if self.window is not None:
            sliding = visible & (cols_pos[None, :] > rows_pos[:, None] - self.window)

        def additive(allowed: Tensor) -> Tensor:
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]

        if self.layer_types is None:
            return additive(sliding)
        kinds = {"full_attention": visible, "sliding_attention": sliding}
        return {kind: additive(kinds[kind]) for kind in set(self.layer_types)}

    @classmethod
    def probe(cls, model: PreTrainedModel, device: torch.device) -> dict[int, KVShape]:
        """Run two sequences through a small paged cache — prefills, a chunk after a cached prefix, decodes, scattered
        blocks — and compare each logit row with the model's own forward over the whole sequence. Returns the K/V
        shapes the layers handed over; raises ProbeFailed if anything differs or fails."""
        vocab = int(model.config.vocab_size)
        tokens = [[(7 * i + 3 * s + 1) % vocab for i in range(n)] for s, n in enumerate((11, 15))]
        tables = [[5, 0, 7], [2, 9, 1, 4]]
        steps = [((0, 9), (1, 6)), ((0, 1), (1, 8)), ((0, 1), (1, 1))]  # (sequence, tokens) of each chunk
        try:
            runner = cls(model, device=device, num_blocks=10, block_size=4, shapes=None)
            with torch.inference_mode():
                want = [
                    model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
                    for ids in tokens
                ]
            done = [0, 0]
            for step in steps:
                chunks = [SeqChunk(tokens[s][done[s] : done[s] + n], done[s], tables[s]) for s, n in step]
                got = runner.forward(chunks)
                for (s, n), row in zip(step, got, strict=True):
                    done[s] += n
                    check_close(row, want[s][done[s] - 1], model.dtype)
        except ProbeFailed:
            raise
        except Exception as exc:  # whatever the model's forward does with a cache it does not know
            raise ProbeFailed(f"{type(exc).__name__}: {first_line(exc)}") from exc
        if not runner.cache.keys:
            raise ProbeFailed("no layer handed its K/V to the cache")
        return runner.cache.shapes()


@dataclass
class _Step:
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    write: Tensor  # [T] slot of each new token
    read: Tensor  # [K] slots of each chunk's context, chunk after chunk
    mask: Tensor | dict[str, Tensor]
    last_rows: Tensor  # [len(chunks)] row of each chunk's last token


def _groups(chunks: list[SeqChunk]) -> list[list[SeqChunk]]:
    """Consecutive runs of chunks whose queries x keys stay under MAX_MASK_ELEMENTS (a chunk alone may exceed it)."""
    groups: list[list[SeqChunk]] = []
    queries = keys = 0
    for chunk in chunks:
        length, context = len(chunk.token_ids), chunk.start_pos + len(chunk.token_ids)
        if groups and (queries + length) * (keys + context) <= MAX_MASK_ELEMENTS:
            groups[-1].append(chunk)
            queries, keys = queries + length, keys + context
        else:
            groups.append([chunk])
            queries, keys = length, context
    return groups


def _length_dependent_rope(model: PreTrainedModel) -> str | None:
    """The rope type of a rotary module that recomputes its frequencies from the positions it sees, if any."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        for kind in rope_type.values() if isinstance(rope_type, dict) else [rope_type]:
            if isinstance(kind, str) and ("dynamic" in kind or kind == "longrope"):
                return kind
    return None


def _use_maskable_attention(model: PreTrainedModel) -> None:
    """Flash and flex attention ignore a dense mask: the model must attend with sdpa or eager here."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation in ("sdpa", "eager"):
        return
    for candidate in ("sdpa", "eager"):
        try:
            model.set_attn_implementation(candidate)
        except (ValueError, ImportError) as exc:
            logger.debug("attention %s unavailable: %s", candidate, exc)
            continue
        logger.info("attention: %s instead of %s (the fallback needs a dense mask)", candidate, implementation)
        return
    raise ProbeFailed(f"attention {implementation!r} cannot take a dense mask, and neither sdpa nor eager loads")


def check_close(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    """Within rounding: batched and unbatched matmuls sum in other orders, by ~1e-6 in float32, ~1e-2 in 16 bits."""
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    error = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if not error <= tolerance:  # also catches NaN
        raise ProbeFailed(f"its logits through the paged cache differ from its own forward by {error:.2g} (relative)")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
