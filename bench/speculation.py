"""Prompt-lookup speculative decoding against plain decoding, in one process on one model.

Workloads (each request alone, batch 1, unless --batch says more):
  edit          the prompt holds most of the answer: a JSON record, a paragraph and a function, each to
                be written out again with one small change (greedy);
  plain         open-ended continuations of short prompts (greedy);
  plain-sampled the same, at temperature 0.8 with a seed per request.
For each, rounds alternate speculation off and on (so a drifting machine weighs on both alike) and the
median round is shown: generated tokens per second over whole requests (prefill included, the same in
both), the draft tokens verified and kept, and whether both gave the same tokens (they must, greedy or
seeded).

    python bench/speculation.py [--new-tokens 128] [--rounds 3] [--batch 1] [--model path.gguf]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams
from gemlora.text.tokenizer import Tokenizer

EDITS = [
    'Here is a product record in JSON:\n{"id": 4411, "name": "Stainless steel kettle", "price": 34.5, '
    '"currency": "EUR", "stock": 120, "tags": ["kitchen", "steel", "kettle"], "supplier": {"name": '
    '"Acme Housewares", "country": "DE", "since": 2019}}\n\nThe same record with the stock changed to 80:\n',
    "Original paragraph:\nThe harbour was quiet in the early morning. Fishing boats rocked gently against the "
    "pier while gulls circled overhead, and the smell of salt and diesel hung in the cold air. By seven o'clock "
    "the first traders had opened their stalls along the quay.\n\nThe same paragraph with 'harbour' spelled "
    "the American way:\n",
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be "
    "positive')\n    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n        "
    "if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n            "
    "out.append(total / window)\n    return out\n\n# The same function, renamed to rolling_mean:\n",
]
PLAIN = ["The history of the city of Lyon", "My favourite recipe for a rainy day", "The three laws of motion",
         "A short story about a lighthouse keeper", "How to plant tomatoes in spring",
         "The best way to learn a new language is"]


def run(model, prompts: list[list[int]], params: list[SamplingParams], spec: bool, batch: int):
    engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=0.5, num_speculative_tokens=8 if spec else 0),
                       frozenset())
    engine.add_request(prompts[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))   # warm-up
    while engine.has_work():
        engine.step()
    out: list[list[int]] = []
    start = time.perf_counter()
    for at in range(0, len(prompts), batch):
        ids = [engine.add_request(p, q) for p, q in zip(prompts[at:at + batch], params[at:at + batch])]
        got = {i: [] for i in ids}
        while engine.has_work():
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
        out += [got[i] for i in ids]
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    return out, sum(map(len, out)) / elapsed, stats.spec_draft_tokens, stats.spec_accepted_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the embedded google/gemma-3-270m)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each, alternated; the median is shown")
    ap.add_argument("--batch", type=int, default=1, help="requests run together")
    args = ap.parse_args()
    path = resolve_model_dir(args.model)
    model = load_model(path, torch.float32, quantization="auto")
    tok = Tokenizer.from_dir(path)
    n = args.new_tokens
    workloads = {
        "edit": ([tok.encode(t) for t in EDITS], [SamplingParams(max_tokens=n, temperature=0)] * len(EDITS)),
        "plain": ([tok.encode(t) for t in PLAIN], [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)]
                  * len(PLAIN)),
        "plain-sampled": ([tok.encode(t) for t in PLAIN], [SamplingParams(max_tokens=n, temperature=0.8, seed=i + 1,
                                                                          ignore_eos=True) for i in range(len(PLAIN))]),
    }
    print(f"threads {torch.get_num_threads()}; batch {args.batch}; up to {n} new tokens per request; "
          f"median of {args.rounds} alternated rounds")
    print(f"{'workload':<14} {'off tok/s':>9} {'on tok/s':>9} {'on/off':>7} {'drafted':>8} {'kept':>6}  tokens")
    for name, (prompts, params) in workloads.items():
        runs: dict[bool, list] = {False: [], True: []}
        for _ in range(args.rounds):
            for spec in (False, True):
                runs[spec].append(run(model, prompts, params, spec, args.batch))
        off, on = (sorted(runs[s], key=lambda r: r[1])[args.rounds // 2] for s in (False, True))
        same = all(r[0] == off[0] for r in runs[False] + runs[True])
        print(f"{name:<14} {off[1]:>9.1f} {on[1]:>9.1f} {on[1] / off[1]:>6.2f}x {on[2]:>8} "
              f"{on[3] / max(on[2], 1):>6.0%}  {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
