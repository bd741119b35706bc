'use strict';
// The interactive 3D view: this page owns the view state, sends all of it on every change
// (at most once per animation frame) and draws the JPEG frames the server pushes back.
// Protocol: node/render/live_session.py. Nothing here ever sees the volume.
(() => {
  const PANES = ['3d', 'axial', 'coronal', 'sagittal'];
  const MAX_SIDE = 1024;
  const PRESET_LABELS = {bone: 'bone', vascular: 'vascular', lung: 'lung', soft_tissue: 'soft tissue', mr: 'MR'};
  const $ = (id) => document.getElementById(id);

  const canvases = Object.fromEntries(PANES.map((p) => [p, $('pane-' + p)]));
  const meta = {};  // pane -> header of the frame on screen
  const images = {};  // pane -> ImageBitmap on screen
  const stats = {seq: 0, idle: -1, frames: {}, full: 0, interactive: 0, last: {}, errors: [], ready: null, closed: null};
  window.view3dStats = stats;  // read by the browser tests and handy in the devtools console

  let info = null;  // the server's "ready" message
  let state = null;
  let seq = 0;
  let queued = false;
  let ws = null;

  function defaults() {
    const preset = info.presets[0];
    return {type: 'view', seq: 0, interacting: false, azimuth: 0, elevation: 0, zoom: 1, pan: [0, 0],
            mode: 'vr', preset, window: info.windows[preset].slice(), shift: 0, opacity: 1, slab: 0,
            crosshair: info.center_mm.slice(), sizes: paneSizes()};
  }

  function paneSizes() {
    const sizes = {};
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    for (const p of PANES) {
      const box = canvases[p].getBoundingClientRect();
      let w = Math.round(box.width * dpr), h = Math.round(box.height * dpr);
      const shrink = Math.min(1, MAX_SIDE / Math.max(w, h, 1));
      w = Math.round(w * shrink);
      h = Math.round(h * shrink);
      if (w >= 16 && h >= 16) {
        sizes[p] = [h, w];
        if (canvases[p].width !== w || canvases[p].height !== h) {
          canvases[p].width = w;
          canvases[p].height = h;
          if (images[p]) draw(p);
        }
      }
    }
    return sizes;
  }

  // -- sending ------------------------------------------------------------------------------
  function send() {
    if (!state || queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      state.seq = stats.seq = ++seq;
      ws.send(JSON.stringify(state));
    });
  }

  function change(fields) {
    Object.assign(state, fields);
    syncControls();
    send();
  }

  // -- receiving ----------------------------------------------------------------------------
  const arrivals = {};  // pane -> arrival counter, so a slow decode never overwrites a newer frame
  const drawn = {};

  async function onFrame(buffer) {
    const view = new DataView(buffer);
    const n = view.getUint32(0);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
    const pane = header.pane;
    const mine = arrivals[pane] = (arrivals[pane] || 0) + 1;
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(new Blob([new Uint8Array(buffer, 4 + n)], {type: 'image/jpeg'}));
    } finally {
      ws && ws.readyState === WebSocket.OPEN && ws.send('{"type":"ack"}');
    }
    if (mine < (drawn[pane] || 0)) return;
    drawn[pane] = mine;
    if (images[pane]) images[pane].close();
    images[pane] = bitmap;
    meta[pane] = header;
    stats.frames[pane] = (stats.frames[pane] || 0) + 1;
    stats[header.quality] += pane === '3d' ? 1 : 0;
    stats.last[pane] = header;
    draw(pane);
    if (pane === '3d') {
      $('status').textContent = `${header.quality} · render ${header.render_ms} ms · ${info.renderer}`;
    }
  }

  function draw(pane) {
    const c = canvases[pane], g = c.getContext('2d'), m = meta[pane], img = images[pane];
    g.fillStyle = '#000';
    g.fillRect(0, 0, c.width, c.height);
    g.drawImage(img, 0, 0, c.width, c.height);
    if (pane !== '3d') {
      const [x, y] = m.crosshair_px.map((v) => v * c.width / img.width);
      g.strokeStyle = 'rgba(255, 210, 0, 0.8)';
      g.lineWidth = 1;
      g.beginPath();
      g.moveTo(0, y + 0.5); g.lineTo(c.width, y + 0.5);
      g.moveTo(x + 0.5, 0); g.lineTo(x + 0.5, c.height);
      g.stroke();
    }
    labels(g, c, m.labels, pane === '3d' ? state.mode.toUpperCase() : `${pane} ${m.slice + 1}/${m.slices}`);
    if (pane === '3d' && m.mm_per_px) scaleBar(g, c, m.mm_per_px * img.width / c.width);
  }

  function labels(g, c, edges, title) {
    g.fillStyle = '#ffd200';
    g.font = `${Math.max(11, Math.round(c.height / 28))}px system-ui, sans-serif`;
    g.textBaseline = 'middle';
    g.textAlign = 'left';
    g.fillText(edges.left, 4, c.height / 2);
    g.textAlign = 'right';
    g.fillText(edges.right, c.width - 4, c.height / 2);
    g.textAlign = 'center';
    g.textBaseline = 'top';
    g.fillText(edges.top, c.width / 2, 4);
    g.textBaseline = 'bottom';
    g.fillText(edges.bottom, c.width / 2, c.height - 4);
    g.textAlign = 'left';
    g.textBaseline = 'top';
    g.fillText(title, 4, 4);
  }

  function scaleBar(g, c, mmPerPx) {
    const mm = [10, 20, 50, 100, 200].find((v) => v / mmPerPx >= c.width / 8) || 200;
    const px = mm / mmPerPx, x = c.width - 12 - px, y = c.height - 24;
    g.fillRect(x, y, px, 2);
    g.textAlign = 'center';
    g.textBaseline = 'bottom';
    g.fillText(`${mm / 10} cm`, x + px / 2, y - 2);
  }

  // -- the 3D pane: rotate, pan, zoom, window/opacity; mouse and touch alike -----------------
  const pointers = new Map();
  let gesture = null;
  let wheelTimer = null;

  function mmPerCssPx() {
    const m = meta['3d'], c = canvases['3d'];
    return m ? m.mm_per_px * c.width / c.getBoundingClientRect().width : 1;
  }

  function startGesture(e) {
    const pts = [...pointers.values()];
    if (pts.length >= 2) {
      const [a, b] = pts;
      gesture = {kind: 'pinch', dist: Math.hypot(a.x - b.x, a.y - b.y), mid: [(a.x + b.x) / 2, (a.y + b.y) / 2],
                 zoom: state.zoom, pan: state.pan.slice()};
      return;
    }
    const kind = e.ctrlKey ? 'window' : (e.button === 2 || e.button === 1 || e.shiftKey) ? 'pan' : 'rotate';
    gesture = {kind, x: e.clientX, y: e.clientY, from: JSON.parse(JSON.stringify(state))};
  }

  function moveGesture(e) {
    const g = gesture;
    if (g.kind === 'pinch') {
      const [a, b] = [...pointers.values()];
      const dist = Math.hypot(a.x - b.x, a.y - b.y), mid = [(a.x + b.x) / 2, (a.y + b.y) / 2];
      const zoom = clamp(g.zoom * dist / Math.max(g.dist, 1), 0.1, 20);
      const k = mmPerCssPx();
      change({interacting: true, zoom, pan: [g.pan[0] - (mid[0] - g.mid[0]) * k, g.pan[1] + (mid[1] - g.mid[1]) * k]});
      return;
    }
    const dx = e.clientX - g.x, dy = e.clientY - g.y, f = g.from;
    if (g.kind === 'rotate') {
      change({interacting: true, azimuth: f.azimuth - dx * 0.5, elevation: clamp(f.elevation + dy * 0.5, -90, 90)});
    } else if (g.kind === 'pan') {
      const k = mmPerCssPx();
      change({interacting: true, pan: [f.pan[0] - dx * k, f.pan[1] + dy * k]});
    } else if (state.mode === 'vr') {
      change({interacting: true, shift: clamp(f.shift + dx * 0.004, -1, 1),
              opacity: clamp(f.opacity * Math.exp(-dy * 0.01), 0, 3)});
    } else {
      change({interacting: true, window: [f.window[0] + dy * 2, Math.max(1, f.window[1] + dx * 4)]});
    }
  }

  function bind3d() {
    const c = canvases['3d'];
    c.addEventListener('contextmenu', (e) => e.preventDefault());
    c.addEventListener('pointerdown', (e) => {
      if (!state) return;
      c.setPointerCapture(e.pointerId);
      pointers.set(e.pointerId, {x: e.clientX, y: e.clientY});
      startGesture(e);
    });
    c.addEventListener('pointermove', (e) => {
      if (!gesture || !pointers.has(e.pointerId)) return;
      pointers.set(e.pointerId, {x: e.clientX, y: e.clientY});
      moveGesture(e);
    });
    const end = (e) => {
      if (!pointers.delete(e.pointerId)) return;
      if (pointers.size) {
        startGesture(e);  // a finger lifted from a pinch: carry on with the remaining one
        return;
      }
      gesture = null;
      change({interacting: false});  // one full-quality frame of where the hand stopped
    };
    c.addEventListener('pointerup', end);
    c.addEventListener('pointercancel', end);
    c.addEventListener('wheel', (e) => {
      if (!state) return;
      e.preventDefault();
      change({interacting: true, zoom: clamp(state.zoom * Math.exp(-e.deltaY * 0.0015), 0.1, 20)});
      clearTimeout(wheelTimer);
      wheelTimer = setTimeout(() => change({interacting: false}), 250);
    }, {passive: false});
  }

  // -- MPR panes: click or drag moves the crosshair, the wheel pages through slices ------------
  function panePoint(pane, e) {
    const c = canvases[pane], m = meta[pane], img = images[pane], box = c.getBoundingClientRect();
    const x = (e.clientX - box.left) * img.width / box.width, y = (e.clientY - box.top) * img.height / box.height;
    const p = [0, 1, 2].map((i) => m.origin_mm[i] + x * m.right_mm[i] + y * m.down_mm[i]);
    // Keep the crosshair's depth along this pane's normal: only the in-plane position moves.
    const n = m.slice_step_mm, nn = Math.hypot(...n), along = [0, 1, 2].reduce(
      (s, i) => s + (p[i] - state.crosshair[i]) * n[i] / nn, 0);
    return p.map((v, i) => v - along * n[i] / nn);
  }

  function bindPlane(pane) {
    const c = canvases[pane];
    let dragging = false;
    c.addEventListener('pointerdown', (e) => {
      if (!state || !meta[pane]) return;
      dragging = true;
      c.setPointerCapture(e.pointerId);
      change({crosshair: panePoint(pane, e)});
    });
    c.addEventListener('pointermove', (e) => { if (dragging && meta[pane]) change({crosshair: panePoint(pane, e)}); });
    c.addEventListener('pointerup', () => { dragging = false; });
    c.addEventListener('pointercancel', () => { dragging = false; });
    c.addEventListener('wheel', (e) => {
      if (!state || !meta[pane]) return;
      e.preventDefault();
      const step = meta[pane].slice_step_mm, s = Math.sign(e.deltaY);
      change({crosshair: state.crosshair.map((v, i) => v + s * step[i])});
    }, {passive: false});
  }

  // -- controls -----------------------------------------------------------------------------
  function syncControls() {
    document.body.classList.toggle('not-vr', state.mode !== 'vr');
    for (const b of document.querySelectorAll('[data-mode]')) b.setAttribute('aria-pressed', b.dataset.mode === state.mode);
    for (const b of document.querySelectorAll('[data-preset]')) {
      b.setAttribute('aria-pressed', b.dataset.preset === state.preset);
    }
    $('shift').value = state.shift;
    $('opacity').value = state.opacity;
    if (document.activeElement !== $('slab')) $('slab').value = state.slab;
    if (document.activeElement !== $('level')) $('level').value = Math.round(state.window[0]);
    if (document.activeElement !== $('width')) $('width').value = Math.round(state.window[1]);
  }

  // A MinIP of the whole volume would show the air around the patient: it starts as a 20 mm
  // slab about the crosshair in the lung window; a MIP starts over the whole volume.
  function modeDefaults(mode) {
    if (mode === 'minip') {
      return {mode, slab: state.slab || 20, window: (info.windows.lung || state.window).slice()};
    }
    if (mode === 'mip') return {mode, slab: 0, window: info.windows[state.preset].slice()};
    return {mode};
  }

  function bindControls() {
    for (const b of document.querySelectorAll('[data-mode]')) {
      b.addEventListener('click', () => change({interacting: false, ...modeDefaults(b.dataset.mode)}));
    }
    const box = $('presets');
    for (const name of info.presets) {
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.preset = name;
      b.textContent = PRESET_LABELS[name] || name;
      b.addEventListener('click', () => change({preset: name, window: info.windows[name].slice(), shift: 0,
                                                opacity: 1, interacting: false}));
      box.appendChild(b);
    }
    const slider = (id, key) => {
      $(id).addEventListener('input', () => change({[key]: Number($(id).value), interacting: true}));
      $(id).addEventListener('change', () => change({interacting: false}));
    };
    slider('shift', 'shift');
    slider('opacity', 'opacity');
    const win = () => {
      const level = Number($('level').value), width = Number($('width').value);
      if (Number.isFinite(level) && Number.isFinite(width) && width > 0) change({window: [level, width]});
    };
    $('slab').addEventListener('change', () => {
      const slab = Number($('slab').value);
      if (Number.isFinite(slab) && slab >= 0) change({slab, interacting: false});
    });
    $('level').addEventListener('change', win);
    $('width').addEventListener('change', win);
    $('reset').addEventListener('click', () => {
      state = defaults();
      change({});
    });
    let resizeTimer = null;
    new ResizeObserver(() => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (!state) return;
        // The observer fires once on observe() too: an unchanged size would only cost a second render.
        const sizes = paneSizes();
        if (JSON.stringify(sizes) !== JSON.stringify(state.sizes)) change({sizes});
      }, 150);
    }).observe($('panes'));
  }

  // -- connection ---------------------------------------------------------------------------
  function fail(text) {
    $('error').textContent = text;
    stats.errors.push(text);
  }

  function connect() {
    const path = location.pathname.replace(/\/+$/, '');
    ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}/ws`);
    ws.binaryType = 'arraybuffer';
    ws.addEventListener('message', (e) => {
      if (typeof e.data !== 'string') {
        onFrame(e.data).catch((err) => fail(`frame: ${err}`));
        return;
      }
      const msg = JSON.parse(e.data);
      if (msg.type === 'loading') {
        $('status').textContent = 'loading the series on the server…';
      } else if (msg.type === 'ready') {
        info = msg;
        stats.ready = msg;
        bindControls();
        state = defaults();
        $('status').textContent = `${msg.modality} ${msg.shape.join('×')} · ${msg.renderer}`;
        change({});
      } else if (msg.type === 'idle') {
        stats.idle = msg.seq;
      } else if (msg.type === 'error') {
        fail(msg.message);
      }
    });
    ws.addEventListener('close', (e) => {
      stats.closed = e.code;
      if (e.code === 4401 || e.code === 1008) {
        location.assign('/login?next=' + encodeURIComponent(location.pathname));
      } else if (e.code !== 1000) {
        $('status').textContent = `disconnected (${e.code}); reload the page to reconnect`;
      }
    });
  }

  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

  bind3d();
  PANES.slice(1).forEach(bindPlane);
  connect();
})();
