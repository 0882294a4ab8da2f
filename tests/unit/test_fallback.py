"""The fallback runners on tiny models of architectures the native runner does not compute: through the real engine,
greedy output is Hugging Face's own `generate`, token for token, however the scheduler batches, chunks, shares
prefixes or preempts; the probe picks the batched path only where it reproduces the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from test_engine import PEER, Client, chat
from tiny_model import fallback_loaded, tiny_loaded

from common.protocol import Done
from worker.engine import Engine, EngineConfig
from worker.fallback import FallbackRunner, ProbeFailed
from worker.fallback_serial import SerialRunner
from worker.models import LoadedModel, ModelLoadError
from worker.runner import ModelRunner, SeqChunk
from worker.runners import choose_runner
from worker.sequence import Sequence

# Which runner serves each tiny architecture: the two batched ones run through the paged cache; OPT's forward asks
# the cache for its length, so it is served one sequence at a time.
RUNNERS = {"gemma3_text": FallbackRunner, "gpt2": FallbackRunner, "opt": SerialRunner}
MAX_TOKENS = 12
LONG = "Tell me everything about " + ", ".join(f"the river number {i}" for i in range(20)) + "."


@pytest.fixture(scope="module", params=list(RUNNERS))
def loaded(request: pytest.FixtureRequest, tokenizer: Any) -> LoadedModel:
    return fallback_loaded(tokenizer, request.param)


def engine_for(loaded: LoadedModel, **config: Any) -> Engine:
    return Engine(loaded, EngineConfig(**{"kv_cache_bytes": 8 << 20, "max_prefill_tokens": 32, **config}))


def generated(loaded: LoadedModel, seq: Sequence) -> list[int]:
    """Hugging Face's own greedy continuation of the sequence's prompt, as long as the engine's output."""
    prompt = torch.tensor([seq.token_ids[: seq.num_prompt_tokens]])
    output = loaded.model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=seq.num_output_tokens,
        do_sample=False,
        eos_token_id=None,  # the engine's requests ignore EOS too
        pad_token_id=0,
    )
    return output[0, seq.num_prompt_tokens :].tolist()


class Recorder:
    """Wraps a runner's forward and keeps every step's chunks."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[list[SeqChunk]] = []
        forward = engine.runner.forward

        def recorded(chunks: list[SeqChunk]) -> Any:
            self.steps.append(list(chunks))
            return forward(chunks)

        monkeypatch.setattr(engine.runner, "forward", recorded)


def add(client: Client, request_id: int, text: str) -> Sequence:
    client.add(chat(request_id, text, max_tokens=MAX_TOKENS))
    seq = client.engine.scheduler.find((PEER, request_id))
    assert seq is not None
    return seq


def test_each_architecture_takes_its_path(loaded: LoadedModel) -> None:
    engine = engine_for(loaded)
    runner_type = RUNNERS[loaded.model.config.model_type]
    assert type(engine.runner) is runner_type
    # Shared KV blocks are real only in the paged cache: the serial runner must not claim prefix hits.
    assert engine.blocks.prefix_caching is (runner_type is FallbackRunner)
    # The fallbacks mask a sliding window as the model does, so gemma3's window of 8 does not cap the context.
    assert engine.context_length == 512


def test_greedy_output_is_generates_however_the_requests_are_batched(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(loaded)
    recorder = Recorder(engine, monkeypatch)
    client = Client(engine)
    seqs = [add(client, 1, "Write a poem about the sea."), add(client, 2, "What is the capital of France?")]
    while any(seq.num_output_tokens == 0 for seq in seqs):  # until both decode
        client.take(engine.step())
    seqs.append(add(client, 3, "Name three colours."))  # admitted while the first two decode
    seqs.append(add(client, 4, LONG))  # longer than a step's prompt budget: prefilled in chunks
    client.run()

    assert all(len(end) == 1 and isinstance(end[0], Done) for end in client.ends().values())
    for seq in seqs:
        assert seq.num_output_tokens == MAX_TOKENS
        assert seq.output_ids == generated(loaded, seq), f"request {seq.key[1]}"
    # The scenario happened as described: a new prompt shared a step with decodes, and the long one was chunked.
    assert any(
        any(c.key == seqs[2].key and c.prompt for c in step) and any(not c.prompt for c in step)
        for step in recorder.steps
    )
    assert any(c.key == seqs[3].key and c.prompt and c.start_pos > 0 for step in recorder.steps for c in step)
    assert engine.blocks.num_used == 0
    if isinstance(engine.runner, SerialRunner):
        assert engine.runner.caches == {}  # every finished sequence's cache was dropped


def test_preempted_sequences_recompute_to_the_same_output(loaded: LoadedModel) -> None:
    bytes_per_block = choose_runner(loaded, 8 << 20, 16).bytes_per_block
    # Room for two of the three sequences (each ~70 prompt + 12 output tokens, 6 blocks): one is preempted.
    engine = engine_for(loaded, kv_cache_bytes=13 * bytes_per_block, max_prefill_tokens=256)
    client = Client(engine)
    seqs = [add(client, i, f"Story {i}: {LONG[:150]}") for i in range(3)]
    client.run()
    assert engine.scheduler.num_preemptions > 0
    for seq in seqs:
        assert seq.output_ids == generated(loaded, seq), f"request {seq.key[1]}"


def test_a_repeated_prompt_reuses_cached_blocks_only_on_the_paged_path(loaded: LoadedModel) -> None:
    engine = engine_for(loaded)
    client = Client(engine)
    first = add(client, 1, LONG)
    client.run()
    second = add(client, 2, LONG)
    client.run()
    if isinstance(engine.runner, FallbackRunner):
        assert second.num_cached > 0
    else:
        assert second.num_cached == 0
    assert first.output_ids == second.output_ids == generated(loaded, second)


def test_a_native_family_stays_on_the_native_runner(tokenizer: Any) -> None:
    engine = Engine(tiny_loaded(tokenizer), EngineConfig(kv_cache_bytes=8 << 20))
    assert isinstance(engine.runner, ModelRunner)


def test_the_probe_catches_a_forward_that_is_silently_wrong(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = fallback_loaded(tokenizer, "gpt2")

    def no_causal_mask(self: FallbackRunner, visible: torch.Tensor, *_: Any) -> torch.Tensor:
        return torch.zeros((1, 1, *visible.shape))  # every query sees every key of the step: runs, but wrong

    monkeypatch.setattr(FallbackRunner, "_masks", no_causal_mask)
    with pytest.raises(ProbeFailed, match="differ from its own forward"):
        FallbackRunner.probe(loaded.model, loaded.device)
    assert type(choose_runner(loaded, 8 << 20, 16).runner) is SerialRunner


def test_a_model_no_path_reproduces_is_refused_in_one_line(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = fallback_loaded(tokenizer, "opt")

    def broken(self: SerialRunner, chunk: SeqChunk) -> torch.Tensor:
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setattr(SerialRunner, "_forward", broken)
    with pytest.raises(ModelLoadError) as refused:
        choose_runner(loaded, 8 << 20, 16)
    message = str(refused.value)
    assert "cannot serve model type 'opt'" in message and "no kernel for this" in message
    assert "\n" not in message


def test_a_rope_that_rescales_with_the_length_is_served_one_sequence_at_a_time(tokenizer: Any) -> None:
    """Phi-3 128k's longrope picks its factors by the longest position it sees: in a shared step, the neighbours'."""
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ProbeFailed, match="longrope"):
        FallbackRunner.probe(model, torch.device("cpu"))
