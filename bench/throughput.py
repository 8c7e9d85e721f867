"""Throughput of gemlora against transformers `generate()` on the same work, in one run.

For 1, 8 and 32 concurrent requests of mixed prompt lengths (fixed seed) on the embedded model,
both systems generate the same number of tokens per request (greedy, EOS ignored), starting from
token ids so tokenization is out of the picture. Prints generated tokens/s of each, the ratio
gemlora/transformers, and for batch 1 the weight bytes read per second of decoding against the
memory read bandwidth measured here (one large reduction over a buffer much bigger than the caches).

    python bench/throughput.py [--batches 1 8 32] [--new-tokens 64] [--prompt-lens 16 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams


def make_prompts(n: int, vocab: int, seed: int, lens: tuple[int, int] = (16, 256)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(*lens))] for _ in range(n)]


def memory_bandwidth_gbs() -> float:
    buf = torch.ones(2**28, dtype=torch.float32)   # 1 GiB
    buf.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def run_gemlora(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Returns (generated tokens/s overall, decode-only tokens/s)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    produced, first_done = 0, None
    while engine.has_work():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        if first_done is None and produced >= len(prompts):   # every prompt prefilled, first tokens out
            first_done, decode_from = time.perf_counter(), produced
    end = time.perf_counter()
    assert produced == new_tokens * len(prompts)
    return produced / (end - start), (produced - decode_from) / (end - first_done)


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])      # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return new_tokens * len(prompts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(None)
    dtype = getattr(torch, args.dtype)
    model = load_model(model_dir, dtype)
    engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=2.0, max_num_seqs=64), frozenset({1, 106}))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = memory_bandwidth_gbs()
    lo, hi = args.prompt_lens
    print(f"workload: prompts of {lo}-{hi} tokens, {args.new_tokens} new tokens each, greedy")
    print(f"model: {model_dir.name}  weights {weight_bytes / 1e9:.2f} GB ({args.dtype})  "
          f"threads {torch.get_num_threads()}  measured read bandwidth {bandwidth:.1f} GB/s")
    run_gemlora(engine, make_prompts(2, model.cfg.vocab_size, 99), 4)            # warm-up, both sides
    run_transformers(hf, make_prompts(2, model.cfg.vocab_size, 99), 4)
    print(f"{'batch':>5} {'gemlora tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}  notes")
    for n in args.batches:
        prompts = make_prompts(n, model.cfg.vocab_size, args.seed + n, tuple(args.prompt_lens))
        ours, ours_decode = run_gemlora(engine, prompts, args.new_tokens)
        theirs = run_transformers(hf, prompts, args.new_tokens)
        note = ""
        if n == 1:
            gbs = weight_bytes * ours_decode / 1e9
            note = f"decode {ours_decode:.1f} tok/s = {gbs:.1f} GB/s of weights, {gbs / bandwidth:.0%} of bandwidth"
        print(f"{n:>5} {ours:>14.1f} {theirs:>19.1f} {ours / theirs:>5.2f}x  {note}", flush=True)


if __name__ == "__main__":
    main()
