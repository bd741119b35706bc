'use strict';
// Where to go after signing in: only a page of this node, never another site. The address is resolved
// as the browser will resolve it (a pattern test on the text is not enough: the URL parser drops tabs
// and newlines, so "/\t/evil.example" becomes "//evil.example"), and only this origin's is kept
// ("javascript:..." and other sites have another origin).
function nextPath() {
  const next = new URLSearchParams(location.search).get('next');
  if (!next) return '/console/';
  let url;
  try {
    url = new URL(next, location.origin);
  } catch (e) {
    return '/console/';
  }
  return url.origin === location.origin ? url.pathname + url.search + url.hash : '/console/';
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
