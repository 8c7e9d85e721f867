"""One-time conversion of a Gemma 1/2/3 GGUF file (llama.cpp naming) into a checkpoint folder.

Owns the GGUF -> checkpoint translation: tensor names, undoing llama.cpp's `+1` on Gemma norm weights,
the config transformers derives from the metadata, and the tokenizer with a chat template. Weights
keep their precision: every quantized tensor is repacked without loss into gemlora's QuantizedTensor
format (codes, scales, bias: `<name>.codes` / `.scales` / `.bias` entries, their formats listed in
the file's `gemlora.quantized` metadata), and F32 / F16 / BF16 tensors keep their dtype. Nothing is
widened to float32, on disk or in memory: tensors are read with plain file reads and written slice
by slice, so peak memory is one slice of one tensor. Knows files and formats only: nothing of
requests, the engine or HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from math import prod
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from rich.progress import track

from gemlora.model.tensor_file import TensorWriter
from gemlora.quant import gguf as gguf_quant
from gemlora.quant.tensor import encode_header

# Part of every cache key (see source.py): bump it whenever the converter's output changes.
# 2: quantized tensors kept as QuantizedTensor entries instead of de-quantized float32.
CONVERTER_VERSION = 2
QUANTIZED_METADATA = "gemlora.quantized"     # the file metadata key listing quantized weights' formats
_ROWS_PER_SLICE = 1 << 24                    # weights unpacked at once: bounds the converter's memory

# Gemma's turn markup; HF's templates fold a leading system message into the first turn and trim content.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] | trim ~ '\\n\\n' "
    "if messages and messages[0]['role'] == 'system' else '' -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\\n' "
    "~ (system if loop.first else '') ~ message['content'] | trim ~ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)

_ARCHS = ("gemma", "gemma2", "gemma3")
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# gguf-py's TensorNameMap for MODEL_ARCH.GEMMA2/GEMMA3, inverted (transformers maps names through it).
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face parameter name of a llama.cpp tensor, e.g. `blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`. Raises for a tensor with no HF counterpart."""
    stem = gguf_name.removesuffix(".weight")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.weight"
    if (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)) and m[2] in _PER_LAYER:
        # Gemma 1 has a single norm before its MLP, which HF calls post_attention_layernorm.
        part = "post_attention_layernorm" if arch == "gemma" and m[2] == "ffn_norm" else _PER_LAYER[m[2]]
        return f"model.layers.{m[1]}.{part}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face {arch} counterpart")


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert a Gemma GGUF into an HF checkpoint folder at `out_dir` (which must not exist).

    Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json into a `.<name>.partial-*` folder beside `out_dir`, renamed into place
    only when complete, so a crash never leaves a half-written `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"conversion target already exists: {out_dir}")
    try:
        reader = GGUFReader(gguf_path)
    except ValueError as e:  # e.g. "GGUF magic invalid", which would not say which file
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    arch = field.contents() if (field := reader.get_field("general.architecture")) else None
    if arch not in _ARCHS:
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not a Gemma text decoder ({', '.join(_ARCHS)})")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        config = _hf_config(gguf_path, arch)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _save_tokenizer(gguf_path, config, tmp)
        _write_safetensors(gguf_path, reader, arch, tmp / "model.safetensors", progress=progress)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _teach_transformers_gemma1() -> None:
    """transformers reads Gemma 2/3 GGUF metadata but rejects Gemma 1's, whose keys are Gemma 2's
    minus the sliding window (llama.cpp writes the same ones). Registering them is idempotent."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if "gemma" not in gguf_utils.GGUF_SUPPORTED_ARCHITECTURES:
        gemma2 = GGUF_CONFIG_MAPPING["gemma2"]
        GGUF_CONFIG_MAPPING["gemma"] = {k: v for k, v in gemma2.items() if k != "attention.sliding_window"}
        gguf_utils.GGUF_SUPPORTED_ARCHITECTURES.append("gemma")


def _hf_config(gguf_path: Path, arch: str) -> dict:
    """The config exactly as transformers builds it from this GGUF (its class defaults fill what the
    metadata lacks, e.g. Gemma 3's local RoPE base and 5:1 layer pattern), plus `architectures`."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch == "gemma":
        _teach_transformers_gemma1()
    config = AutoConfig.for_model(**load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]  # as save_pretrained would
    return config.to_dict()


def _save_tokenizer(gguf_path: Path, config: dict, out: Path) -> None:
    from transformers import GemmaTokenizer, GenerationConfig

    # AutoTokenizer picks GemmaTokenizer for every Gemma GGUF; naming it skips AutoTokenizer's own
    # metadata parse (~10 s) and its architecture check, which rejects Gemma 1.
    tokenizer = GemmaTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out, save_jinja_files=False)  # keep the template inside tokenizer_config.json
    # Chat turns end with <end_of_turn>, which the GGUF's single eos id misses (HF's Gemma repos list both).
    end_of_turn = tokenizer.get_vocab().get("<end_of_turn>")
    eos = [config["eos_token_id"]] + ([end_of_turn] if end_of_turn is not None else [])
    GenerationConfig(bos_token_id=config["bos_token_id"], pad_token_id=config["pad_token_id"],
                     eos_token_id=eos).save_pretrained(out)


_DENSE = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
          GGMLQuantizationType.BF16: torch.bfloat16}


def _write_safetensors(gguf_path: Path, reader: GGUFReader, arch: str, path: Path, *, progress: bool) -> None:
    """Stream tensors into a safetensors file one slice at a time, so peak memory is one slice.

    The header comes first, which needs every shape up front: GGUF lists dims fastest-first, numpy
    (and safetensors) slowest-first. A tied lm_head is simply absent from the GGUF, as in HF checkpoints.
    """
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    plan = []         # (gguf tensor, hf name, shape, quantized layout or None)
    formats = {}
    for t in reader.tensors:
        name, shape = hf_tensor_name(t.name, arch), tuple(int(d) for d in reversed(t.shape))
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype in _DENSE:   # norms become float32: (1 + w) - 1 is exact there, not in 16 bits
            specs[name] = (torch.float32 if "norm.weight" in t.name else _DENSE[qtype], shape)
            plan.append((t, name, shape, None))
            continue
        if qtype not in gguf_quant.LAYOUT:
            gguf_quant.unpack(np.zeros(0, np.uint8), qtype, 0, 0)      # raises: unsupported type, named
        if len(shape) != 2:
            raise ValueError(f"{t.name}: a quantized tensor must be 2-D, got shape {shape}")
        bits, group, scale_dtype, has_bias, offset = gguf_quant.LAYOUT[qtype]
        rows, cols = shape
        specs[f"{name}.codes"] = (torch.uint8, (rows, cols if bits == 8 else cols // 2))
        specs[f"{name}.scales"] = (scale_dtype, (rows, cols // group))
        if has_bias:
            specs[f"{name}.bias"] = (scale_dtype, (rows, cols // group))
        formats[name] = {"bits": bits, "group": group, "offset": offset, "gguf_type": qtype.name}
        plan.append((t, name, shape, qtype))
    with TensorWriter(path, specs, {QUANTIZED_METADATA: encode_header(formats)}) as out, gguf_path.open("rb") as f:
        for t, name, shape, qtype in track(plan, description="Repacking GGUF", disable=not progress):
            if qtype is None:
                f.seek(t.data_offset)
                data = np.frombuffer(f.read(int(t.n_bytes)), dtype=_DENSE_NUMPY[GGMLQuantizationType(t.tensor_type)])
                tensor = torch.from_numpy(data.copy()).view(_DENSE[GGMLQuantizationType(t.tensor_type)]).reshape(shape)
                if "norm.weight" in t.name:  # llama.cpp stores Gemma's (1 + w); transformers subtracts 1 back
                    tensor = tensor.float() - 1
                out.write(name, tensor)
                continue
            rows, cols = shape
            per_row = gguf_quant.row_bytes(qtype, cols)
            step = max(1, _ROWS_PER_SLICE // cols)
            for row in range(0, rows, step):
                n = min(step, rows - row)
                f.seek(t.data_offset + row * per_row)
                raw = np.frombuffer(f.read(n * per_row), dtype=np.uint8)
                qt = gguf_quant.unpack(raw, qtype, n, cols)
                out.write(f"{name}.codes", qt.codes, row)
                out.write(f"{name}.scales", qt.scales, row)
                if qt.bias is not None:
                    out.write(f"{name}.bias", qt.bias, row)


# numpy views of the dense types' bytes (bf16 has no numpy dtype: read as raw 16-bit words)
_DENSE_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.BF16: np.uint16}
