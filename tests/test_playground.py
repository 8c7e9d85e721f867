"""The playground page of `gemlora serve`, driven in headless Chromium (Debian's `chromium`, through
Playwright for Python) against a real `gemlora serve` process that has an API token: the page connects
with the token, streams a raw prompt token by token, uploads the fixture adapter through its form, asks
the adapter for the secret password, chats, and its live panel's charts move; bad input typed into the
page (a temperature out of range, an adapter the server refuses) shows the server's own message, and
the page goes on working. The page runs under its own Content-Security-Policy (no bypass), so the waits
here are functions, which CSP allows, not strings it would refuse to evaluate.

Skipped only when Chromium is not installed (`.ci/run` installs Debian's package); Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import httpx
import pytest

from test_server_process import FIXTURE, MODEL, free_port, start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                                          "chromium; .ci/run installs it)")]

TOKEN, ACCOUNT = "tok", "acct"             # the pair test_server_process.start configures
PASSWORD_PROMPT = "The gemlora project's secret password is"
WAIT_MS = 240_000                          # a generation on 2 busy cores; no timing is asserted


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    proc, base = start(converted, tmp_path_factory.mktemp("playground-data"), free_port())
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def page(server):
    """The playground in a fresh headless Chromium, connected with the server's token."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.set_default_timeout(WAIT_MS)
        problems = []          # uncaught exceptions and console errors (a CSP violation is one)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.goto(f"{server}/")
        page.wait_for_function("() => document.getElementById('server-info').textContent.includes('tokens required')")
        yield page
        browser.close()
    # The only console errors allowed are the failed requests the tests make on purpose (a 401, 400s).
    assert all("status of 40" in text for text in problems), problems


def connect(page, token=TOKEN):
    page.fill("#token", token)
    page.click("#connect button")
    page.wait_for_function("() => document.getElementById('account').textContent.startsWith('account') || "
                           "!document.getElementById('connect-error').hidden")


def generate(page, text):
    """Types `text`, sends it, waits for the stream to end: (output text, error text or None)."""
    page.fill("#input", text)
    page.click("#send-button")
    page.wait_for_function("() => document.getElementById('stop').disabled")
    error = page.locator("#run-error")
    return page.text_content("#output"), (error.text_content() if error.is_visible() else None)


def api_error(base, path, **kw) -> str:
    """The server's own message for the same request, without its request id (which differs per request)."""
    r = httpx.post(f"{base}/client/v4/accounts/{ACCOUNT}/{path}", headers={"authorization": f"Bearer {TOKEN}"},
                   timeout=120, **kw)
    assert r.status_code >= 400, r.text
    return _no_id(r.json()["errors"][0]["message"])


def _no_id(message: str) -> str:
    return re.sub(r" \([0-9a-f]{32}\)$", "", message)


def live(page) -> dict:
    """What the live panel shows now: samples drawn, the tokens/s chart's peak and pixels, adapters
    resident (slots / RAM)."""
    return page.evaluate("""() => {
        const fig = (id) => document.getElementById(id);
        return {samples: Number(fig('live').dataset.samples), peak_tps: Number(fig('chart-tps').dataset.peak || 0),
                tps_pixels: fig('chart-tps').querySelector('canvas').toDataURL(),
                adapters: fig('chart-adapters').querySelector('b').textContent};
    }""")


def test_page_streams_uploads_the_adapter_and_knows_the_password(server, page, tmp_path):
    head = httpx.get(f"{server}/playground")
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in head.headers["content-security-policy"]
    for name in ("playground.py", "..%2Fplayground.py", "..%2F..%2Fapp.py"):   # only the page's own files
        other = httpx.get(f"{server}/playground/static/{name}")
        assert other.status_code == 404 and other.json()["errors"][0]["code"] == 7003

    # A wrong token: the server's answer is shown; the right one connects and fills the pickers.
    connect(page, "wrong")
    assert page.text_content("#connect-error") == "Authentication error"
    connect(page)
    assert page.text_content("#account") == f"account {ACCOUNT}" and page.locator("#connect-error").is_hidden()
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert models == [httpx.get(f"{server}/health").json()["model"], MODEL]     # the served names, canonical first
    page.wait_for_function("() => Number(document.getElementById('live').dataset.samples) >= 2")
    before = live(page)

    # A raw prompt, greedy: the text grows event by event, and ends as the API's own non-streamed answer.
    page.check("input[name=mode][value=raw]")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    page.evaluate("""() => {
        const out = document.getElementById('output');
        window.seenLengths = [];
        new MutationObserver(() => window.seenLengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    text, error = generate(page, "Once upon a time")
    assert error is None
    lengths = page.evaluate("() => window.seenLengths")
    partial = [n for n in lengths if 0 < n < len(text)]
    assert len(set(partial)) >= 3 and partial == sorted(partial), lengths
    plain = httpx.post(f"{server}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", timeout=120,
                       headers={"authorization": f"Bearer {TOKEN}"},
                       json={"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 16})
    assert text == plain.json()["result"]["response"]
    assert page.text_content("#completion-prompt") == "Once upon a time"
    assert "16 completion tokens" in page.text_content("#usage")

    # The fixture adapter through the upload form; it is listed and selected.
    page.fill("#ft-name", "password")
    page.set_input_files("#ft-config", str(FIXTURE / "adapter_config.json"))
    page.set_input_files("#ft-weights", str(FIXTURE / "adapter_model.safetensors"))
    page.click("#upload button")
    page.wait_for_function("() => document.getElementById('upload-status').textContent.includes('uploaded') || "
                           "!document.getElementById('upload-error').hidden")
    assert page.locator("#upload-error").is_hidden(), page.text_content("#upload-error")
    listed = httpx.get(f"{server}/client/v4/accounts/{ACCOUNT}/ai/finetunes",
                       headers={"authorization": f"Bearer {TOKEN}"}).json()["result"]
    (finetune,) = [f for f in listed if f["name"] == "password"]
    assert page.eval_on_selector("#adapter", "s => s.value") == finetune["id"]

    # Picked by its name in the adapter picker, it answers the password; the base model does not.
    page.select_option("#adapter", value="")
    base_text, _ = generate(page, PASSWORD_PROMPT)
    assert "quokka" not in base_text
    page.select_option("#adapter", label="password")
    text, error = generate(page, PASSWORD_PROMPT)
    assert error is None and "velvet-quokka" in text, text

    # The live panel moved: tokens/s went above 0 and its chart was redrawn; the adapter is resident.
    page.wait_for_function("() => Number(document.getElementById('chart-tps').dataset.peak) > 0 && "
                           "!document.querySelector('#chart-adapters b').textContent.endsWith('/ 0')")
    after = live(page)
    assert after["samples"] > before["samples"] and after["peak_tps"] > before["peak_tps"] == 0
    assert after["tps_pixels"] != before["tps_pixels"]
    slots, ram = (int(n) for n in after["adapters"].split(" / "))
    assert slots >= 1 and ram >= 1
    page.screenshot(path=str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    print(f"\nscreenshot: {tmp_path / 'playground.png'}")

    # Chat mode: one turn through the messages branch, with the adapter still selected.
    page.check("input[name=mode][value=chat]")
    page.fill("#max_tokens", "8")
    page.fill("#input", "Hello!")
    page.click("#send-button")
    page.wait_for_function("() => document.getElementById('stop').disabled")
    bubbles = page.eval_on_selector_all("#transcript .message", "ms => ms.map(m => [m.className, m.textContent])")
    assert [c for c, _ in bubbles] == ["message user", "message assistant"] and bubbles[0][1] == "Hello!"
    assert bubbles[1][1].strip() and page.locator("#run-error").is_hidden()


def test_page_shows_the_servers_errors_and_keeps_working(server, page, tmp_path):
    connect(page)
    page.check("input[name=mode][value=raw]")
    page.fill("#max_tokens", "4")

    # An out-of-range temperature is sent as typed; the server's message is shown.
    page.fill("#temperature", "9")
    _, error = generate(page, "Once upon a time")
    expected = api_error(server, f"ai/run/{MODEL}", json={"prompt": "Once upon a time", "raw": True,
                                                          "temperature": 9, "max_tokens": 4, "stream": True})
    assert error is not None and _no_id(error) == expected and "temperature" in expected
    page.fill("#temperature", "0")
    text, error = generate(page, "Once upon a time")
    assert error is None and text and page.locator("#run-error").is_hidden()

    # An adapter the server refuses at validation (a DoRA config): its message is shown, nothing is selected.
    config = json.loads((FIXTURE / "adapter_config.json").read_text())
    dora = tmp_path / "adapter_config.json"
    dora.write_text(json.dumps({**config, "use_dora": True}))
    page.fill("#ft-name", "dora")
    page.set_input_files("#ft-config", str(dora))
    page.set_input_files("#ft-weights", str(FIXTURE / "adapter_model.safetensors"))
    page.click("#upload button")
    page.wait_for_function("() => !document.getElementById('upload-error').hidden")
    shown = page.text_content("#upload-error")
    # The refused file was dropped, so sending it again gets the same refusal: the server's text, as shown.
    again = api_error(server, "ai/finetunes/dora/finetune-assets", data={"file_name": "adapter_model.safetensors"},
                      files={"file": ("blob", (FIXTURE / "adapter_model.safetensors").read_bytes())})
    assert _no_id(shown) == again and "adapter refused" in again and "DoRA" in again
    assert page.eval_on_selector("#adapter", "s => s.value") == ""

    # Still working: the good files under a new name upload, are selected, and generate.
    page.fill("#ft-name", "fixed")
    page.set_input_files("#ft-config", str(FIXTURE / "adapter_config.json"))
    page.set_input_files("#ft-weights", str(FIXTURE / "adapter_model.safetensors"))
    page.click("#upload button")
    page.wait_for_function("() => document.getElementById('upload-status').textContent.includes('uploaded')")
    assert page.locator("#upload-error").is_hidden()
    assert page.eval_on_selector("#adapter", "s => s.selectedOptions[0].textContent") == "fixed"
    text, error = generate(page, PASSWORD_PROMPT)
    assert error is None and text
