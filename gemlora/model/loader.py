"""Loads a Hugging Face Gemma checkpoint folder (config.json + safetensors, sharded or not) into
`GemmaForCausalLM`, in the dtype and on the device asked for.

Owns the map from checkpoint names to our packed parameters (q|k|v -> qkv_proj, gate|up ->
gate_up_proj), which LoRA loading shares. Files are memory-mapped by safetensors; the model is built
on the meta device first, so nothing is allocated twice. Knows files and names, nothing of requests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open

from gemlora.model.config import GemmaConfig
from gemlora.model.gemma import GemmaForCausalLM

# checkpoint module name -> (our packed module, index of its part in Linear.output_sizes)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_IGNORED = re.compile(r"(vision_tower|multi_modal_projector|rotary_emb)")


def load_config(path: Path) -> GemmaConfig:
    return GemmaConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = False) -> GemmaForCausalLM:
    path = Path(path)
    cfg = load_config(path)
    with torch.device("meta"):
        model = GemmaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty() re-creates parameters, so tie again
        model.lm_head.weight = model.embed_tokens
    params = dict(model.named_parameters(remove_duplicate=False))
    part_sizes = {f"{n}.weight": m.output_sizes for n, m in model.named_modules() if hasattr(m, "output_sizes")}
    filled: set[str] = set()
    files = _weight_files(path)
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("loading weights", total=None)
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    target = _target(name, cfg)
                    if target is None:
                        continue
                    pname, part = target
                    if pname not in params:
                        raise ValueError(f"{file.name}: tensor {name!r} matches no parameter of the model")
                    _copy_into(params[pname], part_sizes.get(pname), part, f.get_tensor(name), name)
                    filled.add(pname if part is None else f"{pname}#{part}")
                    bar.advance(task)
    missing = [n for n in _expected(params, part_sizes) if n not in filled]
    if cfg.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    return model.eval().requires_grad_(False)


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


def _expected(params: dict[str, torch.Tensor], part_sizes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names the loaded tensors must cover; each part of a packed weight is listed as 'param#part'."""
    names = []
    for name in params:
        sizes = part_sizes.get(name, ())
        names += [f"{name}#{i}" for i in range(len(sizes))] if len(sizes) > 1 else [name]
    return names
