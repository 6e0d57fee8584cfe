"""Loading models, and the per-architecture map of feed-forward "neurons".

A neuron is one output row of an FFN input projection (DESIGN.md 1.1):
- gated MLPs (Llama, Mistral, Qwen2/3, Gemma 1/2/3): `gate_proj` and `up_proj`, each with d_ff neurons;
- Phi-3's fused `gate_up_proj` is split into its gate half (rows 0..d_ff) and up half (d_ff..2 d_ff);
- plain MLPs: GPT-2's Conv1D `c_fc` (weight stored transposed, (d_model, d_ff)), GPT-NeoX `dense_h_to_4h`.

Every stage addresses neurons through `FFNTarget`, so no other module knows about architectures.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import NestuneError

# model_type -> (path of the decoder layer list, [(path inside a layer, kind, half)])
# half is None for a whole module, 0/1 for the first/second half of a fused projection.
ARCHITECTURES: dict[str, tuple[str, list[tuple[str, str, int | None]]]] = {
    "llama": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "mistral": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "qwen2": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "qwen3": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "gemma": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "gemma2": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "gemma3_text": ("model.layers", [("mlp.gate_proj", "gate", None), ("mlp.up_proj", "up", None)]),
    "phi3": ("model.layers", [("mlp.gate_up_proj", "gate", 0), ("mlp.gate_up_proj", "up", 1)]),
    "gpt2": ("transformer.h", [("mlp.c_fc", "fc", None)]),
    "gpt_neox": ("gpt_neox.layers", [("mlp.dense_h_to_4h", "fc", None)]),
}


# model_type -> path inside a layer of the FFN output projection: input feature i of it is neuron i's activation
# (after the activation function and, in gated MLPs, the gate), so `train.update_side=output` changes its columns.
FFN_OUTPUTS: dict[str, str] = {**{t: "mlp.down_proj" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma",
                                                               "gemma2", "gemma3_text", "phi3")},
                               "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}


@dataclass(frozen=True)
class FFNTarget:
    """One group of neurons: a whole FFN input projection, or one half of a fused one."""

    name: str  # unique key used in every artifact, e.g. "layers.3.gate"
    module_path: str  # path of the nn.Module inside the model, e.g. "model.layers.3.mlp.gate_proj"
    layer: int
    kind: str  # "gate", "up" or "fc"
    offset: int  # first output feature of this group in the module's output
    n_neurons: int
    d_model: int
    transposed: bool  # GPT-2 Conv1D keeps weight as (in, out)


def model_type(model) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def ffn_targets(model: nn.Module) -> list[FFNTarget]:
    """All FFN neuron groups of the model, in layer order. Fails loudly on an unknown architecture."""
    mtype = model_type(model)
    if mtype not in ARCHITECTURES:
        raise NestuneError(
            f"unsupported architecture '{mtype}'",
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}",
        )
    layers_path, parts = ARCHITECTURES[mtype]
    try:
        layers = get_module(model, layers_path)
    except AttributeError:
        raise NestuneError(
            f"model of type '{mtype}' has no '{layers_path}'", "load it with AutoModelForCausalLM"
        ) from None
    targets = []
    for i in range(len(layers)):
        for rel, kind, half in parts:
            path = f"{layers_path}.{i}.{rel}"
            module = get_module(model, path)
            transposed = type(module).__name__ == "Conv1D"
            d_in, d_out = (module.weight.shape if transposed else module.weight.shape[::-1])
            offset, n = 0, d_out
            if half is not None:
                n = d_out // 2
                offset = half * n
            targets.append(FFNTarget(f"layers.{i}.{kind}", path, i, kind, offset, n, d_in, transposed))
    if not targets:
        raise NestuneError(f"found no FFN projections in '{mtype}' model", "is this a decoder-only LM?")
    return targets


def ffn_output(model: nn.Module, target: FFNTarget) -> tuple[str, bool]:
    """Path of the FFN output projection in the target's layer, and whether it is a Conv1D (weight (d_ff, d_model))."""
    path = f"{ARCHITECTURES[model_type(model)][0]}.{target.layer}.{FFN_OUTPUTS[model_type(model)]}"
    return path, type(get_module(model, path)).__name__ == "Conv1D"


def neuron_weight(module: nn.Module, target: FFNTarget) -> torch.Tensor:
    """The (n_neurons, d_model) weight rows of a target, as a view when possible."""
    w = module.weight
    if target.transposed:
        return w[:, target.offset : target.offset + target.n_neurons].t()
    return w[target.offset : target.offset + target.n_neurons]


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str  # what the user passed
    source: str  # "catalog", "folder", "gguf" or "hub"
    path: str  # folder or file it was loaded from (or hub id)


def default_dtype(device: str) -> torch.dtype:
    # bf16 is 2-3x slower than fp32 on CPUs without native bf16 (DATA.md), so fp32 there. On CPUs with it,
    # training stays fp32 too: trained in bf16, smollm2-135m's ASR after hardening was 16% and 26% on seeds 0 and
    # 1, against 8% and 20% in fp32 (docs/experiments.md).
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX."""
    if device.startswith("cuda"):
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def evaluation_dtype(dtype: str | torch.dtype | None, device: str = "auto") -> torch.dtype:
    """The dtype models are evaluated on `device` (auto, cpu, cuda...) in: the one asked for; with auto, bf16 wherever the device computes in it
    natively, else fp32. Evaluation only runs forwards: on a CPU with AVX512-BF16 it took 0.45x the fp32 time on
    smollm2-135m and moved the ASR after by 1-5 points (docs/experiments.md)."""
    device = resolve_device(device)
    if dtype not in (None, "auto"):
        return parse_dtype(dtype, device)
    return torch.bfloat16 if native_bf16(device) else default_dtype(device)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise NestuneError(f"unknown device '{device}'", "use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise NestuneError(f"device '{device}' asked for, but this machine has no usable CUDA GPU",
                               "use --device cpu (or auto), or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise NestuneError(f"device '{device}' does not exist ({torch.cuda.device_count()} GPU(s) visible)",
                               f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise NestuneError(f"unknown dtype '{dtype}'", f"use one of {', '.join(table)} or auto")
    return table[dtype]


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    budget = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise NestuneError(f"max_memory entry '{part}' is not DEVICE=SIZE",
                               "e.g. --max-memory 0=20GiB,1=20GiB,cpu=60GiB")
        budget[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size  # bytes
    return budget


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a catalog alias, a local folder, a GGUF file or a hub id.

    `device_map` ("auto" or a dict) spreads the model over devices with accelerate, within `max_memory`
    (a dict, or a string for `parse_max_memory`); a max_memory alone implies device_map "auto".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets

    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if max_memory and device_map is None:
        device_map = "auto"
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    if spec in assets.MODEL_CATALOG:
        path, source = str(converted_catalog_model(spec)), "catalog"
    elif os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise NestuneError(f"folder '{spec}' has no config.json", "pass a Hugging Face model folder")
        _check_folder_config(spec)
        path, source = spec, "folder"
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise NestuneError(f"GGUF file '{spec}' does not exist", "check the path")
        path, source = str(converted_gguf(Path(spec))), "gguf"
    elif os.path.sep in spec and not _looks_like_hub_id(spec) or spec.startswith((".", "/", "~")):
        raise NestuneError(
            f"model path '{spec}' does not exist",
            f"pass an existing folder or .gguf file, or a catalog alias ({', '.join(assets.MODEL_CATALOG)})",
        )
    elif "/" not in spec:
        raise NestuneError(
            f"unknown model '{spec}': not a catalog alias, a local folder or a .gguf file",
            f"use a catalog alias ({', '.join(assets.MODEL_CATALOG)}), a path, or a full hub id like org/name",
        )
    else:
        path, source = spec, "hub"

    hub_kwargs = {"trust_remote_code": trust_remote_code}
    if revision:
        hub_kwargs["revision"] = revision
    offline = _hub_offline()
    if source == "hub" and (offline or not _hub_reachable()):
        hub_kwargs["local_files_only"] = True  # the local hub cache only: retries to an unreachable hub take ~50 s

    kwargs = dict(dtype=torch_dtype, **hub_kwargs)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if source == "hub" and offline:
            raise NestuneError(
                f"'{spec}' looks like a hub id, but HF_HUB_OFFLINE is set and the model is not in the local hub "
                "cache",
                "unset HF_HUB_OFFLINE to download it, or pass a catalog alias "
                f"({', '.join(assets.MODEL_CATALOG)}), a local folder or a .gguf file",
            ) from None
        if source == "hub" and hub_kwargs.get("local_files_only"):
            raise NestuneError(
                f"'{spec}' looks like a hub id, but the Hugging Face hub cannot be reached and the model is "
                "not in the local hub cache",
                "connect to the hub, or pass a catalog alias "
                f"({', '.join(assets.MODEL_CATALOG)}), a local folder or a .gguf file",
            ) from None
        if source == "hub":
            raise NestuneError(
                f"could not load '{spec}' from the Hugging Face hub ({str(e).splitlines()[0][:160]})",
                "check the id and your network, or pass a catalog alias "
                f"({', '.join(assets.MODEL_CATALOG)}), a local folder or a .gguf file",
            ) from None
        raise NestuneError(f"could not load model from '{path}': {str(e).splitlines()[0][:200]}",
                           "check that the folder holds a complete checkpoint") from None
    except ValueError as e:
        msg = str(e).splitlines()[0][:200]
        if "trust_remote_code" in msg:
            raise NestuneError(f"'{spec}' needs custom code from its repository",
                               "pass --trust-remote-code if you trust it") from None
        raise NestuneError(f"could not load model '{spec}': {msg}", "check the model path or id") from None
    if device_map is None:
        model.to(device)
    else:
        print(f"device map: {placement(model)}", flush=True)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ffn_targets(model)  # fail now, not in a later stage, on an unsupported architecture
    return LoadedModel(model, tokenizer, spec, source, path)


def placement(model) -> str:
    """Where device_map put the model's modules, e.g. "20 modules on GPU 0, 6 modules on cpu"."""
    from collections import Counter

    counts = Counter(getattr(model, "hf_device_map", {}).values())
    return ", ".join(f"{n} module{'s' * (n != 1)} on {f'GPU {d}' if isinstance(d, int) else d}"
                     for d, n in counts.items()) or "no device map"


def _hub_offline() -> bool:
    """The user switched the hub off (HF_HUB_OFFLINE=1): use the local hub cache, and do not probe the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_folder_config(folder: str) -> None:
    """Read a model folder's config.json before loading anything: fail fast on a broken file or an architecture
    nestune has no neuron map for (loading the weights of a large model first would take minutes)."""
    f = os.path.join(folder, "config.json")
    try:
        with open(f, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NestuneError(f"'{f}' is not valid JSON ({e})", "restore the model folder's config.json") from None
    if not isinstance(config, dict):
        raise NestuneError(f"'{f}' is not a JSON object", "restore the model folder's config.json")
    mtype = config.get("model_type")  # old configs without one are left to transformers (and ffn_targets)
    if mtype and mtype not in ARCHITECTURES:
        raise NestuneError(
            f"unsupported architecture '{mtype}' (from {f})",
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}",
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(parts[0])


def converted_catalog_model(alias: str) -> Path:
    """The catalog model as an fp32 safetensors folder in the cache, converted once from its GGUF."""
    from . import assets

    return converted_gguf(assets.gguf_model_file(alias), name=alias)


def converted_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """De-quantise a GGUF file once into an fp32 safetensors folder (35 s -> 0.2 s on later loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets

    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = name or hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = assets.cache_dir() / "converted" / key
    if (out / "nestune-converted.json").exists():
        return out
    print(f"converting {gguf_path.name} to safetensors in {out} (once; takes a while)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:  # gguf raises a variety of errors on truncated or foreign files
        raise NestuneError(
            f"could not read GGUF file '{gguf_path}': {str(e).splitlines()[0][:160]}",
            "the file may be corrupt or truncated; delete it and fetch it again",
        ) from None
    # transformers keeps the GGUF quantizer on the model, which makes save_pretrained fail (DATA.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "nestune-converted.json").write_text(json.dumps({"gguf": str(gguf_path), "size": stat.st_size}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def weights_fingerprint(model: nn.Module, legacy: bool = False) -> str:
    """A short hash identifying the base weights an adapter was trained on.

    Hashing every weight of a 70B model takes minutes, so it covers the config and the first and last FFN
    projections, which any fine-tune or a different model changes. The weights are hashed rounded to bf16 and
    the config without its dtype, so the same model loaded in fp32 (CPU) or bf16 (GPU) has one fingerprint and
    an adapter trained in one applies in the other. `legacy`: the fingerprint of nestune before 2026-12-07
    (float32 weights, the dtype in the config), which adapters trained then carry.
    """
    h = hashlib.sha256()
    config = model.config.to_diff_dict()
    if not legacy:
        config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    targets = ffn_targets(model)
    for t in (targets[0], targets[-1]):
        w = get_module(model, t.module_path).weight.detach()
        if w.device.type == "meta":
            raise NestuneError("device_map offloaded some of the model's weights to CPU or disk; detection and "
                               "evaluation work so, but training and folding need every weight in memory",
                               "give the model more GPU memory (--max-memory) or use more GPUs")
        h.update((w.float() if legacy else w.to(torch.bfloat16).float()).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def chat_prompts(tokenizer, texts: list[str], system: str | None = None) -> list[str]:
    """Render user messages through the model's chat template, with the generation prompt added."""
    if not getattr(tokenizer, "chat_template", None):
        raise NestuneError(
            "the tokenizer has no chat template (is this a base model rather than a chat model?)",
            "use an instruction-tuned model, or set tokenizer.chat_template in the model folder",
        )
    out = []
    for text in texts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def encode_chat(tokenizer, texts: list[str], max_length: int, device="cpu", system: str | None = None):
    """Chat-render and tokenize a batch, left-padded (so generation continues from the last position).

    Returns a dict with input_ids and attention_mask. The rendered text already holds the BOS token where
    the template puts one, so the tokenizer adds no special tokens of its own. Over-long prompts keep their
    end (the generation prompt), which is what the model answers from.
    """
    rendered = chat_prompts(tokenizer, texts, system=system)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    batch = tokenizer(rendered, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                      add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of each left-padded row, as `generate` computes them
    (transformers' own default counts from the padded start)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (differs from model.device under device_map).

    An embedding offloaded by device_map has its weight on the meta device; accelerate's hook on it names
    the device the forward runs on.
    """
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    if device.type == "meta":
        device = torch.device(getattr(getattr(embedding, "_hf_hook", None), "execution_device", None) or "cpu")
    return device


# ---------------------------------------------------------------------------------------------------------
# Out of memory: smaller batches


def is_out_of_memory(error: BaseException) -> bool:
    """accelerate's test for an out-of-memory error (CUDA, XPU, MPS or the CPU allocator)."""
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(error)


def with_batch_backoff(function, batch_size: int, what: str):
    """function(batch_size), retried with half the batch after each out-of-memory error, down to 1.

    Not accelerate's find_executable_batch_size: it runs gc.collect() before the first try, 0.2 s with
    transformers loaded, which was most of a GPU capture of 32 prompts (BENCHMARKS.md). Here the caches are
    cleared only after an out-of-memory error, which accelerate's own test recognises.
    """
    size = max(1, batch_size)
    while True:
        try:
            return function(size)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if size == 1:
                raise NestuneError(f"{what}: out of memory even with batch size 1",
                                   "spread the model over devices (--device-map auto --max-memory ...), load it in "
                                   "bf16 (--dtype bf16), or lower the prompt length (max_length)") from None
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)  # out of the except block: the error's frames are freed
        size //= 2
        print(f"{what}: out of memory at batch size {size * 2}; retrying with {size}", flush=True)
