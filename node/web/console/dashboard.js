'use strict';
// The dashboard: queue depth, throughput, training runs going (or just ended), studies with their jobs
// and deliveries, failed deliveries; polled every POLL_MS. Admin buttons call the API, which checks the role itself.
const {api, el, clear, time, flash, polled} = Hilum;
const POLL_MS = 2000;

function tile(label, value, id) {
  return el('div', {class: 'tile', id}, el('b', {}, value), label);
}

async function act(method, path, what) {
  const out = document.getElementById('action-result');
  try {
    const r = await api(method, path);
    flash(out, `${what}: ${r.action || 'done'}`, true);
  } catch (e) {
    flash(out, `${what} refused: ${e.message}`, false);
  }
  refresh();
}

function deliverySummary(job) {
  const counts = {};
  for (const result of job.results) {
    for (const [dest, status] of Object.entries(result.deliveries)) {
      const key = `${dest} ${status}`;
      counts[key] = (counts[key] || 0) + 1;
    }
  }
  return Object.entries(counts).map(([key, n]) => {
    const status = key.split(' ')[1];
    return el('span', {class: `status-${status}`}, `${key} ×${n} `);
  });
}

function jobRow(job) {
  const failedDeliveries = job.results.some((r) => Object.values(r.deliveries).includes('failed'));
  const retry = (job.status === 'failed' || failedDeliveries)
    ? el('button', {class: 'admin-only retry-job', 'data-job': job.id,
      onclick: () => act('POST', `/api/jobs/${job.id}/retry`, `retry job ${job.id}`)}, 'Retry')
    : null;
  const pct = Math.round((job.progress || 0) * 100);
  return el('tr', {class: 'job', 'data-job': job.id},
    el('td', {colspan: 2}, `job ${job.id} · ${job.rule} → ${job.handler}`),
    el('td', {class: `status-${job.status} job-status`}, job.status),
    el('td', {}, el('span', {class: 'progress', title: `${pct} %`}, el('span', {style: null})),
      ` ${pct} % `, job.message || ''),
    el('td', {}, `attempt ${job.attempts}`),
    el('td', {class: 'deliveries'}, deliverySummary(job)),
    el('td', {class: 'error job-error'}, job.error || '',
      ...(job.quality_warnings || []).map((w) => el('div', {class: 'job-warning'}, `⚠ ${w}`))),
    el('td', {}, retry));
}

function studyRows(s) {
  const modalities = [...new Set(s.series.map((x) => x.modality).filter(Boolean))].join(', ');
  const uid = encodeURIComponent(s.study_uid);
  const complete = s.stable ? null : el('button', {class: 'admin-only force-complete',
    onclick: () => act('POST', `/api/studies/${uid}/complete`, 'force complete')}, 'Force complete');
  // The server-side 3D view opens one series: the largest CT, MR or PET series of the study.
  const volume = s.series.filter((x) => ['CT', 'MR', 'PT'].includes(x.modality))
    .sort((a, b) => b.instances - a.instances)[0];
  const view3d = volume
    ? [' · ', el('a', {href: `/view3d/${uid}/${encodeURIComponent(volume.series_uid)}`, class: 'view3d'}, '3D (server)')]
    : [];
  const row = el('tr', {class: 'study', 'data-study': s.study_uid},
    el('td', {}, el('span', {class: 'patient-name'}, s.patient_name || '(no name)'), el('br'),
      el('span', {class: 'uid'}, s.patient_id || '')),
    el('td', {}, modalities),
    el('td', {}, s.study_date || ''),
    el('td', {}, time(s.last_received)),
    el('td', {class: 'instances'}, s.instances_received),
    el('td', {class: s.stable ? 'status-done' : 'status-receiving'}, s.stable ? 'stable' : 'receiving'),
    el('td', {}, el('a', {href: `/viewer?StudyInstanceUIDs=${uid}`, class: 'ohif'}, 'OHIF'), view3d),
    el('td', {}, complete));
  const note = s.route_note
    ? [el('tr', {class: 'route-note', 'data-study': s.study_uid}, el('td', {colspan: 8}, s.route_note))] : [];
  return [row, originRow(s), ...note, ...s.jobs.map(jobRow), ...s.pending_rules.map(pendingRow)];
}

const METHODS = {move: 'C-MOVE', get: 'C-GET', wado: 'WADO-RS'};

function asker(r) {
  if (r.by === 'rule') return `pull rule ${r.rule}`;
  if (r.by === 'priors') return `priors of job ${r.job}`;
  return `${r.user || '?'} via ${r.via}`;
}

// Where each series came from: pushed by which AE, or retrieved by which pull rule or user from
// which source (the same words as `hilum status --study`).
function originText(o) {
  const parts = o.retrieved.map((r) => `retrieved from ${r.source} by ${asker(r)} (retrieve ${r.retrieve}, `
    + `${METHODS[r.method] || r.method}, ${r.at ? time(r.at) : 'not finished'}): ${r.instances}`);
  if (o.pushed) {
    const p = o.pushed;
    parts.push(`${p.calling_ae ? `pushed by ${p.calling_ae} from ${p.source_ip}` : 'pushed'} (${time(p.first_at)}): `
      + `${p.instances}`);
  }
  for (const r of o.arriving) {
    parts.push(`retrieve ${r.retrieve} from ${r.source} by ${asker(r)} still ${r.status}`);
  }
  return parts.join('; ');
}

function originRow(s) {
  return el('tr', {class: 'origin', 'data-study': s.study_uid},
    el('td', {colspan: 8}, ...s.series.map((x) => el('div', {class: 'series-origin', 'data-series': x.series_uid},
      `${x.modality || ''} ${x.description || x.series_uid}: ${originText(x.origin)}`))));
}

// A rule that matched but waits for its own (longer) quiet period: the study is not done yet.
function pendingRow(p) {
  return el('tr', {class: 'pending-rule'},
    el('td', {colspan: 2}, `rule ${p.rule} → ${p.handler || 'forward'}`),
    el('td', {class: 'status-pending'}, 'waiting'),
    el('td', {colspan: 5}, `runs at ${time(p.fires_at)} unless more instances arrive`));
}

function deliveryRow(d) {
  return el('tr', {'data-delivery': d.id},
    el('td', {}, d.id), el('td', {}, d.destination), el('td', {}, d.kind), el('td', {}, d.job_id ?? ''),
    el('td', {}, d.attempts), el('td', {class: 'error'}, d.last_error || ''),
    el('td', {}, el('button', {class: 'admin-only retry-delivery',
      onclick: () => act('POST', `/api/deliveries/${d.id}/retry`, `retry delivery ${d.id}`)}, 'Retry')));
}

function workerRow(w, now) {
  return el('tr', {'data-worker': w.name},
    el('td', {}, w.name), el('td', {}, w.host), el('td', {}, w.queues.join(', ')),
    el('td', {}, w.current_job ?? 'idle'), el('td', {}, `${Math.round(now - w.last_seen)} s ago`));
}

// Remote workers and their queues (executor.kind: celery); hidden for the local executor.
function renderCluster(cl, now) {
  const section = document.getElementById('cluster');
  section.hidden = cl.executor !== 'celery';
  if (section.hidden) return;
  clear(document.querySelector('#workers tbody'),
    cl.workers.length ? cl.workers.map((w) => workerRow(w, now))
      : [el('tr', {}, el('td', {colspan: 5, class: 'muted'}, 'no worker has reported yet'))]);
}

const fixed = (v, digits) => (v === null || v === undefined ? '–' : Number(v).toFixed(digits));

// A project's training run: its last epoch (loss, validation Dice) while it goes, its outcome once ended;
// the project page draws the whole curves.
function trainingRow(r) {
  const e = r.last_epoch;
  const outcome = r.state === 'done' ? `version ${r.version}` : r.state === 'failed' ? r.error : '';
  // data-epoch: the epochs done so far, so a script (and the browser test) can wait for a given one
  return el('tr', {class: 'training-run', 'data-project': r.project, 'data-run': r.run, 'data-state': r.state,
                   'data-epoch': e ? e.epoch : 0},
    el('td', {}, el('a', {href: `/console/projects#${encodeURIComponent(r.project)}`}, r.project)),
    el('td', {class: 'uid'}, r.run),
    el('td', {class: `status-${r.state}`}, r.state),
    el('td', {class: 'epoch'}, e ? `${e.epoch}/${e.of}` : 'starting'),
    el('td', {class: 'loss'}, e ? fixed(e.loss, 4) : '–'),
    el('td', {class: 'dice'}, e ? `${fixed(e.val_mean_dice, 3)} (best ${fixed(r.best_val_mean_dice, 3)})` : '–'),
    el('td', {class: r.state === 'failed' ? 'error' : ''}, outcome));
}

function renderTraining(runs) {
  const section = document.getElementById('training');
  section.hidden = !runs.length;
  clear(document.querySelector('#training-runs tbody'), runs.map(trainingRow));
}

function render(data, changed) {
  renderCluster(data.cluster, data.now);  // "N s ago" moves with the clock
  document.getElementById('updated').textContent = new Date().toLocaleTimeString();
  if (!changed) return;
  const q = data.queue;
  const h = data.last_hour;
  clear(document.getElementById('queue'),
    tile('jobs waiting', q.jobs_pending, 'q-jobs-pending'), tile('jobs running', q.jobs_running, 'q-jobs-running'),
    tile('deliveries waiting', q.deliveries_pending, 'q-deliveries-pending'),
    tile('deliveries failed', q.deliveries_failed, 'q-deliveries-failed'),
    tile('instances / last hour', h.instances_received, 'h-instances'),
    tile('jobs done / last hour', h.jobs_done, 'h-jobs-done'),
    tile('deliveries / last hour', h.deliveries_done, 'h-deliveries'),
    ...Object.entries(data.cluster.queues || {}).map(([name, n]) => tile(`queue ${name}`, n, `q-broker-${name}`)));
  renderTraining(data.training);
  document.getElementById('studies-total').textContent = `(${data.studies_total})`;
  clear(document.querySelector('#studies tbody'), data.studies.flatMap(studyRows));
  clear(document.querySelector('#failed-deliveries tbody'),
    data.failed_deliveries.length ? data.failed_deliveries.map(deliveryRow)
      : [el('tr', {}, el('td', {colspan: 7, class: 'muted'}, 'none'))]);
  // Progress bar widths are set as properties, not style attributes: the CSP forbids inline styles.
  for (const row of document.querySelectorAll('tr.job')) {
    const job = data.studies.flatMap((s) => s.jobs).find((j) => String(j.id) === row.dataset.job);
    row.querySelector('.progress > span').style.width = `${Math.round((job.progress || 0) * 100)}%`;
  }
}

// What changes with the clock alone (the server's time, the workers' heartbeats) redraws no row.
const steady = (data) => JSON.stringify({...data, now: 0, cluster: {...data.cluster, workers: 0}});
const poll = polled(() => api('GET', '/api/dashboard', undefined, {background: true}), render, steady);

async function refresh() {
  try {
    await poll();
  } catch (e) {
    document.getElementById('updated').textContent = `failed: ${e.message}`;
  }
}

Hilum.start('/console/').then(() => {
  refresh();
  setInterval(refresh, POLL_MS);
});
