"""Our paged, flat-batch forward pass against the HF model's own logits, on the real default model (CPU, fp32)."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from worker import quant
from worker import runner as runner_module
from worker.gguf_weights import read_gguf_weights
from worker.models import LoadedModel, cpu_has_bf16, default_model_path
from worker.quant import QuantWeight, quantize_model
from worker.runner import ModelRunner, SeqChunk, UnsupportedModel, _SplitLinear

BLOCK_SIZE = 16
NUM_BLOCKS = 96
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Write a haiku about paged attention and the memory it saves.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24",
    "Bonjour! Comment allez-vous aujourd'hui ? Je voudrais un café, s'il vous plaît.",
]


@pytest.fixture(scope="module")
def loaded(loaded_fp32: LoadedModel) -> LoadedModel:
    return loaded_fp32  # dense float32 (conftest.py)


@pytest.fixture(scope="module")
def runner(loaded: LoadedModel) -> ModelRunner:
    return ModelRunner(
        loaded.model, device=torch.device("cpu"), dtype=torch.float32, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE
    )


@pytest.fixture(scope="module")
def torch_runner(loaded: LoadedModel) -> ModelRunner:
    """Decode attention on torch ops, as on a GPU or where the native kernel does not build (worker/native.py)."""
    return ModelRunner(
        loaded.model,
        device=torch.device("cpu"),
        dtype=torch.float32,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        native=False,
    )


@pytest.fixture
def blocks() -> list[int]:
    """Free block ids in shuffled order, so block tables are never contiguous or sorted."""
    free = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(free)
    return free


def tokens(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode(text)


def table(free: list[int], num_tokens: int) -> list[int]:
    return [free.pop() for _ in range(-(-num_tokens // BLOCK_SIZE))]


_references: dict[tuple[int, ...], torch.Tensor] = {}


def hf_logits(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    """The HF model's float32 logits at every position of one sequence alone, without any cache.

    Causal attention makes row p the logits of the prefix [0, p] alone, so one call per prompt serves every test.
    """
    key = tuple(token_ids)
    if key not in _references:
        with torch.inference_mode():
            _references[key] = loaded.model(torch.tensor([token_ids])).logits[0].float()
    return _references[key]


def assert_matches(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_full_prompt_prefill(loaded: LoadedModel, runner: ModelRunner, blocks: list[int]) -> None:
    ids = tokens(loaded, PROMPTS[0])
    logits = runner.forward([SeqChunk(ids, 0, table(blocks, len(ids)))])
    assert logits.shape == (1, loaded.model.config.vocab_size)
    assert_matches(logits[0], hf_logits(loaded, ids)[-1])


def test_prompt_prefilled_in_three_chunks(loaded: LoadedModel, runner: ModelRunner, blocks: list[int]) -> None:
    ids = tokens(loaded, PROMPTS[0])
    reference = hf_logits(loaded, ids)
    block_table = table(blocks, len(ids))
    for start, end in [(0, 17), (17, 40), (40, len(ids))]:  # boundaries inside blocks, not on them
        logits = runner.forward([SeqChunk(ids[start:end], start, block_table)])
        assert_matches(logits[0], reference[end - 1])


@pytest.mark.parametrize(
    ("attention", "gather_bytes"),
    [("native", 0), ("torch", runner_module.CPU_DECODE_GATHER_BYTES), ("torch", 1)],
    ids=["native-kernel", "torch-one-group", "torch-groups-of-1"],
)
def test_batched_decode_of_sequences_with_different_lengths(
    loaded: LoadedModel,
    request: pytest.FixtureRequest,
    blocks: list[int],
    attention: str,
    gather_bytes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode attention on the native kernel where it built, and on torch ops in one gather or one per sequence."""
    monkeypatch.setattr(runner_module, "CPU_DECODE_GATHER_BYTES", gather_bytes)
    runner: ModelRunner = request.getfixturevalue("runner" if attention == "native" else "torch_runner")
    prompts = [tokens(loaded, text) for text in PROMPTS[:3]]
    assert len({len(ids) for ids in prompts}) == 3
    tables = [table(blocks, len(ids) + 2) for ids in prompts]
    # All prompts but their last two tokens in one step, then two decode steps of all three together.
    runner.forward([SeqChunk(ids[:-2], 0, t) for ids, t in zip(prompts, tables, strict=True)])
    for back in (2, 1):
        logits = runner.forward(
            [SeqChunk([ids[-back]], len(ids) - back, t) for ids, t in zip(prompts, tables, strict=True)]
        )
        for row, ids in enumerate(prompts):
            assert_matches(logits[row], hf_logits(loaded, ids)[len(ids) - back])


def test_mixed_step_of_decodes_and_prefill_chunks(loaded: LoadedModel, runner: ModelRunner, blocks: list[int]) -> None:
    decoding = [tokens(loaded, PROMPTS[1]), tokens(loaded, PROMPTS[2])]
    chunked = tokens(loaded, PROMPTS[0])  # its second chunk attends to its cached first chunk
    fresh = tokens(loaded, PROMPTS[3])  # a first chunk: plain causal attention
    decode_tables = [table(blocks, len(ids)) for ids in decoding]
    chunked_table, fresh_table = table(blocks, len(chunked)), table(blocks, len(fresh))
    runner.forward([SeqChunk(ids[:-1], 0, t) for ids, t in zip(decoding, decode_tables, strict=True)])
    runner.forward([SeqChunk(chunked[:30], 0, chunked_table)])
    # The caller's order mixes kinds; the runner puts decodes first internally and must answer in this order.
    step = [
        SeqChunk(chunked[30:], 30, chunked_table),
        SeqChunk([decoding[0][-1]], len(decoding[0]) - 1, decode_tables[0]),
        SeqChunk(fresh, 0, fresh_table),
        SeqChunk([decoding[1][-1]], len(decoding[1]) - 1, decode_tables[1]),
    ]
    logits = runner.forward(step)
    for row, ids in enumerate([chunked, decoding[0], fresh, decoding[1]]):
        assert_matches(logits[row], hf_logits(loaded, ids)[-1])


def test_block_placement_does_not_change_the_result(loaded: LoadedModel, runner: ModelRunner) -> None:
    ids = tokens(loaded, PROMPTS[0])
    num_blocks = -(-len(ids) // BLOCK_SIZE)
    contiguous = list(range(num_blocks))
    scattered = [NUM_BLOCKS - 1 - 7 * i for i in range(num_blocks)]  # descending, with gaps
    results = []
    for block_table in (contiguous, scattered):
        runner.forward([SeqChunk(ids[:-1], 0, block_table)])
        results.append(runner.forward([SeqChunk(ids[-1:], len(ids) - 1, block_table)])[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)
    assert_matches(results[1], hf_logits(loaded, ids)[-1])


TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
TINY_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY, **TINY_HEADS, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        LlamaConfig(**TINY, **TINY_HEADS, rope_parameters=LLAMA3_ROPE),
        Qwen2Config(**TINY, **TINY_HEADS),  # q/k/v biases
        Qwen3Config(**TINY, **TINY_HEADS, head_dim=32),  # q_norm/k_norm, head_dim != hidden / heads
        MistralConfig(**TINY, **TINY_HEADS, sliding_window=None),
    ],
    ids=["llama-biases", "llama3-rope", "qwen2", "qwen3", "mistral"],
)
def test_tiny_models_of_each_supported_architecture(config: PretrainedConfig) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random weights large enough, and norms far enough from 1, that mistakes show
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.2)
    ids = torch.randint(0, config.vocab_size, (40,)).tolist()
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0]
    runner = ModelRunner(model, device=torch.device("cpu"), dtype=torch.float32, num_blocks=16, block_size=4)
    block_table = [9, 3, 14, 0, 7, 1, 12, 5, 2, 11]
    for start, end in [(0, 25), (25, 39), (39, 40)]:
        logits = runner.forward([SeqChunk(ids[start:end], start, block_table)])
        assert_matches(logits[0], reference[end - 1])


def test_short_block_table_is_refused(runner: ModelRunner) -> None:
    with pytest.raises(ValueError, match="block table"):
        runner.forward([SeqChunk([1] * 20, 0, [0])])


def test_bytes_per_block_counts_k_and_v_of_every_layer(loaded: LoadedModel) -> None:
    config = loaded.model.config  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert ModelRunner.bytes_per_block(config, torch.float32, 16) == 2 * 30 * 16 * 3 * 64 * 4
    assert ModelRunner.bytes_per_block(config, torch.bfloat16, 16) == 2 * 30 * 16 * 3 * 64 * 2


def test_unsupported_architecture_is_refused_clearly() -> None:
    model = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(UnsupportedModel, match="'gpt2' is not supported"):
        ModelRunner(model, device=torch.device("cpu"), dtype=torch.float32, num_blocks=4)  # type: ignore[arg-type]


def test_bfloat16_runner_tracks_the_float32_model(loaded: LoadedModel, blocks: list[int]) -> None:
    """bf16 (prepacked where oneDNN has bf16 kernels) cannot match fp32 to 1e-3; it must still predict the same."""
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    runner = ModelRunner(model, device=torch.device("cpu"), dtype=torch.bfloat16, num_blocks=NUM_BLOCKS)
    for text in PROMPTS:
        ids = tokens(loaded, text)
        reference = hf_logits(loaded, ids)
        block_table = table(blocks, len(ids))
        prefill = runner.forward([SeqChunk(ids[:-1], 0, block_table)])[0]
        decode = runner.forward([SeqChunk(ids[-1:], len(ids) - 1, block_table)])[0]
        for ours, theirs in ((prefill, reference[-2]), (decode, reference[-1])):
            assert ours.dtype == torch.float32
            assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.99
            assert ours.argmax() == theirs.argmax()


# Where the CPU has no bf16 units, dtype auto serves fp32 and bf16 matmuls are emulated by other kernels.
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="no bf16 units")


def quantized_weights(loaded: LoadedModel, kind: str) -> dict[str, QuantWeight]:
    if kind == "dense":
        return {}
    if kind == "gguf":  # the shipped file's own Q4_1 (int4 kernel) and Q8_0 (int8 kernel) tensors
        return read_gguf_weights(default_model_path(), loaded.model.config)
    return quantize_model(loaded.model, kind)


@pytest.mark.parametrize(
    ("dtype", "kind", "native"),
    [
        (torch.float32, "dense", True),
        pytest.param(torch.bfloat16, "dense", True, marks=needs_bf16),
        (torch.float32, "gguf", True),
        (torch.bfloat16, "gguf", True),
        (torch.bfloat16, "int8", True),
        (torch.bfloat16, "int4", True),
        (torch.bfloat16, "gguf-int4", True),
        (torch.float32, "dense", False),
        pytest.param(torch.bfloat16, "dense", False, marks=needs_bf16),
    ],
    ids=[
        "fp32",
        "bf16",
        "fp32-gguf-q4_1",
        "bf16-gguf-q4_1",
        "bf16-int8",
        "bf16-int4",
        "bf16-gguf-q4_1-kept-int4",
        "fp32-torch",
        "bf16-torch",
    ],
)
def test_same_logits_alone_and_among_any_neighbours(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kind: str, native: bool
) -> None:
    """Bit for bit: greedy output must not depend on the batch, however the scheduler chunks and mixes it.

    Alone: the prompt in one chunk, then decode steps of one row. Together: the prompt in three chunks (the last
    a single prompt token) beside other prompts and decoders of other lengths, then decodes beside them. For
    each weight format: dense, and the int8/int4 kernels (GGUF native, `--quantize int8|int4`); decode attention on
    the native kernel (where it built) and on torch ops.
    """
    model = loaded.model if dtype == torch.float32 else copy.deepcopy(loaded.model).to(dtype)
    if kind == "gguf-int4":  # Q4_1 on the int4 kernels, as a model over INT4_AS_INT8_MAX_BYTES runs it
        monkeypatch.setattr(quant, "INT4_AS_INT8_MAX_BYTES", 0)
    quantized = quantized_weights(loaded, kind.removesuffix("-int4"))
    runner = ModelRunner(
        model, device=torch.device("cpu"), dtype=dtype, num_blocks=NUM_BLOCKS, quantized=quantized, native=native
    )
    assert all(isinstance(linear, _SplitLinear) for linear in (runner.lm_head, runner.layers[0].qkv)) == bool(quantized)
    free = list(range(NUM_BLOCKS))
    ids, others = tokens(loaded, PROMPTS[0]), [tokens(loaded, text) for text in PROMPTS[1:]]
    follow = [5, 77, 1234]  # tokens fed back after the prompt, the same in both runs

    alone_table = table(free, len(ids) + len(follow))
    alone = [runner.forward([SeqChunk(ids, 0, alone_table, prompt=True)])[0]]
    for i, token in enumerate(follow):
        alone.append(runner.forward([SeqChunk([token], len(ids) + i, alone_table)])[0])

    mine, theirs = table(free, len(ids) + len(follow)), [table(free, len(o) + len(follow)) for o in others]
    runner.forward([SeqChunk(o, 0, t, prompt=True) for o, t in zip(others[:2], theirs, strict=False)])
    first = runner.forward([SeqChunk(ids[:17], 0, mine, prompt=True), SeqChunk(others[2], 0, theirs[2], prompt=True)])
    decoders = [SeqChunk([9], len(o), t) for o, t in zip(others[:2], theirs, strict=False)]
    runner.forward([*decoders, SeqChunk(ids[17:-1], 17, mine, prompt=True)])
    together = [runner.forward([SeqChunk(ids[-1:], len(ids) - 1, mine, prompt=True), *decoders])[0]]
    for i, token in enumerate(follow):
        step = [SeqChunk([11], len(o) + 1 + i, t) for o, t in zip(others, theirs, strict=True)]
        together.append(runner.forward([*step[:1], SeqChunk([token], len(ids) + i, mine), *step[1:]])[1])
    assert first.shape[0] == 2
    for position, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert torch.equal(a, b), f"position {len(ids) - 1 + position}: max diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=["fp32", "bf16"])
def test_prefill_attention_in_query_blocks_changes_nothing(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """On torch ops, long contexts run a chunk's attention in blocks of query rows (PREFILL_SCORE_BYTES): bit for bit
    the same logits and cache as in one call, for a first chunk and for one after a cached prefix. The chunks' query
    rows (51 and 39 tokens x 2 heads) leave a last block of 2 rows, fewer than MIN_MATMUL_ROWS, which _attend pads."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, **TINY_HEADS)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (90,)).tolist()
    results = []
    for score_bytes in (2**30, 1):  # one call; blocks of MIN_MATMUL_ROWS query rows
        monkeypatch.setattr(runner_module, "PREFILL_SCORE_BYTES", score_bytes)
        runner = ModelRunner(
            model, device=torch.device("cpu"), dtype=dtype, num_blocks=32, block_size=4, native=False
        )  # the native kernel has no prefill path of its own: prompt rows take its decode path (the next test)
        block_table = list(range(31, 8, -1))  # 23 blocks of 4, not in order
        logits = [runner.forward([SeqChunk(ids[a:b], a, block_table, prompt=True)])[0] for a, b in ((0, 51), (51, 90))]
        results.append((logits, [cache.clone() for cache in runner.k_cache + runner.v_cache]))
    (whole, whole_cache), (blocked, blocked_cache) = results
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(whole_cache, blocked_cache, strict=True))


@pytest.mark.skipif(runner_module.native_kernels.kernels() is None, reason="the native kernels did not build here")
def test_native_attention_gives_a_prompt_token_the_bits_of_the_same_token_decoded(
    loaded: LoadedModel, runner: ModelRunner, blocks: list[int]
) -> None:
    """With the native kernels a prompt's rows go through the paged kernel as decode rows do, each at its own
    length: the prompt's last-token logits (and the cache it leaves) are the same bits whether that token is the end
    of a prefill chunk, decoded alone after it, or part of a chunk beside decode rows of another sequence."""
    ids, other = tokens(loaded, PROMPTS[0]), tokens(loaded, PROMPTS[1])
    whole_table = table(blocks, len(ids))
    whole = runner.forward([SeqChunk(ids, 0, whole_table, prompt=True)])[0]
    split_table = table(blocks, len(ids))
    runner.forward([SeqChunk(ids[:-1], 0, split_table, prompt=True)])
    decoded = runner.forward([SeqChunk(ids[-1:], len(ids) - 1, split_table)])[0]
    assert torch.equal(whole, decoded)
    other_table, mixed_table = table(blocks, len(other) + 1), table(blocks, len(ids))
    runner.forward([SeqChunk(other, 0, other_table, prompt=True)])
    mixed = runner.forward([SeqChunk([7], len(other), other_table), SeqChunk(ids, 0, mixed_table, prompt=True)])[1]
    assert torch.equal(whole, mixed)
    layer = len(runner.layers) - 1
    for cache in (runner.k_cache[layer], runner.v_cache[layer]):
        for position in (0, len(ids) // 2, len(ids) - 1):
            block, offset = divmod(position, BLOCK_SIZE)
            assert torch.equal(cache[:, whole_table[block], offset], cache[:, mixed_table[block], offset])


W4A8 = runner_module.native_kernels.kernels()
needs_w4a8 = pytest.mark.skipif(W4A8 is None or not W4A8.w4a8, reason="no int4 x int8 kernel here (AVX512-VNNI)")


@needs_w4a8
@pytest.mark.parametrize("int4_as_int8", [True, False], ids=["int8-rows", "int4"])
def test_integer_activation_kernels_serve_prompt_rows_too(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, int4_as_int8: bool
) -> None:
    """With AVX512-VNNI every layer of the GGUF runs on a kernel with int8 activations, which takes every row,
    prompt or generated, with no dense copy of its weights: the Q8_0 lm_head on int8 x int8, the Q4_1 layers on
    int8 x int8 as int8 rows (a model this small) or on int4 x int8 (over INT4_AS_INT8_MAX_BYTES). A prompt's last
    token then gets the bits of the same token decoded after the rest of it."""
    if not int4_as_int8:
        monkeypatch.setattr(quant, "INT4_AS_INT8_MAX_BYTES", 0)
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    runner = ModelRunner(
        model,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        num_blocks=NUM_BLOCKS,
        quantized=quantized_weights(loaded, "gguf"),
    )
    layer = runner.layers[0]
    linears = (layer.qkv, layer.down, runner.lm_head)
    assert all(isinstance(linear, _SplitLinear) and linear.dense is None for linear in linears)
    [head_kernel] = runner.lm_head.quantized.kernels  # type: ignore[union-attr]
    assert isinstance(head_kernel, quant.NativeW8A8Kernel)
    [qkv_kernel] = layer.qkv.quantized.kernels  # type: ignore[union-attr]
    if int4_as_int8:
        assert isinstance(qkv_kernel, quant.NativeW8A8Kernel) and qkv_kernel.name.endswith("(Q4_1 as int8 rows)")
    else:
        assert isinstance(qkv_kernel, quant.NativeW4A8Kernel)
    free = list(range(NUM_BLOCKS))
    ids = tokens(loaded, PROMPTS[2])
    whole_table, split_table = table(free, len(ids)), table(free, len(ids))
    whole = runner.forward([SeqChunk(ids, 0, whole_table, prompt=True)])[0]
    runner.forward([SeqChunk(ids[:-1], 0, split_table, prompt=True)])
    decoded = runner.forward([SeqChunk(ids[-1:], len(ids) - 1, split_table)])[0]
    assert torch.equal(runner.k_cache[-1][:, whole_table], runner.k_cache[-1][:, split_table])
    assert torch.equal(runner.v_cache[-1][:, whole_table], runner.v_cache[-1][:, split_table])
    assert torch.equal(whole, decoded)
