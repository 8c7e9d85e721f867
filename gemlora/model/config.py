"""GemmaConfig: one flat description of every Gemma text decoder (Gemma 1, 2 and 3).

Owns the translation of Hugging Face `config.json` dicts, in both the older schema
(`sliding_window_pattern`, `rope_theta` + `rope_local_base_freq`, `rope_scaling`) and the newer one
(`layer_types`, `rope_parameters` per layer type), into switches the model branches on. The model
never looks at a version string. Knows nothing of weights, requests or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

_DEFAULTS = {  # per model_type, as transformers' config classes set them
    "gemma": dict(final_softcap=None, attn_softcap=None, window=None, pattern=None,
                  theta=10_000.0, local_theta=None),
    "gemma2": dict(final_softcap=30.0, attn_softcap=50.0, window=4096, pattern=2,
                   theta=10_000.0, local_theta=None),
    "gemma3_text": dict(final_softcap=None, attn_softcap=None, window=4096, pattern=6,
                        theta=1_000_000.0, local_theta=10_000.0),
}
_SUPPORTED_ROPE = ("default", "linear")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    theta: float
    linear_factor: float = 1.0  # positions are divided by this ("linear" RoPE scaling)


@dataclass(frozen=True, slots=True)
class GemmaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    attn_scale: float                    # query_pre_attn_scalar ** -0.5 (G2/G3) or head_dim ** -0.5 (G1)
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    sliding_window: int | None
    layer_sliding: tuple[bool, ...]      # per layer: sliding-window (local) attention?
    rope_global: RopeSpec
    rope_local: RopeSpec
    qk_norm: bool                        # Gemma 3
    sandwich_norms: bool                 # pre/post feed-forward norms (Gemma 2/3)
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GemmaConfig:
        hf = dict(hf)
        if hf.get("model_type") == "gemma3" and "text_config" in hf:
            hf = {**hf["text_config"], "model_type": "gemma3_text"}  # multimodal wrapper: text part
        model_type = hf.get("model_type")
        if model_type not in _DEFAULTS:
            raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(_DEFAULTS)}")
        d = _DEFAULTS[model_type]
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported hidden_activation {act!r} (Gemma uses gelu_pytorch_tanh)")
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
        if model_type == "gemma":
            attn_scale = head_dim ** -0.5
        else:
            attn_scale = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
        window = hf.get("sliding_window", d["window"]) if d["window"] else None
        layer_sliding = _layer_sliding(hf, num_layers, d["pattern"]) if window else (False,) * num_layers
        rope_global, rope_local = _rope_specs(hf, d)
        eos = hf.get("eos_token_id", 1)
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            attn_scale=attn_scale,
            attn_logit_softcap=hf.get("attn_logit_softcapping", d["attn_softcap"]),
            final_logit_softcap=hf.get("final_logit_softcapping", d["final_softcap"]),
            sliding_window=int(window) if window else None,
            layer_sliding=layer_sliding,
            rope_global=rope_global,
            rope_local=rope_local,
            qk_norm=model_type == "gemma3_text",
            sandwich_norms=model_type != "gemma",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        )


def _layer_sliding(hf: Mapping[str, Any], num_layers: int, default_pattern: int) -> tuple[bool, ...]:
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}")
        return tuple(t == "sliding_attention" for t in layer_types)
    pattern = int(hf.get("sliding_window_pattern") or default_pattern)
    return tuple(bool((i + 1) % pattern) for i in range(num_layers))  # every pattern-th layer is global


def _rope_specs(hf: Mapping[str, Any], d: Mapping[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    params = hf.get("rope_parameters")
    if params and ("full_attention" in params or "sliding_attention" in params):  # newer, per layer type
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or full
        g = _rope_spec(full, full.get("rope_theta", hf.get("rope_theta", d["theta"])))
        l_theta = local.get("rope_theta", hf.get("rope_local_base_freq", d["local_theta"] or g.theta))
        return g, _rope_spec(local, l_theta)
    if params:  # newer, one set for every layer (Gemma 1/2)
        g = _rope_spec(params, params.get("rope_theta", hf.get("rope_theta", d["theta"])))
        return g, g
    g = _rope_spec(hf.get("rope_scaling") or {}, hf.get("rope_theta", d["theta"]))
    local_theta = hf.get("rope_local_base_freq", d["local_theta"])
    return g, (RopeSpec(float(local_theta)) if local_theta else g)  # scaling applies to global layers only


def _rope_spec(spec: Mapping[str, Any], theta: float) -> RopeSpec:
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {_SUPPORTED_ROPE}")
    factor = float(spec.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return RopeSpec(theta=float(theta), linear_factor=factor)
