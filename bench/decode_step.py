"""Batch-1 decoding against the memory wall: where a decode step's time goes, and how close it is to
reading its bytes at the machine's measured bandwidth.

Loads the model as `gemlora serve` does (the embedded GGUF, quantized), decodes greedily from one
prompt with the LM head exact and with it screened (gemlora.quant.screened_head), and prints for each:
decode tok/s (the median of --rounds runs of each, alternated), the bytes one step reads (layer weights + the LM head as read + the KV cache at the
mean context), those bytes per second as a fraction of the measured read bandwidth, and the step
split into the layers, the LM head, sampling and the rest (Python, scheduling). All runs in one
process, the same prompt; the two must decode the same tokens.

    python bench/decode_step.py [--new-tokens 256] [--prompt-tokens 100] [--rounds 3] [--model path.gguf]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import memory_bandwidth_gbs  # noqa: E402

import gemlora.engine.engine as engine_module  # noqa: E402
from gemlora.config import EngineConfig  # noqa: E402
from gemlora.engine.engine import LLMEngine  # noqa: E402
from gemlora.model.layers import Linear  # noqa: E402
from gemlora.model.loader import load_model  # noqa: E402
from gemlora.model.source import resolve_model_dir  # noqa: E402
from gemlora.sampling import SamplingParams  # noqa: E402


def weight_bytes(linear: Linear) -> int:
    w = linear.quantized if linear.quantized is not None else linear.weight
    return w.nbytes if not isinstance(w, torch.Tensor) else w.nelement() * w.element_size()


class Timer:
    """Wall time spent inside a few functions, patched in place."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        real = getattr(owner, name)
        own = name in vars(owner)
        self._undo.append(lambda: setattr(owner, name, real) if own else delattr(owner, name))

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, timed)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def decode(model, screen: bool, prompt: list[int], new_tokens: int) -> tuple[list[int], float, dict[str, float]]:
    engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=0.5, screen_lm_head=screen), frozenset())
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))   # warm-up
    while engine.has_work():
        engine.step()
    engine.add_request(prompt, params)
    tokens = engine.step()[0].new_token_ids            # the prefill, not timed
    timer = Timer()
    timer.wrap(model, "forward", "layers")
    timer.wrap(model, "compute_logits", "LM head")
    timer.wrap(engine_module, "sample", "sampling")
    start = time.perf_counter()
    while engine.has_work():
        tokens += engine.step()[0].new_token_ids
    elapsed = time.perf_counter() - start
    timer.undo()
    steps = new_tokens - 1
    split = {k: v / steps * 1e3 for k, v in timer.spent.items()}
    split["rest"] = elapsed / steps * 1e3 - sum(split.values())
    return tokens, steps / elapsed, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the embedded google/gemma-3-270m)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each, alternated; the median is shown")
    args = ap.parse_args()
    model = load_model(resolve_model_dir(args.model), torch.float32, quantization="auto")
    cfg = model.cfg
    rng = random.Random(0)
    prompt = [2] + [rng.randrange(1000, cfg.vocab_size - 1000) for _ in range(args.prompt_tokens - 1)]
    layers = sum(weight_bytes(m) for m in model.layers.modules() if isinstance(m, Linear))
    context = args.prompt_tokens + args.new_tokens / 2
    kv = sum(2 * min(context, cfg.sliding_window or context) if s else 2 * context
             for s in cfg.layer_sliding) * cfg.num_kv_heads * cfg.head_dim * 4
    bandwidth = memory_bandwidth_gbs()
    print(f"model {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"threads {torch.get_num_threads()}; measured read bandwidth {bandwidth:.1f} GB/s")
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens; "
          f"layer weights {layers / 1e6:.1f} MB, KV read at the mean context {kv / 1e6:.1f} MB")
    print(f"{'LM head':<10} {'head MB':>8} {'MB/step':>8} {'tok/s':>7} {'GB/s':>6} {'of wall':>7}   "
          f"ms per step: layers / LM head / sampling / rest")
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(args.rounds):              # alternated, so a drifting machine weighs on both alike
        for screen in (False, True):
            runs[screen].append(decode(model, screen, prompt, args.new_tokens))
    results = {}
    for screen, done in runs.items():
        tokens, tok_s, split = sorted(done, key=lambda r: r[1])[len(done) // 2]     # the median run
        assert all(r[0] == tokens for r in done)
        head = model.screened_head if screen and model.screened_head is not None else None
        head_bytes = (head.nbytes + head.candidates * cfg.hidden_size) if head else weight_bytes(model.lm_head)
        step = layers + head_bytes + kv
        gbs = step * tok_s / 1e9
        name = "screened" if head else "exact"
        results[name] = (tokens, tok_s)
        print(f"{name:<10} {head_bytes / 1e6:>8.1f} {step / 1e6:>8.1f} {tok_s:>7.1f} {gbs:>6.1f} {gbs / bandwidth:>7.0%}   "
              + " / ".join(f"{split.get(k, 0.0):.2f}" for k in ("layers", "LM head", "sampling", "rest")))
    if "screened" in results:
        same = results["screened"][0] == results["exact"][0]
        print(f"screened / exact: {results['screened'][1] / results['exact'][1]:.2f}x tok/s; "
              f"greedy tokens {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
