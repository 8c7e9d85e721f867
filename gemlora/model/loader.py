"""Loads a Gemma checkpoint folder (config.json + safetensors, sharded or not) into `GemmaForCausalLM`,
in the dtype, on the device and with the weight format asked for.

Owns the map from checkpoint names to our packed parameters (q|k|v -> qkv_proj, gate|up ->
gate_up_proj), which LoRA loading shares, and the choice of weight format (`quantization`):
- "none": every weight dense in `dtype` (quantized checkpoint entries are dequantized): the exact
  float path the parity tests run on;
- "gguf": quantized entries (a GGUF conversion's) stay quantized, the rest dense;
- "int8" / "int4": every projection and the embedding quantized at load, round-to-nearest per group
  of 32 (gemlora.quant.rtn), from whatever the checkpoint holds.
The model is built on the meta device with no dense tensor for a weight that will be quantized, and
files are read tensor by tensor, so peak memory stays near the final size. Knows files and names,
nothing of requests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from rich.progress import Progress

from gemlora.kernels.build import extension
from gemlora.model.config import GemmaConfig
from gemlora.model.gemma import GemmaForCausalLM
from gemlora.model.tensor_file import TensorReader
from gemlora.quant import rtn
from gemlora.quant.tensor import QuantizedTensor
from gemlora.quant.weight import QuantWeight

QUANTIZATIONS = ("none", "gguf", "int8", "int4")
QUANTIZED_METADATA = "gemlora.quantized"     # written by gguf_convert: {tensor name: format}

# checkpoint module name -> (our packed module, index of its part in Linear.output_sizes)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_IGNORED = re.compile(r"(vision_tower|multi_modal_projector|rotary_emb)")


def load_config(path: Path) -> GemmaConfig:
    return GemmaConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))


def quantizes(path: str | Path, quantization: str) -> bool:
    """Will load_model(path, quantization=...) keep or make quantized linear layers?"""
    if quantization == "auto":
        return bool(_quantized_entries(_weight_files(Path(path))))
    return quantization != "none"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = False, quantization: str = "none", activations: str = "auto") -> GemmaForCausalLM:
    """`quantization` "auto" keeps the checkpoint's own types: "gguf" if it stores quantized weights,
    else "none". `activations`: how the quantized kernels quantize activations (gemlora.kernels.qmatmul)."""
    if quantization not in QUANTIZATIONS + ("auto",):
        raise ValueError(f"quantization must be one of auto, {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    path = Path(path)
    cfg = load_config(path)
    if torch.device(device).type == "cpu":
        extension()        # built (once per install) or loaded now, at start: never inside a request's step
    files = _weight_files(path)
    stored = _quantized_entries(files)
    if quantization == "auto":
        quantization = "gguf" if stored else "none"
    with torch.device("meta"):
        model = GemmaForCausalLM(cfg)
    model.to(dtype)          # on meta: free; to_empty then allocates each tensor once, in `dtype`
    quantize_all = quantization in ("int8", "int4")
    linears = {f"{n}.weight": m for n, m in model.named_modules() if hasattr(m, "output_sizes")}
    part_sizes = {pname: m.output_sizes for pname, m in linears.items()}
    if quantize_all:
        planned = set(_quantizable(linears, cfg))
    elif quantization == "gguf":   # kept quantized where the checkpoint stores every part quantized
        parts: dict[str, set] = {}
        for name in stored:
            if (target := _target(name, cfg)) is not None:
                parts.setdefault(target[0], set()).add(target[1])
        planned = {p for p, got in parts.items()
                   if got == ({None} if len(part_sizes.get(p, ())) < 2 else set(range(len(part_sizes[p]))))}
    else:
        planned = set()
    quantized: dict[str, dict[int | None, QuantizedTensor]] = {}
    # weights that will be quantized get no dense tensor at all
    for pname in planned:
        if pname == "embed_tokens":
            model.embed_tokens = None
        else:
            linears[pname].weight = None
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings and "embed_tokens" not in planned:  # to_empty() re-creates parameters
        model.lm_head.weight = model.embed_tokens
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("loading weights", total=None)
        for file, name, get in _tensors(files, stored):
            target = _target(name, cfg)
            if target is None:
                continue
            pname, part = target
            if pname in planned:
                tensor = get()
                if not isinstance(tensor, QuantizedTensor):
                    tensor = rtn.quantize(tensor, 8 if quantization == "int8" else 4)
                elif quantize_all:   # re-quantize a GGUF's types to the one asked for
                    tensor = rtn.quantize(tensor.dequantize(), 8 if quantization == "int8" else 4)
                parts = quantized.setdefault(pname, {})
                parts[part] = tensor
                if len(parts) == max(1, len(part_sizes.get(pname, ()))) or part is None:
                    # complete: pack it for its device now, so one canonical copy at most is held
                    _install(model, linears, pname, quantized.pop(pname), part_sizes, device,
                             activations=activations)
            elif pname in params:
                tensor = get()
                if isinstance(tensor, QuantizedTensor):
                    tensor = tensor.dequantize()
                _copy_into(params[pname], part_sizes.get(pname), part, tensor, name)
            else:
                raise ValueError(f"{file.name}: tensor {name!r} matches no parameter of the model")
            filled.add(pname if part is None else f"{pname}#{part}")
            bar.advance(task)
    missing = [n for n in _expected(params, part_sizes, planned) if n not in filled]
    if cfg.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    if quantized:
        raise ValueError(f"checkpoint {path} lacks parts of {sorted(quantized)[:5]}")
    _release_freed_memory()
    return model.eval().requires_grad_(False)


def _release_freed_memory() -> None:
    """Loading frees many tensor-sized transients between long-lived allocations; glibc keeps such
    freed heap memory mapped (0.7 GB of a 7B model's load), so hand it back to the OS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def _quantizable(linears: dict, cfg: GemmaConfig) -> list[str]:
    """Every projection and the embedding (a tied LM head is the embedding)."""
    return ["embed_tokens"] + [n for n in linears if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]


def _install(model: GemmaForCausalLM, linears: dict, pname: str, parts: dict, part_sizes: dict, device, *,
             activations: str) -> None:
    if pname == "embed_tokens":
        qt = parts[None]
        if qt.shape != (model.cfg.vocab_size, model.cfg.hidden_size):
            raise ValueError(f"the embedding has shape {qt.shape}, the model expects "
                             f"{(model.cfg.vocab_size, model.cfg.hidden_size)}")
        model.set_quantized_embedding(QuantWeight([qt], device, activations, lm_head=model.cfg.tie_word_embeddings))
        return
    sizes = part_sizes[pname]
    order = [parts[None]] if None in parts else [parts[i] for i in range(len(sizes))]
    if len(order) == len(sizes) and any(qt.rows != size for qt, size in zip(order, sizes)):
        raise ValueError(f"{pname}: part sizes {[qt.rows for qt in order]}, the model expects {list(sizes)}")
    if sum(qt.rows for qt in order) != sum(sizes) or order[0].cols != linears[pname].in_features:
        raise ValueError(f"{pname}: quantized weight of shape {sum(q.rows for q in order)} x {order[0].cols}, "
                         f"the model expects {sum(sizes)} x {linears[pname].in_features}")
    linears[pname].set_quantized(QuantWeight(order, device, activations, lm_head=pname == "lm_head.weight"))


def _quantized_entries(files: list[Path]) -> dict[str, dict]:
    """{checkpoint name: format} of the quantized weights, from every file's metadata."""
    entries: dict[str, dict] = {}
    for file in files:
        with TensorReader(file) as f:
            entries.update(json.loads(f.metadata.get(QUANTIZED_METADATA, "{}")))
    return entries


def _tensors(files: list[Path], stored: dict[str, dict]):
    """(file, checkpoint name, loader) for every weight; a quantized one loads as a QuantizedTensor."""
    for file in files:
        with TensorReader(file) as f:
            for name in f.keys():
                base, _, field = name.rpartition(".")
                if base in stored:
                    if field == "codes":
                        yield file, base, lambda f=f, base=base: QuantizedTensor(
                            f.get(f"{base}.codes"), f.get(f"{base}.scales"),
                            f.get(f"{base}.bias") if f"{base}.bias" in f else None,
                            int(stored[base]["bits"]), int(stored[base]["group"]), int(stored[base]["offset"]))
                    continue
                yield file, name, lambda f=f, name=name: f.get(name)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def _target(name: str, cfg: GemmaConfig) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (our parameter name, packed part or None); None = not ours to load."""
    if _IGNORED.search(name):
        return None
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else ("lm_head.weight", None)
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name == "embed_tokens.weight":
        return "embed_tokens", None
    m = re.fullmatch(r"(layers\.\d+\.(?:self_attn|mlp)\.)(\w+)\.weight", name)
    if m and m.group(2) in PACKED_MODULES:
        packed, part = PACKED_MODULES[m.group(2)]
        return f"{m.group(1)}{packed}.weight", part
    return name, None


def _copy_into(param: torch.Tensor, sizes: tuple[int, ...] | None, part: int | None,
               tensor: torch.Tensor, name: str) -> None:
    dest = param.data if part is None else param.data.narrow(0, sum(sizes[:part]), sizes[part])
    if dest.shape != tensor.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}")
    dest.copy_(tensor)


def _expected(params: dict[str, torch.Tensor], part_sizes: dict[str, tuple[int, ...]],
              quantized: set[str] = frozenset()) -> list[str]:
    """Names the loaded tensors must cover; each part of a packed weight is listed as 'param#part'."""
    names = []
    for name in list(params) + sorted(quantized):
        sizes = part_sizes.get(name, ())
        names += [f"{name}#{i}" for i in range(len(sizes))] if len(sizes) > 1 else [name]
    return names
