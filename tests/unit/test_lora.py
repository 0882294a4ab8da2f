"""Batched LoRA in the runner against PEFT's own merged models, on a tiny random Llama (CPU, float32).

Adapters are PEFT's, written by `save_pretrained` with random B (init_lora_weights=False), so every delta is non-zero:
one on all seven projections, one on q/v alone (the fused q/k/v gets a zero block for k), one with rsLoRA scaling.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from worker.adapter_files import AdapterError, read_adapter
from worker.lora import LoraShapes, LoraWeights, load_lora
from worker.quant import quantize_model
from worker.runner import ModelRunner, SeqChunk, _SplitLinear

# PEFT 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: LoraConfig arguments
    "all": {"r": 8, "lora_alpha": 16, "target_modules": ALL_MODULES},
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rs": {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "up_proj", "down_proj"], "use_rslora": True},
}
NUM_BLOCKS, BLOCK_SIZE = 64, 4


def base_model() -> PreTrainedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32).eval()
    with torch.no_grad():  # large enough, and norms far enough from 1, that a wrong delta shows in the logits
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PreTrainedModel]]:
    """Each adapter's folder and PEFT's merged model (the reference), from the same base weights."""
    folder = tmp_path_factory.mktemp("adapters")
    made = {}
    for index, (name, arguments) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + index)
        config = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **arguments)
        model = peft.get_peft_model(base_model(), config)
        with torch.no_grad():  # PEFT's random B is small; scale it so each adapter moves the logits clearly
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.mul_(20)
        model.save_pretrained(folder / name)
        made[name] = (folder / name, model.merge_and_unload().eval())
    return made


def make_runner(
    model: PreTrainedModel | None = None, dtype: torch.dtype = torch.float32, **kwargs: object
) -> ModelRunner:
    model = model or base_model()
    return ModelRunner(
        model, device=torch.device("cpu"), dtype=dtype, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, **kwargs
    )  # type: ignore[arg-type]


def weights(path: Path, name: str, dtype: torch.dtype = torch.float32) -> LoraWeights:
    return load_lora(read_adapter(path), name, LoraShapes.of(CONFIG), dtype=dtype, device=torch.device("cpu"))


def reference(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


PROMPTS = [list(range(3, 40)), list(range(100, 123)), [7, 9, 11, 13, 200, 17, 19, 23, 29, 31, 37]]
FOLLOW = [42, 43, 44]  # tokens fed back after each prompt


def run_mixed(runner: ModelRunner, slots: list[int]) -> list[list[torch.Tensor]]:
    """Each prompt with its slot: prefilled together in one step, then decoded together; logits per position."""
    free = list(range(NUM_BLOCKS))
    tables = [[free.pop() for _ in range(-(-(len(p) + len(FOLLOW)) // BLOCK_SIZE))] for p in PROMPTS]
    out: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    step = [SeqChunk(p, 0, t, prompt=True, adapter=s) for p, t, s in zip(PROMPTS, tables, slots, strict=True)]
    for row, logits in enumerate(runner.forward(step)):
        out[row].append(logits)
    for i, token in enumerate(FOLLOW):
        step = [SeqChunk([token], len(p) + i, t, adapter=s) for p, t, s in zip(PROMPTS, tables, slots, strict=True)]
        for row, logits in enumerate(runner.forward(step)):
            out[row].append(logits)
    return out


def test_adapters_and_base_share_a_step_and_each_row_matches_its_model(adapters: dict) -> None:
    runner = make_runner()
    runner.loras = [None, weights(adapters["all"][0], "all"), weights(adapters["qv"][0], "qv")]
    base = base_model()
    models = [adapters["all"][1], base, adapters["qv"][1]]
    got = run_mixed(runner, slots=[1, 0, 2])
    for row, (model, prompt) in enumerate(zip(models, PROMPTS, strict=True)):
        expected = reference(model, prompt + FOLLOW)[len(prompt) - 1 :]
        for position, logits in enumerate(got[row]):
            torch.testing.assert_close(logits, expected[position], atol=1e-4, rtol=1e-4)
            assert logits.argmax() == expected[position].argmax()
    # And the adapters change the answer: a runner that ignored them would fail the check above.
    assert (reference(models[0], PROMPTS[0]) - reference(base, PROMPTS[0])).abs().max() > 0.5


def test_rslora_scaling(adapters: dict) -> None:
    runner = make_runner()
    runner.loras = [None, weights(adapters["rs"][0], "rs")]
    got = run_mixed(runner, slots=[1, 1, 1])  # one adapter on every row: the path without a gather
    for row, prompt in enumerate(PROMPTS):
        expected = reference(adapters["rs"][1], prompt + FOLLOW)[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(got[row]), expected, atol=1e-4, rtol=1e-4)


def test_base_rows_are_bit_identical_with_or_without_adapters_beside_them(adapters: dict) -> None:
    runner = make_runner()
    runner.loras = [None, weights(adapters["all"][0], "all"), weights(adapters["qv"][0], "qv")]
    without = run_mixed(runner, slots=[0, 0, 0])
    beside = run_mixed(runner, slots=[1, 0, 2])
    for a, b in zip(without[1], beside[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_rows_are_the_same_alone_and_among_neighbours(adapters: dict, dtype: torch.dtype) -> None:
    """As for base rows (tests/unit/test_runner.py): small groups are padded, so a row's delta does not depend on how
    many rows share its adapter or which other adapters share its step."""
    runner = make_runner(base_model().to(dtype), dtype=dtype)
    runner.loras = [None, weights(adapters["all"][0], "all", dtype), weights(adapters["qv"][0], "qv", dtype)]
    free = list(range(NUM_BLOCKS))
    alone_table = [free.pop() for _ in range(12)]
    alone = runner.forward([SeqChunk(PROMPTS[0], 0, alone_table, prompt=True, adapter=2)])[0]
    alone_next = runner.forward([SeqChunk([5], len(PROMPTS[0]), alone_table, adapter=2)])[0]
    together = run_mixed(runner, slots=[2, 1, 2])[0]
    assert torch.equal(alone, together[0])
    together_next = make_step_after(runner, free)
    assert torch.equal(alone_next, together_next)


def make_step_after(runner: ModelRunner, free: list[int]) -> torch.Tensor:
    """PROMPTS[0] with adapter 2 prefilled beside others, then its token 5 decoded beside rows of both adapters."""
    tables = [[free.pop() for _ in range(12)] for _ in PROMPTS]
    runner.forward(
        [SeqChunk(p, 0, t, prompt=True, adapter=s) for p, t, s in zip(PROMPTS, tables, [2, 1, 1], strict=True)]
    )
    step = [SeqChunk([9], len(PROMPTS[1]), tables[1], adapter=1), SeqChunk([5], len(PROMPTS[0]), tables[0], adapter=2)]
    step.append(SeqChunk([9], len(PROMPTS[2]), tables[2], adapter=1))
    return runner.forward(step)[1]


def test_quantized_base_layers_get_the_delta_on_top(adapters: dict) -> None:
    """int8 weights: generated rows on an int8 kernel, prompt rows on the dense copy (or, where AVX512-VNNI runs the
    int8 x int8 kernel, on it too); both add the adapter's delta.

    The reference is PEFT's merged model over the same base: exact for prompt rows on the dense copy, within the int8
    error for rows on an int8 kernel, and the adapter must move those rows as much as it moves PEFT's logits.
    """
    base = base_model()
    runner = make_runner(base, quantized=quantize_model(base, "int8"))
    runner.loras = [None, weights(adapters["all"][0], "all")]
    got = run_mixed(runner, slots=[1, 1, 0])
    merged, plain = adapters["all"][1], base_model()
    expected = reference(merged, PROMPTS[0] + FOLLOW)[len(PROMPTS[0]) - 1 :]
    qkv = runner.layers[0].qkv
    assert isinstance(qkv, _SplitLinear)
    if qkv.dense is not None:
        torch.testing.assert_close(got[0][0], expected[0], atol=1e-4, rtol=1e-4)  # the prompt: dense
    shift = (expected - reference(plain, PROMPTS[0] + FOLLOW)[len(PROMPTS[0]) - 1 :]).abs().max()
    for position in range(0 if qkv.dense is None else 1, len(FOLLOW) + 1):
        error = (got[0][position] - expected[position]).abs().max()
        assert error < 0.1 * shift, f"position {position}: off by {error:.3f}; the adapter moves logits by {shift:.3f}"


def test_an_unknown_slot_is_refused() -> None:
    runner = make_runner()
    with pytest.raises(ValueError, match="LoRA slot 3"):
        runner.forward([SeqChunk([1, 2, 3], 0, [0], adapter=3)])


def test_an_adapter_for_another_model_is_refused(adapters: dict) -> None:
    wider = LoraShapes.of(LlamaConfig(**{**CONFIG.to_dict(), "hidden_size": 128}))
    with pytest.raises(AdapterError, match="trained for another model"):
        load_lora(read_adapter(adapters["all"][0]), "all", wider, dtype=torch.float32, device=torch.device("cpu"))
    deeper = LoraShapes(num_layers=1, features=LoraShapes.of(CONFIG).features)
    with pytest.raises(AdapterError, match="layer 1"):
        load_lora(read_adapter(adapters["all"][0]), "all", deeper, dtype=torch.float32, device=torch.device("cpu"))


def test_the_files_read_without_torch_say_what_is_in_them(adapters: dict) -> None:
    files = read_adapter(adapters["qv"][0])
    assert {(m.layer, m.module) for m in files.modules} == {(i, m) for i in range(2) for m in ("q_proj", "v_proj")}
    assert {m.scale for m in files.modules} == {2.0} and files.rank == 4
    assert files.num_parameters == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    rs = read_adapter(adapters["rs"][0])
    assert {m.scale for m in rs.modules} == {4 / 2**0.5}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"bias": "all"}, "biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"r": 0}, "positive"),
    ],
)
def test_configs_this_server_would_compute_wrongly_are_refused(
    adapters: dict, tmp_path: Path, change: dict, message: str
) -> None:
    source = adapters["qv"][0]
    config = json.loads((source / "adapter_config.json").read_text()) | change
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").symlink_to(source / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=message):
        read_adapter(tmp_path)


def test_missing_or_broken_files_are_refused_clearly(adapters: dict, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterError, match="unreadable"):
        read_adapter(tmp_path)


def test_an_embedding_lora_is_refused(adapters: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 256)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterError, match="embedding, lm_head"):
        read_adapter(tmp_path)
