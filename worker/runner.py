"""The model forward pass: Llama-family decoders over a paged KV cache, many sequences per step. All torch is here."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker import native as native_kernels
from worker.lora import DOWN, GATE_UP, O_PROJ, QKV, LoraGroup, LoraWeights, add_lora
from worker.quant import QuantLinear, QuantWeight, int4_as_int8_rows, kernel_works

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Decode attention gathers each sequence's K/V blocks into one batch; on a CPU, batches of about this many bytes
# stay in the cache until attention reads them. Measured on a 2-core EPYC, whole steps of 64 sequences: 3x faster
# at 1000 tokens of context, 10% at 200; no change for 16 sequences at 200.
CPU_DECODE_GATHER_BYTES = 4 * 2**20

# A prefill chunk's attention scores are [kv_heads, query rows, context] float32: 55 MB a layer for 256 tokens at
# 6,000 of context, which made such a chunk 16x one at context 0 on a 2-core EPYC (1.6 s against 0.1 s). In blocks of
# query rows whose scores fit in about this many bytes it takes 0.48 s (1-32 MiB measured: 1 MiB 0.78 s, 32 MiB 1.2 s;
# `bench/step.py --prefill 256 --prefill-at 6000`).
PREFILL_SCORE_BYTES = 8 * 2**20

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
    # Prompt tokens take the prefill path even one at a time (the tail of a chunked or prefix-cached prompt): its
    # linears (with integer weights) and its attention on torch ops round differently from the decode path's, and a
    # prompt's logits must not depend on how the scheduler happened to split it, or greedy output would depend on the
    # batch it shared. (The native attention kernel serves both kinds of row alike: _PagedRows.)
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
    win (a whole step 1.3x/1.7x faster at one sequence). Prefill is compute-bound, where the int4/int8 x bf16 kernels
    fall behind oneDNN's bf16 matmul (bench/step.py), so prompt rows take the dense weights (the dequantized integer
    weights). Which path a row takes depends only on its kind (a prompt token or a generated one), never on the
    batch, so batch invariance holds.

    Except on CPUs with AVX512-VNNI, whose integer kernels quantize the activations to int8 per block of 32 (as
    llama.cpp does for these formats): int8 x int8 for int8 weights (and for int4 ones on a small model, see
    quant.INT4_AS_INT8_MAX_BYTES), int4 x int8 for int4 weights in groups of whole blocks. They keep up with oneDNN's
    bf16 at prefill sizes, and one call over all rows beats two and a concatenation (whole steps of 16-60 decodes
    beside a 148-160-token chunk 1.15-1.18x for int4 x int8; bench/step.py). Prompt rows then take them too
    (`dense` None), no dense copy is kept, and a prompt token's bits equal the same token's decoded. The int8
    activations cost the prompt path ~1 % perplexity (README, Quality).
    """

    def __init__(self, quantized: QuantLinear, dense: _Linear | None) -> None:
        """`dense` None: the integer kernels take the prompt rows too (see ModelRunner._linear)."""
        self.quantized, self.dense = quantized, dense
        self.out_features = quantized.out_features

    def __call__(self, x: Tensor, residual: Tensor | None = None, decode_rows: int = 0) -> Tensor:
        if decode_rows >= x.shape[0] or self.dense is None:
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
    blocks: Tensor | None  # (head, block) ids (ModelRunner._head_blocks) of [0, start_pos + length); None: no prefix
    # [1, rows, keys] additive mask (0 or -inf); rows: length * query heads per KV head; keys: the chunk's own (no
    # prefix) or its whole blocks'
    bias: Tensor


@dataclass
class _DecodeGroup:
    """Some 1-token chunks whose attention runs as one batched call."""

    rows: slice  # their rows in the flat batch
    blocks: Tensor  # (head, block) ids of [rows * max_blocks] blocks, heads outermost; tables padded with block 0
    bias: Tensor  # [kv_heads * rows, 1, max_blocks * block_size] additive mask (0 or -inf), heads outermost


@dataclass
class _PagedRows:
    """Every row of the step, decode and prompt alike, for the native kernel (worker/native.py), which reads their
    blocks in place: each row is a query that attends to its own sequence's first `length` positions. A prompt row
    thus gets the same arithmetic as a decode row at its position, so how the scheduler splits a prompt (or whether
    its tail is prefilled or decoded) changes none of its bits."""

    rows: slice  # their rows in the flat batch
    tables: Tensor  # [rows, max_blocks] int64 block ids, padded with block 0 (never read)
    lengths: Tensor  # [rows] int64 context lengths, the row's own token included


@dataclass
class _Step:
    """Index tensors for one forward, built once and shared by every layer."""

    input_ids: Tensor  # [T], decode tokens first, then each prefill chunk
    slots: Tensor  # [T] flat KV slot of each token
    cos: Tensor  # [T, 1, D]
    sin: Tensor  # [T, 1, D], sign of rotate_half folded in
    # Rows whose attention runs as batched calls: the decode rows on torch ops, or every row (prefills then
    # empty) on the native kernel.
    batched: list[_DecodeGroup] | list[_PagedRows]
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
        native: bool = True,
    ) -> None:
        """`quantized`: integer weights by module name (`models.LoadedModel.quantized`); those layers run on int8/int4
        kernels instead of the module's dense weight, and a fused projection is quantized only if all its parts are.
        `native`: on a CPU, decode attention, the norms, rotary, SiLU and the K/V writes run on our C++ kernels where
        they build (worker/native.py); False keeps torch ops for all of them.
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
        self._kernels = native_kernels.kernels() if native and device.type == "cpu" else None
        self._quantized = int4_as_int8_rows(quantized or {}, self._kernels)
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
            "runner: %d layers, %d KV blocks of %d tokens (%.1f MiB), %s linear layers, attention and per-token "
            "steps on %s%s",
            len(self.layers),
            num_blocks,
            block_size,
            num_blocks * self.bytes_per_block(config, dtype, block_size) / 2**20,
            "prepacked oneDNN" if self._pack else "plain",
            "native kernels" if self._kernels else "torch ops",
            self._describe_quantized(),
        )

    def _allocate_cache(self) -> None:
        """Per layer K and V [kv_heads, num_blocks, block_size, head_dim], allocated once for the process.

        Heads first: gathering a sequence's (head, block) rows then yields each head's keys as one contiguous
        [blocks * block_size, head_dim] matrix, which the attention matmuls read as they are. With blocks first, the
        gathered K/V were copied a second time into that shape.
        """
        shape = (self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        # Zeroed, not empty: masked-out slots still meet V in the softmax product, and 0 * NaN would be NaN.
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # The same memory indexed by slot (block * block_size + offset), where new tokens' K/V are written.
        self._k_slots = [cache.view(self.num_kv_heads, -1, self.head_dim) for cache in self.k_cache]
        self._v_slots = [cache.view(self.num_kv_heads, -1, self.head_dim) for cache in self.v_cache]
        # And by (head, block) pair, head * num_blocks + block: attention gathers with index_select on dim 0, which
        # copies whole 2 KB runs (index_select on dim 1 of the cache made decode steps 12-34 % slower, 2 threads).
        self._k_blocks = [cache.view(-1, self.block_size, self.head_dim) for cache in self.k_cache]
        self._v_blocks = [cache.view(-1, self.block_size, self.head_dim) for cache in self.v_cache]

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
            quantized = QuantLinear([p for p in parts if p is not None], bias, self.dtype, self._kernels)
            if all(kernel_works(w) for w in quantized.weights):
                if quantized.integer_activations:  # no dense copy: integer kernels take the prompt rows too
                    return _SplitLinear(quantized, None)
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
        x = self._rms_norm(x.index_select(0, step.logit_rows), self.norm)
        logits = self.lm_head(x, decode_rows=step.decode_rows)
        return (logits if step.caller_order is None else logits.index_select(0, step.caller_order)).float()

    def _layer(self, index: int, layer: _Layer, x: Tensor, step: _Step) -> Tensor:
        h = self._rms_norm(x, layer.input_norm)
        rows = step.decode_rows
        q, k, v = self._qkv(self._lora(layer.qkv(h, decode_rows=rows), h, step, index, QKV), layer, step)
        self._write_kv(index, k, v, step.slots)
        attended = self._attention(index, q, k, v, step)
        x = self._lora(layer.o_proj(attended, residual=x, decode_rows=rows), attended, step, index, O_PROJ)
        h = self._rms_norm(x, layer.post_norm)
        act = self._silu_mul(self._lora(layer.gate_up(h, decode_rows=rows), h, step, index, GATE_UP))
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
        if self._kernels is not None:
            rotated = torch.empty(qk.shape, device=self.device, dtype=self.dtype)
            self._kernels.rotary(qk, step.cos, step.sin, rotated)
            qk = rotated
        else:
            qk = torch.addcmul(qk * step.cos, qk.roll(self.head_dim // 2, dims=-1), step.sin)
        return qk[:, : self.num_heads], qk[:, self.num_heads :], v

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if self._kernels is None:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        out = torch.empty(x.shape, device=self.device, dtype=self.dtype)
        self._kernels.rms_norm(x, weight, self.eps, out)
        return out

    def _silu_mul(self, gate_up: Tensor) -> Tensor:
        """silu(gate) * up from the fused gate/up projection's output [T, 2I]."""
        if self._kernels is None:
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, device=self.device, dtype=self.dtype)
        self._kernels.silu_mul(gate_up, out)
        return out

    def _write_kv(self, index: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """The step's new K/V [T, KVH, D] into their cache slots."""
        if self._kernels is not None:
            self._kernels.write_kv(k, v, self.k_cache[index], self.v_cache[index], slots)
        else:
            self._k_slots[index].index_copy_(1, slots, k.transpose(0, 1))
            self._v_slots[index].index_copy_(1, slots, v.transpose(0, 1))

    def _attention(self, index: int, q: Tensor, k: Tensor, v: Tensor, step: _Step) -> Tensor:
        """Attention output [T, H * D]: the batched rows (every row, on the native kernel), then each prefill chunk."""
        outputs = []
        for group in step.batched:
            if isinstance(group, _PagedRows):
                outputs.append(self._paged_attention(index, q[group.rows], group))
            else:
                outputs.append(self._decode_attention(index, q[group.rows], group))
        for prefill in step.prefills:
            outputs.append(self._prefill_attention(index, q, k, v, prefill))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _paged_attention(self, index: int, q: Tensor, paged: _PagedRows) -> Tensor:
        assert self._kernels is not None
        out = torch.empty(q.shape, device=self.device, dtype=self.dtype)
        k_cache, v_cache, scale = self.k_cache[index], self.v_cache[index], self.head_dim**-0.5
        self._kernels.paged_decode_attention(q, k_cache, v_cache, paged.tables, paged.lengths, scale, out)
        return out.view(q.shape[0], -1)

    def _decode_attention(self, index: int, q: Tensor, group: _DecodeGroup) -> Tensor:
        batch, kv_heads = q.shape[0], self.num_kv_heads
        # Gathering whole blocks with index_select is several times faster than per-slot fancy indexing. Each
        # (head, sequence) pair's keys are then one contiguous [blocks * block_size, head_dim] matrix, positions
        # past its context masked by the bias. Contiguous matters: bmm on a sliced (strided) batch was 4x slower.
        shape = (kv_heads * batch, -1, self.head_dim)
        k = self._k_blocks[index].index_select(0, group.blocks).view(shape)
        v = self._v_blocks[index].index_select(0, group.blocks).view(shape)
        # The query heads sharing a KV head become that head's query rows: K and V are read once per group.
        q = q.view(batch, kv_heads, -1, self.head_dim).transpose(0, 1).reshape(kv_heads * batch, -1, self.head_dim)
        out = self._attend(q, k, v, group.bias)
        return out.reshape(kv_heads, batch, -1, self.head_dim).transpose(0, 1).reshape(batch, -1)

    def _prefill_attention(self, index: int, q: Tensor, k: Tensor, v: Tensor, prefill: _Prefill) -> Tensor:
        rows = slice(prefill.start, prefill.start + prefill.length)
        if prefill.blocks is None:  # a first chunk attends to its own fresh K/V only
            k, v = k[rows].transpose(0, 1).contiguous(), v[rows].transpose(0, 1).contiguous()
        else:  # a later chunk also attends to the prefix already in the cache (its whole blocks; see above)
            shape = (self.num_kv_heads, -1, self.head_dim)
            k = self._k_blocks[index].index_select(0, prefill.blocks).view(shape)
            v = self._v_blocks[index].index_select(0, prefill.blocks).view(shape)
        # [kv_heads, length * group, head_dim]: each KV head's query rows are its heads at every position.
        group = self.num_heads // self.num_kv_heads
        q = q[rows].view(prefill.length, self.num_kv_heads, group, self.head_dim).transpose(0, 1)
        q = q.reshape(self.num_kv_heads, prefill.length * group, self.head_dim)
        # Long contexts: query rows in blocks whose float32 scores stay in the CPU's cache (see PREFILL_SCORE_BYTES).
        # Rows are independent, so blocking changes no row's result.
        block = max(MIN_MATMUL_ROWS, PREFILL_SCORE_BYTES // (4 * self.num_kv_heads * k.shape[1]))
        if self.device.type != "cpu" or q.shape[1] <= block:
            out = self._attend(q, k, v, prefill.bias)
        else:
            parts = [
                self._attend(q[:, r : r + block], k, v, prefill.bias[:, r : r + block])
                for r in range(0, q.shape[1], block)
            ]
            out = torch.cat(parts, dim=1)
        out = out.reshape(self.num_kv_heads, prefill.length, group, self.head_dim).transpose(0, 1)
        return out.reshape(prefill.length, -1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d) + bias) v over [batch, rows, head_dim] queries, [batch, keys, head_dim]
        keys/values and a [batch or 1, rows or 1, keys] additive mask.

        Two matmuls and a softmax rather than SDPA, for both kinds of chunk: SDPA's flash kernel rounds a row
        differently with the number of query rows and with is_causal against a mask, so a prompt prefilled in one
        chunk or in two (as batch neighbours decide) gave different logits; and for one query token it was 1.5x
        slower on CPU (bench/step.py, 16 sequences at 200 tokens: 445 vs 291 us a layer). The scale and the mask
        ride on the first matmul (baddbmm) and the softmax reads the bf16 scores directly into float32: separate
        cast, scale and mask passes over the scores were ~10 % of a step.
        """
        rows = q.shape[-2]
        if rows < MIN_MATMUL_ROWS:  # as in _Linear: keep the matrix kernel, whose rows are independent
            q = F.pad(q, (0, 0, 0, MIN_MATMUL_ROWS - rows))
            if bias.shape[-2] == rows:  # a mask per query row: the padding rows see every key (their output is cut)
                bias = F.pad(bias, (0, 0, 0, MIN_MATMUL_ROWS - rows))
        bias = bias.expand(q.shape[0], q.shape[1], k.shape[1])
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), alpha=self.head_dim**-0.5)
        # float32 out, then cast: bf16's own softmax kernel rounds a row differently with its length (1 ulp, seen
        # in a 62- against an 87-position row with the extra positions masked), so a decode's output would depend
        # on its neighbours' contexts.
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(probs, v)[:, :rows]

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
        position_ids, longest = self._tensor(positions), max(positions) + 1
        cos, sin = self._rope(longest)
        if self._kernels is not None:
            batched: list[_DecodeGroup] | list[_PagedRows] = [
                self._paged_rows([chunks[i] for i in decode + prefill], position_ids, longest)
            ]
            prefills = []
        else:
            batched = self._prepare_decode([chunks[i] for i in decode]) if decode else []
            prefills = self._prepare_prefills([chunks[i] for i in prefill], first_row=len(decode))
        return _Step(
            input_ids=self._tensor(input_ids),
            slots=self._tensor(slots),
            cos=cos.index_select(0, position_ids).unsqueeze(1),
            sin=sin.index_select(0, position_ids).unsqueeze(1),
            batched=batched,
            decode_rows=len(decode),
            prefills=prefills,
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

    def _block_tables(self, chunks: list[SeqChunk], longest: int) -> Tensor:
        """[chunks, blocks of `longest` positions] int64: each chunk's table, padded with block 0 (never read)."""
        num_blocks = -(-longest // self.block_size)
        tables = self._tensor([b for chunk in chunks for b in (chunk.block_table + [0] * num_blocks)[:num_blocks]])
        return tables.view(len(chunks), num_blocks)

    def _paged_rows(self, chunks: list[SeqChunk], positions: Tensor, longest: int) -> _PagedRows:
        """Each token of the chunks (in that order, at `positions`, the longest context `longest`) as a row with its
        sequence's block table."""
        tables = self._block_tables(chunks, longest)
        if len(positions) > len(chunks):  # a prompt chunk's rows share its table
            tables = tables.repeat_interleave(self._tensor([len(chunk.token_ids) for chunk in chunks]), dim=0)
        return _PagedRows(rows=slice(0, len(positions)), tables=tables, lengths=positions + 1)

    def _prepare_decode(self, chunks: list[SeqChunk]) -> list[_DecodeGroup]:
        contexts = [chunk.start_pos + 1 for chunk in chunks]
        blocks = self._block_tables(chunks, max(contexts))
        num_blocks = blocks.shape[1]
        positions = torch.arange(num_blocks * self.block_size, device=self.device)
        bias = self._bias(positions[None, :] < self._tensor(contexts)[:, None])[:, None, :]  # [rows, 1, keys]
        size = len(chunks)  # one group on a GPU; on a CPU, groups that fit its cache (see CPU_DECODE_GATHER_BYTES)
        if self.device.type == "cpu":
            seq_bytes = 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
            size = max(1, CPU_DECODE_GATHER_BYTES // seq_bytes)
        return [
            _DecodeGroup(
                rows=slice(start, min(start + size, len(chunks))),
                blocks=self._head_blocks(blocks[start : start + size].flatten()),
                # attention runs over [kv_heads * rows] matrices, heads outermost
                bias=bias[start : start + size].repeat(self.num_kv_heads, 1, 1),
            )
            for start in range(0, len(chunks), size)
        ]

    def _prepare_prefills(self, chunks: list[SeqChunk], first_row: int) -> list[_Prefill]:
        prefills, row = [], first_row
        group = self.num_heads // self.num_kv_heads
        for chunk in chunks:
            length = len(chunk.token_ids)
            context = chunk.start_pos + length
            blocks, keys = None, length
            if chunk.start_pos:
                num_blocks = -(-context // self.block_size)
                blocks = self._head_blocks(self._tensor(chunk.block_table[:num_blocks]))
                keys = num_blocks * self.block_size
            query_pos = torch.arange(chunk.start_pos, context, device=self.device)
            visible = torch.arange(keys, device=self.device)[None, :] <= query_pos[:, None]
            visible = visible.repeat_interleave(group, dim=0)  # query rows in (position, head) order
            bias = self._bias(visible)[None]
            prefills.append(_Prefill(start=row, length=length, blocks=blocks, bias=bias))
            row += length
        return prefills

    def _head_blocks(self, blocks: Tensor) -> Tensor:
        """Block ids → the (head, block) rows of `_k_blocks`: every head's copy of each block, heads outermost."""
        heads = torch.arange(self.num_kv_heads, device=self.device)[:, None] * self.num_blocks
        return (heads + blocks[None, :]).flatten()

    def _bias(self, visible: Tensor) -> Tensor:
        """An additive attention mask in the model's dtype: 0 where `visible`, -inf elsewhere."""
        return torch.zeros(visible.shape, device=self.device, dtype=self.dtype).masked_fill_(~visible, float("-inf"))

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
