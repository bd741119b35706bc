'use strict';
// One learning-loop project: case counts and states (who did what), the annotation queue with its
// reasons, "open the next case in OHIF" (the prediction pre-loaded), and training runs with live curves
// (loss and validation Dice per epoch, redrawn while a run is going).
const {api, el, clear, time, flash} = Hilum;
const SVG = 'http://www.w3.org/2000/svg';
const STATES = ['unlabeled', 'predicted', 'in_review', 'labeled'];
let generation = 0;  // showProject calls: an answer for a project clicked before the latest is dropped
let polls = 0;  // showRuns calls: a poll and the reload after Train overlap, and the older may answer last
let timer = null;

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// Loss (left axis, its own scale) and validation Dice (0..1) against the epoch.
function curves(run) {
  const W = 420, H = 160, L = 36, R = 36, T = 10, B = 24;
  const epochs = run.epochs;
  const last = Math.max(2, ...epochs.map((e) => e.of || e.epoch));
  const maxLoss = Math.max(1e-6, ...epochs.map((e) => e.loss));
  const x = (ep) => L + (W - L - R) * (ep - 1) / (last - 1);
  const yLoss = (v) => T + (H - T - B) * (1 - v / maxLoss);
  const yDice = (v) => T + (H - T - B) * (1 - v);
  const line = (pts, cls) => svg('polyline', {class: cls, fill: 'none', points: pts.map((p) => p.join(',')).join(' ')});
  const lossPts = epochs.map((e) => [x(e.epoch), yLoss(e.loss)]);
  const dicePts = epochs.filter((e) => e.val_mean_dice !== null).map((e) => [x(e.epoch), yDice(e.val_mean_dice)]);
  const plot = svg('svg', {class: 'curves', width: W, height: H, viewBox: `0 0 ${W} ${H}`, 'data-run': run.run,
    'data-points': epochs.length},
    svg('rect', {x: L, y: T, width: W - L - R, height: H - T - B, class: 'frame'}),
    line(lossPts, 'loss'), line(dicePts, 'dice'),
    ...dicePts.map(([cx, cy]) => svg('circle', {cx, cy, r: 2.5, class: 'dice'})),
    svg('text', {x: 2, y: T + 8, class: 'loss'}, maxLoss.toFixed(2)),
    svg('text', {x: W - R + 4, y: T + 8, class: 'dice'}, '1.0'),
    svg('text', {x: L, y: H - 6}, 'epoch 1'), svg('text', {x: W - R - 40, y: H - 6}, `epoch ${last}`));
  return el('figure', {class: 'run-curves'}, plot,
    el('figcaption', {class: 'muted'}, el('span', {class: 'loss'}, '— loss'), '  ',
      el('span', {class: 'dice'}, '— validation Dice')));
}

function runRow(run) {
  const lastEpoch = run.epochs.length ? run.epochs[run.epochs.length - 1] : null;
  const outcome = run.state === 'done' ? `version ${run.version} (validation Dice ${Number(run.mean_dice).toFixed(3)})`
    : run.state === 'failed' ? run.error : lastEpoch ? `epoch ${lastEpoch.epoch}/${lastEpoch.of}` : 'starting';
  return el('div', {class: 'run', 'data-run': run.run, 'data-state': run.state},
    el('h3', {}, `Run ${run.run}: `, el('span', {class: `status-${run.state === 'done' ? 'done' : run.state}`}, run.state),
      ` — ${outcome}`),
    run.epochs.length ? curves(run) : null);
}

function caseRows(cases) {
  return Object.entries(cases).map(([uid, c]) => {
    const last = c.history.length ? c.history[c.history.length - 1] : null;
    const label = c.labels.length ? c.labels[c.labels.length - 1] : null;
    return el('tr', {'data-case': uid, 'data-state': c.state},
      el('td', {class: 'uid'}, uid), el('td', {}, c.state.replace('_', ' ')),
      el('td', {}, c.prediction ? `${c.prediction.model_version}` +
        (c.prediction.uncertainty ? ` (uncertainty ${Number(c.prediction.uncertainty.score).toFixed(3)})` : '') : '–'),
      el('td', {}, label ? `v${label.version} by ${label.by}` : '–'),
      el('td', {}, last ? `${last.why} — ${last.by}, ${time(last.at)}` : ''));
  });
}

async function openNext(name, strategy, result) {
  try {
    const next = await api('GET', `/api/projects/${encodeURIComponent(name)}/next?strategy=${strategy}`);
    if (!next.case) {
      flash(result, next.reason, true);
      return;
    }
    flash(result, `${next.case}: ${next.reason}`, true);
    window.open(next.viewer_url, '_blank');
  } catch (e) {
    flash(result, e.message, false);
  }
}

async function train(name, shown, button, result) {
  button.disabled = true;  // a double click would start two runs
  try {
    const r = await api('POST', `/api/projects/${encodeURIComponent(name)}/runs`);
    flash(result, `run ${r.run} started on ${r.labeled_cases} labeled case(s)`, true);
    await showRuns(name, shown);
  } catch (e) {
    flash(result, e.message, false);
  } finally {
    button.disabled = false;
  }
}

// Polls while a run goes; a failed poll (a network blip, a 502) is shown and polled again.
async function showRuns(name, shown) {
  const mine = ++polls;
  clearTimeout(timer);
  let runs;
  try {
    runs = await api('GET', `/api/projects/${encodeURIComponent(name)}/runs`, undefined, {background: true});
  } catch (e) {
    runs = {error: e.message};
  }
  if (shown !== generation || mine !== polls) return;
  if (runs.error) {
    flash(document.getElementById('runs-status'), `not updated: ${runs.error}`, false);
  } else {
    clear(document.getElementById('runs-status'));
    clear(document.getElementById('runs'),
      runs.runs.length ? runs.runs.slice().reverse().map(runRow) : el('p', {class: 'muted'}, 'no run yet'));
  }
  if (runs.error || runs.runs.some((r) => r.state === 'running')) timer = setTimeout(() => showRuns(name, shown), 2000);
}

async function showProject(name) {
  const shown = ++generation;
  clearTimeout(timer);
  for (const li of document.querySelectorAll('#project-list li')) li.classList.toggle('active', li.dataset.project === name);
  const [p, q] = await Promise.all([api('GET', `/api/projects/${encodeURIComponent(name)}`),
    api('GET', `/api/projects/${encodeURIComponent(name)}/queue?n=10`)]);
  if (shown !== generation) return;
  const strategy = el('select', {id: 'strategy'}, ['uncertainty', 'diverse', 'random'].map((s) => el('option', {value: s}, s)));
  const result = el('span', {id: 'project-result'});
  clear(document.getElementById('project'),
    el('h2', {}, `${name} — model ${p.project.model}`),
    el('div', {class: 'tiles', id: 'counts'}, STATES.map((s) =>
      el('div', {class: 'tile', 'data-count': s}, el('b', {}, p.counts[s]), s.replace('_', ' ')))),
    el('p', {},
      el('button', {id: 'open-next', onclick: () => openNext(name, strategy.value, result)}, 'Open next case in OHIF'),
      ' by ', strategy, ' ',
      el('button', {id: 'train', class: 'admin-only', onclick: (e) => train(name, shown, e.currentTarget, result)}, 'Train'),
      ' ', result),
    el('h2', {}, 'Annotation queue'),
    q.queue.length ? el('ol', {id: 'queue'}, q.queue.map((e) =>
      el('li', {'data-case': e.study_uid}, el('span', {class: 'uid'}, e.study_uid), ` — ${e.reason}`)))
      : el('p', {class: 'muted'}, 'no predicted case waits'),
    el('h2', {}, 'Cases'),
    el('table', {id: 'cases'}, el('thead', {}, el('tr', {}, ['Study', 'State', 'Prediction', 'Label', 'Last change']
      .map((h) => el('th', {}, h)))), el('tbody', {}, caseRows(p.cases))),
    el('h2', {}, 'Training runs ', el('span', {id: 'runs-status'})), el('div', {id: 'runs'}));
  await showRuns(name, shown);
}

async function load() {
  const {projects} = await api('GET', '/api/projects');
  const list = document.getElementById('project-list');
  clear(list, projects.length ? projects.map((p) => el('li', {'data-project': p.name},
    el('a', {href: `/console/projects#${encodeURIComponent(p.name)}`, onclick: () => showProject(p.name)}, p.name),
    el('span', {class: 'muted'}, ` ${p.counts.labeled}/${Object.values(p.counts).reduce((a, b) => a + b, 0)} labeled`)))
    : el('li', {class: 'muted'}, 'no project: create one with `hilum project create`'));
  const wanted = decodeURIComponent(location.hash.slice(1)) || (projects[0] && projects[0].name);
  if (wanted && projects.some((p) => p.name === wanted)) await showProject(wanted);
}

Hilum.start('/console/projects').then(load);
