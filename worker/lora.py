"""LoRA adapters in the runner: an adapter's weights on the fused layout, and its delta added to the rows that use it.

The runner fuses q/k/v and gate/up into one matmul each (worker/runner.py), so an adapter's pairs are fused the same
way: the parts' A matrices stacked ([r_q + r_k + r_v, in]: one matmul for all parts), their B matrices block-diagonal
([out_q + out_k + out_v, r_q + r_k + r_v]), each B already multiplied by its scale. A part the adapter does not target
is a block of zeros (exact: adding 0 changes nothing).

Per step, rows are grouped by adapter (Punica/S-LoRA's segmented batch): for each adapter present, its rows are
gathered, multiplied by A then B, and added back into the base layer's output. Base rows are never touched, so they
stay bit-identical to a batch without adapters. Measured on this 2-core CPU (bench/lora.py) against the alternatives:
per-row gathered weights with bmm (what Punica's BGMV does in one GPU kernel) materialises [rows, in, r] per layer and
was 5-20x slower; one masked matmul over every present adapter's stacked A/B ran fewer ops but multiplies every row by
every adapter and made an adapter row's result depend on which adapters shared its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from worker.adapter_files import AdapterError, AdapterFiles, ModuleLora

# Positions of the runner's four linears in LoraWeights.layers[i]; the modules each one fuses, in order.
QKV, O_PROJ, GATE_UP, DOWN = range(4)
FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

Pair = tuple[Tensor, Tensor]  # A [r, in], B [out, r] (scale folded in)


@dataclass(frozen=True)
class LoraShapes:
    """What an adapter must fit: per module, (in_features, out_features); and the number of layers."""

    num_layers: int
    features: dict[str, tuple[int, int]]

    @staticmethod
    def of(config: Any) -> LoraShapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        hidden, inner = config.hidden_size, config.intermediate_size
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        features = {
            "q_proj": (hidden, q),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (q, hidden),
            "gate_proj": (hidden, inner),
            "up_proj": (hidden, inner),
            "down_proj": (inner, hidden),
        }
        return LoraShapes(config.num_hidden_layers, features)


@dataclass(frozen=True)
class LoraWeights:
    """One adapter on the runner's layout: layers[i][kind] is its (A, B) for that fused linear, or None."""

    name: str
    layers: list[list[Pair | None]]
    num_bytes: int


@dataclass(frozen=True)
class LoraGroup:
    """The rows of one step that use one adapter."""

    weights: LoraWeights
    rows: Tensor | None  # row indices in the flat batch; None: every row


def load_lora(
    files: AdapterFiles, name: str, shapes: LoraShapes, *, dtype: torch.dtype, device: torch.device
) -> LoraWeights:
    """Read the adapter's tensors and fuse them for the runner; raises AdapterError if they do not fit the model."""
    by_module: dict[tuple[int, str], tuple[ModuleLora, Tensor, Tensor]] = {}
    try:
        with safe_open(str(files.weights), framework="pt") as tensors:
            for module in files.modules:
                _check_fits(module, shapes)
                a, b = tensors.get_tensor(module.a_key), tensors.get_tensor(module.b_key)
                by_module[module.layer, module.module] = (module, a.float(), b.float())
    except (OSError, RuntimeError, ValueError) as exc:  # unreadable or truncated file
        raise AdapterError(f"cannot read {files.weights}: {exc}") from None
    layers: list[list[Pair | None]] = []
    for layer in range(shapes.num_layers):
        fused = [_fuse([by_module.get((layer, m)) for m in parts], parts, shapes) for parts in FUSED]
        layers.append([None if p is None else (p[0].to(device, dtype), p[1].to(device, dtype)) for p in fused])
    num_bytes = sum(t.numel() * t.element_size() for layer_ in layers for pair in layer_ if pair for t in pair)
    return LoraWeights(name, layers, num_bytes)


def _check_fits(module: ModuleLora, shapes: LoraShapes) -> None:
    if module.layer >= shapes.num_layers:
        raise AdapterError(f"the adapter has weights for layer {module.layer}, the model {shapes.num_layers} layers")
    expected = shapes.features[module.module]
    if (module.in_features, module.out_features) != expected:
        raise AdapterError(
            f"layer {module.layer} {module.module}: the adapter maps {module.in_features} → {module.out_features} "
            f"features, the model {expected[0]} → {expected[1]}: it was trained for another model"
        )


def _fuse(
    parts: list[tuple[ModuleLora, Tensor, Tensor] | None], names: tuple[str, ...], shapes: LoraShapes
) -> Pair | None:
    """A stacked, B block-diagonal and scaled; None where the adapter targets none of the parts."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    a = torch.cat([p[1] for p in present])
    b = torch.zeros(sum(shapes.features[n][1] for n in names), a.shape[0])
    row = col = 0
    for part, name in zip(parts, names, strict=True):
        out = shapes.features[name][1]
        if part is not None:
            module, _, part_b = part
            b[row : row + out, col : col + module.rank] = part_b * module.scale
            col += module.rank
        row += out
    return a, b


def add_lora(out: Tensor, x: Tensor, groups: list[LoraGroup], layer: int, kind: int, min_rows: int) -> Tensor:
    """out[rows] += (x[rows] A^T) B^T for each group's rows and adapter; `out` is the base linear's output.

    Fewer than `min_rows` rows are padded, as the runner's own matmuls are (see runner.MIN_MATMUL_ROWS): the matrix
    kernels compute each row alone, so an adapter row's result does not depend on how many rows share its adapter.
    """
    for group in groups:
        pair = group.weights.layers[layer][kind]
        if pair is None:
            continue
        a, b = pair
        rows = x if group.rows is None else x.index_select(0, group.rows)
        count = rows.shape[0]
        if count < min_rows:
            rows = F.pad(rows, (0, 0, 0, min_rows - count))
        delta = F.linear(F.linear(rows, a), b)[:count]
        if group.rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, group.rows, delta)
    return out
