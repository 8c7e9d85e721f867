"""Request size bounds, against a real server (the tiny random Gemma 3 of tests/test_api_hardening.py):
bodies refused before they are read or as they pass the limit, uploads bounded, the message count
capped, and parsing and tokenizing off the event loop, so one large request cannot stall another's stream."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from test_api_hardening import ALICE, BOB, MODEL, pace_during, run_url, server, tiny_adapter_files  # noqa: F401


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raw_http(base: str, head: str, body_chunks=(), timeout: float = 10.0) -> tuple[int, dict, float]:
    """Sends `head` then the chunks (stopping at the first write the server refuses) and reads the answer:
    (status, JSON body, seconds from the head's sending to the answer's status line)."""
    import socket
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:          # the server answered and closed: stop sending
                break
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        took = time.monotonic() - start
        head_part, _, rest = data.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head_part.decode().split("\r\n")[1:])
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                break
            rest += more
    return int(head_part.split()[1]), json.loads(rest[:length] or b"{}"), took


@pytest.mark.parametrize("path, dialect", [("/client/v4/accounts/alice/ai/run/" + MODEL, "workers"),
                                           ("/v1/chat/completions", "openai")])
def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(server, path, dialect):
    """50 MB announced: the 413 comes back at once, in the caller's dialect, without the body being read."""
    base, engine = server()
    before = rss_bytes()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * 2**20}\r\n\r\n")
    status, body, took = raw_http(base, head, [b'{"prompt": "' + b"a" * 65536])
    assert status == 413 and took < 1.0, (status, body, took)
    if dialect == "workers":
        assert body["success"] is False and body["errors"][0]["code"] == 3006
        assert body["errors"][0]["message"].startswith("Request is too large: the body (52428800 bytes) is over")
    else:
        assert body["error"]["code"] == "request_too_large" and "8388608 bytes" in body["error"]["message"]
    assert rss_bytes() - before < 50 * 2**20
    assert httpx.get(f"{base}/health").status_code == 200


def test_a_chunked_body_is_counted_and_refused_at_the_limit(server):
    """No Content-Length (chunked): the server reads up to its limit, not the 50 MB sent, and answers 413."""
    base, engine = server()
    before = rss_bytes()
    head = (f"POST {run_url(base)[len(base):]} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    mib = b"a" * 2**20
    chunks = (b"%x\r\n%s\r\n" % (len(mib), mib) for _ in range(50))
    status, body, took = raw_http(base, head, chunks, timeout=30)
    assert status == 413 and body["errors"][0]["code"] == 3006, (status, body)
    assert "over this route's limit of 8388608 bytes" in body["errors"][0]["message"]
    assert rss_bytes() - before < 50 * 2**20
    assert httpx.post(run_url(base), headers=ALICE, json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_an_upload_over_the_adapter_limit_is_refused_without_filling_the_disk(server, tmp_path):
    base, engine = server(settings={"max_adapter_file_bytes": 2**20})
    assert httpx.post(f"{base}/client/v4/accounts/bob/ai/finetunes", headers=BOB,
                      json={"model": MODEL, "name": "big"}).status_code == 200
    url = f"{base}/client/v4/accounts/bob/ai/finetunes/big/finetune-assets"
    r = httpx.post(url, headers=BOB, data={"file_name": "adapter_model.safetensors"},
                   files={"file": ("f", b"\0" * (3 * 2**20))})
    assert r.status_code == 413, r.text
    assert r.json()["errors"][0]["code"] == 3006
    listed = httpx.get(f"{base}/client/v4/accounts/bob/ai/finetunes/big", headers=BOB).json()["result"]
    assert not list((tmp_path / "data").rglob("adapter_model.safetensors")), listed
    ok = httpx.post(url, headers=BOB, data={"file_name": "adapter_config.json"},
                    files={"file": ("f", tiny_adapter_files(engine)["adapter_config.json"])})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("url, body", [
    ("/client/v4/accounts/alice/ai/run/" + MODEL, {}),
    ("/v1/chat/completions", {"model": MODEL}),
])
def test_more_messages_than_the_cap_are_a_400_naming_the_field(server, url, body):
    from gemlora.api.schemas import MAX_MESSAGES
    base, engine = server()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * (MAX_MESSAGES // 2)
    r = httpx.post(base + url, headers=ALICE, json={**body, "messages": messages + [{"role": "user", "content": "x"}],
                                                     "max_tokens": 1})
    assert r.status_code == 400, r.text
    text = json.dumps(r.json())
    assert "messages" in text and f"{MAX_MESSAGES} items" in text


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server):
    """A 1.9 MB prompt (under the body limit, with the character cap lifted) takes a second or more to
    tokenize; meanwhile another tenant's stream keeps its pace. (Tokenizers' `encode` held the GIL.)"""
    base, engine = server(settings={"max_input_length": 8 * 2**20})
    big = {"prompt": "lorem ipsum dolor sit amet, " * 68_000, "max_tokens": 1}
    assert len(big["prompt"]) // (2 * engine.tokenizer.max_token_chars) < engine.max_model_len   # it is tokenized

    async def send_big(client):
        return await client.post(run_url(base, "bob"), headers=BOB, json=big)

    during, big_done = pace_during(base, send_big)
    r = big_done["result"]
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 5021, r.text   # the context window's refusal
    assert during and max(during) < 1.0, (max(during), big_done["end"] - big_done["start"])


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(server, monkeypatch):
    base, engine = server(settings={"max_input_length": 8 * 2**20})
    seen: list[int] = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, **kw: seen.append(len(text)) or encode(text, **kw))
    r = httpx.post(run_url(base), headers=ALICE, json={"prompt": "lorem ipsum dolor sit amet, " * 220_000,
                                                       "max_tokens": 1}, timeout=60)
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 5021, r.text
    assert not [n for n in seen if n > 10_000]
    r = httpx.post(run_url(base), headers=ALICE, json={"prompt": "Hello", "max_tokens": 1})
    assert r.status_code == 200 and seen


def test_a_huge_unknown_field_is_neither_walked_nor_stalls_the_server(server):
    """5 MB of zeros in an unknown field: the lone-surrogate walk built a path tuple per element on the event
    loop (+541 MB RSS, /health 2 s late). Unknown fields are not walked, bodies without a surrogate escape
    are not walked at all, and parsing runs off the loop."""
    from gemlora.api.schemas import _lone_surrogate
    base, engine = server()
    body = b'{"prompt": "Hi", "max_tokens": 1, "junk": [' + b"0," * 2_500_000 + b'0]}'
    before = rss_bytes()
    r = httpx.post(run_url(base), headers={**ALICE, "content-type": "application/json"}, content=body, timeout=60)
    assert r.status_code == 200, r.text
    assert rss_bytes() - before < 200 * 2**20
    # the walk still finds a lone surrogate where it is read, at any depth, and in keys
    data = {"messages": [{"role": "user", "content": "ok \ud83d\ude00"}, {"role": "user", "content": ["x", "\udfff"]}]}
    raw = json.dumps(data).encode()
    assert _lone_surrogate(json.loads(raw), raw) == ("messages", 1, "content", 1)
    assert _lone_surrogate({"junk": "\udfff"}, b'{"junk": "\\udfff"}', ("prompt",)) is None
    assert _lone_surrogate({"prompt": {"\udfff": 1}}, b'{"prompt": {"\\udfff": 1}}') == ("prompt", "\udfff")
    assert _lone_surrogate({"prompt": "\udfff"}, b'{"prompt": "x"}') is None     # no escape in the raw text
    raw_encoded = b'{"prompt": "a\xed\xbf\xbf"}'                                  # CESU bytes, no escape
    assert _lone_surrogate(json.loads(raw_encoded), raw_encoded) == ("prompt",)
