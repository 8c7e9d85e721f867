"""What routing requests to engine replicas costs: adapter loads and time to first token under Zipf traffic
over many adapters, with adapter affinity, Ray Serve's default router, and plain round-robin.

Each configuration is started on its own (`gemlora serve`, the embedded google/gemma-3-270m), given the
same public adapters (random rank-8 PEFT LoRAs on q_proj/v_proj) and driven over `/v1/completions` with
the same requests: `--requests` prompts of 40-160 words, each naming an adapter drawn Zipf(1.0) from
`--adapters`, `--concurrency` in flight, greedy, `--new-tokens` each, streamed. Printed per
configuration: adapter loads from disk (RAM tier) and into slots, from /metrics; tokens/s; TTFT and
inter-token p50/p90. Runs: one process (`--replicas 1`, its RAM tier holding the whole set), then N
replicas with each router, each replica's RAM tier holding `--replica-ram-adapters` (by default half
the set: a replica's memory is bounded, so where requests go decides how often adapters are read again).

    python bench/routing.py                    # 2 replicas, 200 requests over 16 adapters, 16 in flight
    python bench/routing.py --routers affinity round-robin --requests 400

On a 2-core machine 2 replicas share the same 2 cores as 1 process: throughput cannot scale here; the
figures to read are the loads and TTFT each router causes. Report them from one run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving import ALIAS, HEADER, Result, drive, prompts, row, start_gemlora, stop, wait_ready, write_adapters  # noqa: E402


def start(replicas: int, routing: str, ram_adapters: int, adapters_dir: Path, log: Path):
    proc, base = start_gemlora(None, adapters_dir, ["--replicas", str(replicas), "--replica-routing", routing,
                                                    "--max-cpu-loras", str(ram_adapters)], threads=None, log=log)
    # behind Ray, /health answers before every replica is up: wait for "N of N"
    wait_ready(base, proc, 900, ready=lambda health: replicas == 1 or
               health.json()["engine"].startswith(f"{replicas} of {replicas}"))
    return proc, base


def loads(base: str) -> tuple[float, float]:
    """(adapter loads from disk, adapter loads into slots), summed over replicas."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    read = lambda tier: sum(float(v) for v in re.findall(  # noqa: E731
        rf'^gemlora_adapter_loads_total{{tier="{tier}"}} ([0-9.e+]+)$', text, re.M))
    return read("ram"), read("slot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--routers", nargs="+", default=["affinity", "ray", "round-robin"])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--replica-ram-adapters", type=int, default=0, help="default: adapters / replicas")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-single", action="store_true", help="skip the one-process run")
    args = ap.parse_args()

    from gemlora.model.source import embedded_gguf, resolve_model_dir
    model_dir = resolve_model_dir(str(embedded_gguf()), progress=True)
    ram = args.replica_ram_adapters or max(1, args.adapters // args.replicas)
    rng = random.Random(0)
    picks = rng.choices(range(args.adapters), [1 / (k + 1) for k in range(args.adapters)], k=args.requests)
    loras = [{"lora": f"adapter-{k}"} for k in picks]
    texts = prompts(args.requests, seed=7)
    runs = ([] if args.no_single else [(1, "affinity", args.adapters)]) + [(args.replicas, r, ram) for r in args.routers]
    tmp = Path(tempfile.mkdtemp(prefix="gemlora-routing-"))
    results = []
    try:
        write_adapters(model_dir, tmp / "adapters", args.adapters)
        print(f"{args.requests} requests, Zipf(1.0) over {args.adapters} adapters ({len(set(picks))} drawn), "
              f"{args.concurrency} in flight, {args.new_tokens} new tokens, greedy")
        print(f"{'':<44} {'disk loads':>10} {'slot loads':>10}")
        for replicas, routing, ram_adapters in runs:
            name = ("1 process" if replicas == 1 else f"{replicas} replicas, {routing}") + f", RAM {ram_adapters}"
            proc, base = start(replicas, routing, ram_adapters, tmp / "adapters", tmp / f"serve-{len(results)}.log")
            try:
                asyncio.run(drive(base, ALIAS, prompts(4, seed=99), 2, 4, None))       # warm-up, base model
                time.sleep(2.5)                          # replicas post their numbers every second
                disk0, slot0 = loads(base)
                res: Result = asyncio.run(drive(base, ALIAS, texts, args.concurrency, args.new_tokens, loras))
                time.sleep(2.5)
                disk, slot = loads(base)
            finally:
                stop(proc)
            results.append((name, res, disk - disk0, slot - slot0))
            print(f"{name:<44} {disk - disk0:>10.0f} {slot - slot0:>10.0f}", flush=True)
        distinct = len(set(picks))
        print(f"\n{'':<34} {'disk loads / distinct':>22}\n{HEADER}")
        for name, res, disk, _ in results:
            print(f"{name:<34} {disk / distinct:>21.2f}x")
            print(row("", res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
