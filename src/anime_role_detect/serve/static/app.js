// Recognise page: upload (button or drag-and-drop) -> /api/classify -> picture with boxes, top-k bars, tags.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = ["#ff2d75", "#18a0fb", "#21b36b", "#ffb000", "#8e44ff", "#00b8b8", "#ff6a00", "#4f5bd5"];
  const state = { answer: null, objectUrl: null, controller: null };

  function setLoading(on, text) {
    $("loading").classList.toggle("hidden", !on);
    if (text) $("loading-text").textContent = text;
    $("pick").disabled = on;
  }

  function reset() {
    $("error").classList.add("hidden");
    $("result").classList.add("hidden");
    $("fb-status").textContent = "";
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
  }

  function label(d) {
    return d.unknown || d.role === "unknown" ? "unknown" : d.role;
  }

  // Draw at the image's resolution (small images scaled up so names stay legible); CSS fits it to the screen.
  // `img` is an <img> or a paused <video> (then the current frame is drawn and the video stays visible).
  function drawImage(img, answer) {
    const canvas = $("canvas");
    const isVideo = img instanceof HTMLVideoElement;
    const iw = isVideo ? img.videoWidth : img.naturalWidth, ih = isVideo ? img.videoHeight : img.naturalHeight;
    const scale = Math.max(1, 480 / Math.max(iw, ih));
    const w = Math.round(iw * scale), h = Math.round(ih * scale);
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = scale < 2;
    ctx.drawImage(img, 0, 0, w, h);
    const lw = Math.max(3, Math.round(Math.min(w, h) / 120));
    const font = Math.max(13, Math.round(Math.min(w, h) / 24));
    const dets = answer.detections && answer.detections.length ? answer.detections
      : (answer.boxes || []).map((box) => ({ box, role: answer.role, similarity: answer.similarity }));
    dets.forEach((d, i) => {
      const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
      const color = COLORS[i % COLORS.length];
      ctx.lineWidth = lw; ctx.strokeStyle = color;
      // keep the whole stroke inside the picture so a whole-image box is visible too
      const half = lw / 2;
      const bx = Math.max(half, x1 + half), by = Math.max(half, y1 + half);
      const bw = Math.min(w - half, x2 - half) - bx, bh = Math.min(h - half, y2 - half) - by;
      ctx.strokeRect(bx, by, bw, bh);
      const text = `${label(d)} ${ARD.pct(d.similarity)}`;
      ctx.font = `600 ${font}px system-ui, sans-serif`;
      const tw = ctx.measureText(text).width + 10, th = font + 8;
      const ty = y1 - th >= 0 ? y1 - th : Math.min(h - th, y1 + lw);
      const tx = Math.min(Math.max(0, x1 + lw), Math.max(0, w - tw));
      ctx.fillStyle = color; ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = "#fff"; ctx.fillText(text, tx + 5, ty + font);
    });
    canvas.dataset.boxes = JSON.stringify(dets.map((d) => d.box.map((v) => v * scale)));
    canvas.dataset.scale = String(scale);
    canvas.dataset.lineWidth = String(lw);
    canvas.dataset.colors = JSON.stringify(dets.map((_, i) => COLORS[i % COLORS.length]));
    canvas.classList.remove("hidden");
    if (!isVideo) $("video").classList.add("hidden");
  }

  // Video answers carry one answer per sampled frame ("name@t=1.25s"): boxes of the nearest one.
  function frameTime(f) {
    const m = /@t=([0-9.]+)s$/.exec(f.filename || "");
    return m ? parseFloat(m[1]) : NaN;
  }

  function drawVideoFrame(video, answer) {
    const frames = (answer.frames || []).filter((f) => !Number.isNaN(frameTime(f)));
    if (!frames.length || !video.videoWidth) return;
    const near = frames.reduce((a, b) => (Math.abs(frameTime(b) - video.currentTime) < Math.abs(frameTime(a) - video.currentTime) ? b : a));
    drawImage(video, near);
    const canvas = $("canvas");
    canvas.dataset.frameTime = String(frameTime(near));
    canvas.dataset.frameRoles = JSON.stringify((near.detections || []).map(label));
    $("frame-caption").textContent = `Frame at ${frameTime(near).toFixed(1)} s: ${(near.detections || []).map(label).join(", ") || "nobody"}`;
  }

  function renderDetections(answer) {
    const box = $("detections");
    box.replaceChildren();
    (answer.detections || []).forEach((d, i) => {
      const div = document.createElement("div");
      div.className = "detection";
      div.dataset.role = d.role;
      const h = document.createElement("h3");
      const sw = document.createElement("span"); sw.className = "swatch"; sw.style.background = COLORS[i % COLORS.length];
      h.append(sw, document.createTextNode(`${label(d)}${d.series ? " · " + d.series : ""}`));
      div.append(h);
      const bars = document.createElement("div"); bars.className = "bars topk";
      (d.topk || []).forEach((t) => bars.append(ARD.barRow(t.role, t.score, t.series ? `${t.role} (${t.series})` : t.role)));
      div.append(bars);
      const used = new Set((d.rerank && d.rerank.tags_used) || []);
      if ((d.tags || []).length) {
        const tags = document.createElement("div"); tags.className = "tags";
        d.tags.slice(0, 24).forEach((t) => {
          const s = document.createElement("span");
          s.className = "tag" + (used.has(t.tag) ? " used" : "");
          s.textContent = `${t.tag} ${ARD.pct(t.score)}`;
          s.title = used.has(t.tag) ? "this tag moved the answer" : "predicted tag";
          tags.append(s);
        });
        div.append(tags);
      }
      if (d.rerank && d.rerank.tags_used && d.rerank.tags_used.length) {
        const p = document.createElement("div"); p.className = "small";
        const delta = d.rerank.delta >= 0 ? `+${ARD.pct(d.rerank.delta)}` : `-${ARD.pct(-d.rerank.delta)}`;
        p.textContent = `Tags that drove the answer: ${d.rerank.tags_used.join(", ")} (${delta}${d.rerank.changed ? ", changed the answer" : ""})`;
        div.append(p);
      }
      box.append(div);
    });
  }

  function renderSummary(answer) {
    const unknown = answer.unknown || answer.role === "unknown";
    const role = $("result-role");
    role.textContent = unknown ? "Nobody I know" : answer.role;
    role.classList.toggle("unknown", unknown);
    role.dataset.role = answer.role;
    const n = (answer.detections || answer.appearances || []).length;
    const parts = [];
    if (answer.series) parts.push(answer.series);
    parts.push(`confidence ${ARD.pct(answer.similarity)}`);
    if (answer.mode) parts.push(`mode ${answer.mode}`);
    if (answer.detections) parts.push(`${n} ${n === 1 ? "character" : "characters"} found`);
    if (answer.whole_image) parts.push("whole picture used");
    $("result-meta").textContent = parts.join(" · ");
    const t = answer.timings_ms || {};
    $("timings").textContent = t.total ? `answered in ${Math.round(t.total)} ms` : "";
  }

  function renderVideo(answer, url) {
    const video = $("video");
    $("canvas").classList.add("hidden");
    // the frame under the playhead is drawn with its boxes whenever the video stops on it
    video.onseeked = () => drawVideoFrame(video, answer);
    video.onpause = () => drawVideoFrame(video, answer);
    video.onloadeddata = () => {
      const main = (answer.appearances || []).find((a) => a.role === answer.role) || (answer.appearances || [])[0];
      video.currentTime = main ? main.best_frame_s : 0;  // start on the main character's best frame
    };
    video.src = url;
    video.classList.remove("hidden");
    const box = $("appearances");
    box.replaceChildren();
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>Character</th><th>Seen</th><th>Best</th></tr></thead>";
    const body = document.createElement("tbody");
    (answer.appearances || []).forEach((a) => {
      const tr = document.createElement("tr");
      const c1 = document.createElement("td"); c1.textContent = a.role;
      const c2 = document.createElement("td"); c2.textContent = `${a.start_s.toFixed(1)}–${a.end_s.toFixed(1)} s (${a.frames} frames)`;
      const c3 = document.createElement("td");
      const link = document.createElement("a"); link.href = "#"; link.textContent = `${ARD.pct(a.best_similarity)} at ${a.best_frame_s.toFixed(1)} s`;
      link.addEventListener("click", (e) => { e.preventDefault(); video.currentTime = a.best_frame_s; });
      c3.append(link);
      tr.append(c1, c2, c3); body.append(tr);
    });
    table.append(body);
    if ((answer.appearances || []).length) box.append(table);
    else box.textContent = "No known character appeared in the sampled frames.";
  }

  async function classify(file) {
    reset();
    if (!file) return;
    if (state.controller) state.controller.abort();
    state.controller = new AbortController();
    const isVideo = file.type.startsWith("video/");
    setLoading(true, isVideo ? "Watching the video…" : "Looking closely…");
    const form = new FormData();
    form.append("file", file, file.name);
    if ($("mode").value) form.append("mode", $("mode").value);
    if ($("rerank").value) form.append("rerank", $("rerank").value);
    try {
      const answer = await ARD.api("/api/classify", { method: "POST", body: form, signal: state.controller.signal });
      state.answer = answer;
      state.objectUrl = URL.createObjectURL(file);
      renderSummary(answer);
      $("detections").replaceChildren(); $("appearances").replaceChildren();
      if (answer.appearances !== undefined) {
        renderVideo(answer, state.objectUrl);
      } else {
        $("frame-caption").textContent = "";
        renderDetections(answer);
        const img = new Image();
        await new Promise((ok, bad) => { img.onload = ok; img.onerror = () => bad(new Error("the browser cannot show this picture")); img.src = state.objectUrl; });
        drawImage(img, answer);
      }
      $("feedback").classList.toggle("hidden", !answer.image_sha256);
      $("result").classList.remove("hidden");
      document.body.dataset.state = "answered";
    } catch (err) {
      if (err.name === "AbortError") return;
      ARD.showError($("error"), err);
      document.body.dataset.state = "error";
    } finally {
      setLoading(false);
    }
  }

  async function sendFeedback(body) {
    const a = state.answer;
    if (!a || !a.image_sha256) return;
    $("fb-status").textContent = "sending…";
    try {
      await ARD.api("/api/feedback", { method: "POST", json: { image_sha256: a.image_sha256, ...body }, auth: true });
      $("fb-status").textContent = "Thanks — noted for the next model update.";
    } catch (err) {
      $("fb-status").textContent = err.friendly ? `${err.friendly} ${err.message}` : String(err);
    }
  }

  function init() {
    ARD.restoreToken();
    ARD.showVersion();
    const input = $("file"), drop = $("drop");
    $("pick").addEventListener("click", (e) => { e.preventDefault(); input.click(); });
    input.addEventListener("change", () => { classify(input.files[0]); });
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
    drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) classify(f); });
    $("fb-yes").addEventListener("click", () => sendFeedback({ confirmed: true }));
    $("fb-send").addEventListener("click", () => {
      const role = $("fb-role").value.trim();
      if (!role) { $("fb-status").textContent = "Type the right name first."; return; }
      sendFeedback({ correct_role: role });
    });
  }

  document.addEventListener("DOMContentLoaded", init);
})();
