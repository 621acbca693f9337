// Workflow page: characters (rows or JSON) + parameters -> POST /api/workflow, live progress over SSE, cancel, metrics.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const PARAMS = { epochs: "int", images_per_character: "int", image_size: "int", batch_size: "int", learning_rate: "float", model: "str" };
  const state = { job: null, source: null, stages: new Map() };

  // -- characters: rows (name, series, optional booru tag) or the same list as JSON, kept in sync --------------
  const EXAMPLE = '[{"name": "suzukaze_aoba", "series": "New Game!"}]';

  // Danbooru-style tag from name + series, as the collectors derive it: "Hoshino", "Blue Archive" -> hoshino_(blue_archive).
  function derivedTag(name, series) {
    const norm = (s) => s.trim().toLowerCase().replace(/\s+/g, "_");
    return series.trim() ? `${norm(name)}_(${norm(series)})` : norm(name);
  }

  function cell(cls, label, value, placeholder) {
    const input = document.createElement("input");
    input.type = "text";
    input.className = cls;
    input.value = value || "";
    input.placeholder = placeholder;
    input.setAttribute("aria-label", label);
    input.autocomplete = "off";
    input.spellcheck = false;
    return input;
  }

  function refreshTagHint(row) {
    const name = row.querySelector(".c-name").value, series = row.querySelector(".c-series").value;
    row.querySelector(".c-tag").placeholder = name.trim() ? derivedTag(name, series) : "derived from name + series";
  }

  function addRow(c = {}, focus = false) {
    const row = document.createElement("div");
    row.className = "char-row";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary remove-row";
    remove.textContent = "✕";
    remove.title = "Remove this character";
    remove.setAttribute("aria-label", "Remove this character");
    remove.addEventListener("click", () => {
      row.remove();
      if (!$("char-rows").children.length) addRow();
      rowsChanged();
    });
    row.append(cell("c-name", "Character name", c.name, "e.g. suzukaze_aoba"), cell("c-series", "Series", c.series, "e.g. New Game!"),
               cell("c-tag", "Booru tag (optional)", c.tag, ""), remove);
    row.addEventListener("input", () => { refreshTagHint(row); rowsChanged(); });
    refreshTagHint(row);
    $("char-rows").append(row);
    if (focus) row.querySelector(".c-name").focus();
    return row;
  }

  // The rows as character objects; fully empty rows are skipped, a row with a series or tag but no name is an error.
  function rowsValue(strict) {
    const out = [];
    [...$("char-rows").children].forEach((row, i) => {
      const [name, series, tag] = [".c-name", ".c-series", ".c-tag"].map((s) => row.querySelector(s).value.trim());
      if (!name && !series && !tag) return;
      if (!name && strict) throw new Error(`Character row ${i + 1} needs a name.`);
      const c = { name, series };
      if (tag) c.tag = tag;
      out.push(c);
    });
    return out;
  }

  function setRows(list) {
    $("char-rows").replaceChildren();
    list.forEach((c) => addRow(c));
    if (!list.length) addRow();
  }

  function rowsChanged() {
    const list = rowsValue(false);
    $("characters").value = list.length ? `[\n${list.map((c) => `  ${JSON.stringify(c)}`).join(",\n")}\n]` : "";  // one character a line
  }

  // The JSON box as character objects (bare strings are names), with the messages a person can act on.
  function parseJson(text) {
    let value;
    try { value = JSON.parse(text); } catch (e) {
      throw new Error(`The characters box is not valid JSON (${e.message}). Example: ${EXAMPLE}`);
    }
    if (!Array.isArray(value)) throw new Error(`Give a JSON list of characters. Example: ${EXAMPLE}`);
    return value.map((c, i) => {
      if (typeof c === "string") c = { name: c };
      if (!c || typeof c !== "object" || typeof c.name !== "string" || !c.name.trim()) throw new Error(`Character ${i + 1} needs a "name".`);
      const out = { name: c.name.trim(), series: String(c.series || "").trim() };
      if (c.tag && String(c.tag).trim()) out.tag = String(c.tag).trim();
      return out;
    });
  }

  const jsonMode = () => $("json-toggle").getAttribute("aria-pressed") === "true";

  function showJson(on) {
    $("json-toggle").setAttribute("aria-pressed", String(on));
    $("json-toggle").textContent = on ? "Edit as rows" : "Edit as JSON";
    $("char-json-view").classList.toggle("hidden", !on);
    $("char-rows-view").classList.toggle("hidden", on);
  }

  function toggleJson() {
    $("error").classList.add("hidden");
    if (!jsonMode()) { rowsChanged(); showJson(true); $("characters").focus(); return; }
    const text = $("characters").value.trim();
    try { setRows(text ? parseJson(text) : []); } catch (err) { ARD.showError($("error"), err); return; }  // stay on the JSON
    showJson(false);
  }

  // Typing valid JSON updates the rows at once, so both views always hold the same list.
  function jsonChanged() {
    try { setRows(parseJson($("characters").value)); } catch { /* checked when starting or switching back */ }
  }

  function readCharacters() {
    const list = jsonMode() ? parseJson($("characters").value) : rowsValue(true);
    if (!list.length) throw new Error("Add at least one character: a name, and its series so the right pictures are found.");
    return list;
  }

  function readParams() {
    const out = {};
    for (const [name, kind] of Object.entries(PARAMS)) {
      const raw = $(`p-${name}`).value.trim();
      if (!raw) continue;
      out[name] = kind === "int" ? parseInt(raw, 10) : kind === "float" ? parseFloat(raw) : raw;
    }
    return out;
  }

  function setStatus(status) {
    const pill = $("status");
    pill.textContent = status;
    pill.className = `status-pill ${status}`;
    document.body.dataset.status = status;
    const running = ["queued", "running", "cancelling"].includes(status);
    $("cancel").classList.toggle("hidden", !running);
    $("cancel").disabled = status === "cancelling";
    $("start").disabled = running;
  }

  function renderStage(ev) {
    state.stages.set(ev.stage, ev);
    const box = $("stages");
    box.replaceChildren();
    for (const s of state.stages.values()) {
      const frac = s.total > 0 ? s.done / s.total : 0;
      const row = ARD.barRow(s.stage, frac, s.message || s.stage);
      row.dataset.stage = s.stage;
      row.querySelector(".pct").textContent = s.total > 0 ? `${Math.round(s.percent)}%` : `${s.done}`;
      box.append(row);
    }
  }

  function logLine(text) {
    const log = $("log");
    log.textContent += text + "\n";
    log.scrollTop = log.scrollHeight;
  }

  function renderOutcome(end) {
    $("outcome").classList.remove("hidden");
    const body = $("metrics").querySelector("tbody");
    body.replaceChildren();
    if (end.status === "succeeded" && end.result) {
      $("outcome-text").textContent = end.result.version_id
        ? `New version ${end.result.version_id} is registered; the recogniser switches to it automatically when it is live.`
        : "The workflow finished.";
      for (const [k, v] of Object.entries(end.result.metrics || {})) {
        const tr = document.createElement("tr");
        const a = document.createElement("td"); a.textContent = k;
        const b = document.createElement("td"); b.textContent = typeof v === "number" ? (Math.abs(v) <= 1 ? v.toFixed(3) : String(v)) : JSON.stringify(v);
        tr.append(a, b); body.append(tr);
      }
    } else if (end.status === "cancelled") {
      $("outcome-text").textContent = "Cancelled. Finished steps are kept; starting again resumes from them.";
    } else {
      $("outcome-text").textContent = `Failed: ${end.error || "see the log"}`;
    }
  }

  function follow(job) {
    if (state.source) state.source.close();
    const src = new EventSource(`/api/workflow/${job.id}/events`);
    state.source = src;
    src.addEventListener("status", (e) => { const d = JSON.parse(e.data); setStatus(d.status); logLine(`— ${d.status}`); });
    src.addEventListener("progress", (e) => {
      const d = JSON.parse(e.data);
      renderStage(d);
      if (d.message) logLine(`[${d.stage}] ${d.done}/${d.total} ${d.message}`);
    });
    src.addEventListener("end", (e) => { const d = JSON.parse(e.data); setStatus(d.status); renderOutcome(d); src.close(); ARD.showVersion(); });
    src.onerror = () => { if (src.readyState === EventSource.CLOSED) logLine("— stream closed"); };
  }

  async function start() {
    $("error").classList.add("hidden");
    $("outcome").classList.add("hidden");
    let body;
    try { body = { characters: readCharacters(), params: readParams() }; } catch (err) { ARD.showError($("error"), err); return; }
    $("start").disabled = true;
    try {
      const job = await ARD.api("/api/workflow", { method: "POST", json: body, auth: true });
      state.job = job; state.stages.clear();
      $("stages").replaceChildren(); $("log").textContent = "";
      $("job-id").textContent = `job ${job.id}`;
      $("progress").classList.remove("hidden");
      document.body.dataset.job = job.id;
      setStatus(job.status);
      follow(job);
    } catch (err) {
      ARD.showError($("error"), err);
      $("start").disabled = false;
    }
  }

  async function cancel() {
    if (!state.job) return;
    $("cancel").disabled = true;
    try {
      const job = await ARD.api(`/api/workflow/${state.job.id}/cancel`, { method: "POST", auth: true });
      setStatus(job.status);
    } catch (err) { ARD.showError($("error"), err); $("cancel").disabled = false; }
  }

  // After a reload of the page, pick up a run that is still going (its history is replayed by the stream).
  async function resumeRunning() {
    try {
      const { jobs } = await ARD.api("/api/workflow");
      const job = jobs.reverse().find((j) => ["queued", "running", "cancelling"].includes(j.status));
      if (!job) return;
      state.job = job;
      $("job-id").textContent = `job ${job.id}`;
      $("progress").classList.remove("hidden");
      document.body.dataset.job = job.id;
      setStatus(job.status);
      follow(job);
    } catch { /* the workflow API may be disabled on this server */ }
  }

  document.addEventListener("DOMContentLoaded", () => {
    ARD.restoreToken();
    ARD.showVersion();
    resumeRunning();
    setRows([{}, {}]);
    $("add-row").addEventListener("click", () => addRow({}, true));
    $("json-toggle").addEventListener("click", toggleJson);
    $("characters").addEventListener("input", jsonChanged);
    $("start").addEventListener("click", start);
    $("cancel").addEventListener("click", cancel);
  });
})();
