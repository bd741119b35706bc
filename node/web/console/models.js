'use strict';
// Model versions (states, validation Dice, shadow agreement) with the admin's promote/shadow/retire,
// and the learning-loop projects (case counts per state, the head of the annotation queue).
const {api, el, clear, time, flash} = Hilum;

function fmt(x, digits = 3) {
  return x === null || x === undefined ? '–' : Number(x).toFixed(digits);
}

function actionButton(model, version, action, label, result) {
  return el('button', {class: `admin-only ${action}`, onclick: async () => {
    try {
      const r = await api('POST', `/api/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}/${action}`);
      flash(result, `${version}: ${r.before} → ${r.after}`, true);
      await load();
    } catch (e) {
      flash(result, e.message, false);
    }
  }}, label);
}

function agreementTable(summary) {
  return el('table', {class: 'agreement'},
    el('thead', {}, el('tr', {}, ['Structure', 'Cases', 'Mean Dice', 'Min Dice', 'Mean volume diff (ml)',
      'Mean volume diff (%)'].map((h) => el('th', {}, h)))),
    el('tbody', {}, Object.entries(summary.labels).map(([name, s]) => el('tr', {},
      el('td', {}, name), el('td', {}, s.cases), el('td', {}, fmt(s.mean_dice)), el('td', {}, fmt(s.min_dice)),
      el('td', {}, fmt(s.mean_volume_diff_ml, 1)), el('td', {}, fmt(s.mean_volume_diff_pct, 1))))));
}

function modelSection(m) {
  const result = el('span', {class: 'model-result'});
  const rows = m.versions.map((v) => el('tr', {'data-version': v.version},
    el('td', {}, v.version), el('td', {class: `state state-${v.state}`}, v.state),
    el('td', {}, v.validation ? fmt(v.validation.mean_dice) : '–'), el('td', {}, time(v.registered_at)),
    el('td', {}, v.registered_by || ''), el('td', {class: 'uid'}, v.sha256 ? v.sha256.slice(0, 12) : ''),
    el('td', {}, v.state === 'active' ? '' : actionButton(m.model, v.version, 'promote', 'Promote', result),
      v.version === 'built-in' || ['shadow', 'active'].includes(v.state) ? '' :
        actionButton(m.model, v.version, 'shadow', 'Shadow', result),
      v.version === 'built-in' || v.state === 'retired' ? '' :
        actionButton(m.model, v.version, 'retire', 'Retire', result))));
  const shadows = Object.entries(m.shadow_agreement).map(([version, s]) => el('div', {class: 'shadow',
    'data-shadow': version},
    el('h3', {}, `Shadow ${version} against the active version: ${s.cases} case(s), mean Dice ${fmt(s.mean_dice)}`),
    s.cases ? agreementTable(s) : el('p', {class: 'muted'}, 'no case compared yet')));
  return el('section', {class: 'model', 'data-model': m.model},
    el('h3', {}, `${m.handler} — active: ${m.active || 'none'}`), result,
    el('table', {class: 'versions'},
      el('thead', {}, el('tr', {}, ['Version', 'State', 'Validation Dice', 'Registered', 'By', 'SHA-256', '']
        .map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)),
    shadows);
}

async function projectRow(p) {
  const q = await api('GET', `/api/projects/${encodeURIComponent(p.name)}/queue?n=3`);
  const c = p.counts;
  return el('tr', {'data-project': p.name}, el('td', {}, p.name), el('td', {}, p.model),
    el('td', {}, c.unlabeled), el('td', {}, c.predicted), el('td', {}, c.in_review), el('td', {}, c.labeled),
    el('td', {}, el('ul', {class: 'plain'}, q.queue.map((e) =>
      el('li', {}, el('span', {class: 'uid'}, e.study_uid), ` — ${e.reason}`)))));
}

async function load() {
  const [models, projects] = await Promise.all([api('GET', '/api/models'), api('GET', '/api/projects')]);
  clear(document.getElementById('models'), models.models.map(modelSection));
  clear(document.querySelector('#projects tbody'), await Promise.all(projects.projects.map(projectRow)));
}

Hilum.start('/console/models').then(load);
