"""PEFT LoRA adapter folder -> validated, scaled (A, B) pairs for each patched module of one Gemma.

Owns parsing an adapter folder (`adapter_config.json` + `adapter_model.safetensors`, what Workers AI
takes), reproducing PEFT's rules for which modules are patched at which rank and scale
(`target_modules`, `exclude_modules`, `layers_to_transform`/`layers_pattern`, `rank_pattern`,
`alpha_pattern`, `use_rslora`), and refusing, with an AdapterError naming file, key, module and value,
anything that would not compute exactly what it computed under PEFT. Every tensor must map to a module
of this base model and every targeted module must have its tensors: an adapter that "loads" and
silently patches nothing is the failure this file exists to prevent.

A load returns a complete LoRAAdapter or raises; nothing is cached or global, so a refused load
leaves nothing behind. Must not know the engine, slots, batching, HTTP or device placement: tensors
are CPU float32, with the LoRA scaling already folded into B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gemlora.lora.patterns import FirstMatch, PatternError, check_count, compile_pattern
from gemlora.model.config import GemmaConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES
_BLOCK = {**dict.fromkeys(ATTN_MODULES, "self_attn"), **dict.fromkeys(MLP_MODULES, "mlp")}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# save_pretrained writes "base_model.model." + module name + ".lora_A.weight"; raw state dicts keep the
# adapter name (".lora_A.default.weight"). The module name depends on the class trained: *ForCausalLM
# "model.layers.N...", Gemma3ForConditionalGeneration "model.language_model.layers.N..." (transformers
# >= 4.52) or "language_model.model.layers.N..." (older).
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_KEY = re.compile(rf"base_model\.model\.(?P<prefix>{'|'.join(map(re.escape, _PREFIXES))})"
                  r"layers\.(?P<layer>0|[1-9][0-9]*)\.(?P<block>\w+)\.(?P<module>\w+)"
                  r"\.(?P<ab>lora_A|lora_B)(?P<name>\.[^.]+)?\.weight")
_VISION = ("the vision tower; this engine serves text only, so target the language model alone (e.g. "
           "target_modules=r'.*language_model.*\\.(q_proj|v_proj)')")
_KEY_HINTS = (("vision_tower", _VISION), ("multi_modal_projector", _VISION),
              ("lora_magnitude_vector", "a DoRA magnitude vector; DoRA is not supported yet"),
              ("lora_embedding", "an embedding LoRA; only the q/k/v/o/gate/up/down projections can be patched"),
              (".bias", "a bias; only bias-free LoRA is supported"))

# Config fields that change what the adapter computes in ways we do not implement, refused when truthy.
_UNSUPPORTED = {
    "use_dora": "DoRA is not supported yet", "modules_to_save": "fully trained extra modules are not supported yet",
    "lora_bias": "a trained bias on lora_B is not supported", "alora_invocation_tokens": "aLoRA is not supported",
    **{k: "not supported" for k in ("target_parameters", "layer_replication", "trainable_token_indices",
                                     "use_qalora", "megatron_config", "use_bdlora", "arrow_config", "kasa_config",
                                     "monteclora_config", "velora_config")},
}
# Other inits (pissa*, olora, corda, loftq, lora_ga, mica) rewrite the base weights or the forward, so
# such files only work with a base model we do not have (unless PEFT converted them on save).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")


class AdapterError(ValueError):
    """An adapter refused at load time; the message names the file, key, module or value at fault."""


@dataclass(frozen=True)
class LoRAWeights:
    """One patched module of one layer: delta(x) = x @ A.T @ B.T, scaling already folded into B."""
    A: torch.Tensor  # [r, in_features] float32, contiguous
    B: torch.Tensor  # [out_features, r] float32, contiguous


@dataclass
class LoRAAdapter:
    path: Path
    config: dict
    weights: dict[tuple[int, str], LoRAWeights]
    rank: int
    nbytes: int
    scales: dict[tuple[int, str], float] = field(default_factory=dict)

    def module_counts(self) -> dict[str, int]:
        counts = {m: sum(1 for _, mod in self.weights if mod == m) for m in TARGET_MODULES}
        return {m: n for m, n in counts.items() if n}

    def summary(self) -> str:
        mods = ", ".join(f"{n} {m}" for m, n in self.module_counts().items())
        layers = len({layer for layer, _ in self.weights})
        layers_word = "layer" if layers == 1 else "layers"
        ranks = {k: w.A.shape[0] for k, w in self.weights.items()}
        root = math.sqrt if self.config.get("use_rslora") else float
        alphas = [s * root(ranks[k]) for k, s in self.scales.items()]
        rs = " (rsLoRA)" if self.config.get("use_rslora") else ""
        return (f"patches {mods} modules in {layers} {layers_word}; rank {_span(ranks.values())}, "
                f"alpha {_span(alphas)} (scale {_span(self.scales.values())}){rs}")


def _span(values: Any) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if math.isclose(lo, hi) else f"{lo:g}-{hi:g}"


@dataclass(frozen=True)
class _Spec:
    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    targets: list[str] | str
    exclude: list[str] | str | None
    layers: list[int] | int | None
    layers_pattern: list[str] | str | None
    # the patterns above, compiled by RE2 (gemlora.lora.patterns: linear time in the name, never backtracking)
    targets_re: Any = None
    exclude_re: Any = None
    layer_res: tuple = ()
    rank_keys: FirstMatch = field(default_factory=lambda: FirstMatch((), ""))
    alpha_keys: FirstMatch = field(default_factory=lambda: FirstMatch((), ""))


def load_adapter(path: str | Path, model_cfg: GemmaConfig, *, max_rank: int = 32,
                 max_file_bytes: int = 300 * 2**20) -> LoRAAdapter:
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter folder")
    if not cfg_file.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_FILE}")
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:  # never unpickled: loading a pickle can run arbitrary code
            raise AdapterError(f"{path}: {pickles[0]} is a pickle and is refused; re-save the adapter as "
                               f"{WEIGHTS_FILE} (save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")
    size = weights_file.stat().st_size
    if size > max_file_bytes:
        raise AdapterError(f"{weights_file}: {size} bytes exceeds the limit of {max_file_bytes} bytes")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    spec = _parse_config(config, cfg_file, model_cfg)
    # config errors first, before the tensors are looked at; the key prefix is not known yet
    _check_targets_supported(spec, [n for p in _PREFIXES for n in _names(p, model_cfg).values()], cfg_file)
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as f:
            weights, scales = _read_weights(f, weights_file, spec, model_cfg, max_rank)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({e})") from None
    return LoRAAdapter(path=path, config=config, weights=weights, scales=scales,
                       rank=max(w.A.shape[0] for w in weights.values()),
                       nbytes=sum(w.A.nbytes + w.B.nbytes for w in weights.values()))


def _parse_config(c: dict[str, Any], file: Path, model_cfg: GemmaConfig) -> _Spec:
    def bad(what: str) -> AdapterError:
        return AdapterError(f"{file}: {what}")

    if c.get("peft_type") != "LORA":
        raise bad(f"peft_type {c.get('peft_type')!r} is not supported; only 'LORA' is")
    for key, why in _UNSUPPORTED.items():
        if c.get(key):
            raise bad(f"{key}={c[key]!r}: {why}")
    if c.get("bias", "none") != "none":
        raise bad(f"bias={c['bias']!r}: only 'none' is supported (trained base biases are not applied)")
    init = c.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise bad(f"init_lora_weights={init!r} modifies the base model's weights; convert it to plain LoRA "
                  "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r, alpha, rslora = c.get("r", 8), c.get("lora_alpha", 8), c.get("use_rslora", False)
    if not (_is_int(r) and r > 0) or not _is_num(alpha) or not isinstance(rslora, bool):
        raise bad(f"r={r!r}, lora_alpha={alpha!r}, use_rslora={rslora!r}: expected a positive int, a finite "
                  "number and a bool")
    rank_pattern, alpha_pattern = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    if not (isinstance(rank_pattern, dict) and all(_is_int(v) and v > 0 for v in rank_pattern.values())):
        raise bad(f"rank_pattern={rank_pattern!r} must map patterns to positive ranks")
    if not (isinstance(alpha_pattern, dict) and all(map(_is_num, alpha_pattern.values()))):
        raise bad(f"alpha_pattern={alpha_pattern!r} must map patterns to finite numbers")
    targets, exclude = c.get("target_modules"), c.get("exclude_modules")
    layers, layers_pattern = c.get("layers_to_transform"), c.get("layers_pattern")
    if targets is None:
        raise bad("target_modules is missing; list the modules explicitly")
    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):  # as LoraConfig does
        raise bad("layers_to_transform/layers_pattern cannot be used when target_modules is a str")
    if layers_pattern and layers is None:
        raise bad("layers_pattern needs layers_to_transform")
    if targets == "all-linear":  # PEFT: every linear layer but the output layer
        targets = list(TARGET_MODULES)
    for value, what in ((targets, "target_modules"), (exclude, "exclude_modules"), (layers_pattern, "layers_pattern")):
        if value is not None and not (isinstance(value, (str, list)) and all(isinstance(v, str) for v in value)):
            raise bad(f"{what}={value!r} must be a string or a list of strings")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise bad(f"layers_to_transform={layers!r} must be an int or a list of ints")
    for i in [layers] if _is_int(layers) else layers or []:
        if not 0 <= i < model_cfg.num_layers:
            raise bad(f"layers_to_transform names layer {i} but the base model has {model_cfg.num_layers} "
                      "layers; trained for another base model?")
    lists = [v for v in (targets, exclude, layers_pattern) if isinstance(v, list)]
    try:
        check_count([len(v) for v in lists] + [len(rank_pattern), len(alpha_pattern)])
        # PEFT fullmatches target_modules / exclude_modules when they are strings
        targets_re = compile_pattern(targets, "target_modules") if isinstance(targets, str) else None
        exclude_re = compile_pattern(exclude, "exclude_modules") if isinstance(exclude, str) else None
        # lazy .*? so that the first numbered segment is taken as the layer index
        layer_res = tuple(compile_pattern(p, "layers_pattern", r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
                          for p in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []))
        rank_keys, alpha_keys = FirstMatch(rank_pattern, "rank_pattern"), FirstMatch(alpha_pattern, "alpha_pattern")
    except PatternError as e:
        raise bad(str(e)) from None
    return _Spec(r=r, alpha=float(alpha), rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                 targets=targets, exclude=exclude, layers=layers, layers_pattern=layers_pattern,
                 targets_re=targets_re, exclude_re=exclude_re, layer_res=layer_res,
                 rank_keys=rank_keys, alpha_keys=alpha_keys)


def _read_weights(f: Any, file: Path, spec: _Spec, model_cfg: GemmaConfig, max_rank: int,
                  ) -> tuple[dict[tuple[int, str], LoRAWeights], dict[tuple[int, str], float]]:
    keys: dict[tuple[int, str, str], str] = {}
    formats: set[tuple[str, str]] = set()
    for key in f.keys():
        m = _KEY.fullmatch(key)
        if m is None:
            hint = next((why for frag, why in _KEY_HINTS if frag in key), "it maps to no module of this base model")
            raise AdapterError(f"{file}: unexpected tensor {key!r}: {hint} (expected keys like "
                               "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')")
        layer, module = int(m["layer"]), m["module"]
        if _BLOCK.get(module) != m["block"]:
            raise AdapterError(f"{file}: tensor {key!r}: {m['block']}.{module} is not a module LoRA can patch "
                               f"in this base model (supported: {', '.join(TARGET_MODULES)})")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{file}: tensor {key!r} is for layer {layer} but the base model has "
                               f"{model_cfg.num_layers} layers; trained for another base model?")
        if (layer, module, m["ab"]) in keys:
            raise AdapterError(f"{file}: tensors {keys[layer, module, m['ab']]!r} and {key!r} are for the same weight")
        keys[layer, module, m["ab"]] = key
        formats.add((m["prefix"], m["name"] or ""))
    if not keys:
        raise AdapterError(f"{file}: holds no LoRA tensors")
    if len(formats) > 1:  # e.g. two adapters' state dicts merged into one file
        raise AdapterError(f"{file}: mixes key formats {sorted(formats)}")
    prefix = formats.pop()[0]
    names = _names(prefix, model_cfg)
    _check_targets_supported(spec, list(names.values()), file.with_name(CONFIG_FILE))
    targeted = {lm for lm, name in names.items() if _peft_targets(spec, name)}
    found = {(i, m) for i, m, _ in keys}
    for i, m in sorted(found):
        if (i, m) not in targeted:
            raise AdapterError(f"{file}: has weights for {names[i, m]} but {CONFIG_FILE} does not target it")
        for ab, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if (i, m, ab) not in keys:
                raise AdapterError(f"{file}: {names[i, m]} has {other} but no {ab}")
    missing = sorted(targeted - found)
    if missing:
        raise AdapterError(f"{file}: {CONFIG_FILE} targets {names[missing[0]]} ({len(missing)} modules in all) "
                           "but the file has no weights for it; the adapter would silently do nothing there")

    weights, scales = {}, {}
    for i, m in sorted(found):
        name, (key_a, key_b) = names[i, m], (keys[i, m, "lora_A"], keys[i, m, "lora_B"])
        shape_a, shape_b = (tuple(f.get_slice(k).get_shape()) for k in (key_a, key_b))
        in_f, out_f = _dims(model_cfg, m)
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != in_f or shape_b[0] != out_f:
            raise AdapterError(f"{file}: {name}: lora_A {list(shape_a)} / lora_B {list(shape_b)} do not fit this "
                               f"base model, which needs [r, {in_f}] / [{out_f}, r]; trained for another base model?")
        if shape_a[0] != shape_b[1]:
            raise AdapterError(f"{file}: {name}: rank mismatch, lora_A has rank {shape_a[0]} but lora_B {shape_b[1]}")
        r = _pattern_value(spec.rank_pattern, spec.rank_keys, name, spec.r)
        if shape_a[0] != r:
            raise AdapterError(f"{file}: {name}: tensors have rank {shape_a[0]} but {CONFIG_FILE} says {r} "
                               "(r / rank_pattern)")
        if r > max_rank:
            raise AdapterError(f"{file}: {name}: rank {r} exceeds max_rank {max_rank}")
        alpha = float(_pattern_value(spec.alpha_pattern, spec.alpha_keys, name, spec.alpha))
        scale = alpha / math.sqrt(r) if spec.rslora else alpha / r
        a, b = _tensor(f, key_a, file), _tensor(f, key_b, file)
        weights[i, m] = LoRAWeights(A=a.contiguous(), B=(b * scale).contiguous())
        scales[i, m] = scale
    return weights, scales


def _tensor(f: Any, key: str, file: Path) -> torch.Tensor:
    dtype = f.get_slice(key).get_dtype()
    if dtype not in _FLOAT_DTYPES:
        raise AdapterError(f"{file}: tensor {key!r} has dtype {dtype}; expected a float type")
    t = f.get_tensor(key).to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{file}: tensor {key!r} contains NaN or Inf values")
    return t


_ANY_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")   # ours, not the tenant's: Python's re is safe here


def _peft_targets(spec: _Spec, name: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists, for the options we accept."""
    suffixes = _dotted_suffixes(name)
    ex = spec.exclude
    if spec.exclude_re is not None and spec.exclude_re.fullmatch(name):
        return False
    if isinstance(ex, list) and (name in ex or not suffixes.isdisjoint(ex)):
        return False
    if spec.targets_re is not None:
        return spec.targets_re.fullmatch(name) is not None
    if name in spec.targets:  # an exact module name bypasses layers_to_transform, as in PEFT
        return True
    if suffixes.isdisjoint(spec.targets):
        return False
    if spec.layers is None or spec.layers == []:
        return True
    match = (next((m for rx in spec.layer_res if (m := rx.match(name))), None) if spec.layer_res
             else _ANY_LAYER.match(name))
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == spec.layers if isinstance(spec.layers, int) else idx in spec.layers


def _dotted_suffixes(name: str) -> set[str]:
    """The strings t with name.endswith("." + t): "a.b.c" -> {"b.c", "c"} (PEFT's list-entry rule)."""
    parts = name.split(".")
    return {".".join(parts[i:]) for i in range(1, len(parts))}


def _pattern_value(patterns: dict[str, Any], keys: FirstMatch, name: str, default: Any) -> Any:
    """peft.utils.other.get_pattern_key: the first key (in file order) matching a dotted suffix of name."""
    key = keys.first(name)
    return patterns[key] if key is not None else patterns.get(name, default)


def _names(prefix: str, cfg: GemmaConfig) -> dict[tuple[int, str], str]:
    """The patchable modules' names as PEFT saw them, e.g. (3, "q_proj") -> "model.layers.3.self_attn.q_proj"."""
    return {(i, m): f"{prefix}layers.{i}.{_BLOCK[m]}.{m}" for i in range(cfg.num_layers) for m in TARGET_MODULES}


def _check_targets_supported(spec: _Spec, names: list[str], file: Path) -> None:
    supported = ", ".join(TARGET_MODULES)
    if spec.targets_re is not None:
        if not any(spec.targets_re.fullmatch(n) for n in names):
            raise AdapterError(f"{file}: target_modules regex {spec.targets!r} matches no module LoRA can patch "
                               f"in this base model (e.g. {names[0]!r}; supported: {supported})")
        return
    known = set(names).union(*map(_dotted_suffixes, names))
    for t in spec.targets:
        if t not in known:
            raise AdapterError(f"{file}: target_modules entry {t!r} is unsupported: it names no module LoRA can "
                               f"patch in this base model (supported: {supported})")


def _dims(cfg: GemmaConfig, module: str) -> tuple[int, int]:
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}[module]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
