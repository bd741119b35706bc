'use strict';
// Destinations and the AE allow-list, with a C-ECHO (or, for the archive, a REST ping) per destination.
const {api, el, clear, flash} = Hilum;

function echoButton(name) {
  const result = el('span', {class: 'echo-result'});
  const button = el('button', {class: 'admin-only echo', onclick: async () => {
    flash(result, 'testing…', true);
    try {
      const r = await api('POST', `/api/destinations/${encodeURIComponent(name)}/echo`);
      flash(result, r.detail + (r.ms !== undefined ? ` (${r.ms} ms)` : ''), r.ok);
    } catch (e) {
      flash(result, e.message, false);
    }
  }}, 'Echo');
  return [button, result];
}

async function load() {
  const d = await api('GET', '/api/destinations');
  document.getElementById('node-ae').textContent = d.node.ae_title;
  document.getElementById('node-port').textContent = d.node.dicom_port;
  const archive = el('tr', {'data-destination': 'orthanc'},
    el('td', {}, 'orthanc'), el('td', {}, d.archive.managed ? 'archive (managed Orthanc)' : 'archive (Orthanc)'),
    el('td', {}, ''), el('td', {}, d.archive.url), el('td', {}, ''), el('td', {}, ''),
    el('td', {}, echoButton('orthanc')));
  clear(document.querySelector('#destinations tbody'), archive, d.destinations.map((x) =>
    el('tr', {'data-destination': x.name},
      el('td', {}, x.name), el('td', {}, x.type), el('td', {}, x.ae_title), el('td', {}, `${x.host}:${x.port}`),
      el('td', {}, x.calling_ae_title), el('td', {}, ''), el('td', {}, echoButton(x.name)))));
  document.getElementById('any-caller').hidden = !d.accepts_any_caller;
  clear(document.querySelector('#allowed-callers tbody'), d.allowed_callers.map((c) =>
    el('tr', {}, el('td', {}, c.ae_title), el('td', {}, c.host || 'any'))));
}

Hilum.start('/console/destinations').then(load);
