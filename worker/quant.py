"""Weight-only int8 and int4 linear layers: integer codes packed once, multiplied directly by our AVX512-BF16
kernels (worker/csrc/quant_gemm.cpp) where they are built, else by torch's CPU kernels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.native import Kernels

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")
# int4 groups along the input dimension. 32 is GGUF's block (Q4_0, Q4_1, Q4_K's sub-blocks) and the smallest
# group torch's int4 kernel takes; `--quantize int4` uses it too, for quality closest to Q4_1.
INT4_GROUP = 32
INT4_GROUPS = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
# How many 16-wide K tiles torch's int4 packing interleaves: 2 was as fast as 4 or 8 in a noisy micro-benchmark.
INT4_INNER_K_TILES = 2
# Both kernels take bf16 activations and bf16 scales (fp32 activations fall to a scalar loop, 100x slower):
# an fp32 runner casts its activations around them.
KERNEL_DTYPE = torch.bfloat16


@dataclass
class QuantWeight:
    """A linear weight [out, in] as integer codes and scales, before packing for a kernel.

    int8 (group_size 0): w = codes * scale[row]; codes int8.
    int4: w = (codes - 8) * scale[row, group] + zero[row, group]; codes uint8 holding 0..15, groups of
    `group_size` along the input dimension. This is torch's int4 layout, and GGUF Q4_0/Q4_1/Q4_K, GPTQ, AWQ and
    compressed-tensors int4 all map onto it exactly (up to the bf16 rounding of scales and zeros).
    """

    codes: Tensor
    scale: Tensor  # float32, [out] or [out, in // group_size]
    zero: Tensor | None = None  # float32 [out, in // group_size], int4 only
    group_size: int = 0
    source: str = ""  # where the codes came from ("Q4_1", "int8", "GPTQ", ...), for logs and the model card

    @property
    def bits(self) -> int:
        return 8 if self.group_size == 0 else 4

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> Tensor:
        """The float32 weight the codes stand for."""
        if self.group_size == 0:
            return self.codes.float() * self.scale[:, None]
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        assert self.zero is not None
        return (self.codes.float() - 8) * scale + self.zero.repeat_interleave(self.group_size, dim=1)

    def rows(self, index: Tensor) -> QuantWeight:
        """The same weight with its output rows reordered (GGUF stores llama's q/k rows permuted)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantWeight(self.codes[index], self.scale[index], zero, self.group_size, self.source)

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Stack weights along their output rows (q/k/v and gate/up fuse this way); all must be alike."""
        first = parts[0]
        if any(p.group_size != first.group_size or p.shape[1] != first.shape[1] for p in parts):
            raise ValueError("fused weights differ in group size or input width")
        zero = None if first.zero is None else torch.cat([p.zero for p in parts if p.zero is not None])
        sources = sorted({p.source for p in parts})
        return QuantWeight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            zero,
            first.group_size,
            "+".join(sources),
        )


def quantize_int8(weight: Tensor, source: str = "int8") -> QuantWeight:
    """Symmetric, one scale per output row (torchao's int8 weight-only). The scale is rounded to bf16 first,
    so the codes are chosen for the scale the kernel really multiplies by."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).to(KERNEL_DTYPE).float()
    codes = torch.round(weight / scale[:, None]).clamp_(-128, 127).to(torch.int8)
    return QuantWeight(codes, scale, None, 0, source)


def quantize_int4(weight: Tensor, group_size: int = INT4_GROUP, source: str = "int4") -> QuantWeight:
    """Asymmetric min/max per group of `group_size` inputs, in torch's (codes - 8) * scale + zero form."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"input width {in_features} is not a multiple of the int4 group {group_size}")
    groups = weight.detach().float().view(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp_min(1e-12).to(KERNEL_DTYPE).float()
    zero = (low + 8 * scale).to(KERNEL_DTYPE).float()
    codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return QuantWeight(codes.view(out_features, in_features), scale, zero, group_size, source)


def quantize(weight: Tensor, kind: str) -> QuantWeight:
    """`--quantize int8|int4` of one dense weight; a width int4 groups cannot split falls back to int8."""
    if kind == "int4" and weight.shape[1] % INT4_GROUP == 0:
        return quantize_int4(weight)
    if kind not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {kind!r}")
    return quantize_int8(weight, source=kind)


class Int8Kernel:
    """x @ W.T through `torch._weight_int8pack_mm`: int8 weights, one bf16 scale per output row."""

    def __init__(self, weight: QuantWeight) -> None:
        self.codes = weight.codes.contiguous()
        self.scale = weight.scale.to(KERNEL_DTYPE)
        self.name = f"int8 ({weight.source})"

    def __call__(self, x: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x, self.codes, self.scale)


class Int4Kernel:
    """x @ W.T through `torch._weight_int4pack_mm_for_cpu`: two codes a byte, a bf16 scale and zero per group."""

    def __init__(self, weight: QuantWeight) -> None:
        assert weight.zero is not None
        self.packed = torch._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), INT4_INNER_K_TILES)
        # [in / group, out, 2]: the kernel's layout of scales and zeros.
        self.scales_zeros = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        self.group_size = weight.group_size
        self.name = f"int4 g{weight.group_size} ({weight.source})"

    def __call__(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)


NATIVE_COLUMNS = 16  # worker/csrc/quant_gemm.cpp's tile: output columns per vector of sums
# The int8-activation kernels (int4 x int8, int8 x int8) give each row's activations one scale per this many k: K,
# and int4 weight groups, must be whole blocks.
ACT_BLOCK = 32


class NativeInt4Kernel:
    """x @ W.T on worker/csrc/quant_gemm.cpp's int4 kernel; codes repacked into its tiles, float32 scales and zeros.

    Unlike torch's kernel it unpacks a tile once per 8 rows, so it stays ahead of dense bf16 from 1 row to a full
    batch (bench/step.py); scales and zeros stay float32 where torch's kernel rounds them to bf16.
    """

    def __init__(self, weight: QuantWeight, gemm: Callable[..., None]) -> None:
        assert weight.zero is not None
        n, k = weight.shape
        tiles = n // NATIVE_COLUMNS
        # [tile, column j, k-quad q, pair p, element e], k = 4q + 2p + e -> byte 2j + e of quad q, pair p's nibble.
        codes = weight.codes.view(tiles, NATIVE_COLUMNS, k // 4, 2, 2).permute(0, 2, 1, 4, 3)
        self.packed = (codes[..., 0] | (codes[..., 1] << 4)).reshape(tiles, k // 4, 32).contiguous()
        self.scales = weight.scale.view(tiles, NATIVE_COLUMNS, -1).transpose(1, 2).contiguous().float()
        self.zeros = weight.zero.view(tiles, NATIVE_COLUMNS, -1).transpose(1, 2).contiguous().float()
        self.group_size, self.out_features, self.gemm = weight.group_size, n, gemm
        self.name = f"native int4 g{weight.group_size} ({weight.source})"

    def __call__(self, x: Tensor) -> Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=KERNEL_DTYPE)
        self.gemm(x.contiguous(), self.packed, self.scales, self.zeros, self.group_size, out)
        return out


class NativeW4A8Kernel(NativeInt4Kernel):
    """x @ W.T on worker/csrc/quant_gemm.cpp's int4 x int8 kernel: the same tiles, with each row's activations
    quantized per block of 32 (as llama.cpp's Q8_1 does for its Q4 dot products) and summed on AVX512-VNNI, whose
    integer dot products do twice the multiplies per instruction of bf16 ones.

    Whole decode steps of the default Q4_1 model against `NativeInt4Kernel`: 1.09-1.12x at 16-60 sequences, level
    at 1-4 (bandwidth-bound there). Quality (bench/quality.py, decode path, whole text): Q4_1 perplexity 0.9993x its
    dequantized reference and 96.7 % greedy agreement (0.9926x and 97.9 % with bf16 activations), int4 0.9968x and
    96.5 % (0.9917x, 96.1 %); the prompt path at 400 tokens with blocks of 32: 0.9999x, where one scale per row cost
    7.9 % (the reason for blocks).
    """

    def __init__(self, weight: QuantWeight, gemm: Callable[..., None]) -> None:
        super().__init__(weight, gemm)
        # The kernel multiplies the unsigned codes 0..15: (code - 8) * scale + zero = code * scale + (zero - 8 scale).
        self.zeros = (self.zeros - 8 * self.scales).contiguous()
        self.name = f"native int4 x int8 g{weight.group_size} ({weight.source})"


class NativeInt8Kernel:
    """x @ W.T on worker/csrc/quant_gemm.cpp's int8 kernel: codes repacked into its tiles, one float32 scale a row."""

    def __init__(self, weight: QuantWeight, gemm: Callable[..., None]) -> None:
        n, k = weight.shape
        tiles = n // NATIVE_COLUMNS
        # [tile, column j, k-pair p, element e] -> element 2j + e of pair p.
        codes = weight.codes.view(tiles, NATIVE_COLUMNS, k // 2, 2).permute(0, 2, 1, 3)
        self.packed = codes.reshape(tiles, k // 2, 32).contiguous()
        self.scales = weight.scale.float().contiguous()
        self.out_features, self.gemm = n, gemm
        self.name = f"native int8 ({weight.source})"

    def __call__(self, x: Tensor) -> Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=KERNEL_DTYPE)
        self.gemm(x.contiguous(), self.packed, self.scales, out)
        return out


class NativeW8A8Kernel(NativeInt8Kernel):
    """x @ W.T on worker/csrc/quant_gemm.cpp's int8 x int8 kernel: int8 weights with one scale per output row, each
    row's activations quantized per block of 32 as for `NativeW4A8Kernel`; the codes are stored plus 128 (the
    unsigned operand of the VNNI dot product) in tiles of 16 columns by 4 k. Called as `NativeInt8Kernel` is.

    One weight scale per output row leaves a block of 32 only its activation scale to apply (2 float operations per 8
    integer dot products, against 4 for int4 groups): 1.5-1.8 TOP/s at 16-316 rows on this 2-core Zen 5, 1.2x the
    int4 x int8 kernel and 2x the int8 x bf16 one (`NativeInt8Kernel`).
    """

    def __init__(self, weight: QuantWeight, gemm: Callable[..., None]) -> None:
        n, k = weight.shape
        tiles = n // NATIVE_COLUMNS
        offset = (weight.codes.to(torch.int16) + 128).to(torch.uint8)
        # [tile, column j, k-quad q, element e] -> byte 4j + e of quad q.
        self.packed = offset.view(tiles, NATIVE_COLUMNS, k // 4, 4).permute(0, 2, 1, 3).reshape(tiles, k // 4, 64)
        self.packed = self.packed.contiguous()
        self.scales = weight.scale.float().contiguous()
        self.out_features, self.gemm = n, gemm
        self.name = f"native int8 x int8 ({weight.source})"


QuantKernel = Int8Kernel | Int4Kernel | NativeInt8Kernel | NativeInt4Kernel | NativeW4A8Kernel | NativeW8A8Kernel


def _kernel(weight: QuantWeight, native: Kernels | None) -> QuantKernel:
    """Ours where it is built and the shape fits its tiles, else torch's."""
    n, k = weight.shape
    if native is not None and native.quant_gemm and n % NATIVE_COLUMNS == 0:
        if weight.bits == 8 and native.w4a8 and k % ACT_BLOCK == 0:
            return NativeW8A8Kernel(weight, native.w8a8_gemm)
        if weight.bits == 8 and k % 2 == 0:
            return NativeInt8Kernel(weight, native.int8_gemm)
        if weight.bits == 4 and native.w4a8 and weight.group_size % ACT_BLOCK == 0 and k % weight.group_size == 0:
            return NativeW4A8Kernel(weight, native.w4a8_gemm)
        if weight.bits == 4 and weight.group_size % 4 == 0 and k % weight.group_size == 0:
            return NativeInt4Kernel(weight, native.int4_gemm)
    return Int8Kernel(weight) if weight.bits == 8 else Int4Kernel(weight)


def _alike(a: QuantWeight, b: QuantWeight) -> bool:
    return a.group_size == b.group_size and a.shape[1] == b.shape[1]


class QuantLinear:
    """The runner's `_Linear` interface over int8/int4 kernels: x @ W.T (+ bias) (+ residual).

    `weights` are the parts of a fused projection (q, k, v): alike neighbours are stacked into one kernel call;
    parts of different kinds (Q4_K_M keeps v in Q6_K beside q and k in Q4_K) run one call each.
    Every kernel computes each output row on its own, in the same order whatever the number of rows (checked for
    1-70 rows, and by tests/unit/test_runner.py's batch-invariance test per format), so they need no padding.
    torch's are matrix-vector-like: at 1-4 rows they read 2-4x fewer weight bytes than bf16 and are faster; from ~16
    rows up they unpack the weights again for every 4 rows and are slower than oneDNN's bf16 (bench/step.py). Ours
    (`NativeInt4Kernel`, `NativeInt8Kernel`) unpack once per 8 rows.
    """

    def __init__(
        self, weights: list[QuantWeight], bias: Tensor | None, dtype: torch.dtype, native: Kernels | None = None
    ) -> None:
        """`native`: the runner's native kernels, whose int4/int8 gemm is used where built (worker/native.py)."""
        groups: list[list[QuantWeight]] = []
        for weight in weights:
            if groups and _alike(groups[-1][-1], weight):
                groups[-1].append(weight)
            else:
                groups.append([weight])
        self.weights = [QuantWeight.cat(group) if len(group) > 1 else group[0] for group in groups]
        self.kernels = [_kernel(w, native) for w in self.weights]
        self.dtype, self.bias = dtype, bias
        self.out_features = sum(w.shape[0] for w in self.weights)

    @property
    def integer_activations(self) -> bool:
        """Whether every kernel quantizes its activations to int8 (int4 x int8 or int8 x int8)."""
        return all(isinstance(kernel, NativeW4A8Kernel | NativeW8A8Kernel) for kernel in self.kernels)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.to(KERNEL_DTYPE)
        outs = [kernel(x) for kernel in self.kernels]
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)).to(self.dtype)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out if residual is None else out.add_(residual)


# int4 weights run as int8 rows (requantized at load) where all of them as int8 take at most this many bytes. The
# int8 x int8 kernel does half the float work per block of the int4 x int8 one, and a small model's steps under load
# are compute-bound: on SmolLM2-135M (Q4_1, 106 MB as int8) whole steps of 16-60 decodes beside a 148-256-token
# chunk run 1.17-1.2x faster, 1-sequence steps level, 4-sequence ones ~10 % slower. A larger model's decoding waits
# on its weight bytes, which int4 halves.
INT4_AS_INT8_MAX_BYTES = 512 * 2**20


def int4_as_int8_rows(weights: dict[str, QuantWeight], native: Kernels | None) -> dict[str, QuantWeight]:
    """The int4 weights requantized to int8 rows for the int8 x int8 kernel, where it runs here and the model is
    small enough (INT4_AS_INT8_MAX_BYTES); else the weights as they are."""
    fits = {
        name: w
        for name, w in weights.items()
        if w.bits == 4 and w.shape[0] % NATIVE_COLUMNS == 0 and w.shape[1] % ACT_BLOCK == 0
    }
    if not fits or native is None or not native.quant_gemm or not native.w4a8:
        return weights
    size = sum(w.codes.numel() for w in fits.values())
    if size > INT4_AS_INT8_MAX_BYTES:
        logger.info("int4 weights stay int4: %.0f MiB as int8 rows is over %d", size / 2**20, INT4_AS_INT8_MAX_BYTES)
        return weights
    return {
        name: quantize_int8(w.dequantize(), source=f"{w.source} as int8 rows") if name in fits else w
        for name, w in weights.items()
    }


def kernel_works(weight: QuantWeight) -> bool:
    """Whether torch's kernel takes this shape here (CPU builds without them, odd widths): tried on zeros."""
    out_features, in_features = weight.shape
    try:
        codes = torch.zeros(out_features, in_features, dtype=weight.codes.dtype)
        zero = None if weight.zero is None else torch.zeros_like(weight.zero)
        probe = QuantWeight(codes, torch.ones_like(weight.scale), zero, weight.group_size)
        out = QuantLinear([probe], None, KERNEL_DTYPE)(torch.ones(2, in_features, dtype=KERNEL_DTYPE))
        return out.shape == (2, out_features)
    except (RuntimeError, AttributeError) as exc:
        logger.info("no int%d kernel for %dx%d here (%s)", weight.bits, out_features, in_features, str(exc)[:120])
        return False


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_model(model: torch.nn.Module, kind: str) -> dict[str, QuantWeight]:
    """`--quantize int8|int4`: every decoder projection by module name, for the runner's kernels.

    The lm_head is int8 in both modes, as llama.cpp's Q4 files keep their output layer at 6-8 bits: it is the
    layer whose error lands directly on the logits.
    """
    weights = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            weights[name] = quantize(module.weight, kind)
        elif name == "lm_head":
            weights[name] = quantize_int8(module.weight, source=kind)
    return weights
