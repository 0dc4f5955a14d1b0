// medaudit reviewer workbench: one page, views by URL fragment, data from ./api/*.
// Everything the server sends is put into the page as text (textContent), never as HTML.
// Flags are named by opaque references (ref), never by their request id, in URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { me: null, filters: { status: "open", offset: 0, limit: 25 }, page: null, sel: 0, flag: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function say(text) {
  const s = $("status");
  s.textContent = text;
  clearTimeout(say.t);
  say.t = setTimeout(() => { s.textContent = ""; }, 4000);
}

class HttpError extends Error {
  constructor(status, body) { super(body.detail || `HTTP ${status}`); this.status = status; this.body = body; }
}

async function api(path, opts = {}) {
  const init = { method: opts.method || "GET", headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (opts.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  if (init.method !== "GET" && state.me) init.headers["X-CSRF-Token"] = state.me.csrf;
  const r = await fetch(path, init);
  const body = await r.json().catch(() => ({}));
  if (r.status === 401 && path !== "session") { signedOut(); throw new HttpError(401, body); }
  if (!r.ok) throw new HttpError(r.status, body);
  return body;
}

const pct = (x) => (x === undefined || x === null ? "–" : `${(100 * x).toFixed(1)} %`);
// Percentiles come as 0-100 (share of clean images scoring lower), shares and probabilities as 0-1.
const pctl = (x) => (x === undefined || x === null ? "–" : `${Number(x).toFixed(1)} %`);
const num = (x, d = 3) => (x === undefined || x === null ? "–" : Number(x).toFixed(d));
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "–");

// ------------------------------------------------------------------------------------ views

function show(view) {
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === view || a.getAttribute("href") === location.hash) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function signedOut() {
  state.me = null;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  show("login");
  $("login-key").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    await api("session", { method: "POST", body: { key: $("login-key").value } });
    $("login-key").value = "";
    await start();
  } catch (e) {
    $("login-error").textContent = e.status === 403
      ? "This key may not review flags (it is not a reviewer key)."
      : e.status === 401 ? "This key is not valid." : `Sign-in failed: ${e.message}`;
  }
}

async function start() {
  try {
    state.me = await api("api/me");
  } catch (e) {
    if (e.status !== 401) $("login-error").textContent = e.message;
    return;
  }
  $("who").textContent = `reviewer ${state.me.key_id}`;
  $("nav").hidden = false;
  $("logout").hidden = false;
  const fill = (name, values) => {
    const s = document.querySelector(`#filters select[name=${name}]`);
    s.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
  };
  fill("concept", state.me.concepts);
  fill("severity", state.me.severities);
  fill("version", state.me.versions);
  $("nav-concepts").replaceChildren(...state.me.concepts.map((c) => el("a", { href: `#/concept/${encodeURIComponent(c)}` }, c)));
  $("refit-version").replaceChildren(...state.me.versions.map((v) => el("option", { value: v }, v)));
  route();
}

function route() {
  if (!state.me) return signedOut();
  const [, view, arg] = (location.hash || "#/queue").split("/");
  if (view === "flag" && arg) return openFlag(arg);
  if (view === "concept" && arg) return openConcept(decodeURIComponent(arg));
  if (view === "refit") return openRefit();
  return openQueue();
}

// ------------------------------------------------------------------------------------ queue

function queueQuery(f) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v !== "" && v !== undefined && v !== null) q.set(k, v);
  return q.toString();
}

async function loadQueue() {
  state.page = await api(`api/queue?${queueQuery(state.filters)}`);
  return state.page;
}

// Each queue load is numbered: the answer to a load that a newer one (filters applied, a page
// turned) has superseded is dropped, so a slow earlier answer never paints over the newer page.
let queueLoads = 0;

async function openQueue() {
  show("queue");
  const form = $("filters");
  for (const [k, v] of Object.entries(state.filters)) if (form.elements[k]) form.elements[k].value = v;
  const load = ++queueLoads;
  const query = queueQuery(state.filters);
  let page;
  try { page = await loadQueue(); } catch (e) { if (load === queueLoads) say(e.message); return; }
  if (load !== queueLoads) return;
  const facets = page.facets;
  for (const name of ["concept", "severity", "version"]) {
    for (const opt of form.elements[name].options) {
      if (!opt.value) continue;
      opt.textContent = `${opt.value} (${facets[name][opt.value] || 0})`;
    }
  }
  const first = page.items.length ? page.offset + 1 : 0;
  $("queue-counts").replaceChildren(
    el("b", {}, String(page.matching)), ` ${page.status} flags match these filters, of `,
    el("b", {}, String(page.total)), ` ${page.status} in all.`,
  );
  $("page-info").textContent = `${first}–${page.offset + page.items.length} of ${page.matching}`;
  $("prev").disabled = page.offset === 0;
  $("next").disabled = page.offset + page.items.length >= page.matching;
  $("queue-rows").replaceChildren(...page.items.map((it, i) => {
    const tr = el("tr", { tabIndex: -1, "data-ref": it.ref },
      el("td", {}, when(it.created_at)),
      el("td", {}, el("a", { href: `#/flag/${it.ref}` }, it.request_id)),
      el("td", {}, it.concept),
      el("td", { class: `sev sev-${it.severity}` }, it.severity),
      el("td", {}, it.model_version),
      el("td", {}, `${it.label} (${pct(it.probability)})`),
      el("td", {}, `${num(it.score)} (${pctl(it.percentile)})`),
      el("td", {}, pct(it.relevance_share)),
      el("td", {}, it.verdict ? `${it.status}: ${it.verdict}` : it.status),
    );
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.hash = `#/flag/${it.ref}`; });
    if (i === state.sel) tr.classList.add("sel");
    return tr;
  }));
  if (!page.items.length) $("queue-rows").append(el("tr", {}, el("td", { colSpan: 9 }, "Nothing to review with these filters.")));
  $("queue-rows").dataset.query = query;  // which filters and page the rows show
}

function moveSel(d) {
  const rows = [...document.querySelectorAll("#queue-rows tr[data-ref]")];
  if (!rows.length) return;
  state.sel = Math.max(0, Math.min(rows.length - 1, state.sel + d));
  rows.forEach((r, i) => r.classList.toggle("sel", i === state.sel));
  rows[state.sel].focus();
}

// ------------------------------------------------------------------------------------ one flag

function drawMask(img) {
  // The mask PNG is grey levels (255: artifact): recoloured to a translucent cyan, elsewhere clear.
  const c = $("mask-layer");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const on = d.data[i] > 127;
    d.data[i] = 0; d.data[i + 1] = 229; d.data[i + 2] = 255; d.data[i + 3] = on ? 255 : 0;
  }
  ctx.putImageData(d, 0, 0);
}

function applyLayers() {
  $("heat").style.opacity = $("show-heat").checked ? $("heat-opacity").value / 100 : 0;
  $("mask-layer").style.opacity = $("show-mask").checked ? $("mask-opacity").value / 100 : 0;
}

function fact(dl, name, value) { dl.append(el("dt", {}, name), el("dd", {}, value)); }

function flagItem(it) {
  const verdict = it.verdict ? ` — ${it.verdict} by ${it.reviewer} (${when(it.resolved_at)})` : " — open";
  return el("li", {}, el("a", { href: `#/flag/${it.ref}` }, `${it.concept} on ${it.request_id}`), verdict);
}

async function openFlag(ref) {
  show("flag");
  let f;
  try { f = await api(`api/flags/${ref}`); } catch (e) { say(e.message); return; }
  state.flag = f;
  $("flag-title").textContent = `${f.concept} flag on request ${f.request_id}`;
  // The bare input with the heatmap as its own layer (RGBA: its opacity is the blend's weight,
  // 60 % as in /audit's heatmap_png). Flags stored before the bare image was kept have only the
  // blend: shown as before, on black, with the heatmap slider at 100 %.
  const base = $("base"), heat = $("heat");
  const layered = Boolean(f.available.image && f.available.heat_layer);
  if (layered !== state.layered) $("heat-opacity").value = layered ? 60 : 100;
  state.layered = layered;
  $("image-note").textContent = "";
  base.hidden = !layered;
  if (layered) {
    base.alt = `The model-size input image of request ${f.request_id}`;
    base.src = `api/flags/${ref}/image.png`;
    heat.alt = `LRP heatmap of the ${f.label} prediction, drawn over the image: red where relevance is positive, blue where negative`;
    heat.src = `api/flags/${ref}/heat_layer.png`;
  } else {
    base.removeAttribute("src");
    heat.alt = `LRP heatmap of the ${f.label} prediction blended into the model-size input: red where relevance is positive, blue where negative`;
    if (f.available.heatmap) {
      heat.src = `api/flags/${ref}/heatmap.png`;
      $("image-note").textContent = "This flag was stored before the bare image was kept: the image shows only with the heatmap.";
    } else { heat.removeAttribute("src"); $("image-note").textContent = "The heatmap expired (stored 7 days) or was withheld."; }
  }
  const mask = $("mask-layer");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  $("show-mask").disabled = !f.available.mask;
  if (f.available.mask) {
    const m = new Image();
    m.onload = () => drawMask(m);
    m.src = `api/flags/${ref}/mask.png`;
  }
  applyLayers();

  const dl = $("flag-facts");
  dl.replaceChildren();
  fact(dl, "Request", f.request_id);
  fact(dl, "Flagged at", when(f.created_at));
  fact(dl, "Version", f.model_version);
  fact(dl, "Prediction", `${f.label} (${pct(f.probability)})`);
  fact(dl, "Concept", `${f.concept} at ${f.layer}`);
  fact(dl, "Severity", f.severity);
  fact(dl, "CAV score", `${num(f.score)} (threshold ${num(f.threshold)})`);
  fact(dl, "Percentile", `${pctl(f.percentile)} of clean images score lower`);
  fact(dl, "Relevance share", `${pct(f.relevance_share)} of the prediction's relevance inside the concept's mask`);
  const differs = f.corrected_disagrees ? "answers differently (the artifact may be deciding)" : "gives the same answer";
  fact(dl, "Corrected version", f.corrected_disagrees === null ? "not asked (no shadow version)"
    : f.corrected_label ? `${f.corrected_version}: ${f.corrected_label} (${pct(f.corrected_probability)}), ${differs}`
      : differs);
  $("flag-reasons").replaceChildren(...(f.reasons || []).map((r) => el("li", {}, r)));
  const none = (text) => [el("li", { class: "hint" }, text)];
  $("flag-siblings").replaceChildren(...(f.same_request.length ? f.same_request.map(flagItem) : none("none")));
  $("flag-history").replaceChildren(...(f.history.length ? f.history.map(flagItem) : none("none")));
  const open = f.status === "open";
  for (const b of document.querySelectorAll("#verdict-form button")) b.disabled = !open;
  $("note").disabled = !open;
  $("note").value = open ? "" : (f.note || "");
  $("flag-state").textContent = open ? "Open" : `Resolved: ${f.verdict} by ${f.reviewer} at ${when(f.resolved_at)}`;
}

async function turnPage(step) {
  // The pager sits below the table: a new page is read from its first row, under the header.
  state.filters.offset = Math.max(0, state.filters.offset + step * state.filters.limit);
  await openQueue();
  window.scrollTo(0, 0);
}

async function nextFlag() {
  // The next open flag of the current filters, fetched as data: the page itself stays.
  const current = state.flag && state.flag.ref;
  let page;
  try { page = await loadQueue(); } catch (e) { say(e.message); return; }
  const next = page.items.find((it) => it.ref !== current && it.status === "open");
  if (next) location.hash = `#/flag/${next.ref}`;
  else { say("Queue done for these filters."); location.hash = "#/queue"; }
}

async function resolveFlag(verdict) {
  const f = state.flag;
  if (!f || f.status !== "open") return;
  try {
    await api(`api/flags/${f.ref}/resolve`, { method: "POST", body: { verdict, note: $("note").value } });
  } catch (e) { say(e.message); return; }
  say(`${f.concept} on ${f.request_id}: ${verdict}`);
  await nextFlag();
}

// ------------------------------------------------------------------------------------ concept

async function openConcept(name) {
  show("concept");
  $("concept-title").textContent = `${name}: flagged images by CAV score`;
  let c;
  try { c = await api(`api/concepts/${encodeURIComponent(name)}?top=24`); } catch (e) { say(e.message); return; }
  const v = c.verdicts_shown;
  $("concept-summary").textContent = `${c.flagged} flagged images of recent traffic; the top ${c.items.length} by score `
    + `(confirmed ${v.artifact_confirmed || 0}, rejected ${v.false_alarm || 0}). Confirmed and rejected ones are what refine-cav learns from.`;
  $("concept-items").replaceChildren(...c.items.map((it, i) => {
    const buttons = it.status === "open"
      ? el("div", { class: "row" },
        el("button", { type: "button", "data-verdict": "artifact_confirmed" }, "Confirm"),
        el("button", { type: "button", "data-verdict": "false_alarm" }, "Not it"))
      : el("p", { class: "hint" }, `${it.verdict} by ${it.reviewer}`);
    const li = el("li", {},
      el("img", { src: `api/flags/${it.ref}/heatmap.png`, alt: `#${i + 1}: heatmap of request ${it.request_id}, score ${num(it.score)}` }),
      el("div", {}, el("a", { href: `#/flag/${it.ref}` }, `#${i + 1} ${it.request_id}`)),
      el("div", { class: "hint" }, `score ${num(it.score)} · pct ${pctl(it.percentile)} · share ${pct(it.relevance_share)}`),
      buttons);
    for (const b of li.querySelectorAll("button")) {
      b.addEventListener("click", async () => {
        try {
          await api(`api/flags/${it.ref}/resolve`, { method: "POST", body: { verdict: b.dataset.verdict, note: `concept view: ${name}` } });
          say(`${it.request_id}: ${b.dataset.verdict}`);
          openConcept(name);
        } catch (e) { say(e.message); }
      });
    }
    return li;
  }));
}

// ------------------------------------------------------------------------------------ refit

function showRefit(s) {
  const text = {
    none: "No refit yet.",
    running: `Refitting ${s.version} (started ${when(s.started)} by ${s.reviewer})…`,
    done: `Refit of ${s.version} done at ${when(s.finished)}` + (s.report ? `: new version ${s.report.new_version}` : ""),
    failed: `Refit of ${s.version} failed (exit ${s.returncode}); its output is below.`,
  }[s.state];
  $("refit-state").textContent = text;
  $("refit-output").textContent = s.output || "";
  const rows = [];
  if (s.report) {
    for (const [c, m] of Object.entries(s.report.held_out)) {
      const a = s.report.added[c] || { positive: 0, negative: 0 };
      const g = (x, k = "auroc") => (x ? num(x[k]) : "–");
      rows.push(el("tr", {}, el("td", {}, c), el("td", {}, `${a.positive}/${a.negative}`), el("td", {}, g(m.stored)),
        el("td", {}, g(m.baseline)), el("td", {}, g(m.refined)), el("td", {}, g(m.refined, "ap"))));
    }
  }
  $("refit-rows").replaceChildren(...rows);
  $("refit-table").hidden = !rows.length;
  clearTimeout(showRefit.t);
  if (s.state === "running" && location.hash === "#/refit") showRefit.t = setTimeout(openRefit, 2000);
}

async function openRefit() {
  show("refit");
  try { showRefit(await api("api/refit")); } catch (e) { say(e.message); }
}

async function startRefit(ev) {
  ev.preventDefault();
  try { showRefit(await api("api/refit", { method: "POST", body: { version: $("refit-version").value } })); }
  catch (e) { say(e.message); }
}

// ------------------------------------------------------------------------------------ keys

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !state.me) return;
  // Letters are shortcuts unless the focus is where they are text (a checkbox or slider is not).
  const a = document.activeElement;
  const typing = a.tagName === "TEXTAREA" || a.tagName === "SELECT"
    || (a.tagName === "INPUT" && !["checkbox", "range", "radio", "button", "submit"].includes(a.type));
  if (typing) {
    if (ev.key === "Escape") document.activeElement.blur();
    return;
  }
  const view = (location.hash || "#/queue").split("/")[1] || "queue";
  const k = ev.key;
  if (k === "?") { $("help").showModal(); return; }
  if (view === "queue") {
    if (k === "j") moveSel(1);
    else if (k === "k") moveSel(-1);
    else if (k === "Enter") {
      const row = document.querySelectorAll("#queue-rows tr[data-ref]")[state.sel];
      if (row) location.hash = `#/flag/${row.dataset.ref}`;
    } else return;
  } else if (view === "flag") {
    const verdicts = { a: "artifact_confirmed", f: "false_alarm", o: "other" };
    if (verdicts[k]) resolveFlag(verdicts[k]);
    else if (k === "n") { $("note").focus(); }
    else if (k === "h") { $("show-heat").checked = !$("show-heat").checked; applyLayers(); }
    else if (k === "m" && !$("show-mask").disabled) { $("show-mask").checked = !$("show-mask").checked; applyLayers(); }
    else if (k === "j") nextFlag();
    else if (k === "Escape") location.hash = "#/queue";
    else return;
  } else return;
  ev.preventDefault();
}

// ------------------------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", async () => {
    try { await api("logout", { method: "POST", body: {} }); } catch (e) { /* signed out either way */ }
    signedOut();
  });
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const data = new FormData($("filters"));
    state.filters = { ...Object.fromEntries(data.entries()), offset: 0, limit: 25 };
    state.sel = 0;
    openQueue();
  });
  $("filters").addEventListener("reset", () => {
    state.filters = { status: "open", offset: 0, limit: 25 };
    state.sel = 0;
    setTimeout(openQueue, 0);
  });
  $("prev").addEventListener("click", () => turnPage(-1));
  $("next").addEventListener("click", () => turnPage(1));
  for (const id of ["show-heat", "heat-opacity", "show-mask", "mask-opacity"]) $(id).addEventListener("input", applyLayers);
  for (const b of document.querySelectorAll("#verdict-form button[data-verdict]")) {
    b.addEventListener("click", () => resolveFlag(b.dataset.verdict));
  }
  $("refit-form").addEventListener("submit", startRefit);
  window.addEventListener("hashchange", route);
  document.addEventListener("keydown", onKey);
  start().then(() => { if (!state.me) signedOut(); });
});
