"""GGUF -> HF checkpoint conversion and model source resolution.

Fast tests build tiny Gemma 1/2/3 GGUFs from random transformers models (names from gguf-py's own
TensorNameMap, norms stored as 1 + w like llama.cpp) and check the round trip. Slow tests convert
the embedded google/gemma-3-270m GGUF once and compare it with what transformers loads from it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from gemlora import disk_cache
from gemlora.model import gguf_convert, source
from gemlora.model.gguf_convert import GEMMA_CHAT_TEMPLATE, convert_gguf, hf_tensor_name
from gemlora.model.source import resolve_model_dir

TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\u2581"]
TOKENS += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["hi", "th"]
TOKENS += ["\u2581" + w for w in ("hi", "a", "b", "the")]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _tiny_model(arch: str):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig

    dims = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config = {"gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[arch](**dims)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)  # zero-initialised otherwise, which would hide a missing -1
    return model


def _write_gguf(arch: str, model, path: Path) -> None:
    """What llama.cpp's convert_hf_to_gguf writes for this model, in float32."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if arch != "gemma":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_types([3 if t.startswith("<") else 1 for t in TOKENS])  # 3: control
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for name, p in model.state_dict().items():
        if name != "lm_head.weight":  # tied: llama.cpp writes no output.weight
            value = p.numpy() + (1 if name.endswith("norm.weight") else 0)
            writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_tiny_gguf_round_trip(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _tiny_model(arch)
    _write_gguf(arch, model, tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == model.config.model_type
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(model.config, key), key

    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors = _read_safetensors(out)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(tensors[name], value, atol=1e-6, rtol=0, msg=name)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert list(out.parent.glob(".hf.partial-*")) == []


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    _write_gguf("gemma3", _tiny_model("gemma3"), tmp_path / "tiny.gguf")
    monkeypatch.setattr(gguf_convert, "_write_safetensors", disk_full)  # after config and tokenizer are written
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_rejects_non_gemma(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'llama' is not a Gemma"):
        convert_gguf(tmp_path / "llama.gguf", tmp_path / "hf", progress=False)


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight", "gemma3") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight", "gemma") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight", "gemma2") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight", "gemma3")


def test_chat_template():
    from jinja2 import Environment

    render = Environment().from_string(GEMMA_CHAT_TEMPLATE).render
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "Bye"}]
    assert render(messages=messages, bos_token="<bos>", add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert render(messages=messages[1:2], bos_token="<bos>", add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model_dir(tmp_path / "nope.gguf", cache_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve_model_dir(tmp_path / "weights.bin", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        resolve_model_dir(tmp_path / "empty", cache_dir=tmp_path)
    (tmp_path / "not-gguf.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not-gguf.gguf is not a readable GGUF"):
        resolve_model_dir(tmp_path / "not-gguf.gguf", cache_dir=tmp_path / "cache")
    left = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "gguf-hashes"]  # hash memos
    assert not left, "a failed conversion left a folder"


def test_checkpoint_folder_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path


# --- the embedded google/gemma-3-270m ------------------------------------------------------------

# fixtures gguf_path, converted, hf_model, hf_tokenizer: see conftest.py


@pytest.mark.slow
def test_config(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (640, 18, 4, 1, 256)
    assert (config["sliding_window"], config["vocab_size"], config["query_pre_attn_scalar"]) == (512, 262144, 256)
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000
    assert config["tie_word_embeddings"] is True
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


@pytest.mark.slow
def test_weights_equal_transformers(converted, hf_model, gguf_path):
    # Since converter version 2 the cache keeps each quantized tensor in its own precision (codes,
    # scales, bias) instead of float32 (issue 8): dequantized, it must equal transformers' float32
    # weights (which gguf-py de-quantized) exactly, as the float32 cache did before.
    from gemlora.model.tensor_file import TensorReader
    from gemlora.quant.tensor import QuantizedTensor
    expected = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}  # tied
    with TensorReader(converted / "model.safetensors") as f:
        formats = json.loads(f.metadata[gguf_convert.QUANTIZED_METADATA])
        tensors = {}
        for name in f.keys():
            base = name.rsplit(".", 1)[0]
            if base in formats:
                if name.endswith(".codes"):
                    meta = formats[base]
                    tensors[base] = QuantizedTensor(f.get(name), f.get(f"{base}.scales"),
                                                    f.get(f"{base}.bias") if f"{base}.bias" in f else None,
                                                    meta["bits"], meta["group"], meta["offset"]).dequantize()
            else:
                assert f.get(name).dtype == torch.float32 and "norm" in name, name   # only norms are float
                tensors[name] = f.get(name)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for name, value in tensors.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    assert (converted / "model.safetensors").stat().st_size < gguf_path.stat().st_size * 1.5   # not widened
    # the comparison above covers every tensor; make sure that includes the interesting kinds
    kinds = {t.tensor_type.name: t.name for t in gguf.GGUFReader(gguf_path).tensors}
    assert {"F32", "Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(kinds)


@pytest.mark.slow
def test_tokenizer_matches_transformers(converted, hf_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text in ["<start_of_turn>user\nHi<end_of_turn>\n", "Hello, world!", "  two  spaces\n\ttab",
                 "日本語 and emoji 🙂", ""]:
        ids = tokenizer(text).input_ids
        assert ids == hf_tokenizer(text).input_ids, text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids)
    assert tokenizer("<start_of_turn>user\nHi<end_of_turn>\n").input_ids == [2, 105, 2364, 107, 10979, 106, 107]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_cache_is_reused(converted, gguf_path, monkeypatch):
    monkeypatch.setattr(source, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    start = time.perf_counter()
    assert resolve_model_dir(gguf_path, cache_dir=converted.parent) == converted
    assert time.perf_counter() - start < 1.0
    assert resolve_model_dir(None, cache_dir=converted.parent) == converted  # the embedded default
    assert converted.name.endswith(f"-v{gguf_convert.CONVERTER_VERSION}")


def test_concurrent_first_starts_convert_once(tmp_path, monkeypatch):
    gguf_file, cache = tmp_path / "m.gguf", tmp_path / "cache"
    gguf_file.write_bytes(b"GGUF" + bytes(100))
    calls, contended = [], threading.Event()
    try_lock = disk_cache._try_lock

    def watched_try_lock(fd):
        got = try_lock(fd)
        if not got:
            contended.set()
        return got

    def fake_convert(path, out, *, progress):
        calls.append(out)
        assert contended.wait(30)      # the other thread found the lock held while this one converts
        out.mkdir()
        return out

    monkeypatch.setattr(disk_cache, "_try_lock", watched_try_lock)
    monkeypatch.setattr(source, "convert_gguf", fake_convert)
    stale = cache / f".m-{source.gguf_cache_key(gguf_file, cache_dir=cache)}.partial-dead"
    stale.mkdir(parents=True)
    with ThreadPoolExecutor(2) as pool:  # flock excludes separate open()s, threads included
        results = list(pool.map(lambda _: resolve_model_dir(gguf_file, cache_dir=cache), range(2)))
    assert len(calls) == 1 and results == calls * 2
    assert not stale.exists()


def test_cache_key_tracks_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert source.gguf_cache_key(a, cache_dir=tmp_path) != source.gguf_cache_key(b, cache_dir=tmp_path)


def test_cache_key_sees_a_change_in_the_middle_of_the_file_and_hashes_once_per_change(tmp_path, monkeypatch):
    """The old key read the size and the first and last MiB: two fine-tunes of one base differing only in
    their tensors shared one conversion. Now the whole content counts, hashed again only when the file's
    (path, size, mtime, inode) change."""
    import hashlib
    gguf_file, cache = tmp_path / "m.gguf", tmp_path / "cache"
    data = bytearray(b"GGUF" + bytes(5_000_000))
    gguf_file.write_bytes(data)
    first = source.gguf_cache_key(gguf_file, cache_dir=cache)
    assert first.endswith(f"-v{gguf_convert.CONVERTER_VERSION}")
    reads = []
    real_sha = hashlib.sha256
    monkeypatch.setattr(source.hashlib, "sha256", lambda *a: reads.append(a) or real_sha(*a))
    assert source.gguf_cache_key(gguf_file, cache_dir=cache) == first
    assert not [a for a in reads if not a]                      # remembered: the content was not hashed again
    data[2_500_000] = 1                                         # same size, same first and last MiB
    gguf_file.write_bytes(data)
    second = source.gguf_cache_key(gguf_file, cache_dir=cache)
    assert second != first
    assert second == f"{real_sha(bytes(data)).hexdigest()[:16]}-v{gguf_convert.CONVERTER_VERSION}"
