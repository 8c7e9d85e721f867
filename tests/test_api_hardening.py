"""What a hostile or careless caller sends, against a real server (a tiny random Gemma 3 with the
embedded model's tokenizer, so it steps in milliseconds): no request reaches another's, nothing a
caller sends is a 5xx, and the engine cannot die or hang quietly."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port, tiny_lora_tensors
from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.sampling import InvalidRequestError

MODEL = "@cf/google/gemma-7b-it-lora"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
ALICE = {"authorization": "Bearer tok-alice"}
BOB = {"authorization": "Bearer tok-bob"}


@pytest.fixture
def server(tiny_real_vocab, tmp_path, serving):
    """server(settings=None, **engine_config) -> (base URL, AsyncEngine); `settings`: ServerSettings fields."""
    engines = []

    def make(settings: dict | None = None, **cfg):
        engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32",
                                                      kv_cache_memory_gb=0.1, **cfg), progress=False).start()
        engines.append(engine)
        app = create_app(engine, ServerSettings(model_names=(MODEL,), data_dir=tmp_path / "data", **(settings or {})),
                         Auth(TOKENS))
        return serving(app), engine

    yield make
    for engine in engines:
        engine.shutdown()


def run_url(base, account="alice"):
    return f"{base}/client/v4/accounts/{account}/ai/run/{MODEL}"


def wait_idle(engine, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not engine.engine.has_work() and engine.stats().kv_blocks_used == 0:
            return True
        time.sleep(0.02)
    return False


def test_two_callers_sending_the_same_request_id_each_get_only_their_own_output(server):
    base, engine = server()
    same = {"cf-ai-req-id": "shared-id-0001"}
    bodies = {"alice": {"prompt": "The capital of France is", "raw": True, "stream": True, "max_tokens": 40,
                        "temperature": 0},
              "bob": {"prompt": "Rain falls on the", "raw": True, "stream": True, "max_tokens": 40, "temperature": 0}}
    headers = {"alice": {**ALICE, **same}, "bob": {**BOB, **same}}

    async def one(client, who):
        async with client.stream("POST", run_url(base, who), json=bodies[who], headers=headers[who]) as r:
            assert r.status_code == 200
            assert r.headers["cf-ai-req-id"] != "shared-id-0001" and r.headers["x-client-request-id"] == "shared-id-0001"
            events = [json.loads(line[6:]) async for line in r.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(e["response"] for e in events), events[-1]["usage"]["completion_tokens"]

    async def both():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(one(client, "alice"), one(client, "bob")), 60)

    together = asyncio.run(both())
    alone = {who: httpx.post(run_url(base, who), headers=headers[who], timeout=60,
                             json={**bodies[who], "stream": False}).json()["result"] for who in ("alice", "bob")}
    for (text, n), who in zip(together, ("alice", "bob")):
        assert n == alone[who]["usage"]["completion_tokens"] == 40      # every token its own, none of the other's
        assert text == alone[who]["response"]
    assert wait_idle(engine)


@pytest.mark.parametrize("route", ["workers_ai", "openai"])
def test_a_lone_surrogate_anywhere_is_a_400_in_the_dialects_envelope(server, route):
    base, _ = server()
    for where in ("messages", "stop"):
        if route == "workers_ai":
            url = run_url(base)
            body = '{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2}' if where == "messages" \
                else '{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}'
        else:
            url = f"{base}/v1/chat/completions"
            body = ('{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}' % MODEL
                    if where == "messages" else
                    '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}' % MODEL)
        r = httpx.post(url, content=body, headers={**ALICE, "content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        if route == "workers_ai":
            err = r.json()["errors"][0]
            assert err["code"] == 5006 and "surrogate" in err["message"] and f"/{where}" in err["message"]
        else:
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and "surrogate" in err["message"]
            assert err["param"].startswith(where)
    name = httpx.post(f"{base}/client/v4/accounts/alice/ai/finetunes", headers=ALICE,
                      content='{"model": "%s", "name": "a\\udfffb"}' % MODEL)
    assert name.status_code == 400 and name.json()["errors"][0]["code"] == 5006
    ok = httpx.post(run_url(base), json={"prompt": "hi", "max_tokens": 2}, headers=ALICE, timeout=30)
    assert ok.status_code == 200


def test_a_non_ascii_authorization_header_is_a_401_in_the_envelope(server):
    base, _ = server()
    for token in ("Bearer t\xe9st".encode("latin-1"), "Bearer ünïcode".encode("utf-8"), b"Bearer \xff\xfe"):
        r = httpx.post(run_url(base), json={"prompt": "hi"}, headers={"authorization": token}, timeout=30)
        assert r.status_code == 401 and r.json()["errors"][0] == {"code": 10000, "message": "Authentication error"}
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers={"authorization": token})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_a_long_generation_aborts_it(server, stream):
    base, engine = server()
    body = {"prompt": "Count:", "raw": True, "max_tokens": 20000, "temperature": 0.7, "stream": stream}
    if stream:                            # read a few events, then hang up
        with httpx.stream("POST", run_url(base), json=body, headers=ALICE, timeout=30) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(6)][0].startswith("data: ")
    else:                                 # nothing arrives before the end: give up after a second
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(run_url(base), json=body, headers=ALICE, timeout=httpx.Timeout(1.0))
    left = time.monotonic()
    assert wait_idle(engine, 10), "the generation kept running after its client left"
    assert time.monotonic() - left < 10
    assert httpx.post(run_url(base), json={"prompt": "hi", "max_tokens": 2}, headers=ALICE).status_code == 200


def test_stop_is_honoured_and_output_changing_fields_are_refused_on_ai_run(server):
    base, _ = server()
    free = httpx.post(run_url(base), headers=ALICE, timeout=30,
                      json={"prompt": "One two three", "raw": True, "max_tokens": 30, "temperature": 0}).json()
    text = free["result"]["response"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = httpx.post(run_url(base), headers=ALICE, timeout=30,
                     json={"prompt": "One two three", "raw": True, "max_tokens": 30, "temperature": 0, "stop": [stop]})
    assert cut.status_code == 200 and cut.json()["result"]["response"] == text[:text.index(stop)]
    for field, value in (("response_format", {"type": "json"}),
                         ("response_format", {"type": "json_schema", "json_schema": {"not": {"type": "object"}}}),
                         ("guided_json", {"type": "object", "properties": {"a": {"uniqueItems": True}}}),
                         ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                         ("functions", [{"name": "f", "code": "x"}]),
                         ("stop", [""]), ("stop", 5)):
        r = httpx.post(run_url(base), headers=ALICE, json={"prompt": "hi", field: value}, timeout=60)  # busy CI
        assert r.status_code == 400, (field, r.text)
        err = r.json()["errors"][0]
        assert err["code"] == 5006 and f"'/{field}'" in err["message"], err
    plain = httpx.post(run_url(base), headers=ALICE, timeout=60, json={"prompt": "hi", "max_tokens": 2,
                                                                       "response_format": {"type": "text"}, "tools": []})
    assert plain.status_code == 200


def test_reject_if_busy_is_a_429_only_when_requests_queue(server):
    base, engine = server(max_num_seqs=1)
    idle = httpx.post(run_url(base), headers=ALICE, json={"prompt": "hi", "max_tokens": 2,
                                                          "options": {"rejectIfBusy": True}})
    assert idle.status_code == 200

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            long = [asyncio.ensure_future(client.post(run_url(base), headers=ALICE, json={"prompt": "x", "max_tokens": 150}))
                    for _ in range(2)]
            for _ in range(200):                          # one runs, one waits
                if engine.stats().waiting:
                    break
                await asyncio.sleep(0.01)
            busy = await client.post(run_url(base), headers=ALICE,
                                     json={"prompt": "hi", "max_tokens": 2, "options": {"rejectIfBusy": True}})
            await asyncio.gather(*long)
            return busy

    busy = asyncio.run(main())
    assert busy.status_code == 429 and busy.json()["errors"][0]["code"] == 3040


def test_a_refusal_raised_inside_the_engine_is_a_400_not_a_500(server, monkeypatch):
    base, engine = server()

    def refuse(*args, **kwargs):
        raise InvalidRequestError("refused on the engine thread", "prompt")

    monkeypatch.setattr(engine.engine, "add_request", refuse)
    r = httpx.post(run_url(base), headers=ALICE, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    assert "refused on the engine thread" in r.json()["errors"][0]["message"]
    r = httpx.post(f"{base}/v1/completions", headers=ALICE, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_health_tells_whether_the_engine_loop_runs(server):
    base, engine = server()
    ok = httpx.get(f"{base}/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"

    class Fatal(BaseException):     # past every guard in the loop, as a bug in the loop itself would be
        pass

    def die():
        raise Fatal("injected")

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            engine.engine.has_work = die           # the next loop iteration raises outside every step guard
            pending = client.post(run_url(base), headers=ALICE, json={"prompt": "hi", "max_tokens": 5})
            return await asyncio.wait_for(pending, 20)       # must not hang

    r = asyncio.run(main())
    assert r.status_code == 503 and r.json()["errors"][0]["code"] == 3000
    dead = httpx.get(f"{base}/health")
    assert dead.status_code == 503 and dead.json()["status"] == "unavailable" and "Fatal" in dead.json()["engine"]
    again = httpx.post(f"{base}/v1/completions", headers=ALICE, json={"model": MODEL, "prompt": "hi"})
    assert again.status_code == 503 and again.json()["error"]["type"] == "api_error"
    assert "gemlora_engine_up 0.0" in httpx.get(f"{base}/metrics").text


def test_every_serve_option_reads_its_environment_variable(tiny_real_vocab, tmp_path):
    port = free_port()
    env = {**os.environ, "GEMLORA_MODEL": str(tiny_real_vocab), "GEMLORA_PORT": str(port),
           "GEMLORA_DATA_DIR": str(tmp_path / "from-env"), "GEMLORA_ALIAS": f"{MODEL} other-name",
           "GEMLORA_DTYPE": "float32", "GEMLORA_KV_CACHE_MEMORY_GB": "0.05", "GEMLORA_MAX_NUM_SEQS": "3",
           "GEMLORA_LOG_LEVEL": "warning", "GEMLORA_API_TOKENS": "tok:acct"}
    proc = subprocess.Popen([sys.executable, "-m", "gemlora.cli", "serve"], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("gemlora serve did not come up on GEMLORA_PORT")
        r = httpx.post(f"{base}/client/v4/accounts/acct/ai/run/other-name", headers={"authorization": "Bearer tok"},
                       json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        assert (tmp_path / "from-env").is_dir()
    finally:
        proc.terminate()
        proc.wait(30)
    out = subprocess.run([sys.executable, "-m", "gemlora.cli", "serve", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    import re
    options = set(re.findall(r"--([a-z][a-z-]+)", out.stdout)) - {"help"}
    options = {o for o in options if not (o.startswith("no-") and o[3:] in options)}   # --x/--no-x: one env var
    envs = set(re.findall(r"GEMLORA_([A-Z_]+)", out.stdout)) - {"API_TOKENS"}
    assert {o.replace("-", "_").upper() for o in options} == envs


def tiny_adapter_files(engine, regex: str | None = None) -> dict[str, bytes]:
    """A q_proj LoRA for the tiny model (rank 2, every layer); `regex` as its target_modules if given."""
    from safetensors.torch import save
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": regex or ["q_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save(tiny_lora_tensors(engine.model_config))}


def pace_during(base: str, action) -> tuple[list[float], dict]:
    """Alice streams greedy tokens; once ten have arrived, `await action(client)` runs. Returns the gaps
    between Alice's tokens that overlap the action, and {"result", "start", "end"} of the action."""
    async def main():
        arrivals: list[float] = []
        streaming, done = asyncio.Event(), {}
        async with httpx.AsyncClient(timeout=120) as client:
            async def act():
                await streaming.wait()
                done["start"] = time.monotonic()
                done["result"] = await action(client)
                done["end"] = time.monotonic()

            task = asyncio.create_task(act())
            body = {"model": MODEL, "prompt": "Count:", "max_tokens": 20000, "ignore_eos": True, "stream": True,
                    "temperature": 0}
            async with client.stream("POST", f"{base}/v1/completions", json=body, headers=ALICE) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())
                        if len(arrivals) == 10:
                            streaming.set()
                    if "end" in done and arrivals[-1] > done["end"] + 0.5:     # half a second past the action
                        break
            await asyncio.wait_for(task, 60)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= done["start"] and a <= done["end"]]
        return gaps, done

    return asyncio.run(asyncio.wait_for(main(), 180))


def test_a_hostile_adapter_regex_is_refused_while_another_tenants_stream_keeps_its_pace(server):
    """`(.*.*)*x` as target_modules never returned under Python's re, holding the GIL: every stream, upload
    and health check froze. Now it is evaluated in linear time and refused, and Alice's stream never stalls."""
    base, engine = server()
    evil = tiny_adapter_files(engine, "(.*.*)*x")
    ft = httpx.post(f"{base}/client/v4/accounts/bob/ai/finetunes", headers=BOB, json={"model": MODEL, "name": "evil"})
    assert ft.status_code == 200
    upload_url = f"{base}/client/v4/accounts/bob/ai/finetunes/evil/finetune-assets"

    async def upload(client):
        for name, data in evil.items():
            r = await client.post(upload_url, headers=BOB, data={"file_name": name}, files={"file": ("f", data)})
        return r

    during, upload_done = pace_during(base, upload)
    r = upload_done["result"]
    assert r.status_code == 400, r.text
    err = r.json()["errors"][0]
    assert err["code"] == 5006 and "(.*.*)*x" in err["message"] and "matches no module" in err["message"]
    assert upload_done["end"] - upload_done["start"] < 10
    assert during, "the stream must have run while the upload was checked"
    assert max(during) < 2.0, f"the stream stalled {max(during):.2f} s during the upload"
    assert httpx.get(f"{base}/health").status_code == 200
    assert wait_idle(engine)


def test_a_restart_over_a_stored_hostile_config_comes_up_and_names_the_refusal(server, tmp_path):
    """A data dir whose stored config never returned under Python's re (written by an older gemlora): the
    next start comes up at once, other finetunes serve, and the hostile one answers a 400 saying why."""
    base, engine = server()
    ids = {}
    for name in ("evil", "fine"):
        r = httpx.post(f"{base}/client/v4/accounts/bob/ai/finetunes", headers=BOB, json={"model": MODEL, "name": name})
        ids[name] = r.json()["result"]["id"]
        for file_name, data in tiny_adapter_files(engine).items():
            r = httpx.post(f"{base}/client/v4/accounts/bob/ai/finetunes/{name}/finetune-assets", headers=BOB,
                           data={"file_name": file_name}, files={"file": ("f", data)})
            assert r.status_code == 200, r.text
    engine.shutdown()
    config = tmp_path / "data" / "finetunes" / ids["evil"] / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": "(.*.*)*x"}))
    os.utime(config, ns=(time.time_ns() + 10**9,) * 2)                  # the config was written last
    # ... and its validation never finished (the old server hung in it)
    with sqlite3.connect(tmp_path / "data" / "finetunes.sqlite3") as db:
        db.execute("UPDATE finetunes SET summary = NULL WHERE id = ?", (ids["evil"],))

    start = time.monotonic()
    base, engine = server()
    assert time.monotonic() - start < 60 and httpx.get(f"{base}/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    r = httpx.post(run_url(base, "bob"), headers=BOB, json={**body, "lora": "evil"})
    assert r.status_code == 400, r.text
    err = r.json()["errors"][0]
    assert err["code"] == 3039 and "cannot be used" in err["message"] and "(.*.*)*x" in err["message"]
    assert "upload a corrected one" in err["message"] and str(tmp_path) not in err["message"]
    assert httpx.post(run_url(base, "bob"), headers=BOB, json={**body, "lora": "fine"}).status_code == 200


@pytest.mark.parametrize("args, option, why", [
    (["--host", ""], "--host", "every interface"),
    (["--port", "70000"], "--port", "less than or equal to 65535"),
    (["--port", "0"], "--port", "greater than or equal to 1"),
    (["--kv-cache-memory-gb", "nan"], "--kv-cache-memory-gb", "finite number above 0, not nan"),
    (["--kv-cache-memory-gb", "inf"], "--kv-cache-memory-gb", "finite number above 0, not inf"),
    (["--attention-workspace-gb", "-1"], "--attention-workspace-gb", "finite number above 0"),
    (["--max-input-length", "-5"], "--max-input-length", "greater than or equal to 1"),
    (["--max-body-mb", "0"], "--max-body-mb", "finite number above 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs", "greater than or equal to 1"),
    (["--max-model-len", "-1"], "--max-model-len", "greater than or equal to 1"),
    (["--quant-activations", "int4"], "--quant-activations", "must be one of auto, int8, int8x2, int16"),
])
def test_every_option_is_validated_at_start_naming_it(tiny_real_vocab, tmp_path, args, option, why):
    """Before: '' passed the loopback guard and bound every interface anonymously, port 70000 listened on
    4464, nan passed `<= 0` and died after loading the model, -5 gave every prompt a 500."""
    out = subprocess.run([sys.executable, "-m", "gemlora.cli", "serve", *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "GEMLORA_MODEL": str(tiny_real_vocab),
                                           "GEMLORA_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    text = " ".join(out.stderr.replace("│", " ").split())
    assert option in text and why in text, out.stderr[-2000:]
    env = option[2:].replace("-", "_").upper()
    if args[1]:                   # the same through the environment (an empty variable counts as unset)
        out = subprocess.run([sys.executable, "-m", "gemlora.cli", "serve"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "GEMLORA_MODEL": str(tiny_real_vocab),
                                               "GEMLORA_DATA_DIR": str(tmp_path), f"GEMLORA_{env}": args[1]})
        assert out.returncode == 2 and why in " ".join(out.stderr.replace("│", " ").split()), out.stderr[-2000:]


def test_library_settings_refuse_what_the_cli_refuses():
    from gemlora.api.auth import is_loopback
    assert not is_loopback("") and is_loopback("127.0.0.1") and is_loopback("localhost")
    with pytest.raises(ValueError, match="kv_cache_memory_gb must be a finite number above 0, not nan"):
        EngineConfig(kv_cache_memory_gb=float("nan"))
    with pytest.raises(ValueError, match="max_input_length must be a positive integer"):
        ServerSettings(model_names=(MODEL,), data_dir=".", max_input_length=-5)
