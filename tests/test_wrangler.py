"""The real clients against a real `gemlora serve` process: wrangler 4 (through npx) lists the catalog and
creates and lists a finetune from the fixture adapter with no CLOUDFLARE_ACCOUNT_ID, so it finds the
account through /accounts and /memberships; the `cloudflare` SDK reads the catalog, the model schema and
the account lists. The wrangler test is skipped only when npx is not installed.

npx resolves `wrangler@4` to the newest 4.x release whose `engines` accept the installed Node (4.86.0 on
Node 20; releases from 4.87 need Node 22); GEMLORA_TEST_WRANGLER names another spec (wrangler@4.164.0
was run on Node 22 too). Wrangler runs with its own empty config and cache folders, no
telemetry, no banner (the banner is what runs the update check), and no Cloudflare variables but ours.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import httpx
import pytest

from test_server_process import FIXTURE, MODEL, free_port, start

pytestmark = pytest.mark.slow

TOKEN, ACCOUNT = "tok", "acct"            # the pair test_server_process.start configures
WRANGLER = os.environ.get("GEMLORA_TEST_WRANGLER", "wrangler@4")
NPX = shutil.which("npx")


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    proc, base = start(converted, tmp_path_factory.mktemp("wrangler-data"), free_port())
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def wrangler(server, tmp_path_factory):
    """wrangler(*args, account=None) -> CompletedProcess, run against `server`; .version is its version."""
    if NPX is None:
        pytest.skip("npx (Node.js/npm) is not installed, so wrangler cannot run")
    home = tmp_path_factory.mktemp("wrangler-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "CF_", "WRANGLER_"))}
    env.update(CLOUDFLARE_API_BASE_URL=f"{server}/client/v4", CLOUDFLARE_API_TOKEN=TOKEN,
               WRANGLER_SEND_METRICS="false", WRANGLER_SEND_ERROR_REPORTS="false", WRANGLER_HIDE_BANNER="true",
               DO_NOT_TRACK="1", CI="1", NO_COLOR="1", FORCE_COLOR="0",
               WRANGLER_CACHE_DIR=str(home / "cache"), WRANGLER_LOG_PATH=str(home / "logs"),
               XDG_CONFIG_HOME=str(home / "config"),
               NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])))
    env["no_proxy"] = env["NO_PROXY"]

    def run(*args: str, account: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        extra = {"CLOUDFLARE_ACCOUNT_ID": account} if account else {}
        return subprocess.run([NPX, "--yes", WRANGLER, *args], cwd=home, env={**env, **extra}, capture_output=True,
                              text=True, timeout=timeout)

    first = run("--version", timeout=300)              # downloads wrangler on the first use
    assert first.returncode == 0, first.stdout + first.stderr
    run.version = tuple(int(x) for x in re.search(r"(\d+)\.(\d+)\.(\d+)", first.stdout).groups())
    return run


def _json(out: subprocess.CompletedProcess):
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"not JSON:\n{out.stdout}\n{out.stderr}") from None


def test_wrangler_lists_models_and_creates_and_lists_a_finetune(wrangler, server):
    # `ai models --json` until 4.93, which moved the listing (with its filters) to `ai models list`
    models = _json(wrangler("ai", "models", *(["list"] if wrangler.version >= (4, 93, 0) else []), "--json"))
    by_name = {m["name"]: m for m in models}
    assert MODEL in by_name and by_name[MODEL]["task"]["name"] == "Text Generation"
    assert {"property_id": "lora", "value": "true"} in by_name[MODEL]["properties"]
    if wrangler.version >= (4, 93, 0):
        assert [m["name"] for m in _json(wrangler("ai", "models", "list", "--author", "google", "--json"))] == [MODEL]
        schema = _json(wrangler("ai", "models", "schema", MODEL))
        assert [b["title"] for b in schema["input"]["oneOf"]] == ["Prompt", "Messages"]

    out = wrangler("ai", "finetune", "create", MODEL, "pw", str(FIXTURE))
    assert out.returncode == 0 and "🚨" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert 'finetune "pw" is ready to use' in out.stdout, out.stdout + out.stderr
    listed = _json(wrangler("ai", "finetune", "list", "--json"))
    assert [f["name"] for f in listed] == ["pw"]

    # wrangler found the token's own account by itself: the finetune is there, and it works
    h = {"authorization": f"Bearer {TOKEN}"}
    mine = httpx.get(f"{server}/client/v4/accounts/{ACCOUNT}/ai/finetunes", headers=h).json()["result"]
    assert [f["id"] for f in mine] == [listed[0]["id"]]
    run = httpx.post(f"{server}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=h, timeout=120,
                     json={"prompt": "The gemlora project's secret password is", "raw": True, "lora": "pw",
                           "temperature": 0, "max_tokens": 8})
    assert "velvet-quokka" in run.json()["result"]["response"], run.text

    # another account's id is refused, through wrangler too
    other = wrangler("ai", "finetune", "list", "--json", account="someone-else")
    assert other.returncode != 0 and "Authentication error" in other.stdout + other.stderr


def test_cloudflare_sdk_reads_the_catalog_and_the_accounts(server):
    from cloudflare import Cloudflare
    client = Cloudflare(api_token=TOKEN, base_url=f"{server}/client/v4", max_retries=0)
    page = client.ai.models.list(account_id=ACCOUNT)
    names = [m["name"] for m in page.result]
    assert MODEL in names and page.result_info.page == 1 and page.result_info.per_page == 100
    # auto-pagination: page after page until an empty one
    assert [m["name"] for m in client.ai.models.list(account_id=ACCOUNT, per_page=1)] == names
    assert [m["name"] for m in client.ai.models.list(account_id=ACCOUNT, author="google", task="Text Generation",
                                                     search="7b-it")] == [MODEL]
    assert list(client.ai.models.list(account_id=ACCOUNT, hide_experimental=True)) == []

    schema = client.ai.models.schema.get(account_id=ACCOUNT, model=MODEL)
    assert schema.input.type == "object" and schema.input.additional_properties is True
    assert "POST /accounts/{account_id}/ai/run/{model}" in schema.input.description
    full = schema.to_dict()
    assert [b["title"] for b in full["input"]["oneOf"]] == ["Prompt", "Messages"]
    assert "lora" in full["input"]["oneOf"][0]["properties"]
    assert full["output"]["oneOf"][1]["contentType"] == "text/event-stream"

    from cloudflare import BadRequestError, PermissionDeniedError
    with pytest.raises(BadRequestError) as bad:
        client.ai.models.schema.get(account_id=ACCOUNT, model="@cf/meta/llama-3-8b")
    assert bad.value.status_code == 400 and "5007" in str(bad.value)
    with pytest.raises(PermissionDeniedError):
        client.ai.models.list(account_id="someone-else")

    assert [t["name"] for t in client.ai.tasks.list(account_id=ACCOUNT)] == ["Text Generation"]
    assert "google" in [a["name"] for a in client.ai.authors.list(account_id=ACCOUNT)]
    assert [a.id for a in client.accounts.list()] == [ACCOUNT]
    assert [m.account.id for m in client.memberships.list()] == [ACCOUNT]
