// gemlora playground: plain JS, no framework, no build step. It talks to the server only through the
// public API any client uses: /health, /accounts, the catalog and finetunes routes, ai/run with SSE, and
// /metrics. Server text is only ever put in the page with textContent, never as HTML.
// Paths are relative (no leading /), so the page also works behind a proxy that adds a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: "", account: null, chat: [], own: [], abort: null };
const FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
                "presence_penalty", "lora_scale"];

// ---- HTTP -----------------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  // The token goes in the Authorization header and nowhere else (not stored, not in any URL).
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

function errorText(body, response) {
  if (body && Array.isArray(body.errors) && body.errors.length) return body.errors[0].message;  // Workers AI
  if (body && body.error && body.error.message) return body.error.message;                        // OpenAI
  return `HTTP ${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  const body = await response.json().catch(() => null);
  if (!response.ok || !body || body.success === false) throw new Error(errorText(body, response));
  return body.result;
}

const accountPath = () => `client/v4/accounts/${encodeURIComponent(state.account)}/ai`;

function showError(id, message) {
  const el = $(id);
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- Account, models and finetunes ----------------------------------------------------------------

async function connect(event) {
  if (event) event.preventDefault();
  showError("connect-error", "");
  state.token = $("token").value.trim();
  state.account = null;
  $("account").textContent = "";
  try {
    const health = await (await fetch("health")).json();
    $("server-info").textContent = `${health.model} · engine ${health.engine} · ` +
      (health.anonymous ? "no API tokens: anonymous requests accepted" : "API tokens required");
    if (!health.anonymous && !state.token) {
      $("account").textContent = "enter one of this server's API tokens";
      return;
    }
    state.account = (await api("client/v4/accounts"))[0].id;
    const models = await api(`${accountPath()}/models/search`);
    fillSelect($("model"), [[null, models.map((m) => [m.name, m.name])]], $("model").value);
    await loadFinetunes();
    $("account").textContent = `account ${state.account}`;   // connected, pickers filled
  } catch (err) {
    showError("connect-error", err.message);
  }
}

async function loadFinetunes(select) {
  const [own, pub] = await Promise.all([api(`${accountPath()}/finetunes`), api(`${accountPath()}/finetunes/public`)]);
  state.own = own;
  const ownIds = new Set(own.map((f) => f.id));
  fillSelect($("adapter"), [
    [null, [["", "none (base model)"]]],
    [`this account (${state.account})`, own.map((f) => [f.id, f.name])],
    ["public", pub.filter((f) => !ownIds.has(f.id)).map((f) => [f.id, f.name])],
  ], select ?? $("adapter").value);
}

function fillSelect(select, groups, keep) {
  select.replaceChildren();
  for (const [label, options] of groups) {
    if (label !== null && !options.length) continue;
    const parent = label === null ? select : select.appendChild(document.createElement("optgroup"));
    if (label !== null) parent.label = label;
    for (const [value, text] of options) parent.appendChild(new Option(text, value));
  }
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

// ---- Generation (Workers AI ai/run, streamed as SSE) ----------------------------------------------

function samplingFields() {
  // Sent as typed: the server checks the ranges and its message is what the user sees.
  const body = {};
  for (const name of FIELDS) {
    const input = $(name);
    if (input.validity.badInput) throw new Error(`${name}: not a number`);
    if (input.value.trim() !== "") body[name] = Number(input.value);
  }
  return body;
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

const mode = () => document.querySelector("input[name=mode]:checked").value;

function bubble(role, text) {
  const div = $("transcript").appendChild(document.createElement("div"));
  div.className = `message ${role}`;
  div.textContent = text;
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

async function send(event) {
  event.preventDefault();
  if (state.abort) return;                 // one request at a time (Ctrl+Enter while streaming)
  showError("run-error", "");
  const text = $("input").value;
  if (!state.account) return showError("run-error", "not connected: check the token and press Connect");
  let body, out, userBubble = null;
  try {
    body = { ...samplingFields(), stream: true };
  } catch (err) {
    return showError("run-error", err.message);
  }
  if ($("adapter").value) body.lora = $("adapter").value;
  if (mode() === "raw") {
    Object.assign(body, { prompt: text, raw: true });
    $("completion-prompt").textContent = text;
    out = $("output");
    out.textContent = "";
  } else {
    body.messages = [...state.chat, { role: "user", content: text }];
    userBubble = bubble("user", text);
    out = bubble("assistant", "");
    $("input").value = "";
  }
  state.abort = new AbortController();
  setBusy(true);
  $("usage").textContent = "generating…";
  const view = mode() === "raw" ? $("completion") : $("transcript");
  const started = performance.now();
  let usage = null;
  try {
    const model = $("model").value.split("/").map(encodeURIComponent).join("/");
    const response = await fetch(`${accountPath()}/run/${model}`, {
      method: "POST", body: JSON.stringify(body), signal: state.abort.signal,
      headers: authHeaders({ "Content-Type": "application/json" }),
    });
    if (!response.ok) throw new Error(errorText(await response.json().catch(() => null), response));
    await readEvents(response, (ev) => {
      if (ev.success === false || ev.error) throw new Error(errorText(ev, response));  // failed mid-stream
      if (ev.response) {
        out.append(ev.response);   // one text node per token: the text grows as it comes
        view.scrollTop = view.scrollHeight;
      }
      if (ev.usage) usage = ev.usage;
    });
    if (userBubble) state.chat.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    const seconds = (performance.now() - started) / 1000;
    $("usage").textContent = usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` +
      ` in ${seconds.toFixed(1)} s` : "";
  } catch (err) {
    if (err.name === "AbortError") {  // what came before Stop stays, in the page and the conversation
      $("usage").textContent = "stopped";
      if (userBubble) state.chat.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    } else {
      $("usage").textContent = "";
      showError("run-error", err.message);
      if (userBubble) {        // not part of the conversation: give the text back to edit and resend
        userBubble.remove();
        out.remove();
        $("input").value = text;
      }
    }
  } finally {
    state.abort = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send-button").disabled = busy;
  $("stop").disabled = !busy;
}

function clearConversation() {
  state.chat = [];
  $("transcript").replaceChildren();
  $("completion-prompt").textContent = "";
  $("output").textContent = "";
  $("usage").textContent = "";
  showError("run-error", "");
}

function showMode() {
  const raw = mode() === "raw";
  $("mode-title").textContent = raw ? "Raw prompt" : "Chat";
  $("transcript").hidden = raw;
  $("completion").hidden = !raw;
  $("input").placeholder = raw ? "A prompt, sent as is with no chat template (Ctrl+Enter sends)"
                               : "Say something (Ctrl+Enter sends)";
}

// ---- Upload a finetune ----------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  showError("upload-error", "");
  $("upload-status").textContent = "";
  if (!state.account) return showError("upload-error", "not connected: check the token and press Connect");
  const name = $("ft-name").value.trim();
  const parts = [["adapter_config.json", $("ft-config").files[0]], ["adapter_model.safetensors", $("ft-weights").files[0]]]
    .filter(([, file]) => file);
  if (!parts.length) return showError("upload-error", "choose adapter_config.json and/or adapter_model.safetensors");
  let finetune = state.own.find((f) => f.name === name);
  try {
    if (!finetune) {
      $("upload-status").textContent = `creating ${name}…`;
      finetune = await api(`${accountPath()}/finetunes`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: $("model").value, name }),
      });
    }
    for (const [fileName, file] of parts) {
      $("upload-status").textContent = `uploading ${fileName}…`;
      const form = new FormData();
      form.append("file_name", fileName);
      form.append("file", file, fileName);
      await api(`${accountPath()}/finetunes/${encodeURIComponent(finetune.id)}/finetune-assets`,
                { method: "POST", body: form });
    }
    $("upload-status").textContent = `${finetune.name} uploaded and selected`;
    $("ft-config").value = "";
    $("ft-weights").value = "";
    await loadFinetunes(finetune.id);
  } catch (err) {
    $("upload-status").textContent = "";
    showError("upload-error", err.message);
    await loadFinetunes().catch(() => {});   // a finetune created before a refused file is listed
  }
}

// ---- Live panel: /metrics (Prometheus text), polled every second, drawn on canvases ----------------

const HISTORY = 60;
const series = { tps: [], queue: [], kv: [], slots: [], ram: [] };
let previous = null;

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {   // NAME{label="value",...} VALUE; label values may hold { }
    const m = /^([A-Za-z_:][\w:]*)(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;                      // comments and blank lines
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[key] = value;
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

// Every sample of that name (and labels) added up. Behind --replicas the unlabelled series are already
// the sums over replicas (the per-replica ones are named gemlora_replica_*), so nothing is counted twice.
const total = (samples, name, where = {}) => samples
  .filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v))
  .reduce((sum, s) => sum + s.value, 0);

function push(list, value) {
  list.push(value);
  if (list.length > HISTORY) list.shift();
}

function drawChart(figureId, lines, caption, top = 0) {
  const figure = $(figureId);
  const canvas = figure.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const max = Math.max(top, 1, ...lines.flat());
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#e3e6ea";
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  lines.forEach((values, i) => {
    const x = (j) => width - (values.length - 1 - j) * (width / (HISTORY - 1));
    const y = (v) => height - 2 - (v / max) * (height - 6);
    ctx.beginPath();
    values.forEach((v, j) => (j ? ctx.lineTo(x(j), y(v)) : ctx.moveTo(x(j), y(v))));
    ctx.strokeStyle = i ? "#c2410c" : "#2563eb";
    ctx.lineWidth = 2;
    ctx.stroke();
    if (i === 0 && values.length > 1) {
      ctx.lineTo(x(values.length - 1), height);
      ctx.lineTo(x(0), height);
      ctx.fillStyle = "rgba(37, 99, 235, 0.12)";
      ctx.fill();
    }
  });
  figure.querySelector("b").textContent = caption;
  const last = lines[0][lines[0].length - 1] ?? 0;
  figure.dataset.last = String(last);
  figure.dataset.peak = String(Math.max(0, ...lines[0]));
}

async function pollMetrics() {
  const live = $("live");
  try {
    const response = await fetch("metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const samples = parseMetrics(await response.text());
    const now = performance.now() / 1000;
    const generated = total(samples, "gemlora_generation_tokens_total");
    if (previous) push(series.tps, Math.max(0, (generated - previous.generated) / (now - previous.time)));
    previous = { time: now, generated };
    const used = total(samples, "gemlora_kv_blocks_used");
    const blocks = used + total(samples, "gemlora_kv_blocks_free");
    push(series.queue, total(samples, "gemlora_queue_length"));
    push(series.kv, used);
    push(series.slots, total(samples, "gemlora_adapters_resident", { tier: "slot" }));
    push(series.ram, total(samples, "gemlora_adapters_resident", { tier: "ram" }));
    const at = (list) => list[list.length - 1] ?? 0;
    drawChart("chart-tps", [series.tps], at(series.tps).toFixed(1));
    drawChart("chart-queue", [series.queue], String(at(series.queue)));
    drawChart("chart-kv", [series.kv], `${at(series.kv)} of ${blocks}`, blocks);
    drawChart("chart-adapters", [series.slots, series.ram], `${at(series.slots)} / ${at(series.ram)}`);
    live.dataset.samples = String(Number(live.dataset.samples) + 1);
    live.dataset.generated = String(generated);
    $("live-state").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    $("live-state").textContent = `metrics unavailable (${err.message})`;
  }
  setTimeout(pollMetrics, 1000);
}

// ---- Wiring ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("submit", connect);
  $("send").addEventListener("submit", send);
  $("upload").addEventListener("submit", upload);
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("clear").addEventListener("click", clearConversation);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("send").requestSubmit();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showMode);
  showMode();
  connect();
  pollMetrics();
});
