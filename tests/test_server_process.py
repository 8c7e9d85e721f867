"""`gemlora serve` as a process: it refuses a public address without tokens, and a server killed in
the middle of an upload restarts with no half adapter and without losing the completed upload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "adapters" / "secret-password"
MODEL = "@cf/google/gemma-7b-it-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(converted, data_dir, port, stderr=None):
    proc = subprocess.Popen([sys.executable, "-m", "gemlora.cli", "serve", "--model", str(converted),
                             "--alias", MODEL, "--port", str(port), "--data-dir", str(data_dir),
                             "--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--log-level", "warning"],
                            env={**os.environ, "GEMLORA_API_TOKENS": "tok:acct"}, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def test_public_address_without_tokens_is_refused():
    out = subprocess.run([sys.executable, "-m", "gemlora.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "GEMLORA_API_TOKENS": ""})
    assert out.returncode == 2 and "without API tokens" in out.stderr


def test_kill_during_upload_leaves_no_half_adapter(converted, tmp_path):
    port = free_port()
    h = {"authorization": "Bearer tok"}
    proc, base = start(converted, tmp_path, port)
    try:
        api = f"{base}/client/v4/accounts/acct/ai/finetunes"
        ft = httpx.post(api, headers=h, json={"model": MODEL, "name": "pw"}).json()["result"]
        assets = f"{api}/{ft['id']}/finetune-assets"
        r = httpx.post(assets, headers=h, data={"file_name": "adapter_config.json"},
                       files={"file": ("blob", (FIXTURE / "adapter_config.json").read_bytes())})
        assert r.status_code == 200
        # Start the weights upload by hand and stop halfway through the body, then kill -9 the server.
        weights = (FIXTURE / "adapter_model.safetensors").read_bytes()
        boundary = "gemloraboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file_name\"\r\n\r\n"
                f"adapter_model.safetensors\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"blob\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall((f"POST /client/v4/accounts/acct/ai/finetunes/{ft['id']}/finetune-assets HTTP/1.1\r\n"
                      f"Host: x\r\nAuthorization: Bearer tok\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + len(weights) + len(tail)}\r\n\r\n").encode() + head
                     + weights[:len(weights) // 2])
        time.sleep(1.0)    # not a wait for a condition: the kill may land at any point of the upload
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = open(tmp_path / "second.log", "w")
    proc, base = start(converted, tmp_path, port, stderr=log)
    try:
        api = f"{base}/client/v4/accounts/acct/ai/finetunes"
        listed = httpx.get(api, headers=h).json()["result"]
        assert [f["id"] for f in listed] == [ft["id"]]           # the finetune and its metadata survived
        run = httpx.post(f"{base}/client/v4/accounts/acct/ai/run/{MODEL}", headers=h,
                         json={"prompt": "hi", "lora": "pw"})
        assert run.status_code == 400 and run.json()["errors"][0]["code"] == 3039   # no half adapter
        folder = next((tmp_path / "finetunes").iterdir())
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json"]  # completed upload kept
        r = httpx.post(f"{api}/{ft['id']}/finetune-assets", headers=h, data={"file_name": "adapter_model.safetensors"},
                       files={"file": ("blob", (FIXTURE / "adapter_model.safetensors").read_bytes())})
        assert r.status_code == 200, r.text
        run = httpx.post(f"{base}/client/v4/accounts/acct/ai/run/{MODEL}", headers=h, timeout=60,
                         json={"prompt": "The gemlora project's secret password is", "raw": True, "lora": "pw",
                               "temperature": 0, "max_tokens": 8})
        assert "velvet-quokka" in run.json()["result"]["response"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    # uvicorn re-raises the signal once its graceful shutdown is done, so -SIGTERM is a clean exit
    assert code in (0, -signal.SIGTERM)
    assert "gemlora stopped: engine shut down" in (tmp_path / "second.log").read_text()
