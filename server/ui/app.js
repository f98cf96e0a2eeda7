// The routing page of emo-serve: plain JavaScript, no build step, nothing
// fetched from anywhere but this server. Every API call carries the key typed
// in the page (kept in sessionStorage, sent as `Authorization: Bearer`).
"use strict";

const PALETTE = ["#2f6fdb", "#e0731f", "#2a9d5b", "#8e44c9", "#c0392b", "#16a2b8", "#b58900", "#d63384"];
const $ = (id) => document.getElementById(id);
const state = { model: null, profiles: [], colors: {}, routing: null, pools: {} };

// -- talking to the server ------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("emo-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status === 401 ? "This server needs an API key: type it in the field at the top right."
    : (data.error && data.error.message) || ("HTTP " + r.status));
  return data;
}

function say(text, kind) {
  const s = $("status");
  s.textContent = text || "";
  s.className = "status " + (kind || "");
}

// -- profiles ---------------------------------------------------------------------------

function mb(n) { return n == null ? "–" : (n / 1048576).toFixed(n < 10485760 ? 2 : 0) + " MiB"; }

async function loadProfiles() {
  const [models, profiles] = await Promise.all([api("/v1/models"), api("/v1/profiles")]);
  state.model = profiles.base;
  state.profiles = profiles.data.filter((p) => p.name !== "full");
  state.profiles.forEach((p, i) => { state.colors[p.name] = PALETTE[i % PALETTE.length]; });
  state.pools = {};
  profiles.data.forEach((p) => { state.pools[p.name] = p.experts || null; });
  $("model").textContent = "model " + state.model + " · " + state.profiles.length + " profiles";
  const sel = $("profile");
  const keep = sel.value;
  sel.innerHTML = "";
  const hasAuto = models.data.some((m) => m.profile === "auto");
  for (const name of [...(hasAuto ? ["auto"] : []), ...state.profiles.map((p) => p.name), "full"]) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = name === "auto" ? "auto (the profile the text leans to)"
      : name === "full" ? "full (every expert)" : name;
    sel.appendChild(o);
  }
  if (keep) sel.value = keep;
  const body = $("profiles").querySelector("tbody");
  body.innerHTML = "";
  for (const p of profiles.data) {
    const tr = document.createElement("tr");
    const color = state.colors[p.name] || "#888";
    const total = p.bytes.experts || 1;
    const share = p.resident_bytes == null ? 0 : Math.min(1, p.resident_bytes / total);
    tr.innerHTML = `<td><span class="swatch" style="background:${color}"></span>${p.name}</td>
      <td>${p.experts_total}</td>
      <td><div class="mem"><div class="mem-fill" style="width:${(share * 100).toFixed(0)}%;background:${color}"></div></div>
      <span class="muted small">${p.resident_bytes != null && p.resident_bytes >= 0.99 * total
        ? "all " + mb(total) + " in memory" : mb(p.resident_bytes) + " of " + mb(total) + " in memory"}</span></td>`;
    body.appendChild(tr);
  }
}

// -- routing ----------------------------------------------------------------------------

function visible(t) {
  return t.replace(/\n/g, "↵\n").replace(/\t/g, "→");
}

function renderLean(r) {
  const bars = $("lean-bars");
  bars.innerHTML = "";
  const entries = Object.entries(r.profile_affinity).sort((a, b) => b[1] - a[1]);
  for (const [name, v] of entries) {
    const d = document.createElement("div");
    d.className = "lean";
    d.innerHTML = `<span class="lean-name"><span class="swatch" style="background:${state.colors[name]}"></span>${name}</span>
      <span class="lean-track"><span class="lean-fill" style="width:${(v * 100).toFixed(1)}%;background:${state.colors[name]}"></span></span>
      <span class="lean-val">${(v * 100).toFixed(0)}%</span>`;
    bars.appendChild(d);
  }
  const box = $("tokens");
  box.innerHTML = "";
  r.tokens.forEach((text, t) => {
    const s = document.createElement("span");
    s.className = "tok";
    const lean = r.token_profiles[t];
    const shares = r.token_affinity[t] || [];
    const best = lean ? shares[r.profiles.indexOf(lean)] : 0;
    // how sure: the winner's share against an even split between profiles
    const even = r.profiles.length ? 1 / r.profiles.length : 1;
    const sure = Math.max(0.15, Math.min(1, (best - even) / (1 - even) * 2));
    if (lean) s.style.background = hexA(state.colors[lean], sure);
    s.textContent = visible(text);
    s.title = r.profiles.map((p, j) => `${p}: ${(shares[j] * 100).toFixed(0)}%`).join("  ");
    s.addEventListener("mouseenter", () => renderHeatmap(r, t));
    s.addEventListener("mouseleave", () => renderHeatmap(r, null));
    box.appendChild(s);
  });
}

function hexA(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16},${(n >> 8) & 255},${n & 255},${a.toFixed(2)})`;
}

function renderHeatmap(r, token) {
  const box = $("heatmap");
  box.innerHTML = "";
  const width = Math.max(...r.layers.map((l) => Math.max(-1, ...l.experts.flat()))) + 1;
  const pool = state.pools[r.profile];
  const color = state.colors[r.profile] || "#1d2330";  // the profile's own colour; dark for "full"
  document.querySelector(".heat-legend").style.setProperty("--heat", color);
  $("heat-title").textContent = token == null
    ? `· share of the ${r.tokens.length} tokens routed to each expert, under “${r.profile}”${
        state.requested === "auto" ? " (picked by auto)" : ""}`
    : `· token ${token} “${visible(r.tokens[token]).trim()}”: its ${r.top_k} experts and their weights`;
  const head = document.createElement("div");
  head.className = "heat-row";
  head.innerHTML = `<span class="heat-label"></span>` + Array.from({ length: width }, (_, e) =>
    `<span class="heat-col">${e % 4 === 0 ? e : ""}</span>`).join("");
  box.appendChild(head);
  for (const layer of r.layers) {
    const use = new Array(width).fill(0);
    if (token == null) {
      for (const row of layer.experts) for (const e of row) use[e] += 1 / r.tokens.length;
    } else {
      layer.experts[token].forEach((e, j) => { use[e] = Math.max(0.12, layer.weights[token][j]); });
    }
    const row = document.createElement("div");
    row.className = "heat-row";
    const kept = pool ? new Set(pool[String(layer.layer)] || []) : null;
    row.innerHTML = `<span class="heat-label">layer ${layer.layer}</span>` + use.map((u, e) => {
      const out = kept && !kept.has(e);
      const bg = out ? "" : `background:${u > 0 ? hexA(color, 0.12 + 0.88 * Math.min(1, u)) : "#f1f3f7"}`;
      return `<span class="cell${out ? " out" : ""}" style="${bg}" title="layer ${layer.layer}, expert ${e}: ${
        token == null ? (u * 100).toFixed(0) + "% of tokens" : "weight " + u.toFixed(2)}${out ? " (not in the profile)" : ""}"></span>`;
    }).join("");
    box.appendChild(row);
  }
}

async function analyse() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) { say("Type some text first.", "error"); return; }
  say("Routing…");
  try {
    state.requested = $("profile").value;
    const r = await api("/v1/routing", { model: state.model, profile: state.requested, prompt });
    state.routing = r;
    renderLean(r);
    renderHeatmap(r, null);
    const top = Object.entries(r.profile_affinity).sort((a, b) => b[1] - a[1])[0];
    say(`${r.tokens.length} tokens routed under “${r.profile}”` + (top ? `; the text leans to “${top[0]}”.` : "."), "ok");
    loadProfiles().catch(() => {});
  } catch (e) {
    say(e.message, "error");
  }
}

// -- streamed completion -----------------------------------------------------------------

async function generate() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) { say("Type some text first.", "error"); return; }
  const out = $("completion");
  out.innerHTML = "";
  const ptext = document.createElement("span");
  ptext.className = "prompt-text";
  ptext.textContent = prompt;
  const gen = document.createElement("span");
  gen.className = "gen-text";
  out.append(ptext, gen);
  $("served").textContent = "";
  say("Generating…");
  const body = { model: state.model, profile: $("profile").value, prompt, stream: true,
                 max_tokens: Number($("max-tokens").value) || 48, temperature: 0 };
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      const data = await r.json().catch(() => ({}));
      throw new Error(r.status === 401 ? "This server needs an API key: type it in the field at the top right."
        : (data.error && data.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", n = 0, finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        $("served").textContent = "· served by profile “" + ev.profile + "”";
        gen.style.borderColor = state.colors[ev.profile] || "#888";
        for (const c of ev.choices) {
          gen.textContent += c.text;
          out.scrollTop = out.scrollHeight;  // keep the newest text in view
          if (c.text) n += 1;
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    say(`Streamed ${n} chunks (${finish || "done"}).`, "ok");
    out.dataset.done = "1";
  } catch (e) {
    say(e.message, "error");
  }
}

// -- structured output: a chat answer constrained to a JSON schema -------------------------

async function structured() {
  const out = $("structured-out");
  delete out.dataset.done;
  let schema;
  try {
    schema = JSON.parse($("schema").value);
  } catch (e) {
    say("The schema is not JSON: " + e.message, "error");
    return;
  }
  out.textContent = "";
  $("structured-served").textContent = "";
  say("Answering as JSON…");
  const body = { model: state.model, profile: $("profile").value, temperature: 0.7, seed: 0,
                 max_tokens: Math.max(Number($("max-tokens").value) || 48, 128),
                 messages: [{ role: "user", content: $("prompt").value }],
                 response_format: { type: "json_schema", json_schema: { name: "answer", schema, strict: true } } };
  try {
    const data = await api("/v1/chat/completions", body);
    const choice = data.choices[0];
    let text = choice.message.content || "";
    try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* cut short: shown as it came */ }
    out.textContent = text;
    $("structured-served").textContent = "· profile “" + data.profile + "”, " + choice.finish_reason;
    say(choice.finish_reason === "stop" ? "JSON of the schema." : "Cut short at the token budget: raise Tokens.",
        choice.finish_reason === "stop" ? "ok" : "error");
    out.dataset.done = "1";
  } catch (e) {
    say(e.message, "error");
    out.dataset.done = "error";
  }
}

// -- start ------------------------------------------------------------------------------

function init() {
  const key = $("key");
  key.value = sessionStorage.getItem("emo-api-key") || "";
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem("emo-api-key", key.value); else sessionStorage.removeItem("emo-api-key");
    loadProfiles().then(() => say("Key accepted.", "ok")).catch((e) => say(e.message, "error"));
  });
  $("analyse").addEventListener("click", analyse);
  $("generate").addEventListener("click", generate);
  $("structured").addEventListener("click", structured);
  loadProfiles().then(() => say("Ready: type or paste text, pick a profile.", "ok")).catch((e) => say(e.message, "error"));
}

init();
