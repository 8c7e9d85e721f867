"""Prefix caching over HTTP: gemlora with and without it, against llama.cpp's llama-server, on the same
GGUF and the same prompts, one server at a time (bench/serving.py's harness).

Two workloads, both through `/v1/completions` with raw prompts, greedy, streamed:

- **shared preamble**: one ~700-token system preamble before every prompt (a question of 20-60
  words), `--concurrency` requests at a time after one warm-up request that carries the preamble;
  measured against the same questions without the preamble. Answers are 8-32 tokens (drawn once,
  the same for every server): equal lengths would make the requests start and end in lockstep waves,
  which real traffic does not, and each wave's TTFT one sample. Targets: gemlora's TTFT p50 with the
  preamble at most 1.3x without it, and at least 2x better than llama.cpp's on the same work.
- **multi-turn chat**: `--conversations` chats side by side, each of `--turns` turns; every turn
  resends the conversation so far (Gemma's chat turns, the model's earlier answers included) plus a
  new user message of 40-80 words. Target: TTFT of the last turn at most 1.5x that of the first.

For each server it prints tok/s, TTFT p50/p90 and the prompt tokens the server reports as cached
(`usage.prompt_tokens_details.cached_tokens`, which both report).

    python bench/prefix.py                  # the embedded google/gemma-3-270m (Q4_K_M)
    python bench/prefix.py --skip-llama     # gemlora only

llama-server runs with its defaults for prompt reuse (a slot's own last prompt, and its host-memory
prompt cache), `-np` = the concurrency. Report ratios from one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from serving import ALIAS, WORDS, pct, start_gemlora, start_llama, stop, wait_ready  # noqa: E402

HEADER = f"{'run':<44} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'cached':>7}  (ms; cached: mean tokens)"


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0

    def row(self, label: str) -> str:
        tok_s = self.tokens / self.wall if self.wall else float("nan")
        mean = sum(self.cached) / len(self.cached) if self.cached else float("nan")
        return (f"{label:<44} {tok_s:>7.1f} {pct(self.ttft, 0.5) * 1e3:>9.0f} {pct(self.ttft, 0.9) * 1e3:>9.0f} "
                f"{mean:>7.0f}")


async def complete(client: httpx.AsyncClient, base: str, prompt: str, new_tokens: int, stats: Stats) -> str:
    """Streams one completion; records its TTFT and cached tokens; returns its text."""
    body = {"model": ALIAS, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, first, text, usage = time.perf_counter(), None, [], {}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            usage = event.get("usage") or usage
            piece = "".join(c.get("text") or "" for c in event.get("choices", []))
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    stats.ttft.append(first if first is not None else time.perf_counter() - start)
    stats.cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    stats.tokens += usage.get("completion_tokens", 0)
    return "".join(text)


def client(concurrency: int) -> httpx.AsyncClient:
    # a fresh connection per request: llama-server closes keep-alive connections after a few requests
    return httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4,
                                                               max_keepalive_connections=0))


async def shared(base: str, prompts: list[str], concurrency: int, new_tokens: list[int], warm: str) -> Stats:
    stats, sem = Stats(), asyncio.Semaphore(concurrency)
    async with client(concurrency) as c:
        await complete(c, base, warm, 4, Stats())

        async def one(p, n):
            async with sem:
                await complete(c, base, p, n, stats)

        start = time.perf_counter()
        await asyncio.gather(*[one(p, n) for p, n in zip(prompts, new_tokens)])
        stats.wall = time.perf_counter() - start
    return stats


async def chats(base: str, conversations: list[list[str]], new_tokens: int) -> list[Stats]:
    """One Stats per turn, over the conversations (run side by side, each turn after the last; no
    tok/s: the turns of different chats overlap)."""
    turns = [Stats() for _ in conversations[0]]
    async with client(len(conversations)) as c:

        async def chat(messages):
            history = ""
            for t, message in enumerate(messages):
                history += f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"
                answer = await complete(c, base, history, new_tokens, turns[t])
                history += f"{answer}<end_of_turn>\n"

        await asyncio.gather(*[chat(m) for m in conversations])
    return turns


def preamble_text(tokens: int, model_dir: Path) -> str:
    """A system preamble of about `tokens` tokens: numbered rules in plain words."""
    from gemlora.text.tokenizer import Tokenizer
    tok, rng = Tokenizer.from_dir(model_dir), random.Random(7)
    text = "You are the help desk of a small railway museum. Follow these rules in every answer.\n"
    rule = 1
    while len(tok.encode(text)) < tokens:
        text += f"{rule}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24))) + ".\n"
        rule += 1
    return text + "Question: "


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def run_server(name: str, start, args, preamble: str, questions: list[str], lengths: list[int],
               conversations) -> dict:
    proc, base = start()
    out = {}
    try:
        wait_ready(base, proc)
        warm = questions[-1]
        out["plain"] = asyncio.run(shared(base, questions, args.concurrency, lengths, warm))
        print(out["plain"].row(f"{name} questions alone"), flush=True)
        out["preamble"] = asyncio.run(shared(base, [preamble + q for q in questions], args.concurrency,
                                             lengths, preamble + warm))
        print(out["preamble"].row(f"{name} preamble + questions"), flush=True)
        out["chat"] = asyncio.run(chats(base, conversations, args.new_tokens))
        for t, s in enumerate(out["chat"]):
            print(s.row(f"{name} chat turn {t + 1}"), flush=True)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF file (default: the embedded google/gemma-3-270m)")
    ap.add_argument("--preamble-tokens", type=int, default=700)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16, help="per chat answer (preamble answers: 8-32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--no-uncached", action="store_true", help="skip gemlora --no-prefix-caching")
    args = ap.parse_args()

    from gemlora.model.source import embedded_gguf, resolve_model_dir
    gguf = args.model or embedded_gguf()
    model_dir = resolve_model_dir(str(gguf), progress=True)
    binary = None if args.skip_llama else llama_cpp.llama_server()
    rng = random.Random(0)
    preamble = preamble_text(args.preamble_tokens, model_dir)
    questions = [words(rng, 20, 60) + "?" for _ in range(args.requests)]
    lengths = [rng.randint(8, 32) for _ in questions]
    conversations = [[words(rng, 40, 80) for _ in range(args.turns)] for _ in range(args.conversations)]
    ctx = max(args.concurrency, args.conversations) * (args.preamble_tokens + args.turns * (120 + args.new_tokens) + 64)

    long_prompts = ["--max-input-length", "65536"]       # the seed schema's 4096 characters is too few
    runs = {"gemlora": lambda: start_gemlora(args.model, None, long_prompts, args.threads)}
    if not args.no_uncached:
        runs["gemlora, no prefix caching"] = lambda: start_gemlora(args.model, None,
                                                                   [*long_prompts, "--no-prefix-caching"], args.threads)
    if binary is not None:
        parallel = max(args.concurrency, args.conversations)
        runs["llama.cpp"] = lambda: start_llama(binary, Path(gguf), [], args.threads, ctx, parallel)
    print(HEADER, flush=True)
    results = {name: run_server(name, start, args, preamble, questions, lengths, conversations)
               for name, start in runs.items()}

    print(f"\nmodel {Path(gguf).name}; preamble {args.preamble_tokens} tokens, {args.requests} questions at "
          f"{args.concurrency} concurrent, 8-32 new tokens; {args.conversations} chats x {args.turns} turns, "
          f"{args.new_tokens} new tokens; greedy, {args.threads} threads")
    print(HEADER)
    for name, r in results.items():
        print(r["plain"].row(f"{name} questions alone"))
        print(r["preamble"].row(f"{name} preamble + questions"))
        for t, s in enumerate(r["chat"]):
            print(s.row(f"{name} chat turn {t + 1}"))
    g = results["gemlora"]
    p50 = lambda s: pct(s.ttft, 0.5)  # noqa: E731
    print(f"\ngemlora: TTFT p50 with the preamble / without: {p50(g['preamble']) / p50(g['plain']):.2f}x "
          f"(target <= 1.3x)")
    print(f"gemlora: TTFT p50 of chat turn {args.turns} / turn 1: {p50(g['chat'][-1]) / p50(g['chat'][0]):.2f}x "
          f"(target <= 1.5x)")
    for name, r in results.items():
        if name == "gemlora":
            continue
        print(f"{name} TTFT p50 / gemlora's: preamble {p50(r['preamble']) / p50(g['preamble']):.2f}x, "
              f"chat turn {args.turns} {p50(r['chat'][-1]) / p50(g['chat'][-1]):.2f}x"
              + (" (target for the preamble: >= 2x)" if name == "llama.cpp" else ""))


if __name__ == "__main__":
    main()
