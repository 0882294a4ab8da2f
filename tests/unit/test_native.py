"""Our C++ decode attention (worker/paged_attention.cpp) against a float64 reference, in every layout it takes."""

from __future__ import annotations

import os

import pytest
import torch

from worker import native

op = native.paged_decode_attention()


def test_the_kernel_builds_on_this_machine() -> None:
    """Elsewhere the runner falls back to torch ops and these tests skip; CI sets TANDEM_REQUIRE_NATIVE, so there a
    missing compiler or a broken build fails instead of hiding."""
    if op is None and os.environ.get("TANDEM_REQUIRE_NATIVE"):
        pytest.fail("TANDEM_REQUIRE_NATIVE is set but the kernel did not build (see the warning logged above)")
    if op is None:
        pytest.skip("no C++ compiler here: the runner uses its torch path")
    assert native.build().exists()


needs_kernel = pytest.mark.skipif(op is None, reason="the kernel did not build here")


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
    assert op is not None
    out = torch.empty(query.shape, dtype=query.dtype)
    op(query, *cache_and_tables, query.shape[-1] ** -0.5, out)
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
def test_blocks_outside_a_context_are_never_read() -> None:
    """Table entries past a sequence's blocks are padding (the runner pads with block 0) and NaN blocks elsewhere
    in the cache stay unread: only the blocks of [0, length) matter."""
    query, k_cache, v_cache, tables, lens = make_case(
        batch=2, heads=9, kv_heads=3, dim=64, block_size=16, lengths=[20, 40], dtype=torch.float32, seed=3
    )
    expected = run(query, k_cache, v_cache, tables, lens)
    used = {int(block) for seq, length in enumerate(lens.tolist()) for block in tables[seq, : -(-length // 16)]}
    for block in set(range(k_cache.shape[1])) - used:
        k_cache[:, block] = float("nan")
        v_cache[:, block] = float("nan")
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
    native.paged_decode_attention.cache_clear()
    try:
        assert native.paged_decode_attention() is None
    finally:
        native.paged_decode_attention.cache_clear()
