'use strict';
// PACS sources (echo), a study query with "retrieve selected", the retrieve queue with live
// progress, and the pull rules with their last run and high-water mark. Viewers see; admins act.
const {api, el, clear, flash, time, polled} = Hilum;

function adminButton(cls, text, action, result) {
  return el('button', {class: `admin-only ${cls}`, onclick: async () => {
    flash(result, '…', true);
    try {
      flash(result, await action(), true);
    } catch (e) {
      flash(result, e.message, false);
    }
  }}, text);
}

async function loadSources() {
  const d = await api('GET', '/api/pacs/sources');
  const select = document.querySelector('#query select[name=source]');
  clear(select, d.sources.map((s) => el('option', {value: s.name}, s.name)));
  clear(document.querySelector('#sources tbody'), d.sources.map((s) => {
    const result = el('span', {class: 'echo-result'});
    const echo = adminButton('echo', 'Echo', async () => {
      const r = await api('POST', `/api/pacs/sources/${encodeURIComponent(s.name)}/echo`);
      if (!r.ok) throw new Error(r.detail);
      return `ok (${r.ms} ms)`;
    }, result);
    const where = s.type === 'dimse' ? `${s.ae_title}@${s.host}:${s.port}` : s.qido_url;
    return el('tr', {'data-source': s.name}, el('td', {}, s.name), el('td', {}, s.type), el('td', {}, where),
      el('td', {}, s.retrieve + (s.type === 'dimse' && s.retrieve === 'move' ? ` → ${s.move_destination}` : '')),
      el('td', {}, s.max_concurrent), el('td', {}, echo, result));
  }));
}

async function query(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = {};
  for (const k of ['patient_id', 'accession', 'modality']) if (form.get(k)) body[k] = form.get(k);
  if (form.get('since')) body.since = form.get('since');
  const status = document.getElementById('query-status');
  flash(status, 'searching…', true);
  try {
    const source = form.get('source');
    const r = await api('POST', `/api/pacs/sources/${encodeURIComponent(source)}/query`, body);
    clear(document.querySelector('#matches tbody'), r.matches.map((m) => el('tr', {'data-study': m.study_uid},
      el('td', {}, el('input', {type: 'checkbox', value: m.study_uid, 'data-source': source})),
      el('td', {}, m.study_date), el('td', {}, m.patient_id), el('td', {}, m.accession),
      el('td', {}, m.modalities.join('/')), el('td', {}, m.instances ?? '?'), el('td', {}, m.description),
      el('td', {}, m.in_hilum ? 'yes' : ''))));
    document.getElementById('retrieve-selected').disabled = r.matches.length === 0;
    flash(status, `${r.matches.length} stud${r.matches.length === 1 ? 'y' : 'ies'}` +
      (r.malformed ? `, ${r.malformed} malformed answer(s) skipped` : '') +
      (r.warnings && r.warnings.length ? `; warning: ${r.warnings.join('; ')}` : ''), !(r.warnings && r.warnings.length));
  } catch (e) {
    flash(status, e.message, false);
  }
}

async function retrieveSelected() {
  const boxes = [...document.querySelectorAll('#matches input[type=checkbox]:checked')];
  const status = document.getElementById('retrieve-status');
  if (!boxes.length) return flash(status, 'select studies first', false);
  try {
    const r = await api('POST', '/api/pacs/retrieves',
      {source: boxes[0].dataset.source, study_uids: boxes.map((b) => b.value)});
    flash(status, `queued: ${r.ids.join(', ')}`, true);
    loadRetrieves();
  } catch (e) {
    flash(status, e.message, false);
  }
}

const loadRetrieves = polled(() => api('GET', '/api/pacs/retrieves?limit=100', undefined, {background: true}),
  (d, changed) => changed && clear(document.querySelector('#retrieves tbody'), d.retrieves.map((r) => {
    const result = el('span', {});
    const act = ['queued', 'querying', 'retrieving'].includes(r.status)
      ? adminButton('cancel-retrieve', 'Cancel', async () => (await api('POST', `/api/pacs/retrieves/${r.id}/cancel`)).action, result)
      : ['failed', 'partial', 'cancelled'].includes(r.status)
        ? adminButton('retry-retrieve', 'Retry', async () => (await api('POST', `/api/pacs/retrieves/${r.id}/retry`)).action, result)
        : null;
    const pct = r.progress === null ? '' : ` (${Math.round(r.progress * 100)} %)`;
    return el('tr', {'data-retrieve': r.id, class: `status-${r.status}`},
      el('td', {}, r.id), el('td', {}, r.status + (r.method ? ` · ${r.method}` : '')), el('td', {}, r.source),
      el('td', {}, r.study_uid + (r.series ? ` (${r.series.length} series)` : '')),
      el('td', {}, `${r.received}/${r.expected ?? '?'}${pct}`),
      el('td', {}, `ok ${r.completed} · failed ${r.failed} · warning ${r.warning}`),
      el('td', {}, r.requested_by),
      el('td', {class: r.error || (r.detail && r.detail.warnings) ? 'error' : null},
        [r.error, ...((r.detail && r.detail.warnings) || [])].filter(Boolean).join('; ')),
      el('td', {}, act, result));
  })));

const loadPullRules = polled(() => api('GET', '/api/pacs/pull-rules', undefined, {background: true}),
  (d, changed) => changed && clear(document.querySelector('#pull-rules tbody'), d.pull_rules.map((p) => {
    const result = el('span', {});
    const outcome = p.last_error ? p.last_error : p.last_result
      ? `${p.last_result.matches} matches, ${p.last_result.queued} queued, ${p.last_result.rechecked} re-checked` +
        (p.last_result.left ? `, ${p.last_result.left} left for later` : '') +
        (p.last_result.warnings ? `; warning: ${p.last_result.warnings.join('; ')}` : '') : '';
    return el('tr', {'data-rule': p.name}, el('td', {}, p.name), el('td', {}, p.source),
      el('td', {}, `every ${p.every_s} s` + (p.window ? ` in ${p.window}` : '') + (p.watch ? ', watch' : '')),
      el('td', {}, time(p.last_run_at)), el('td', {class: p.last_error ? 'error' : null}, outcome),
      el('td', {}, time(p.next_at)), el('td', {}, p.high_water || ''),
      el('td', {}, adminButton('run-pull', 'Run now', async () => {
        await api('POST', `/api/pacs/pull-rules/${encodeURIComponent(p.name)}/run`);
        return 'requested';
      }, result), result));
  })));

Hilum.start('/console/pacs').then(async () => {
  document.getElementById('query').addEventListener('submit', query);
  document.getElementById('retrieve-selected').addEventListener('click', retrieveSelected);
  await Promise.all([loadSources(), loadRetrieves(), loadPullRules()]);
  setInterval(() => { loadRetrieves().catch(() => null); loadPullRules().catch(() => null); }, 2000);
});
