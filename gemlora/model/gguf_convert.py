"""One-time conversion of a Gemma 1/2/3 GGUF file (llama.cpp naming) into a Hugging Face checkpoint folder.

Owns the GGUF -> HF translation: tensor names, exact de-quantization to float32, undoing llama.cpp's
`+1` on Gemma norm weights, the config transformers derives from the metadata, and the tokenizer with
a chat template. The folder equals what `transformers` loads from the same GGUF, so later starts only
memory-map safetensors. Knows files and formats only: nothing of requests, the engine or HTTP.
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

from gguf import GGUFReader
from gguf.quants import dequantize
from rich.progress import track

# Part of every cache key (see source.py): bump it whenever the converter's output changes.
CONVERTER_VERSION = 1

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

    Writes config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
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
        _write_safetensors(reader, arch, tmp / "model.safetensors", progress=progress)
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


def _write_safetensors(reader: GGUFReader, arch: str, path: Path, *, progress: bool) -> None:
    """Stream tensors into a float32 safetensors file one at a time, so peak memory is one tensor.

    The header comes first, which needs every shape up front: GGUF lists dims fastest-first, numpy
    (and safetensors) slowest-first. A tied lm_head is simply absent from the GGUF, as in HF checkpoints.
    """
    entries = [(t, hf_tensor_name(t.name, arch), [int(d) for d in reversed(t.shape)]) for t in reader.tensors]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in entries:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * prod(shape)]}
        offset += 4 * prod(shape)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned for memory-mapping
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for tensor, name, shape in track(entries, description="De-quantizing GGUF", disable=not progress):
            weights = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            if "norm.weight" in tensor.name:  # llama.cpp stores Gemma's (1 + w); transformers subtracts 1 back
                weights = weights - 1
            weights.astype("<f4", copy=False).tofile(f)
