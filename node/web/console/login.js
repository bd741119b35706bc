'use strict';
// Where to go after signing in: only a path on this node (never another site, never "//host").
function nextPath() {
  const next = new URLSearchParams(location.search).get('next') || '';
  return /^\/(?![\/\\])/.test(next) ? next : '/console/';
}

document.getElementById('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const error = document.getElementById('login-error');
  error.textContent = '';
  const body = {
    username: document.getElementById('username').value,
    password: document.getElementById('password').value,
  };
  try {
    const r = await fetch('/api/session', {
      method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json', 'Accept': 'application/json'},
      body: JSON.stringify(body),
    });
    if (r.ok) {
      location.assign(nextPath());
      return;
    }
    const data = await r.json().catch(() => ({}));
    error.textContent = typeof data.detail === 'string' ? data.detail : `sign-in failed (${r.status})`;
  } catch (e) {
    error.textContent = 'the node does not answer';
  }
});
