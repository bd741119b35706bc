'use strict';
// Shared by the console pages: the API client (session cookie + CSRF token), DOM building that
// only ever puts data into the page as text, and the page header.
const Hilum = (() => {
  let session = null;
  let signingOut = false;  // a poll answered 401 after the sign-out must not turn its /login into /login?next=

  function errorText(data, status) {
    if (data && typeof data.detail === 'string') return data.detail;
    if (data && data.detail && typeof data.detail.message === 'string') return data.detail.message;
    if (data && Array.isArray(data.detail)) {
      return data.detail.map((d) => `${(d.loc || []).join('.')}: ${d.msg}`).join('; ');
    }
    return `request failed (${status})`;
  }

  async function api(method, path, body, options = {}) {
    const headers = {'Accept': 'application/json'};
    if (method !== 'GET') headers['X-CSRF-Token'] = session && session.csrf_token ? session.csrf_token : '';
    if (options.background) headers['X-Hilum-Background'] = '1';
    const init = {method, headers, credentials: 'same-origin'};
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) {
      if (!signingOut) location.assign('/login?next=' + encodeURIComponent(location.pathname + location.search));
      throw new Error('signed out');
    }
    const data = await r.json().catch(() => null);
    if (!r.ok) {
      const e = new Error(errorText(data, r.status));
      e.status = r.status;
      e.data = data;
      throw e;
    }
    return data;
  }

  // A view both polled and reloaded after a click. The two requests overlap, so an answer older than
  // one already drawn is dropped. draw(answer, changed): `changed` is false when key(answer) equals the
  // last drawn, so unchanged rows are left alone (a rebuild between mousedown and mouseup loses the click).
  function polled(load, draw, key = JSON.stringify) {
    let asked = 0, drawn = 0, last = null;
    return async () => {
      const mine = ++asked;
      const answer = await load();
      if (mine < drawn) return;
      drawn = mine;
      const now = key(answer);
      draw(answer, now !== last);
      last = now;
    };
  }

  // el('td', {class: 'x', onclick: fn}, 'text', otherNode): strings always become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'href' && !/^\/(?![\/\\])/.test(String(value))) continue;  // links stay on this node
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  }

  function time(epoch) {
    if (!epoch) return '';
    return new Date(epoch * 1000).toLocaleString();
  }

  function isAdmin() {
    return !!session && session.role === 'admin';
  }

  function header(active) {
    const links = [['/console/', 'Dashboard'], ['/console/rules', 'Rules'],
      ['/console/destinations', 'Destinations'], ['/console/pacs', 'PACS'], ['/console/models', 'Models'],
      ['/console/projects', 'Projects'],
      ['/', 'Viewer (OHIF)']];
    const nav = el('nav', {}, links.map(([href, text]) =>
      el('a', {href, class: href === active ? 'active' : null}, text)));
    const logout = el('button', {id: 'logout', onclick: async () => {
      signingOut = true;
      await api('DELETE', '/api/session').catch(() => null);
      location.assign('/login');
    }}, 'Sign out');
    const who = el('span', {id: 'who'}, `${session.user} (${session.role})`);
    clear(document.getElementById('top'), el('strong', {class: 'brand'}, 'Hilum'), nav, who, logout);
  }

  async function start(active) {
    session = await api('GET', '/api/session');
    document.body.classList.toggle('admin', isAdmin());
    header(active);
    return session;
  }

  // A message next to a button: what happened, or why it was refused.
  function flash(target, text, ok) {
    clear(target, el('span', {class: ok ? 'ok' : 'error', role: 'status'}, text));
  }

  return {api, el, clear, time, start, isAdmin, flash, polled};
})();
