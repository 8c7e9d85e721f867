"""load_adapter against PEFT itself: adapters trained-shaped by `peft` on tiny random Gemma 3 / Gemma 1
checkpoints must give exactly PEFT's per-module LoRA delta on exactly PEFT's set of modules, and every
malformed or unsupported adapter must be refused at load time with a message naming the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_checkpoint
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gemlora.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from gemlora.model.loader import load_config

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def g3(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma3")
    make_tiny_checkpoint("gemma3", path)
    return path


@pytest.fixture(scope="module")
def g1(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma1")
    make_tiny_checkpoint("gemma", path)
    return path


def peft_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs):
    """A PEFT LoRA on the checkpoint at `base`, saved to `out`; B randomised since PEFT inits it to zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(out)
    return pm.eval()


def peft_modules(pm) -> dict[tuple[int, str], LoraLayer]:
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
            assert m, name
            out[int(m[1]), m[2]] = mod
    return out


def assert_parity(pm, adapter: LoRAAdapter) -> None:
    mods = peft_modules(pm)
    assert set(adapter.weights) == set(mods)
    gen = torch.Generator().manual_seed(1)
    for key, mod in mods.items():
        w = adapter.weights[key]
        assert w.A.dtype == w.B.dtype == torch.float32 and w.A.is_contiguous() and w.B.is_contiguous()
        x = torch.randn(5, mod.in_features, generator=gen)
        with torch.no_grad():
            ref = mod(x) - mod.base_layer(x)
        assert ref.abs().max() > 1e-4, key  # the delta is not trivially zero
        torch.testing.assert_close(x @ w.A.T @ w.B.T, ref, atol=1e-5, rtol=1e-5, msg=str(key))
    assert adapter.rank == max(m.r["default"] for m in mods.values())


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 8, "^model.layers.0.mlp.down_proj": 6},
                     alpha_pattern={"v_proj": 3, r"layers\.[24]\.mlp\.down_proj": 32}),
    "regex": dict(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|down_proj)"),
    "layers_list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    "layers_int_pattern": dict(r=2, lora_alpha=4, target_modules=["up_proj", "o_proj"], layers_to_transform=3,
                               layers_pattern="layers"),
    "full_name_bypasses_layers": dict(r=3, lora_alpha=5, target_modules=["model.layers.4.self_attn.o_proj", "k_proj"],
                                      layers_to_transform=[1]),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "down_proj"],
                    exclude_modules=r".*layers\.1\..*"),
    "pattern_order_and_exclude_list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={r"layers\.1\.self_attn\.v_proj": 8, "v_proj": 2},
                                           alpha_pattern={r"layers\.1\.self_attn\.v_proj": 1, "v_proj": 6},
                                           exclude_modules=["model.layers.2.self_attn.q_proj"]),
    "fan_in_fan_out": dict(r=4, lora_alpha=8, target_modules=["q_proj"], fan_in_fan_out=True),
}


@pytest.mark.parametrize("case", CASES)
def test_parity_with_peft_gemma3(g3, tmp_path, case):
    pm = peft_adapter(g3, tmp_path, **CASES[case])
    assert_parity(pm, load_adapter(tmp_path, load_config(g3)))


def test_parity_with_peft_gemma1(g1, tmp_path):
    pm = peft_adapter(g1, tmp_path, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    adapter = load_adapter(tmp_path, load_config(g1))
    assert_parity(pm, adapter)
    assert len(adapter.weights) == 4 * 7


def test_overlapping_patterns_reordered_by_peft_save(g3, tmp_path):
    """Overlapping pattern keys: PEFT up to 0.21 took the first matching key but saved the config with
    sort_keys=True, so the keys came back in another order and PEFT's own reload failed on shapes; later
    PEFT versions reload it. PEFT's reload of the saved folder is the oracle: where it fails we refuse,
    naming the module; where it loads we give exactly its deltas."""
    from peft import PeftModel
    peft_adapter(g3, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                 rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.v_proj": 8})
    try:
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(g3, dtype=torch.float32), tmp_path)
    except RuntimeError as exc:                 # size mismatch for ...layers.1.self_attn.v_proj.lora_A
        assert "size mismatch" in str(exc)
        refused(tmp_path, load_config(g3), "layers.1.self_attn.v_proj", "rank 2 but adapter_config.json says 8")
        return
    assert_parity(reloaded.eval(), load_adapter(tmp_path, load_config(g3)))


def test_gemma3_multimodal_wrapper(tmp_path):
    """A PEFT adapter trained on Gemma3ForConditionalGeneration: keys "model.language_model.layers...";
    LoRA on the vision tower (what a plain target list gives there) is refused, not silently dropped."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from conftest import tiny_hf_config
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    mm = Gemma3ForConditionalGeneration(Gemma3Config(text_config=tiny_hf_config("gemma3").to_dict(),
                                                     vision_config=vision.to_dict(), mm_tokens_per_image=4))
    mm.save_pretrained(tmp_path / "base")
    cfg = load_config(tmp_path / "base")
    pm = get_peft_model(mm, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(tmp_path / "text")
    adapter = load_adapter(tmp_path / "text", cfg)
    layers = pm.base_model.model.model.language_model.layers
    x = torch.randn(3, 64)
    for (i, m), w in adapter.weights.items():
        mod = getattr(layers[i].self_attn, m)
        with torch.no_grad():
            torch.testing.assert_close(x @ w.A.T @ w.B.T, mod(x) - mod.base_layer(x), atol=1e-5, rtol=1e-5)
    assert adapter.module_counts() == {"q_proj": 6, "v_proj": 6}

    get_peft_model(Gemma3ForConditionalGeneration(mm.config), LoraConfig(target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "list")
    refused(tmp_path / "list", cfg, "vision_tower", "text only")


def test_all_linear_written_by_hand(g3, tmp_path):
    peft_adapter(g3, tmp_path, r=4, lora_alpha=8, target_modules="all-linear")
    edit_config(tmp_path, target_modules="all-linear")
    assert len(load_adapter(tmp_path, load_config(g3)).weights) == 6 * 7


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def good(g3, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good-adapter")
    peft_adapter(g3, path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return path


@pytest.fixture
def ad(good, tmp_path) -> Path:
    """A fresh copy of a valid adapter, for a test to break."""
    return Path(shutil.copytree(good, tmp_path / "adapter"))


@pytest.fixture(scope="module")
def cfg(g3):
    return load_config(g3)


def edit_config(d: Path, **changes) -> None:
    c = json.loads((d / CONFIG).read_text())
    c.update(changes)
    (d / CONFIG).write_text(json.dumps(c))


def edit_tensors(d: Path, fn) -> None:
    """fn edits the tensors in place, or returns a new dict of them."""
    tensors = load_file(d / WEIGHTS)
    new = fn(tensors)
    save_file(tensors if new is None or isinstance(new, torch.Tensor) else new, d / WEIGHTS)


def rename_keys(d: Path, fn) -> None:
    edit_tensors(d, lambda t: {fn(k): v for k, v in t.items()})


def refused(path: Path, cfg, *fragments: str, **kw) -> str:
    with pytest.raises(AdapterError) as e:
        load_adapter(path, cfg, **kw)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = Q0_A.replace("lora_A", "lora_B")

# -------------------------------------------------------------------------------- key formats, summary


@pytest.mark.parametrize("prefix", ["base_model.model.model.language_model.layers.",
                                    "base_model.model.language_model.model.layers."])
@pytest.mark.parametrize("adapter_name", [False, True])
def test_key_variants_map_to_same_weights(ad, cfg, prefix, adapter_name):
    ref = load_adapter(ad, cfg)
    rename_keys(ad, lambda k: k.replace("base_model.model.model.layers.", prefix))
    if adapter_name:
        rename_keys(ad, lambda k: re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k))
    got = load_adapter(ad, cfg)
    assert set(got.weights) == set(ref.weights)
    for k, w in ref.weights.items():
        assert torch.equal(got.weights[k].A, w.A) and torch.equal(got.weights[k].B, w.B)


def test_adapter_name_in_plain_keys(ad, cfg):
    ref = load_adapter(ad, cfg)
    rename_keys(ad, lambda k: k.replace(".weight", ".my_adapter.weight"))
    assert torch.equal(load_adapter(ad, cfg).weights[0, "q_proj"].B, ref.weights[0, "q_proj"].B)


def test_regex_targets_match_the_real_module_names(ad, cfg):
    edit_config(ad, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    refused(ad, cfg, "matches no module")  # text-only names "model.layers..." lack "language_model"
    rename_keys(ad, lambda k: k.replace("model.model.layers.", "model.model.language_model.layers."))
    assert len(load_adapter(ad, cfg).weights) == 12


def test_summary_and_counts(ad, cfg):
    adapter = load_adapter(ad, cfg)
    assert adapter.module_counts() == {"q_proj": 6, "v_proj": 6}
    assert adapter.summary() == "patches 6 q_proj, 6 v_proj modules in 6 layers; rank 4, alpha 8 (scale 2)"
    assert adapter.nbytes == sum(w.A.nbytes + w.B.nbytes for w in adapter.weights.values())
    assert adapter.config["r"] == 4 and adapter.path == ad


def test_summary_with_patterns(g3, tmp_path):
    peft_adapter(g3, tmp_path, **CASES["patterns"])
    s = load_adapter(tmp_path, load_config(g3)).summary()
    assert s.startswith("patches 6 q_proj, 6 v_proj, 6 down_proj modules in 6 layers; rank 2-8"), s


def test_loads_are_independent(ad, cfg):
    """No caching: a reload sees the files as they are now, and a refused load changes nothing."""
    first = load_adapter(ad, cfg)
    edit_tensors(ad, lambda t: t[Q0_B].fill_(float("nan")))
    refused(ad, cfg, "NaN")
    edit_tensors(ad, lambda t: t[Q0_B].copy_(first.weights[0, "q_proj"].B / 2.0))
    again = load_adapter(ad, cfg)
    assert again.weights[0, "q_proj"].B is not first.weights[0, "q_proj"].B
    torch.testing.assert_close(again.weights[0, "q_proj"].B, first.weights[0, "q_proj"].B)


# ------------------------------------------------------------------------------------------ refusals


def test_missing_config(ad, cfg):
    (ad / CONFIG).unlink()
    refused(ad, cfg, "missing adapter_config.json")


def test_missing_weights(ad, cfg):
    (ad / WEIGHTS).unlink()
    refused(ad, cfg, "missing adapter_model.safetensors")


def test_not_a_folder(tmp_path, cfg):
    refused(tmp_path / "nope", cfg, "not an adapter folder")


def test_pickle_refused_never_loaded(ad, cfg):
    (ad / WEIGHTS).unlink()
    (ad / "adapter_model.bin").write_bytes(b"\x80\x04 not even a real pickle")
    refused(ad, cfg, "adapter_model.bin", "pickle", "refused")


def test_bad_json(ad, cfg):
    (ad / CONFIG).write_text("{'r': 4,")
    refused(ad, cfg, "not valid JSON")


def test_corrupt_safetensors(ad, cfg):
    (ad / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    refused(ad, cfg, "not a readable safetensors file")


@pytest.mark.parametrize("changes, fragments", [
    (dict(peft_type="LOHA"), ["peft_type 'LOHA'"]),
    (dict(use_dora=True), ["DoRA is not supported yet"]),
    (dict(modules_to_save=["lm_head"]), ["modules_to_save", "not supported yet"]),
    (dict(bias="lora_only"), ["bias='lora_only'"]),
    (dict(bias="all"), ["bias='all'"]),
    (dict(lora_bias=True), ["lora_bias"]),
    (dict(target_parameters=["mlp.experts.down_proj"]), ["target_parameters"]),
    (dict(layer_replication=[[0, 4], [2, 6]]), ["layer_replication"]),
    (dict(init_lora_weights="pissa"), ["init_lora_weights='pissa'", "modifies the base model"]),
    (dict(init_lora_weights="olora"), ["init_lora_weights='olora'"]),
    (dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), ["'embed_tokens' is unsupported"]),
    (dict(target_modules=["lm_head"]), ["'lm_head' is unsupported"]),
    (dict(target_modules=None), ["target_modules is missing"]),
    (dict(target_modules=r"model\.embed_tokens"), ["matches no module"]),
    (dict(target_modules="(q_proj"), ["not a valid regex"]),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), ["cannot be used when target_modules is a str"]),
    (dict(layers_to_transform=[0, 9]), ["layer 9", "6 layers", "another base model"]),
    (dict(r=0), ["r=0"]),
    (dict(lora_alpha="16"), ["lora_alpha='16'"]),
    (dict(rank_pattern={"q_proj": -1}), ["rank_pattern"]),
])
def test_bad_config(ad, cfg, changes, fragments):
    edit_config(ad, **changes)
    refused(ad, cfg, *fragments)


# Catastrophic-backtracking patterns: Python's re never returns on a real module name with these (it holds
# the GIL while it backtracks, so one tenant's config froze the whole server). RE2 evaluates them in time
# linear in the name; each load must finish within a second of CPU, accepted or refused.
EVIL = "(.*.*)*x"


@pytest.mark.parametrize("changes, fragments", [
    (dict(target_modules=EVIL), ["target_modules regex", "matches no module"]),
    (dict(target_modules="(.*.*)*(q_proj|v_proj)"), []),                  # accepted: it matches both
    (dict(exclude_modules=EVIL), []),                                     # accepted: excludes nothing
    (dict(rank_pattern={EVIL: 2}, alpha_pattern={"(a|aa)*b": 3}), []),    # accepted: no key matches
    (dict(layers_to_transform=[0, 1], layers_pattern=EVIL), ["does not target"]),
])
def test_catastrophic_patterns_are_evaluated_in_bounded_time(ad, cfg, changes, fragments):
    import time
    edit_config(ad, **changes)
    start = time.process_time()
    if fragments:
        refused(ad, cfg, *fragments)
    else:
        assert load_adapter(ad, cfg).weights
    assert time.process_time() - start < 1.0


@pytest.mark.parametrize("changes, fragments", [
    (dict(target_modules=r"(.*)\1q_proj"), ["target_modules", "cannot be evaluated in bounded time"]),
    (dict(exclude_modules=r".*(?=q_proj).*"), ["exclude_modules", "cannot be evaluated in bounded time"]),
    (dict(rank_pattern={r"(?<!x)q_proj": 2}), ["rank_pattern key", "cannot be evaluated in bounded time"]),
    (dict(layers_to_transform=[0], layers_pattern="(a{1000}){1000}"), ["layers_pattern", "bounded time"]),
    (dict(target_modules="q" * 5000), ["5000 characters", "at most 4096"]),
    (dict(rank_pattern={f"layers\\.{i}\\.x": 2 for i in range(1025)}), ["1027 patterns", "at most 1024"]),
    (dict(target_modules=["q_proj"] * 2000), ["2000 patterns"]),
])
def test_patterns_beyond_a_linear_engine_are_refused_naming_them(ad, cfg, changes, fragments):
    edit_config(ad, **changes)
    refused(ad, cfg, *fragments)


def test_long_module_lists_cost_a_set_lookup(ad, cfg):
    """1,002 list entries (near the most a config may hold) are checked per name by suffix lookup."""
    import time
    names = [f"model.layers.{i % 6}.self_attn.{m}" for i in range(300) for m in ("q_proj", "v_proj")]
    edit_config(ad, target_modules=["q_proj", "v_proj", *names], exclude_modules=[f"x{i}.q_proj" for i in range(400)])
    start = time.process_time()
    assert load_adapter(ad, cfg).weights
    assert time.process_time() - start < 1.0


def test_wrong_prefix(ad, cfg):
    rename_keys(ad, lambda k: k.replace("base_model.model.model.layers.", "base_model.model.transformer.h."))
    refused(ad, cfg, "unexpected tensor", "transformer.h.", "maps to no module")


def test_missing_base_model_prefix(ad, cfg):
    rename_keys(ad, lambda k: k.removeprefix("base_model.model."))
    refused(ad, cfg, "unexpected tensor", "maps to no module")


def test_layer_out_of_range(ad, cfg):
    rename_keys(ad, lambda k: k.replace("layers.5.", "layers.7."))
    refused(ad, cfg, "layer 7", "6 layers", "another base model")


def test_unknown_module(ad, cfg):
    rename_keys(ad, lambda k: k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qkv_proj"))
    refused(ad, cfg, "self_attn.qkv_proj", "not a module LoRA can patch")


def test_module_in_wrong_block(ad, cfg):
    rename_keys(ad, lambda k: k.replace("layers.0.self_attn.q_proj", "layers.0.mlp.q_proj"))
    refused(ad, cfg, "mlp.q_proj", "not a module LoRA can patch")


def test_untargeted_module_in_file(ad, cfg):
    edit_tensors(ad, lambda t: {**t, Q0_A.replace("q_proj", "k_proj"): t[Q0_A].clone(),
                                Q0_B.replace("q_proj", "k_proj"): t[Q0_B][:32].clone()})
    refused(ad, cfg, "layers.0.self_attn.k_proj", "does not target it")


def test_layers_to_transform_excludes_a_layer_in_file(ad, cfg):
    edit_config(ad, layers_to_transform=[1, 2, 3, 4, 5])
    refused(ad, cfg, "layers.0.self_attn.q_proj", "does not target it")


@pytest.mark.parametrize("drop, fragment", [(Q0_B, "has lora_A but no lora_B"), (Q0_A, "has lora_B but no lora_A")])
def test_half_a_pair(ad, cfg, drop, fragment):
    edit_tensors(ad, lambda t: {k: v for k, v in t.items() if k != drop})
    refused(ad, cfg, "layers.0.self_attn.q_proj", fragment)


def test_targeted_module_without_weights(ad, cfg):
    edit_config(ad, target_modules=["q_proj", "v_proj", "k_proj"])
    refused(ad, cfg, "targets model.layers.0.self_attn.k_proj", "6 modules", "silently do nothing")


def test_targeted_layer_without_weights(ad, cfg):
    edit_tensors(ad, lambda t: {k: v for k, v in t.items() if ".layers.3.self_attn.v_proj" not in k})
    refused(ad, cfg, "targets model.layers.3.self_attn.v_proj", "no weights")


def test_shape_from_another_base_model(ad, cfg):
    edit_tensors(ad, lambda t: {**t, Q0_A: torch.randn(4, 128)})
    refused(ad, cfg, "layers.0.self_attn.q_proj", "[4, 128]", "[r, 64]", "another base model")


def test_transposed_weights_refused_even_with_fan_in_fan_out(ad, cfg):
    """PEFT stores lora_A as [r, in] whatever fan_in_fan_out says (it only affects merging into Conv1D base
    weights, and PEFT resets it to False for nn.Linear), so a transposed file is a shape error."""
    edit_config(ad, fan_in_fan_out=True)
    load_adapter(ad, cfg)
    edit_tensors(ad, lambda t: {k: v.T.contiguous() for k, v in t.items()})
    refused(ad, cfg, "do not fit this base model", "[64, 4]")


def test_rank_mismatch_between_a_and_b(ad, cfg):
    edit_tensors(ad, lambda t: {**t, Q0_B: torch.randn(64, 3)})
    refused(ad, cfg, "layers.0.self_attn.q_proj", "rank mismatch", "lora_A has rank 4 but lora_B 3")


def test_rank_mismatch_with_config(ad, cfg):
    edit_config(ad, r=8)
    refused(ad, cfg, "rank 4 but adapter_config.json says 8")


def test_rank_mismatch_with_rank_pattern(ad, cfg):
    edit_config(ad, rank_pattern={r"layers\.2\.self_attn\.v_proj": 2})
    refused(ad, cfg, "layers.2.self_attn.v_proj", "rank 4 but adapter_config.json says 2")


def test_rank_above_max(ad, cfg):
    refused(ad, cfg, "rank 4 exceeds max_rank 2", max_rank=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(ad, cfg, value):
    def poison(t):
        t[Q0_B][3, 1] = value
    edit_tensors(ad, poison)
    refused(ad, cfg, Q0_B, "NaN or Inf")


def test_non_float_dtype(ad, cfg):
    edit_tensors(ad, lambda t: {**t, Q0_A: (t[Q0_A] * 100).to(torch.int8)})
    refused(ad, cfg, Q0_A, "dtype I8")


def test_half_precision_is_converted(ad, cfg):
    ref = load_adapter(ad, cfg)
    edit_tensors(ad, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    got = load_adapter(ad, cfg).weights[0, "q_proj"]
    assert got.A.dtype == torch.float32
    torch.testing.assert_close(got.B, ref.weights[0, "q_proj"].B, atol=2e-2, rtol=2e-2)


def test_file_too_large(ad, cfg):
    size = (ad / WEIGHTS).stat().st_size
    refused(ad, cfg, "exceeds the limit", str(size - 1), max_file_bytes=size - 1)
    load_adapter(ad, cfg, max_file_bytes=size)


@pytest.mark.parametrize("extra, fragment", [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias"),
    ("base_model.model.lm_head.lora_A.weight", "maps to no module"),
    ("base_model.model.model.norm.weight", "maps to no module"),
])
def test_extra_tensors(ad, cfg, extra, fragment):
    edit_tensors(ad, lambda t: {**t, extra: torch.zeros(4, 64)})
    refused(ad, cfg, "unexpected tensor", extra, fragment)


def test_duplicate_weight(ad, cfg):
    edit_tensors(ad, lambda t: {**t, Q0_A.replace(".weight", ".default.weight"): t[Q0_A].clone()})
    refused(ad, cfg, "same weight")


def test_mixed_key_formats(ad, cfg):
    rename_keys(ad, lambda k: k.replace("model.model.layers.5.", "model.model.language_model.layers.5."))
    refused(ad, cfg, "mixes key formats")


def test_empty_file(ad, cfg):
    save_file({}, ad / WEIGHTS)
    refused(ad, cfg, "no LoRA tensors")
