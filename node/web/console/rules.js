'use strict';
// Rules editor: view and edit rule files with the server's validation shown next to the text,
// explain the edited text against a stored study, simulate it on past studies, history, diff, revert.
const {api, el, clear, flash} = Hilum;
let current = null;  // the file being edited

const $ = (id) => document.getElementById(id);

function errorsOf(e) {
  const detail = e.data && e.data.detail;
  return detail && Array.isArray(detail.errors) ? detail.errors : null;
}

function showErrors(errors) {
  clear($('rule-errors'), errors.map((x) => {
    const where = x.file + (x.line ? `:${x.line}` : '');
    const what = [x.rule ? `rule '${x.rule}'` : null, x.field ? `field '${x.field}'` : null].filter(Boolean);
    return el('li', {'data-line': x.line ?? ''}, `${where}: ${what.length ? what.join(', ') + ': ' : ''}${x.message}`);
  }));
}

function proposal() {
  return current ? {[current]: $('rule-text').value} : {};
}

async function loadOverview() {
  const o = await api('GET', '/api/rules');
  $('rules-version').textContent = o.version ?? 'none';
  $('directory-errors').textContent = o.directory_errors.length
    ? `${o.directory_errors.length} problem(s) in the rules directory; the previous rules stay active` : '';
  clear($('rule-files'), o.files.map((name) => el('li', {},
    el('a', {href: '/console/rules', 'data-file': name, class: name === current ? 'active' : null,
      onclick: (ev) => { ev.preventDefault(); openFile(name); }}, name))));
  clear(document.querySelector('#rules-table tbody'), o.rules.map((r) => el('tr', {},
    el('td', {}, r.name, el('br'), el('span', {class: 'muted'}, r.description)),
    el('td', {}, r.file + (r.line ? `:${r.line}` : '')), el('td', {}, r.level), el('td', {}, r.order),
    el('td', {}, [r.enabled ? null : 'disabled', r.exclusive ? 'exclusive' : null, r.fallback ? 'fallback' : null]
      .filter(Boolean).join(', ')),
    el('td', {}, r.action))));
  if (!current && o.files.length) await openFile(o.files[0]);
}

async function openFile(name) {
  const f = await api('GET', `/api/rules/files/${encodeURIComponent(name)}`);
  current = name;
  $('file-name').textContent = name;
  $('rule-text').value = f.text;
  clear($('rule-errors'));
  clear($('save-result'));
  for (const a of document.querySelectorAll('#rule-files a')) a.classList.toggle('active', a.dataset.file === name);
}

async function validate() {
  const r = await api('POST', '/api/rules/validate', {files: proposal()});
  showErrors(r.errors);
  flash($('save-result'), r.valid ? 'valid' : `${r.errors.length} problem(s)`, r.valid);
}

async function save() {
  // Validate first: a refused change is shown next to the text without a failed request.
  const check = await api('POST', '/api/rules/validate', {files: proposal()});
  if (!check.valid) {
    showErrors(check.errors);
    flash($('save-result'), `not saved: ${check.errors.length} problem(s)`, false);
    return;
  }
  try {
    const r = await api('PUT', `/api/rules/files/${encodeURIComponent(current)}`,
      {text: $('rule-text').value, message: $('change-message').value});
    clear($('rule-errors'));
    flash($('save-result'), `saved: version ${r.version}`, true);
    await Promise.all([loadOverview(), loadHistory()]);
  } catch (e) {
    const errors = errorsOf(e);
    if (errors) showErrors(errors);
    flash($('save-result'), `not saved: ${e.message}`, false);
  }
}

async function remove() {
  if (!confirm(`Delete ${current}?`)) return;
  try {
    await api('DELETE', `/api/rules/files/${encodeURIComponent(current)}`);
    current = null;
    await Promise.all([loadOverview(), loadHistory()]);
  } catch (e) {
    const errors = errorsOf(e);
    if (errors) showErrors(errors);
    flash($('save-result'), `not deleted: ${e.message}`, false);
  }
}

async function loadStudies() {
  const s = await api('GET', '/api/studies?limit=100');
  clear($('explain-study'), s.studies.map((x) => el('option', {value: x.study_uid},
    `${x.patient_name || '(no name)'} · ${x.study_date || ''} · ${x.study_uid}`)));
}

async function explain() {
  const out = $('explain-result');
  try {
    const r = await api('POST', '/api/rules/explain', {study_uid: $('explain-study').value, files: proposal()});
    clear(out, r.explanations.map((x) => el('div', {class: 'explanation'},
      el('h3', {}, `${x.level} rules for ${x.subject}`),
      el('table', {}, x.rules.map((o) => el('tr', {},
        el('td', {class: `status-${o.status === 'matched' ? 'done' : 'pending'}`}, o.status),
        el('td', {}, o.rule), el('td', {}, o.reason)))),
      el('p', {}, x.actions.length ? `=> ${x.actions.length} action(s)` : '=> nothing to do'))));
  } catch (e) {
    const errors = errorsOf(e);
    if (errors) showErrors(errors);
    clear(out, el('p', {class: 'error'}, e.message));
  }
}

async function simulateChange() {
  const out = $('simulate-result');
  out.hidden = false;
  try {
    const r = await api('POST', '/api/rules/simulate?since_days=30', {files: proposal()});
    out.textContent = r.text;
  } catch (e) {
    const errors = errorsOf(e);
    if (errors) showErrors(errors);
    out.textContent = e.message;
  }
}

async function loadHistory() {
  const h = await api('GET', '/api/rules/history');
  clear(document.querySelector('#history tbody'), h.versions.map((v) => el('tr', {'data-version': v.version},
    el('td', {}, v.version), el('td', {}, v.time), el('td', {}, v.author), el('td', {}, v.message),
    el('td', {},
      el('button', {class: 'show-diff', onclick: () => showDiff(v.version)}, 'Diff'), ' ',
      el('button', {class: 'admin-only revert', onclick: () => revert(v.version)}, 'Revert to this')))));
}

async function showDiff(version) {
  const d = await api('GET', `/api/rules/history/${version}`);
  $('diff').hidden = false;
  $('diff').textContent = d.diff || '(no changes)';
}

async function revert(version) {
  try {
    const r = await api('POST', `/api/rules/history/${version}/revert`);
    flash($('save-result'), `reverted to version ${version}: now version ${r.version}`, true);
    current = null;
    await Promise.all([loadOverview(), loadHistory()]);
  } catch (e) {
    flash($('save-result'), `revert refused: ${e.message}`, false);
  }
}

$('validate-button').addEventListener('click', validate);
$('save-button').addEventListener('click', save);
$('delete-button').addEventListener('click', remove);
$('explain-button').addEventListener('click', explain);
$('simulate-button').addEventListener('click', simulateChange);
$('new-file-button').addEventListener('click', () => {
  current = $('new-file').value.trim();
  $('file-name').textContent = `${current} (new)`;
  $('rule-text').value = '';
});

Hilum.start('/console/rules').then(() => Promise.all([loadOverview(), loadStudies(), loadHistory()]));
