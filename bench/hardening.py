"""What a hostile or careless request costs the others (issue 26's figures), on an in-process server over
a tiny random Gemma 3 with the embedded model's tokenizer, so that steps take milliseconds:

- a PEFT regex that never returns under Python's re (`(.*.*)*x`): RE2's CPU per adapter config, and
  Python's re on 24 characters (stopped after 20 s);
- a 50 MB body announced by Content-Length, and the same sent chunked: time to the 413, RSS growth;
- a 1.9 MB prompt while another tenant streams: its answer time, and the other stream's largest and
  median gaps between tokens meanwhile.

    python bench/hardening.py
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_tiny_checkpoint, start_uvicorn  # noqa: E402
from test_api_hardening import ALICE, MODEL, TOKENS, pace_during  # noqa: E402
from test_request_limits import raw_http, rss_bytes  # noqa: E402

from gemlora.api.app import ServerSettings, create_app  # noqa: E402
from gemlora.api.auth import Auth  # noqa: E402
from gemlora.config import EngineConfig  # noqa: E402
from gemlora.engine.async_engine import AsyncEngine  # noqa: E402
from gemlora.lora.patterns import compile_pattern  # noqa: E402
from gemlora.model.source import resolve_model_dir  # noqa: E402


def regexes() -> None:
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(36)] + ["a" * 16]
    start = time.process_time()
    for _ in range(100):
        rx = compile_pattern("(.*.*)*x", "target_modules")
        [n for n in names if rx.fullmatch(n)]
    print(f"RE2, (.*.*)*x compiled and matched against {len(names)} names: "
          f"{(time.process_time() - start) * 10:.3f} ms of CPU per config")

    def give_up(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(20)
    start = time.monotonic()
    try:
        re.compile("(.*.*)*x").search("a" * 24)
        print(f"Python re on 24 characters: {time.monotonic() - start:.1f} s")
    except TimeoutError:
        print("Python re on 24 characters: still running after 20 s")
    finally:
        signal.alarm(0)


def requests(base: str) -> None:
    path = f"/client/v4/accounts/alice/ai/run/{MODEL}"
    before = rss_bytes()
    status, _, took = raw_http(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
                                     f"Content-Length: {50 * 2**20}\r\n\r\n", [b"{" + b"a" * 65536])
    print(f"50 MB body, Content-Length: {status} in {took * 1000:.1f} ms, RSS +{(rss_bytes() - before) / 2**20:.1f} MiB")
    before = rss_bytes()
    mib = b"a" * 2**20
    status, _, took = raw_http(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
                                     "Transfer-Encoding: chunked\r\n\r\n",
                               (b"%x\r\n%s\r\n" % (len(mib), mib) for _ in range(50)), timeout=30)
    print(f"50 MB body, chunked: {status} in {took * 1000:.1f} ms, RSS +{(rss_bytes() - before) / 2**20:.1f} MiB")

    async def big_prompt(client):
        return await client.post(base + path, headers=ALICE,
                                 json={"prompt": "lorem ipsum dolor sit amet, " * 68_000, "max_tokens": 1})

    during, done = pace_during(base, big_prompt)
    print(f"1.9 MB prompt: {done['result'].status_code} in {done['end'] - done['start']:.2f} s; the other stream's "
          f"largest gap meanwhile {max(during) * 1000:.0f} ms (median gap meanwhile {sorted(during)[len(during) // 2] * 1000:.1f} ms)")


def main() -> None:
    regexes()
    work = Path(tempfile.mkdtemp(prefix="gemlora-hardening-"))
    try:
        model = work / "tiny"
        make_tiny_checkpoint("gemma3", model, vocab_size=262144, max_position_embeddings=32768)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(resolve_model_dir(None, progress=False) / name, model / name)
        engine = AsyncEngine.from_config(EngineConfig(model=str(model), dtype="float32", kv_cache_memory_gb=0.1),
                                         progress=False).start()
        settings = ServerSettings(model_names=(MODEL,), data_dir=work / "data", max_input_length=8 * 2**20)
        base, stop = start_uvicorn(create_app(engine, settings, Auth(TOKENS)))
        try:
            requests(base)
        finally:
            stop()
            engine.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
