// dd label: paint artifact masks over a queue. No dependencies; talks to dd/label/serve.py.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const imgCanvas = $("img"), predCanvas = $("pred"), maskCanvas = $("mask");
  const stage = $("stage"), viewport = $("viewport");
  const MASK_RGB = [255, 40, 90], PRED_RGB = [40, 170, 255];
  const MAX_UNDO = 50;

  const st = {
    state: null, index: 0, item: null, W: 0, H: 0,
    mask: null, pred: null, undo: [], redo: [],
    tool: "brush", size: 12, zoom: 1, painting: false, last: null, dirty: false, busy: false,
  };

  function setStatus(text, error) {
    const s = $("status");
    s.textContent = text;
    s.className = error ? "error" : "";
  }

  async function api(path, opts) {
    const r = await fetch(path, opts);
    const ctype = r.headers.get("Content-Type") || "";
    const body = ctype.startsWith("application/json") ? await r.json() : null;
    if (!r.ok) throw new Error((body && body.error) || r.status + " " + r.statusText);
    return body;
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const im = new Image();
      im.onload = () => resolve(im);
      im.onerror = () => reject(new Error("cannot load " + url));
      im.src = url + (url.includes("?") ? "&" : "?") + "t=" + Date.now();
    });
  }

  function grayOf(im, W, H) {
    const c = document.createElement("canvas");
    c.width = W; c.height = H;
    const ctx = c.getContext("2d");
    ctx.drawImage(im, 0, 0, W, H);
    const d = ctx.getImageData(0, 0, W, H).data;
    const out = new Uint8Array(W * H);
    for (let i = 0; i < out.length; i++) out[i] = d[4 * i];
    return out;
  }

  // -- rendering ----------------------------------------------------------------------------
  function renderMask() {
    const ctx = maskCanvas.getContext("2d");
    const id = ctx.createImageData(st.W, st.H);
    const d = id.data, m = st.mask;
    for (let i = 0; i < m.length; i++) {
      if (m[i]) {
        d[4 * i] = MASK_RGB[0]; d[4 * i + 1] = MASK_RGB[1]; d[4 * i + 2] = MASK_RGB[2];
        d[4 * i + 3] = m[i];
      }
    }
    ctx.putImageData(id, 0, 0);
  }

  function renderPred() {
    const ctx = predCanvas.getContext("2d");
    ctx.clearRect(0, 0, st.W, st.H);
    if (!st.pred || !$("showpred").checked) return;
    const id = ctx.createImageData(st.W, st.H);
    const d = id.data, p = st.pred;
    for (let i = 0; i < p.length; i++) {
      d[4 * i] = PRED_RGB[0]; d[4 * i + 1] = PRED_RGB[1]; d[4 * i + 2] = PRED_RGB[2];
      d[4 * i + 3] = p[i];
    }
    ctx.putImageData(id, 0, 0);
  }

  function applyZoom() {
    for (const c of [imgCanvas, predCanvas, maskCanvas]) {
      c.style.width = st.W * st.zoom + "px";
      c.style.height = st.H * st.zoom + "px";
    }
    stage.style.width = st.W * st.zoom + "px";
    stage.style.height = st.H * st.zoom + "px";
    $("zoomval").textContent = Math.round(st.zoom * 100) + "%";
  }

  function fitZoom() {
    const w = viewport.clientWidth - 20, h = viewport.clientHeight - 20;
    const z = Math.min(w / st.W, h / st.H);
    st.zoom = Math.max(0.05, Math.min(8, isFinite(z) && z > 0 ? z : 1));
    applyZoom();
  }

  function setZoom(z) {
    st.zoom = Math.max(0.05, Math.min(32, z));
    applyZoom();
  }

  function updateProgress(p) {
    if (p && typeof p.done === "number") {
      st.state.done = p.done; st.state.total = p.total;
    }
    $("progress").textContent = st.state.done + " / " + st.state.total;
  }

  // -- painting -----------------------------------------------------------------------------
  function pushUndo() {
    st.undo.push(st.mask.slice());
    if (st.undo.length > MAX_UNDO) st.undo.shift();
    st.redo = [];
  }

  function stamp(cx, cy) {
    const r = st.size / 2, v = st.tool === "eraser" ? 0 : 255;
    const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(st.W - 1, Math.ceil(cx + r));
    const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(st.H - 1, Math.ceil(cy + r));
    const r2 = Math.max(r * r, 0.25);
    for (let y = y0; y <= y1; y++) {
      const dy = y + 0.5 - cy;
      for (let x = x0; x <= x1; x++) {
        const dx = x + 0.5 - cx;
        if (dx * dx + dy * dy <= r2) st.mask[y * st.W + x] = v;
      }
    }
  }

  function line(a, b) {
    const dist = Math.hypot(b.x - a.x, b.y - a.y);
    const step = Math.max(0.5, st.size / 4);
    const n = Math.max(1, Math.ceil(dist / step));
    for (let i = 1; i <= n; i++) stamp(a.x + ((b.x - a.x) * i) / n, a.y + ((b.y - a.y) * i) / n);
  }

  function pos(ev) {
    const r = maskCanvas.getBoundingClientRect();
    return { x: ((ev.clientX - r.left) * st.W) / r.width, y: ((ev.clientY - r.top) * st.H) / r.height };
  }

  maskCanvas.addEventListener("pointerdown", (ev) => {
    if (!st.mask || ev.button !== 0) return;
    maskCanvas.setPointerCapture(ev.pointerId);
    pushUndo();
    st.painting = true;
    st.last = pos(ev);
    stamp(st.last.x, st.last.y);
    st.dirty = true;
    renderMask();
  });
  maskCanvas.addEventListener("pointermove", (ev) => {
    if (!st.painting) return;
    const p = pos(ev);
    line(st.last, p);
    st.last = p;
    renderMask();
  });
  const endStroke = () => { st.painting = false; st.last = null; };
  maskCanvas.addEventListener("pointerup", endStroke);
  maskCanvas.addEventListener("pointercancel", endStroke);

  function undo() {
    if (!st.undo.length) return;
    st.redo.push(st.mask);
    st.mask = st.undo.pop();
    st.dirty = true;
    renderMask();
  }
  function redo() {
    if (!st.redo.length) return;
    st.undo.push(st.mask);
    st.mask = st.redo.pop();
    st.dirty = true;
    renderMask();
  }
  function clearMask() {
    pushUndo();
    st.mask = new Uint8Array(st.W * st.H);
    st.dirty = true;
    renderMask();
  }
  function usePrediction() {
    if (!st.pred) { setStatus("this item has no prediction", true); return; }
    pushUndo();
    const t = Math.round((Number($("threshold").value) / 100) * 255);
    const m = new Uint8Array(st.W * st.H);
    for (let i = 0; i < m.length; i++) m[i] = st.pred[i] >= t ? 255 : 0;
    st.mask = m;
    st.dirty = true;
    renderMask();
  }

  function setTool(t) {
    st.tool = t;
    $("brush").classList.toggle("active", t === "brush");
    $("eraser").classList.toggle("active", t === "eraser");
  }
  function setSize(s) {
    st.size = Math.max(1, Math.min(200, Math.round(s)));
    $("size").value = st.size;
    $("sizeval").textContent = st.size;
  }

  // -- items --------------------------------------------------------------------------------
  async function loadItem(n) {
    if (!st.state || n < 0 || n >= st.state.total) return;
    document.body.dataset.ready = "";
    st.busy = true;
    try {
      const item = await api("/api/item/" + n);
      st.index = n; st.item = item; st.W = item.width; st.H = item.height;
      for (const c of [imgCanvas, predCanvas, maskCanvas]) { c.width = st.W; c.height = st.H; }
      const im = await loadImage("/api/item/" + n + "/image");
      imgCanvas.getContext("2d").drawImage(im, 0, 0, st.W, st.H);
      st.pred = item.has_prediction
        ? grayOf(await loadImage("/api/item/" + n + "/prediction"), st.W, st.H) : null;
      st.mask = item.has_mask
        ? grayOf(await loadImage("/api/item/" + n + "/mask"), st.W, st.H)
        : new Uint8Array(st.W * st.H);
      st.undo = []; st.redo = []; st.dirty = false;
      renderMask(); renderPred();
      if (!st.zoomSet) { fitZoom(); st.zoomSet = true; } else applyZoom();
      $("itemname").textContent = "#" + (n + 1) + " " + item.id;
      const bits = [];
      if (item.category) bits.push(item.category);
      if (item.reason) bits.push(item.reason);
      if (typeof item.max === "number") bits.push("max " + item.max.toFixed(3));
      if (item.decision) bits.push("labelled: " + item.decision.label);
      if (item.prompt) bits.push("\u201c" + item.prompt + "\u201d");
      $("meta").textContent = bits.join(" \u00b7 ");
      $("usepred").disabled = !st.pred;
      setStatus("");
      document.body.dataset.ready = String(n);
    } catch (e) {
      setStatus(String(e.message || e), true);
    } finally {
      st.busy = false;
    }
  }

  function annotator() {
    return $("annotator").value.trim() || (st.state && st.state.annotator) || "anonymous";
  }

  function maskPng() {
    const c = document.createElement("canvas");
    c.width = st.W; c.height = st.H;
    const ctx = c.getContext("2d");
    const id = ctx.createImageData(st.W, st.H);
    const d = id.data, m = st.mask;
    for (let i = 0; i < m.length; i++) {
      d[4 * i] = d[4 * i + 1] = d[4 * i + 2] = m[i];
      d[4 * i + 3] = 255;
    }
    ctx.putImageData(id, 0, 0);
    return new Promise((res) => c.toBlob(res, "image/png"));
  }

  async function decide(kind) {
    if (st.busy || !st.item) return;
    st.busy = true;
    const n = st.index;
    document.body.dataset.saved = "";
    try {
      let r;
      const who = encodeURIComponent(annotator());
      if (kind === "artifact" || kind === "uncertain") {
        const blob = await maskPng();
        r = await api("/api/item/" + n + "/mask?label=" + kind + "&annotator=" + who, {
          method: "POST", headers: { "Content-Type": "image/png" }, body: blob,
        });
      } else {
        r = await api("/api/item/" + n + "/decision", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ label: kind, annotator: annotator() }),
        });
      }
      st.state.items[n].label = r.decision.label;
      updateProgress(r);
      setStatus("saved #" + (n + 1) + ": " + r.decision.label);
      document.body.dataset.saved = n + ":" + r.decision.label;
      st.busy = false;
      if (n + 1 < st.state.total) await loadItem(n + 1);
    } catch (e) {
      setStatus("not saved: " + (e.message || e), true);
    } finally {
      st.busy = false;
    }
  }

  // -- controls -----------------------------------------------------------------------------
  $("prev").onclick = () => loadItem(st.index - 1);
  $("next").onclick = () => loadItem(st.index + 1);
  $("brush").onclick = () => setTool("brush");
  $("eraser").onclick = () => setTool("eraser");
  $("size").oninput = (e) => setSize(Number(e.target.value));
  $("undo").onclick = undo;
  $("redo").onclick = redo;
  $("clear").onclick = clearMask;
  $("opacity").oninput = (e) => { maskCanvas.style.opacity = Number(e.target.value) / 100; };
  $("showpred").onchange = renderPred;
  $("threshold").oninput = (e) => {
    $("thrval").textContent = (Number(e.target.value) / 100).toFixed(2);
  };
  $("usepred").onclick = usePrediction;
  $("zoomin").onclick = () => setZoom(st.zoom * 1.25);
  $("zoomout").onclick = () => setZoom(st.zoom / 1.25);
  $("zoomfit").onclick = fitZoom;
  $("save").onclick = () => decide("artifact");
  $("noartifact").onclick = () => decide("no_artifact");
  $("uncertain").onclick = () => decide("uncertain");
  $("skip").onclick = () => decide("skip");
  $("annotator").onchange = (e) => localStorage.setItem("dd-annotator", e.target.value.trim());
  viewport.addEventListener("wheel", (ev) => {
    if (!ev.ctrlKey) return;
    ev.preventDefault();
    setZoom(st.zoom * (ev.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });

  document.addEventListener("keydown", (ev) => {
    if (ev.target && ev.target.tagName === "INPUT" && ev.target.type === "text") return;
    const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
    if (ctrl && (k === "z" || k === "Z")) { ev.preventDefault(); ev.shiftKey ? redo() : undo(); return; }
    if (ctrl && (k === "y" || k === "Y")) { ev.preventDefault(); redo(); return; }
    if (ctrl) return;
    const map = {
      s: () => decide("artifact"), n: () => decide("no_artifact"), u: () => decide("uncertain"),
      x: () => decide("skip"), b: () => setTool("brush"), e: () => setTool("eraser"),
      c: clearMask, t: usePrediction,
      p: () => { $("showpred").checked = !$("showpred").checked; renderPred(); },
      "[": () => setSize(st.size / 1.25), "]": () => setSize(st.size * 1.25 + 1),
      "+": () => setZoom(st.zoom * 1.25), "=": () => setZoom(st.zoom * 1.25),
      "-": () => setZoom(st.zoom / 1.25), "0": fitZoom,
      ArrowLeft: () => loadItem(st.index - 1), ArrowRight: () => loadItem(st.index + 1),
    };
    const fn = map[k] || map[k.toLowerCase()];
    if (fn) { ev.preventDefault(); fn(); }
  });

  window.addEventListener("beforeunload", (ev) => {
    if (st.dirty) { ev.preventDefault(); ev.returnValue = ""; }
  });

  async function start() {
    try {
      st.state = await api("/api/state");
    } catch (e) {
      setStatus("cannot reach the server: " + (e.message || e), true);
      return;
    }
    $("annotator").value = localStorage.getItem("dd-annotator") || st.state.annotator;
    maskCanvas.style.opacity = Number($("opacity").value) / 100;
    updateProgress(st.state);
    const first = st.state.first_todo === null ? 0 : st.state.first_todo;
    await loadItem(first);
  }
  window.ddLabel = st;
  start();
})();
