// Shared helpers for both pages: API calls with friendly errors, the optional token, the live version.
"use strict";

const ARD = (() => {
  const FRIENDLY = {
    0: "Cannot reach the server. Is it running?",
    401: "This action needs the server's API token (open “API token” and paste it).",
    403: "The API token is wrong.",
    404: "Not found.",
    409: "That conflicts with the current gallery.",
    413: "That file is too large for this server.",
    415: "That file is not an image or a video we can read.",
    422: "The server could not use that input.",
    503: "The server is busy or has no model loaded yet. Try again in a moment.",
  };

  class ApiError extends Error {
    constructor(status, error, detail) {
      super(error || FRIENDLY[status] || `Request failed (${status}).`);
      this.status = status;
      this.detail = detail;
      this.friendly = FRIENDLY[status] || (status >= 500 ? "Something went wrong on the server." : "The request was refused.");
    }
  }

  function token() {
    const el = document.getElementById("token");
    const value = el && el.value.trim();
    if (value) localStorage.setItem("ard-token", value);
    return value || localStorage.getItem("ard-token") || "";
  }

  function restoreToken() {
    const el = document.getElementById("token");
    if (el && !el.value) el.value = localStorage.getItem("ard-token") || "";
  }

  async function api(path, { method = "GET", body = null, json = undefined, auth = false, signal } = {}) {
    const headers = {};
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    if (auth && token()) headers["Authorization"] = `Bearer ${token()}`;
    let res;
    try {
      res = await fetch(path, { method, body, headers, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, FRIENDLY[0]);
    }
    let data = null;
    const text = await res.text();
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!res.ok) {
      const msg = data && typeof data.error === "string" ? data.error : null;
      throw new ApiError(res.status, msg, data && data.detail);
    }
    return data;
  }

  function showError(box, err) {
    box.replaceChildren();
    const head = document.createElement("strong");
    head.textContent = err instanceof ApiError ? err.friendly : "Something went wrong.";
    const body = document.createElement("span");
    body.textContent = err && err.message ? err.message : String(err);
    box.append(head, body);
    box.classList.remove("hidden");
  }

  async function showVersion() {
    const el = document.getElementById("version");
    if (!el) return;
    try {
      const v = await api("/api/version");
      el.textContent = v.version ? `model ${v.version}` : "no model loaded yet";
      el.title = v.last_error || "";
    } catch { el.textContent = "server unreachable"; }
  }

  function pct(x) { return `${Math.round(Math.max(0, Math.min(1, x)) * 100)}%`; }

  function barRow(name, score, title) {
    const row = document.createElement("div");
    row.className = "barrow";
    const n = document.createElement("span"); n.className = "name"; n.textContent = name; n.title = title || name;
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("span"); fill.style.width = pct(score); bar.append(fill);
    const p = document.createElement("span"); p.className = "pct"; p.textContent = pct(score);
    row.append(n, bar, p);
    return row;
  }

  return { api, ApiError, showError, showVersion, token, restoreToken, pct, barRow };
})();
