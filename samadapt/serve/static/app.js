// samadapt serve: the page. Plain JavaScript, no outside resources; it talks only to the API of its own server.
// Slices arrive as raw arrays (X-Shape header); the image is windowed here, the mask drawn as a coloured overlay.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const st = {  // the page's state; window.samadapt exposes it (the browser test reads it)
  info: null, session: null, axis: 0, index: 0, image: null, mask: null, prompts: null,
  lo: 0, hi: 1, busy: 0, request: 0, drag: null, clicks: 0, lastClickMs: null, jobs: 0,
};
window.samadapt = st;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["X-Token"] = token;
  st.busy++; view();
  try {
    const res = await fetch(path, Object.assign({}, options, { headers }));
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      throw new Error(detail);
    }
    return res;
  } finally { st.busy--; view(); }
}

async function json(path, body, method = "POST") {
  const res = await api(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return res.json();
}

async function array(res) {
  const shape = res.headers.get("X-Shape").split(",").map(Number);
  const buf = await res.arrayBuffer();
  const data = res.headers.get("X-Dtype") === "float32" ? new Float32Array(buf)
    : res.headers.get("X-Dtype") === "uint16" ? new Uint16Array(buf) : new Uint8Array(buf);
  return { shape, data };
}

function say(text) { $("message").textContent = text || ""; view(); }
function view() {  // data-state: empty | busy | error | idle; data-mask-nonzero: mask pixels of the shown slice
  const v = $("view");
  v.dataset.state = st.busy ? "busy" : $("message").textContent ? "error" : st.session ? "idle" : "empty";
  v.dataset.maskNonzero = st.mask ? String(st.mask.data.reduce((n, x) => n + (x > 0), 0)) : "";
  $("stack").style.display = st.session ? "block" : "none";
  $("placeholder").hidden = Boolean(st.session);
}

// --- model info and status line -----------------------------------------------------------------------------------
async function loadInfo() {
  st.info = await (await api("/api/info")).json();
  const i = st.info;
  const ck = i.checkpoint ? `checkpoint ${i.checkpoint} (${(i.checkpoint_sha256 || "").slice(0, 12)})` : "no checkpoint";
  st.statusBase = `${i.method} · ${i.backbone || "no backbone"} (${(i.backbone_weights || "").slice(0, 12)}) · ${ck}` +
    ` · ${i.device}`;
  status();
  $("cls").innerHTML = i.classes.map((c) => `<option value="${c.id}">${c.id}: ${escapeHtml(c.name)}</option>`).join("");
  $("legend").innerHTML = i.classes.map((c) => `<li><i style="background:${c.color}"></i>${escapeHtml(c.name)}</li>`)
    .join("");
  for (const [kind, ids] of [["points", ["tool-pos", "tool-neg"]], ["boxes", ["tool-box"]]])
    for (const id of ids) $(id).hidden = !i.prompt_kinds.includes(kind);
  $("propagate").hidden = !i.prompt_kinds.length;
  $("tool-hint").textContent = i.prompt_kinds.length ? "click: right button or shift = negative; wheel: slices"
    : `${i.method} takes no prompts: correct with the brush`;
  const first = document.querySelector(`#tools label:not([hidden]) input[name=tool]`);
  first.checked = true;
  if (i.folder) {
    const files = await (await api("/api/files")).json();
    $("served-files").innerHTML = files.map((f) => `<option>${escapeHtml(f)}</option>`).join("");
    $("served").hidden = false;
  }
}
function status(extra) {
  let s = st.statusBase || "";
  if (st.lastClickMs !== null) s += ` · last prompt ${st.lastClickMs.toFixed(0)} ms`;
  if (extra) s += ` · ${extra}`;
  $("status").textContent = s;
}
function escapeHtml(s) { return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`); }

// --- opening ------------------------------------------------------------------------------------------------------
async function opened(desc) {
  st.session = desc; say("");
  $("name").textContent = `${desc.name} · ${desc.shape.join(" × ")} · ${desc.modality}`;
  $("axis").disabled = desc.is_2d; $("axis").value = "0";
  $("predict-volume").disabled = desc.is_2d; $("propagate").disabled = desc.is_2d;
  setWindow("auto");
  $("preset").value = "auto";
  await setAxis(0);
}
async function upload(file) {
  say("");
  try {
    const res = await api(`/api/sessions?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream" } });
    await opened(await res.json());
  } catch (e) { say(e.message); }
}
$("file").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); e.target.value = ""; });
$("open-served").addEventListener("click", async () => {
  try { await opened(await json("/api/sessions/open", { path: $("served-files").value })); } catch (e) { say(e.message); }
});

// --- slices -------------------------------------------------------------------------------------------------------
async function setAxis(axis) {
  st.axis = axis;
  const n = st.session.shape[axis];
  $("slice").max = String(n - 1);
  await setSlice(Math.floor(n / 2));
}
async function setSlice(index) {
  const n = st.session.shape[st.axis];
  st.index = Math.max(0, Math.min(n - 1, index));
  $("slice").value = String(st.index);
  $("slice-label").textContent = `${st.index + 1} / ${n}`;
  const req = ++st.request, q = `axis=${st.axis}&index=${st.index}`, sid = st.session.id;
  try {
    const [img, mask, prompts] = await Promise.all([
      api(`/api/sessions/${sid}/image?${q}`).then(array), api(`/api/sessions/${sid}/mask?${q}`).then(array),
      api(`/api/sessions/${sid}/prompts?${q}&cls=${$("cls").value}`).then((r) => r.json())]);
    if (req !== st.request) return;  // a newer slice was asked for meanwhile
    st.image = img; st.mask = mask; st.prompts = prompts;
    layout(); drawImage(); drawMask(); view();
  } catch (e) { say(e.message); }
}
$("axis").addEventListener("change", () => setAxis(Number($("axis").value)));
$("slice").addEventListener("input", () => setSlice(Number($("slice").value)));
$("view").addEventListener("wheel", (e) => {
  if (!st.session) return;
  e.preventDefault(); setSlice(st.index + (e.deltaY > 0 ? 1 : -1));
}, { passive: false });

function layout() {  // physical aspect from the spacing; volumes shown with their first row at the bottom
  const [, h, w] = st.image.shape, sp = st.session.spacing.filter((_, a) => a !== st.axis);
  const pw = w * sp[1], ph = h * sp[0], box = Math.min(innerWidth - 280, innerHeight - 110);
  const scale = Math.max(1, box) / Math.max(pw, ph);
  const stack = $("stack");
  stack.style.width = `${pw * scale}px`; stack.style.height = `${ph * scale}px`;
  stack.classList.toggle("flip", !st.session.is_2d);
  for (const id of ["image", "overlay"]) { $(id).width = w; $(id).height = h; }
  $("image").style.width = `${pw * scale}px`; $("image").style.height = `${ph * scale}px`;
  $("marks").width = Math.round(pw * scale); $("marks").height = Math.round(ph * scale);
}

// --- drawing ------------------------------------------------------------------------------------------------------
function setWindow(preset) {
  const d = st.session;
  if (preset === "auto") [st.lo, st.hi] = d.window;
  else if (preset === "full") [st.lo, st.hi] = d.range;
  else { const [l, w] = preset.split(",").map(Number); st.lo = l - w / 2; st.hi = l + w / 2; }
  if (st.hi <= st.lo) st.hi = st.lo + 1;
  $("level").value = ((st.lo + st.hi) / 2).toPrecision(4); $("width").value = (st.hi - st.lo).toPrecision(4);
}
$("preset").addEventListener("change", () => { setWindow($("preset").value); drawImage(); });
for (const id of ["level", "width"]) $(id).addEventListener("change", () => {
  const l = Number($("level").value), w = Math.max(Number($("width").value), 1e-6);
  st.lo = l - w / 2; st.hi = l + w / 2; drawImage();
});

function drawImage() {
  if (!st.image) return;
  const [c, h, w] = st.image.shape, d = st.image.data, n = h * w, k = 255 / (st.hi - st.lo);
  const ctx = $("image").getContext("2d"), out = ctx.createImageData(w, h), px = out.data;
  for (let i = 0; i < n; i++) {
    for (let ch = 0; ch < 3; ch++) {
      const v = d[(c >= 3 ? ch : 0) * n + i];
      px[4 * i + ch] = Math.max(0, Math.min(255, (v - st.lo) * k));
    }
    px[4 * i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

function drawMask() {
  if (!st.mask) return;
  const [h, w] = st.mask.shape, m = st.mask.data, alpha = Math.round(Number($("opacity").value) * 255);
  const colors = st.info.classes.map((c) => [1, 3, 5].map((o) => parseInt(c.color.slice(o, o + 2), 16)));
  const ctx = $("overlay").getContext("2d"), out = ctx.createImageData(w, h), px = out.data;
  for (let i = 0; i < h * w; i++) {
    if (!m[i]) continue;
    const col = colors[(m[i] - 1) % colors.length];
    px[4 * i] = col[0]; px[4 * i + 1] = col[1]; px[4 * i + 2] = col[2]; px[4 * i + 3] = alpha;
  }
  ctx.putImageData(out, 0, 0);
  drawMarks();
}
$("opacity").addEventListener("input", drawMask);
$("cls").addEventListener("change", () => st.session && setSlice(st.index));

function drawMarks(extraBox) {
  const cv = $("marks"), ctx = cv.getContext("2d"), [h, w] = st.mask.shape;
  const sx = cv.width / w, sy = cv.height / h;
  ctx.clearRect(0, 0, cv.width, cv.height);
  const p = st.prompts || { points: [], box: null };
  const box = extraBox || p.box;
  if (box) {
    ctx.strokeStyle = "#ffd400"; ctx.lineWidth = 2;
    ctx.strokeRect(box[0] * sx, box[1] * sy, (box[2] - box[0] + 1) * sx, (box[3] - box[1] + 1) * sy);
  }
  for (const q of p.points) {
    ctx.beginPath(); ctx.arc((q.x + 0.5) * sx, (q.y + 0.5) * sy, 5, 0, 2 * Math.PI);
    ctx.fillStyle = q.positive ? "#20e060" : "#ff3030"; ctx.fill();
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.stroke();
  }
}

// --- prompts, brush, undo ---------------------------------------------------------------------------------------
function slicePixel(e) {  // mouse position -> slice pixel (x = column, y = row)
  const r = $("marks").getBoundingClientRect(), [h, w] = st.mask.shape;
  let fy = (e.clientY - r.top) / r.height;
  if ($("stack").classList.contains("flip")) fy = 1 - fy;
  const x = Math.floor(((e.clientX - r.left) / r.width) * w), y = Math.floor(fy * h);
  return [Math.max(0, Math.min(w - 1, x)), Math.max(0, Math.min(h - 1, y))];
}
const tool = () => document.querySelector("input[name=tool]:checked").value;

async function sendPrompt(body) {
  const t0 = performance.now();
  try {
    const mask = await api(`/api/sessions/${st.session.id}/prompt`, { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(Object.assign({ axis: st.axis, index: st.index, cls: Number($("cls").value) }, body)) })
      .then(array);
    st.lastClickMs = performance.now() - t0; st.clicks++;
    st.mask = mask;
    st.prompts = await (await api(`/api/sessions/${st.session.id}/prompts?axis=${st.axis}&index=${st.index}` +
      `&cls=${$("cls").value}`)).json();
    drawMask(); status(); view();
  } catch (e) { say(e.message); }
}
async function sendPaint(points, erase) {
  try {
    st.mask = await api(`/api/sessions/${st.session.id}/paint`, { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ axis: st.axis, index: st.index, cls: erase ? 0 : Number($("cls").value),
        radius: Number($("radius").value), points }) }).then(array);
    drawMask(); view();
  } catch (e) { say(e.message); }
}

const marks = $("marks");
marks.addEventListener("contextmenu", (e) => e.preventDefault());
marks.addEventListener("mousedown", (e) => {
  if (!st.mask) return;
  const [x, y] = slicePixel(e), t = tool();
  if (t === "pos" || t === "neg") {
    const positive = (t === "pos") !== (e.button === 2 || e.shiftKey);
    sendPrompt({ x, y, positive });
  } else st.drag = { tool: t, start: [x, y], points: [[x, y]] };
});
marks.addEventListener("mousemove", (e) => {
  if (!st.drag) return;
  const [x, y] = slicePixel(e), d = st.drag;
  if (d.tool === "box") drawMarks([Math.min(d.start[0], x), Math.min(d.start[1], y), Math.max(d.start[0], x),
    Math.max(d.start[1], y)]);
  else {
    d.points.push([x, y]);
    const ctx = $("overlay").getContext("2d");
    ctx.fillStyle = d.tool === "erase" ? "rgba(0,0,0,0.6)" : "rgba(255,255,255,0.5)";
    ctx.beginPath(); ctx.arc(x + 0.5, y + 0.5, Number($("radius").value), 0, 2 * Math.PI); ctx.fill();
  }
});
addEventListener("mouseup", (e) => {
  const d = st.drag; st.drag = null;
  if (!d) return;
  const [x, y] = slicePixel(e);
  if (d.tool === "box") {
    if (x === d.start[0] || y === d.start[1]) { drawMarks(); return; }
    sendPrompt({ box: [d.start[0], d.start[1], x, y] });
  } else sendPaint(d.points, d.tool === "erase");
});

async function undo() {
  if (!st.session) return;
  try {
    const r = await (await api(`/api/sessions/${st.session.id}/undo`, { method: "POST" })).json();
    if (!r.undone) { status("nothing to undo"); return; }
    if (r.undone.axis !== st.axis) { $("axis").value = String(r.undone.axis); st.axis = r.undone.axis; }
    await setSlice(r.undone.index);
  } catch (e) { say(e.message); }
}
$("undo").addEventListener("click", undo);
addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
  if (!st.session || e.target.tagName === "INPUT") return;
  if (e.key === "ArrowUp") setSlice(st.index + 1);
  if (e.key === "ArrowDown") setSlice(st.index - 1);
});

// --- whole volume and download ----------------------------------------------------------------------------------
async function runJob(path, body, what) {  // a background job of the server, polled until it ends
  if (!st.session) return;
  const buttons = ["predict-volume", "propagate"].map($);
  try {
    await json(`/api/sessions/${st.session.id}/${path}`, body);
    buttons.forEach((b) => { b.disabled = true; });
    for (;;) {
      const p = await (await fetch(`/api/sessions/${st.session.id}/progress`,
        { headers: token ? { "X-Token": token } : {} })).json();
      status(`${what}: ${p.done} / ${p.total} slices`);
      if (!p.running) { if (p.error) say(p.error); break; }
      await new Promise((r) => setTimeout(r, 500));
    }
    st.jobs++;
    status(`${what}: done`);
    await setSlice(st.index);
  } catch (e) { say(e.message); } finally {
    buttons.forEach((b) => { b.disabled = st.session.is_2d; });
  }
}
$("predict-volume").addEventListener("click", () => runJob("predict-volume", { axis: st.axis }, "predicting the volume"));
$("propagate").addEventListener("click", () => runJob("propagate",
  { axis: st.axis, index: st.index, cls: Number($("cls").value) }, "propagating"));

$("download").addEventListener("click", async () => {
  if (!st.session) return;
  try {
    const blob = await (await api(`/api/sessions/${st.session.id}/download`)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = st.session.download;
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  } catch (e) { say(e.message); }
});

loadInfo().catch((e) => { say(e.message); $("status").textContent = "cannot reach the server"; });
