"""The model forward pass: Llama-family decoders over a paged KV cache, many sequences per step. All torch is here."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.lora import DOWN, GATE_UP, O_PROJ, QKV, LoraGroup, LoraWeights, add_lora
from worker.quant import QuantLinear, QuantWeight, kernel_works

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Decode attention gathers each sequence's K/V blocks into one batch; on a CPU, batches of about this many bytes
# stay in the cache until attention reads them. Measured on a 2-core EPYC, whole steps of 64 sequences: 3x faster
# at 1000 tokens of context, 10% at 200; no change for 16 sequences at 200.
CPU_DECODE_GATHER_BYTES = 4 * 2**20

# BLAS libraries switch to matrix-vector kernels for one row (MKL fp32: for up to two), which sum the inner
# dimension in another order: a lone request's logits then differ from the same request's inside a batch,
# and greedy output drifts (measured: 16 of 32 prompts over 64 tokens in bf16 on CPU). Padding to 4 rows keeps
# every step on the matrix kernels, whose rows do not depend on each other; it costs nothing measurable.
MIN_MATMUL_ROWS = 4

# Rope types whose frequencies do not depend on the sequence length, so one cos/sin table serves every step.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(Exception):
    """The model's architecture or one of its config options is outside what this runner computes."""


@dataclass
class SeqChunk:
    token_ids: list[int]  # tokens to run this step for one sequence (1 when decoding, many when prefilling)
    start_pos: int  # absolute position of token_ids[0]; KV for positions [0, start_pos) is already in the cache
    block_table: list[int]  # this sequence's KV block ids, covering positions [0, start_pos + len(token_ids))
    # Prompt tokens take the prefill path even one at a time (the tail of a chunked or prefix-cached prompt):
    # its attention rounds differently from the decode path's, and a prompt's logits must not depend on how
    # the scheduler happened to split it, or greedy output would depend on the batch it shared.
    prompt: bool = False
    key: Hashable = None  # the sequence's identity, for a runner that keeps state per sequence (fallback_serial.py)
    adapter: int = 0  # LoRA slot (ModelRunner.loras) whose delta its rows get; 0: none, the base model


class _Linear:
    """x @ W.T (+ bias) (+ residual). On CPU the weight is also kept prepacked in oneDNN's blocked layout.

    Measured on a 2-core AVX2 EPYC, the prepacked fp32 matmul is 1.5-2x faster than MKL's sgemm for the 4-16 token
    batches of decoding (MKL repacks the whole weight on every call), 2-3x for the lm_head, and about the same
    for 512-token prefills; on a 2-core AVX512-BF16 EPYC, prepacked bf16 is 1.7x plain bf16 and 1.9x prepacked
    fp32 for 1-4 tokens (`bench/step.py`). The packed copy costs the weights' memory once more, which a
    CPU-sized model affords.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, pack: bool) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if pack else None

    def __call__(self, x: Tensor, residual: Tensor | None = None, decode_rows: int = 0) -> Tensor:
        """`decode_rows` is `_SplitLinear`'s; every row takes the one path here."""
        rows = x.shape[0]
        if rows < MIN_MATMUL_ROWS:  # see MIN_MATMUL_ROWS: same kernel, same rounding, whatever the batch
            x = F.pad(x, (0, 0, 0, MIN_MATMUL_ROWS - rows))
            residual = None if residual is None else F.pad(residual, (0, 0, 0, MIN_MATMUL_ROWS - rows))
            return self._matmul(x, residual)[:rows]
        return self._matmul(x, residual)

    def _matmul(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if self.packed is not None:
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if residual is None:
            return F.linear(x, self.weight, self.bias)
        out = torch.addmm(residual, x, self.weight.t())  # the residual add rides on the matmul
        return out if self.bias is None else out.add_(self.bias)


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear works here: checked once on a small matrix, since its ops are private."""
    packable = dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type != "cpu" or not packable or not torch.backends.mkldnn.is_available():
        return False
    try:
        # Fixed values, not torch.randn: the check must not move the global RNG that seeded sampling relies on.
        weight = torch.linspace(-1.0, 1.0, 24 * 16, dtype=dtype).view(24, 16)
        x = torch.linspace(-2.0, 2.0, 3 * 16, dtype=dtype).view(3, 16)
        residual = torch.linspace(0.0, 1.0, 3 * 24, dtype=dtype).view(3, 24)
        linear = _Linear(weight, None, pack=True)
        expected = torch.addmm(residual.float(), x.float(), weight.float().t())
        tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16 keeps 8 bits: outputs near 5 move by 0.03
        return torch.allclose(linear(x, residual).float(), expected, atol=tolerance) and torch.allclose(
            linear(x).float(), expected - residual.float(), atol=tolerance
        )
    except (RuntimeError, AttributeError) as exc:
        logger.info("oneDNN prepacked linear unavailable (%s); using torch.nn.functional.linear", exc)
        return False


class _SplitLinear:
    """Integer weights for decode rows, the dense prepacked matmul for prompt rows.

    Decoding reads every weight for a handful of rows: bandwidth-bound, so the int8/int4 kernels' 2-4x fewer bytes
    win (a whole step 1.3x/1.7x faster at one sequence). Prefill is compute-bound, where those matrix-vector
    kernels, which unpack the weights again for every 4 rows, made 512-token prefills 2x slower than oneDNN's bf16
    matmul (bench/step.py). Which path a row takes depends
    only on its kind (a prompt token or a generated one), never on the batch, so batch invariance holds; a prompt's
    KV and first-token logits come from the dense weights, i.e. the dequantized integer weights.
    """

    def __init__(self, quantized: QuantLinear, dense: _Linear) -> None:
        self.quantized, self.dense = quantized, dense
        self.out_features = quantized.out_features

    def __call__(self, x: Tensor, residual: Tensor | None = None, decode_rows: int = 0) -> Tensor:
        if decode_rows >= x.shape[0]:
            return self.quantized(x, residual)
        if decode_rows == 0:
            return self.dense(x, residual)
        top, bottom = (None, None) if residual is None else (residual[:decode_rows], residual[decode_rows:])
        return torch.cat([self.quantized(x[:decode_rows], top), self.dense(x[decode_rows:], bottom)])


Linear = _Linear | _SplitLinear  # one call shape: linear(x, residual=None, decode_rows=0)


@dataclass
class _Layer:
    """One decoder layer's weights. q/k/v and gate/up are fused so each runs as one matmul over the step."""

    input_norm: Tensor
    qkv: Linear
    qk_norm: Tensor | None  # qwen3: per-head RMSNorm weights, q heads then k heads, [H + KVH, D]
    o_proj: Linear
    post_norm: Tensor
    gate_up: Linear
    down: Linear


@dataclass
class _Prefill:
    """A prefill chunk's rows in the flat batch and what its attention reads."""

    start: int  # first row in the flat batch
    length: int
    context: int  # start_pos + length: how many cached positions it attends to
    blocks: Tensor | None  # block ids covering [0, context); None when there is no cached prefix
    mask: Tensor  # [length, context] bool: causal, shifted by start_pos


@dataclass
class _DecodeGroup:
    """Some 1-token chunks whose attention runs as one batched call."""

    rows: slice  # their rows in the flat batch
    blocks: Tensor  # [rows * max_blocks] block ids, each table padded with block 0 (masked out)
    context: int  # the longest context among all decoding chunks
    mask: Tensor | None  # [rows, 1, 1, context] bool; None when all contexts are equally long


@dataclass
class _Step:
    """Index tensors for one forward, built once and shared by every layer."""

    input_ids: Tensor  # [T], decode tokens first, then each prefill chunk
    slots: Tensor  # [T] flat KV slot of each token
    cos: Tensor  # [T, 1, D]
    sin: Tensor  # [T, 1, D], sign of rotate_half folded in
    decode: list[_DecodeGroup]
    prefills: list[_Prefill]
    logit_rows: Tensor  # row of each chunk's last token: decode chunks first, then prefill chunks
    decode_rows: int  # tokens of decode chunks: the first rows of the batch (and of logit_rows)
    caller_order: Tensor | None  # logit_rows' position of each chunk in the caller's order; None if the same
    lora: list[LoraGroup]  # rows that use a LoRA adapter, by adapter; empty when every row is the base model's


def _fuse(modules: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate linear weights (and biases) and point the modules at views of the result.

    The views keep the HF model usable (tests compare against it) without holding the weights twice.
    """
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach() for m in modules])
    offset = 0
    for m in modules:
        rows = m.out_features
        m.weight.data = weight[offset : offset + rows]
        if bias is not None and m.bias is not None:
            m.bias.data = bias[offset : offset + rows]
        offset += rows
    return weight, bias


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(model: PreTrainedModel) -> None:
    config: Any = model.config
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModel(
            f"model type {config.model_type!r} is not supported (tandem runs {', '.join(SUPPORTED_TYPES)})"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {config.hidden_act!r} is not supported (only silu)")
    rope_type = getattr(getattr(model.base_model, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported (tandem runs {', '.join(STATIC_ROPE_TYPES)})")


class ModelRunner:
    """Runs one engine step: decode and prefill chunks of many sequences as one flat batch of tokens.

    Every linear layer runs once per layer over all T tokens, so the weights are read once per step however
    many sequences share it. The runner fuses q/k/v and gate/up of the HF model in place (see `_fuse`).
    Attention is always full: where a config sets a sliding window, `models.context_length` caps the context
    at that window, so full and sliding attention agree.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int = 16,
        quantized: dict[str, QuantWeight] | None = None,
    ) -> None:
        """`quantized`: integer weights by module name (`models.LoadedModel.quantized`); those layers run on int8/int4
        kernels instead of the module's dense weight, and a fused projection is quantized only if all its parts are.
        """
        check_supported(model)
        config: Any = model.config
        decoder: Any = model.base_model  # the LlamaModel (or Qwen2Model, ...) inside the ForCausalLM wrapper
        if device.type == "cuda" and device.index is None:  # so that it compares equal to the weights' device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = device, dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self.eps = config.rms_norm_eps
        self.embed: Tensor = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
        if self.embed.dtype != dtype or self.embed.device != device:
            raise ValueError(f"the model is {self.embed.dtype} on {self.embed.device}, the runner {dtype} on {device}")
        self.norm = decoder.norm.weight.detach()
        self._pack = _can_pack(device, dtype)
        self._quantized = quantized or {}
        if self._quantized and device.type != "cpu":  # torch's int kernels here are the CPU ones
            logger.warning("int8/int4 kernels run on CPU only; dequantizing the weights for %s", device)
            self._quantized = {}
        self._names = {module: name for name, module in model.named_modules()}
        self.lm_head = self._linear(model.get_output_embeddings())
        self.layers = [self._take_layer(layer) for layer in decoder.layers]
        rotary = decoder.rotary_emb
        self._inv_freq = rotary.inv_freq.detach().to(device=device, dtype=torch.float32)
        self._rope_scaling = float(rotary.attention_scaling)
        self._cos = self._sin = torch.empty(0, self.head_dim, device=device, dtype=dtype)
        # LoRA adapters in memory by slot, slot 0 meaning none; the engine fills and empties them (worker/adapters.py).
        self.loras: list[LoraWeights | None] = [None]
        self._allocate_cache()
        logger.info(
            "runner: %d layers, %d KV blocks of %d tokens (%.1f MiB), %s linear layers%s",
            len(self.layers),
            num_blocks,
            block_size,
            num_blocks * self.bytes_per_block(config, dtype, block_size) / 2**20,
            "prepacked oneDNN" if self._pack else "plain",
            self._describe_quantized(),
        )

    def _allocate_cache(self) -> None:
        """Per layer K and V [num_blocks, block_size, kv_heads, head_dim], allocated once for the process."""
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeroed, not empty: masked-out slots still meet V in the softmax product, and 0 * NaN would be NaN.
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # The same memory indexed by slot (block * block_size + offset), where new tokens' K/V are written.
        self._k_slots = [cache.view(-1, self.num_kv_heads, self.head_dim) for cache in self.k_cache]
        self._v_slots = [cache.view(-1, self.num_kv_heads, self.head_dim) for cache in self.v_cache]

    @staticmethod
    def bytes_per_block(config: Any, dtype: torch.dtype, block_size: int) -> int:
        """K and V bytes of one block over all layers."""
        per_token = 2 * config.num_key_value_heads * _head_dim(config) * dtype.itemsize
        return config.num_hidden_layers * block_size * per_token

    def _take_layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qk_norm = None
        if getattr(attn, "q_norm", None) is not None:
            q_norm = attn.q_norm.weight.detach().expand(self.num_heads, -1)
            k_norm = attn.k_norm.weight.detach().expand(self.num_kv_heads, -1)
            qk_norm = torch.cat([q_norm, k_norm])
        return _Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=self._linear(attn.q_proj, attn.k_proj, attn.v_proj),
            qk_norm=qk_norm,
            o_proj=self._linear(attn.o_proj),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=self._linear(mlp.gate_proj, mlp.up_proj),
            down=self._linear(mlp.down_proj),
        )

    def _linear(self, *modules: nn.Linear) -> Linear:
        weight, bias = _fuse(list(modules)) if len(modules) > 1 else (modules[0].weight, modules[0].bias)
        bias = None if bias is None else bias.detach()
        parts = [self._quantized.get(self._names.get(m, "")) for m in modules]
        if all(part is not None for part in parts):
            quantized = QuantLinear([p for p in parts if p is not None], bias, self.dtype)
            if all(kernel_works(w) for w in quantized.weights):
                return _SplitLinear(quantized, _Linear(weight.detach(), bias, self._pack))
            logger.warning("no int8/int4 kernel for %s here; it runs dequantized", self._names.get(modules[0]))
        return _Linear(weight.detach(), bias, self._pack)

    def _describe_quantized(self) -> str:
        names = ("qkv", "o_proj", "gate_up", "down")
        linears = [self.lm_head] + [getattr(layer, name) for layer in self.layers for name in names]
        kinds: dict[str, int] = {}
        for linear in linears:
            for kernel in linear.quantized.kernels if isinstance(linear, _SplitLinear) else []:
                kinds[kernel.name] = kinds.get(kernel.name, 0) + 1
        return "".join(f", {count} on {kind}" for kind, count in sorted(kinds.items()))

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> Tensor:
        """Float32 logits [len(chunks), vocab] at the last token of each chunk; writes the chunks' KV."""
        if not chunks:
            return torch.empty(0, self.lm_head.out_features, device=self.device)
        step = self._prepare(chunks)
        x = F.embedding(step.input_ids, self.embed)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, step)
        x = F.rms_norm(x.index_select(0, step.logit_rows), self.norm.shape, self.norm, self.eps)
        logits = self.lm_head(x, decode_rows=step.decode_rows)
        return (logits if step.caller_order is None else logits.index_select(0, step.caller_order)).float()

    def _layer(self, index: int, layer: _Layer, x: Tensor, step: _Step) -> Tensor:
        h = F.rms_norm(x, layer.input_norm.shape, layer.input_norm, self.eps)
        rows = step.decode_rows
        q, k, v = self._qkv(self._lora(layer.qkv(h, decode_rows=rows), h, step, index, QKV), layer, step)
        self._k_slots[index].index_copy_(0, step.slots, k)
        self._v_slots[index].index_copy_(0, step.slots, v)
        attended = self._attention(index, q, k, v, step)
        x = self._lora(layer.o_proj(attended, residual=x, decode_rows=rows), attended, step, index, O_PROJ)
        h = F.rms_norm(x, layer.post_norm.shape, layer.post_norm, self.eps)
        gate, up = self._lora(layer.gate_up(h, decode_rows=rows), h, step, index, GATE_UP).chunk(2, dim=-1)
        act = F.silu(gate) * up
        return self._lora(layer.down(act, residual=x, decode_rows=rows), act, step, index, DOWN)

    def _lora(self, out: Tensor, x: Tensor, step: _Step, index: int, kind: int) -> Tensor:
        """The base linear's output plus the LoRA deltas of the rows that have an adapter (worker/lora.py)."""
        return add_lora(out, x, step.lora, index, kind, MIN_MATMUL_ROWS) if step.lora else out

    def _qkv(self, qkv: Tensor, layer: _Layer, step: _Step) -> tuple[Tensor, Tensor, Tensor]:
        """Split the fused projection into q [T, H, D], k and v [T, KVH, D]; rotary on q and k at once."""
        num_tokens, num_qk = qkv.shape[0], self.num_heads + self.num_kv_heads
        qk = qkv[:, : num_qk * self.head_dim].view(num_tokens, num_qk, self.head_dim)
        v = qkv[:, num_qk * self.head_dim :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if layer.qk_norm is not None:
            qk = F.rms_norm(qk, (self.head_dim,), eps=self.eps) * layer.qk_norm
        # rotate_half(x) is roll(x, D/2) with the first half negated; the sign lives in the sin table.
        qk = torch.addcmul(qk * step.cos, qk.roll(self.head_dim // 2, dims=-1), step.sin)
        return qk[:, : self.num_heads], qk[:, self.num_heads :], v

    def _attention(self, index: int, q: Tensor, k: Tensor, v: Tensor, step: _Step) -> Tensor:
        """Attention output [T, H * D]: all decode rows in one batched call, then each prefill chunk."""
        outputs = []
        for group in step.decode:
            outputs.append(self._decode_attention(index, q[group.rows], group))
        for prefill in step.prefills:
            outputs.append(self._prefill_attention(index, q, k, v, prefill))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _decode_attention(self, index: int, q: Tensor, group: _DecodeGroup) -> Tensor:
        batch = q.shape[0]
        shape = (batch, -1, self.num_kv_heads, self.head_dim)
        # Gathering whole blocks with index_select is several times faster than per-slot fancy indexing.
        k = self.k_cache[index].index_select(0, group.blocks).view(shape)[:, : group.context].transpose(1, 2)
        v = self.v_cache[index].index_select(0, group.blocks).view(shape)[:, : group.context].transpose(1, 2)
        # The query heads sharing a KV head become that head's query rows: K and V are read once per group.
        q = q.view(batch, self.num_kv_heads, -1, self.head_dim)
        return self._attend(q, k, v, group.mask).reshape(batch, -1)

    def _prefill_attention(self, index: int, q: Tensor, k: Tensor, v: Tensor, prefill: _Prefill) -> Tensor:
        rows = slice(prefill.start, prefill.start + prefill.length)
        if prefill.blocks is None:  # a first chunk attends to its own fresh K/V only
            k, v = k[rows], v[rows]
        else:  # a later chunk also attends to the prefix already in the cache
            shape = (-1, self.num_kv_heads, self.head_dim)
            k = self.k_cache[index].index_select(0, prefill.blocks).view(shape)[: prefill.context]
            v = self.v_cache[index].index_select(0, prefill.blocks).view(shape)[: prefill.context]
        # [kv_heads, length * group, head_dim]: each KV head's query rows are its heads at every position.
        group = self.num_heads // self.num_kv_heads
        q = q[rows].view(prefill.length, self.num_kv_heads, group, self.head_dim).transpose(0, 1)
        q = q.reshape(self.num_kv_heads, prefill.length * group, self.head_dim)
        mask = prefill.mask.repeat_interleave(group, dim=0)  # rows in the same (position, head) order
        out = self._attend(q, k.transpose(0, 1), v.transpose(0, 1), mask)
        out = out.view(self.num_kv_heads, prefill.length, group, self.head_dim).transpose(0, 1)
        return out.reshape(prefill.length, -1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d)) v over [..., rows, head_dim] queries and [..., context, head_dim] keys/values.

        Two matmuls and a float32 softmax rather than SDPA, for both kinds of chunk: SDPA's flash kernel rounds a
        row differently with the number of query rows and with is_causal against a mask, so a prompt prefilled in
        one chunk or in two (as batch neighbours decide) gave different logits; and for one query token it was
        1.5x slower on CPU (bench/step.py, 16 sequences at 200 tokens: 445 vs 291 us a layer).
        """
        rows = q.shape[-2]
        if rows < MIN_MATMUL_ROWS:  # as in _Linear: keep the matrix kernel, whose rows are independent
            q = F.pad(q, (0, 0, 0, MIN_MATMUL_ROWS - rows))
        scores = torch.matmul(q, k.contiguous().transpose(-1, -2)).float().mul_(self.head_dim**-0.5)
        if mask is not None:
            if rows < MIN_MATMUL_ROWS and mask.shape[-2] == rows:
                mask = F.pad(mask, (0, 0, 0, MIN_MATMUL_ROWS - rows), value=True)
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v.contiguous())[..., :rows, :]

    def _prepare(self, chunks: list[SeqChunk]) -> _Step:
        """Flatten the chunks, decode tokens first, into the index tensors every layer uses."""
        if not all(chunk.token_ids for chunk in chunks):
            raise ValueError("a chunk has no tokens")
        decode = [i for i, chunk in enumerate(chunks) if len(chunk.token_ids) == 1 and not chunk.prompt]
        prefill = [i for i, chunk in enumerate(chunks) if len(chunk.token_ids) > 1 or chunk.prompt]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapter_rows: dict[int, list[int]] = {}
        logit_rows = [0] * len(chunks)
        internal = {chunk: position for position, chunk in enumerate(decode + prefill)}
        order = [internal[i] for i in range(len(chunks))]
        bs = self.block_size
        for i in decode + prefill:
            chunk = chunks[i]
            end = chunk.start_pos + len(chunk.token_ids)
            if len(chunk.block_table) * bs < end:
                raise ValueError(f"block table of chunk {i} covers {len(chunk.block_table) * bs} < {end} positions")
            table = chunk.block_table
            if chunk.adapter:
                rows = range(len(input_ids), len(input_ids) + len(chunk.token_ids))
                adapter_rows.setdefault(chunk.adapter, []).extend(rows)
            input_ids += chunk.token_ids
            positions += range(chunk.start_pos, end)
            slots += [table[pos // bs] * bs + pos % bs for pos in range(chunk.start_pos, end)]
            logit_rows[i] = len(input_ids) - 1
        position_ids = self._tensor(positions)
        cos, sin = self._rope(max(positions) + 1)
        return _Step(
            input_ids=self._tensor(input_ids),
            slots=self._tensor(slots),
            cos=cos.index_select(0, position_ids).unsqueeze(1),
            sin=sin.index_select(0, position_ids).unsqueeze(1),
            decode=self._prepare_decode([chunks[i] for i in decode]) if decode else [],
            decode_rows=len(decode),
            prefills=self._prepare_prefills([chunks[i] for i in prefill], first_row=len(decode)),
            logit_rows=self._tensor([logit_rows[i] for i in decode + prefill]),
            caller_order=None if order == list(range(len(chunks))) else self._tensor(order),
            lora=self._lora_groups(adapter_rows, len(input_ids)),
        )

    def _lora_groups(self, adapter_rows: dict[int, list[int]], num_rows: int) -> list[LoraGroup]:
        groups = []
        for slot, rows in sorted(adapter_rows.items()):
            weights = self.loras[slot] if 0 < slot < len(self.loras) else None
            if weights is None:
                raise ValueError(f"a chunk names LoRA slot {slot}, which holds no adapter")
            groups.append(LoraGroup(weights, None if len(rows) == num_rows else self._tensor(rows)))
        return groups

    def _prepare_decode(self, chunks: list[SeqChunk]) -> list[_DecodeGroup]:
        contexts = [chunk.start_pos + 1 for chunk in chunks]
        longest = max(contexts)
        num_blocks = -(-longest // self.block_size)
        blocks = self._tensor([b for chunk in chunks for b in (chunk.block_table + [0] * num_blocks)[:num_blocks]])
        mask = None
        if min(contexts) != longest:
            mask = torch.arange(longest, device=self.device)[None, :] < self._tensor(contexts)[:, None]
            mask = mask[:, None, None, :]
        size = len(chunks)  # one group on a GPU; on a CPU, groups that fit its cache (see CPU_DECODE_GATHER_BYTES)
        if self.device.type == "cpu":
            seq_bytes = 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
            size = max(1, CPU_DECODE_GATHER_BYTES // seq_bytes)
        return [
            _DecodeGroup(
                rows=slice(start, min(start + size, len(chunks))),
                blocks=blocks[start * num_blocks : (start + size) * num_blocks],
                context=longest,
                mask=None if mask is None else mask[start : start + size],
            )
            for start in range(0, len(chunks), size)
        ]

    def _prepare_prefills(self, chunks: list[SeqChunk], first_row: int) -> list[_Prefill]:
        prefills, row = [], first_row
        for chunk in chunks:
            length = len(chunk.token_ids)
            context = chunk.start_pos + length
            blocks = None
            if chunk.start_pos:
                blocks = self._tensor(chunk.block_table[: -(-context // self.block_size)])
            query_pos = torch.arange(chunk.start_pos, context, device=self.device)
            mask = torch.arange(context, device=self.device)[None, :] <= query_pos[:, None]
            prefills.append(_Prefill(start=row, length=length, context=context, blocks=blocks, mask=mask))
            row += length
        return prefills

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _rope(self, length: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin tables [>= length, D], grown on demand; computed exactly as HF does."""
        if self._cos.shape[0] < length:
            length = max(length, 2 * self._cos.shape[0], 1024)
            positions = torch.arange(length, device=self.device, dtype=torch.float32)
            freqs = torch.outer(positions, self._inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos() * self._rope_scaling, emb.sin() * self._rope_scaling
            half = self.head_dim // 2
            sin[:, :half].neg_()
            self._cos, self._sin = cos.to(self.dtype), sin.to(self.dtype)
        return self._cos, self._sin
