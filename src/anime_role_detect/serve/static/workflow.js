// Workflow page: characters JSON + parameters -> POST /api/workflow, live progress over SSE, cancel, metrics.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const PARAMS = { epochs: "int", images_per_character: "int", image_size: "int", batch_size: "int", learning_rate: "float", model: "str" };
  const state = { job: null, source: null, stages: new Map() };

  function readCharacters() {
    let value;
    try { value = JSON.parse($("characters").value); } catch (e) {
      throw new Error(`The characters box is not valid JSON (${e.message}). Example: [{"name": "suzukaze_aoba", "series": "New Game!"}]`);
    }
    if (!Array.isArray(value) || !value.length) throw new Error("Give a non-empty JSON list of characters.");
    value.forEach((c, i) => {
      if (!c || typeof c.name !== "string" || !c.name.trim()) throw new Error(`Character ${i + 1} needs a "name".`);
    });
    return value.map((c) => ({ name: c.name.trim(), series: (c.series || "").trim() }));
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
    $("start").addEventListener("click", start);
    $("cancel").addEventListener("click", cancel);
  });
})();
