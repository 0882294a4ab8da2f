"""Our C++ kernels (worker/csrc/) against references: decode attention against float64 in every layout it takes,
the fused per-token steps against the torch ops they replace."""

from __future__ import annotations

import os

import pytest
import torch

from worker import native, quant
from worker.quant import QuantWeight

kernels = native.kernels()


def test_the_kernels_build_on_this_machine() -> None:
    """Elsewhere the runner falls back to torch ops and these tests skip; CI sets TANDEM_REQUIRE_NATIVE, so there a
    missing compiler or a broken build fails instead of hiding."""
    if kernels is None and os.environ.get("TANDEM_REQUIRE_NATIVE"):
        pytest.fail("TANDEM_REQUIRE_NATIVE is set but the kernels did not build (see the warning logged above)")
    if kernels is None:
        pytest.skip("no C++ compiler here: the runner uses torch ops")
    assert native.build().exists()


needs_kernel = pytest.mark.skipif(kernels is None, reason="the kernels did not build here")


def make_case(
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    lengths: list[int],
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query, caches and shuffled, non-overlapping block tables for `lengths`; q a strided view, as in the
    runner (its rows are slices of the fused q/k projection)."""
    generator = torch.Generator().manual_seed(seed)
    widest = max(-(-length // block_size) for length in lengths)
    num_blocks = batch * widest + 3
    shape = (kv_heads, num_blocks, block_size, dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    fused = torch.randn(batch, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    query = fused[:, :heads]
    order = torch.randperm(num_blocks, generator=generator)
    tables = order[: batch * widest].view(batch, widest).contiguous()
    return query, k_cache, v_cache, tables, torch.tensor(lengths)


def reference(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per sequence, in float64, from the blocks its table names."""
    kv_heads, _, block_size, dim = k_cache.shape
    group = query.shape[1] // kv_heads
    outputs = []
    for seq, length in enumerate(lengths.tolist()):
        blocks = tables[seq, : -(-length // block_size)]
        keys = k_cache[:, blocks].reshape(kv_heads, -1, dim)[:, :length].double().repeat_interleave(group, 0)
        values = v_cache[:, blocks].reshape(kv_heads, -1, dim)[:, :length].double().repeat_interleave(group, 0)
        scores = (query[seq].double()[:, None, :] @ keys.transpose(1, 2))[:, 0] * dim**-0.5
        outputs.append((torch.softmax(scores, -1)[:, None, :] @ values)[:, 0])
    return torch.stack(outputs)


def run(query: torch.Tensor, *cache_and_tables: torch.Tensor) -> torch.Tensor:
    assert kernels is not None
    out = torch.empty(query.shape, dtype=query.dtype)
    kernels.paged_decode_attention(query, *cache_and_tables, query.shape[-1] ** -0.5, out)
    return out


# Head sizes 64 and 128 take the AVX-512 tiles where the CPU has them, 48 the portable ones. Groups of 3 and 7 query
# heads per KV head leave a last pass of fewer heads than a full one (4 at size 64). Blocks of 4 cut tiles short;
# lengths 1, 16 (a full block), 17 and 200 cover a lone key, whole tiles and partial ones.
LAYOUTS = [
    pytest.param(dict(heads=9, kv_heads=3, dim=64, block_size=16), id="smollm2-like"),
    pytest.param(dict(heads=14, kv_heads=2, dim=64, block_size=16), id="group-of-7"),
    pytest.param(dict(heads=8, kv_heads=4, dim=128, block_size=16), id="dim-128"),
    pytest.param(dict(heads=4, kv_heads=4, dim=48, block_size=4), id="portable-mha-blocks-of-4"),
    pytest.param(dict(heads=6, kv_heads=2, dim=64, block_size=32), id="blocks-of-32"),
]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_the_float64_reference(layout: dict[str, int], dtype: torch.dtype) -> None:
    lengths = [1, 16, 17, 200, 63]
    case = make_case(batch=len(lengths), lengths=lengths, dtype=dtype, seed=1, **layout)
    ours, expected = run(*case), reference(*case)
    # The output is rounded to the dtype once, at the end; everything before runs in float32.
    torch.testing.assert_close(ours.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sequence_gets_the_same_bits_alone_and_in_any_batch(layout: dict[str, int]) -> None:
    """The engine's batch invariance rests on it: greedy output must not depend on who shares the step."""
    lengths = [37, 1, 250, 16, 100, 5]
    query, k_cache, v_cache, tables, lens = make_case(
        batch=len(lengths), lengths=lengths, dtype=torch.bfloat16, seed=2, **layout
    )
    together = run(query, k_cache, v_cache, tables, lens)
    for seq in range(len(lengths)):
        alone = run(query[seq : seq + 1], k_cache, v_cache, tables[seq : seq + 1].contiguous(), lens[seq : seq + 1])
        assert torch.equal(alone[0], together[seq]), f"sequence {seq}"
    reordered = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = run(query[reordered], k_cache, v_cache, tables[reordered].contiguous(), lens[reordered])
    assert torch.equal(shuffled, together[reordered])


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS[:2] + LAYOUTS[3:4])
def test_a_prompt_chunks_rows_get_the_same_bits_as_each_alone(layout: dict[str, int]) -> None:
    """The runner hands a prompt chunk's rows over as rows sharing one block table, each at its own length; the
    kernel takes such rows in runs (MAX_RUN, fewer at long contexts), and no row may notice: the bits of each equal
    those of the row alone, and match the float64 reference. Two chunks (one at 2,500 tokens, where runs shrink to
    fit RUN_SCORE_BYTES) sit between decode rows of other sequences."""
    query, k_cache, v_cache, tables, _ = make_case(
        batch=4, lengths=[2600, 40, 300, 7], dtype=torch.bfloat16, seed=5, **layout
    )
    # rows: a decode of seq 1, 11 rows of seq 0's chunk at 2,490-2,500, a decode of seq 3, 20 rows of seq 2 at 281-300
    rows = [(1, 40)] + [(0, n) for n in range(2490, 2501)] + [(3, 7)] + [(2, n) for n in range(281, 301)]
    generator = torch.Generator().manual_seed(6)
    fused = torch.randn(len(rows), query.shape[1] + 3, query.shape[2], generator=generator).to(torch.bfloat16)
    q = fused[:, : query.shape[1]]
    row_tables = tables[[seq for seq, _ in rows]].contiguous()
    lens = torch.tensor([n for _, n in rows])
    together = run(q, k_cache, v_cache, row_tables, lens)
    for i in range(len(rows)):
        alone = run(q[i : i + 1], k_cache, v_cache, row_tables[i : i + 1], lens[i : i + 1])
        assert torch.equal(alone[0], together[i]), f"row {i}"
    expected = reference(q, k_cache, v_cache, row_tables, lens)
    torch.testing.assert_close(together.double(), expected, atol=1e-2, rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blocks_outside_a_context_are_never_read(dtype: torch.dtype) -> None:
    """Table entries past a sequence's blocks are padding (the runner pads with block 0) and NaN blocks elsewhere
    in the cache stay unread, as do the slots of a last block past the context (bf16 pairs an odd last key with a
    zero, not with the slot after it): only the positions [0, length) matter."""
    query, k_cache, v_cache, tables, lens = make_case(
        batch=2, heads=9, kv_heads=3, dim=64, block_size=16, lengths=[21, 39], dtype=dtype, seed=3
    )
    expected = run(query, k_cache, v_cache, tables, lens)
    used = {int(block) for seq, length in enumerate(lens.tolist()) for block in tables[seq, : -(-length // 16)]}
    for block in set(range(k_cache.shape[1])) - used:
        k_cache[:, block] = float("nan")
        v_cache[:, block] = float("nan")
    for seq, length in enumerate(lens.tolist()):  # the last block's slots past the context
        last = int(tables[seq, (length - 1) // 16])
        k_cache[:, last, length % 16 :] = float("nan")
        v_cache[:, last, length % 16 :] = float("nan")
    tables[0, 2] = next(iter(set(range(k_cache.shape[1])) - used))  # sequence 0 uses 2 blocks; its 3rd is padding
    assert torch.equal(run(query, k_cache, v_cache, tables, lens), expected)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda case: case[3].fill_(10_000), "block id out of range"),
        (lambda case: case[4].fill_(10_000), "context length outside its block table"),
        (lambda case: case[4].fill_(0), "context length outside its block table"),
    ],
    ids=["block-id", "too-long", "empty"],
)
def test_bad_tables_raise_instead_of_reading_stray_memory(change: object, message: str) -> None:
    case = make_case(batch=2, heads=9, kv_heads=3, dim=64, block_size=16, lengths=[20, 40], dtype=torch.float32, seed=4)
    change(case)  # type: ignore[operator]
    with pytest.raises(RuntimeError, match=message):
        run(*case)


@needs_kernel
def test_mismatched_dtypes_are_refused() -> None:
    query, k_cache, v_cache, tables, lens = make_case(
        batch=1, heads=9, kv_heads=3, dim=64, block_size=16, lengths=[20], dtype=torch.float32, seed=5
    )
    with pytest.raises(RuntimeError, match="share a dtype"):
        run(query.to(torch.bfloat16), k_cache, v_cache, tables, lens)


def test_a_failed_build_leaves_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler (or a broken one): the loader logs why and returns None, and the runner keeps its torch ops."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
    finally:
        native.kernels.cache_clear()


# The fused per-token steps against the torch ops they replace: same math in float32, rounded once at the end, so
# within a rounding of the output dtype (torch's bf16 ops round in between, ours do not).
STEP_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])


def assert_step_close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = STEP_TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), atol=atol, rtol=rtol)


@needs_kernel
@DTYPES
def test_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    assert kernels is not None
    generator = torch.Generator().manual_seed(6)
    wide = torch.randn(37, 700, generator=generator).to(dtype)
    x = wide[:, :576]  # rows strided, as an index_select's or a slice's may be
    weight = (1 + torch.randn(576, generator=generator) / 4).to(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    kernels.rms_norm(x, weight, 1e-5, out)
    expected = torch.nn.functional.rms_norm(x.float(), (576,), weight.float(), 1e-5)
    assert_step_close(out, expected, dtype)


@needs_kernel
@DTYPES
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    assert kernels is not None
    generator = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(33, 2 * 1536, generator=generator) * 6).to(dtype)  # gates far into both tails
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # past the exp's clamp: silu ~ 0 and ~ x
    out = torch.empty(33, 1536, dtype=dtype)
    kernels.silu_mul(gate_up, out)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert_step_close(out, torch.nn.functional.silu(gate) * up, dtype)


@needs_kernel
@DTYPES
def test_rotary_matches_torch(dtype: torch.dtype) -> None:
    """As the runner calls it: q and k heads of the fused projection (a strided view), signed sin table."""
    assert kernels is not None
    generator = torch.Generator().manual_seed(8)
    tokens, heads, dim = 21, 12, 64
    fused = torch.randn(tokens, (heads + 3) * dim, generator=generator).to(dtype)
    x = fused[:, : heads * dim].view(tokens, heads, dim)
    angles = torch.rand(tokens, 1, dim // 2, generator=generator) * 6.28
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    kernels.rotary(x, cos, sin, out)
    expected = x.float() * cos.float() + x.float().roll(dim // 2, dims=-1) * sin.float()
    assert_step_close(out, expected, dtype)


@needs_kernel
def test_write_kv_puts_each_token_in_its_slot_and_nothing_else() -> None:
    assert kernels is not None
    generator = torch.Generator().manual_seed(9)
    kv_heads, blocks, block_size, dim = 3, 6, 4, 8
    k_cache, v_cache = torch.zeros(kv_heads, blocks, block_size, dim), torch.zeros(kv_heads, blocks, block_size, dim)
    fused = torch.randn(5, 2 * kv_heads + 9, dim, generator=generator)
    k, v = fused[:, 9 : 9 + kv_heads], fused[:, 9 + kv_heads :]  # strided views, as the runner's
    slots = torch.tensor([23, 0, 5, 6, 17])
    kernels.write_kv(k, v, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    expected_k.view(kv_heads, -1, dim)[:, slots] = k.transpose(0, 1)
    expected_v.view(kv_heads, -1, dim)[:, slots] = v.transpose(0, 1)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    with pytest.raises(RuntimeError, match="slot 24 out of range"):
        kernels.write_kv(k, v, k_cache, v_cache, torch.tensor([1, 2, 3, 4, 24]))


needs_quant_gemm = pytest.mark.skipif(
    kernels is None or not kernels.quant_gemm, reason="the int4/int8 kernels need AVX512-BF16 and a build"
)


def quant_case(bits: int, n: int, k: int, seed: int) -> QuantWeight:
    generator = torch.Generator().manual_seed(seed)
    if bits == 8:
        codes = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
        return QuantWeight(codes, torch.rand(n, generator=generator) / 50, source="test")
    groups = k // 32
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale, zero = torch.rand(n, groups, generator=generator) / 10, torch.randn(n, groups, generator=generator) / 10
    return QuantWeight(codes, scale, zero, 32, source="test")


def native_kernel(weight: QuantWeight) -> quant.NativeInt4Kernel | quant.NativeInt8Kernel:
    assert kernels is not None
    if weight.bits == 8:
        return quant.NativeInt8Kernel(weight, kernels.int8_gemm)
    return quant.NativeInt4Kernel(weight, kernels.int4_gemm)


@needs_quant_gemm
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
def test_integer_gemm_matches_the_dequantized_weights(bits: int, rows: int) -> None:
    """Each output: the row's bf16 activations times the dequantized weight, summed in float32, rounded once."""
    weight = quant_case(bits, n=96, k=320, seed=10 + bits)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    expected = x.double() @ weight.dequantize().double().t()
    torch.testing.assert_close(native_kernel(weight)(x).double(), expected, atol=1e-2, rtol=1e-2)


@needs_quant_gemm
@pytest.mark.parametrize("bits", [4, 8])
def test_integer_gemm_gives_a_row_the_same_bits_in_any_batch(bits: int) -> None:
    """Up to 8 rows take the register path, more the panel path (8 rows of 2 tiles at a time, fewer rows in a last
    pass, an odd last tile alone: 5 tiles here): no row may notice which.

    Random data would hide a change of summation order: its float32 sums are nearly exact and the bf16 output rounds
    what is left away. So each group of 32 inputs opens with +2^20 and -2^20 on equal codes: whether the small
    products are summed before or after those cancel decides whole units of the result.
    """
    weight = quant_case(bits, n=80, k=256, seed=20 + bits)
    weight.codes[:, 2::32] = weight.codes[:, 0::32]
    kernel = native_kernel(weight)
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(3))
    x[:, 0::32], x[:, 2::32] = 2.0**20, -(2.0**20)
    x = x.to(torch.bfloat16)
    together = kernel(x)
    for row in range(19):
        assert torch.equal(kernel(x[row : row + 1])[0], together[row]), f"row {row}"
    assert torch.equal(kernel(x[5:16]), together[5:16])
    assert torch.equal(kernel(x[2:10]), together[2:10])


needs_w4a8 = pytest.mark.skipif(
    kernels is None or not kernels.w4a8, reason="the int4 x int8 kernel needs AVX512-VNNI and AVX512-BF16 and a build"
)


def int4_case(n: int, k: int, group_size: int, seed: int) -> QuantWeight:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    groups = k // group_size
    scale, zero = torch.rand(n, groups, generator=generator) / 10, torch.randn(n, groups, generator=generator) / 10
    return QuantWeight(codes, scale, zero, group_size, source="test")


def w4a8_kernel(weight: QuantWeight) -> quant.NativeW4A8Kernel:
    assert kernels is not None
    return quant.NativeW4A8Kernel(weight, kernels.w4a8_gemm)


def blocks_of_32_quantized(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel sees them: per row and block of 32, codes round(x * 127 / max |x|) (float32,
    ties to even) times max |x| / 127, in float64."""
    blocks = x.float().view(x.shape[0], -1, 32)
    peak = blocks.abs().amax(-1, keepdim=True)
    # 127 / max as a float32 division of two tensors, as the kernel does: torch computes `127 / tensor` as the
    # tensor's reciprocal times 127, which moves codes near a half by one.
    inverse = torch.where(peak > 0, torch.full_like(peak, 127) / peak, 0)
    codes = torch.round(blocks * inverse)
    return (codes.double() * (peak.double() / 127)).view(x.shape)


@needs_w4a8
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 40])
def test_w4a8_gemm_matches_blockwise_quantized_activations(group_size: int, rows: int) -> None:
    """Each output: the row's activations quantized per block of 32 times the dequantized int4 weight, for weight
    groups of one block (Q4_1) and of four (GPTQ's 128); rows up to 6 on the register path, more on panels."""
    weight = int4_case(96, 384, group_size, seed=30 + group_size)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    x[0, :32] = 0  # a block of zeros: scale 0, no division by it
    expected = blocks_of_32_quantized(x) @ weight.dequantize().double().t()
    # Outputs reach ~8, where the one rounding to bf16 moves them by up to 0.016.
    torch.testing.assert_close(w4a8_kernel(weight)(x).double(), expected, atol=0.02, rtol=1e-2)


def w8a8_kernel(weight: QuantWeight) -> quant.NativeW8A8Kernel:
    assert kernels is not None
    return quant.NativeW8A8Kernel(weight, kernels.w8a8_gemm)


def int8_case(n: int, k: int, seed: int) -> QuantWeight:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    codes[0, :8] = torch.tensor([-128, 127, -128, 127, -127, 126, 0, -1], dtype=torch.int8)  # both ends of the range
    return QuantWeight(codes, torch.rand(n, generator=generator) / 100, source="test")


@needs_w4a8
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 40])
def test_w8a8_gemm_matches_blockwise_quantized_activations(rows: int) -> None:
    """Each output: the row's activations quantized per block of 32 times the int8 weight; 5 tiles, so the last
    pass has one tile; rows up to 6 in one pass, more in several. The codes' +128 offset must cancel exactly."""
    weight = int8_case(80, 384, seed=50)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    x[0, :32] = 0  # a block of zeros: scale 0, no division by it
    x[-1, 32:64] = 3.0  # a block of one value: its codes all 127, the largest offset sum
    expected = blocks_of_32_quantized(x) @ weight.dequantize().double().t()
    torch.testing.assert_close(w8a8_kernel(weight)(x).double(), expected, atol=0.02, rtol=1e-2)


@needs_w4a8
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activation_gemms_give_a_row_the_same_bits_in_any_batch(bits: int) -> None:
    """int4 x int8 and int8 x int8: passes of up to 6 rows over 2 tiles (5 tiles: an odd last one alone); int4 in
    registers up to 6 rows, from panels beyond. A row's bits must not depend on which path or pass it took."""
    kernel = w4a8_kernel(int4_case(80, 256, 32, seed=40)) if bits == 4 else w8a8_kernel(int8_case(80, 256, seed=60))
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    together = kernel(x)
    for row in range(19):
        assert torch.equal(kernel(x[row : row + 1])[0], together[row]), f"row {row}"
    assert torch.equal(kernel(x[5:16]), together[5:16])
    assert torch.equal(kernel(x[2:8]), together[2:8])


@needs_w4a8
def test_small_models_int4_weights_run_as_int8_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4_as_int8_rows: requantized to int8 rows (their dequantization within half a step of each row's scale)
    while all of them fit INT4_AS_INT8_MAX_BYTES; int8 weights and shapes the kernel cannot take stay as they are."""
    assert kernels is not None
    weights = {
        "a": int4_case(32, 64, 32, seed=1),
        "b": int8_case(16, 64, seed=2),
        "odd": int4_case(24, 64, 32, seed=3),  # 24 outputs: not whole tiles of 16
    }
    rows = quant.int4_as_int8_rows(weights, kernels)
    assert rows["a"].bits == 8 and rows["a"].source == "test as int8 rows"
    step = rows["a"].scale[:, None]
    assert ((rows["a"].dequantize() - weights["a"].dequantize()).abs() <= step / 2 + 1e-6).all()
    assert rows["b"] is weights["b"] and rows["odd"] is weights["odd"]
    monkeypatch.setattr(quant, "INT4_AS_INT8_MAX_BYTES", 32 * 64 - 1)
    assert quant.int4_as_int8_rows(weights, kernels) is weights
