// The controller's HTTP API, as the web UI uses it. The session token lives
// in an HttpOnly cookie; this module never sees it after login.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function call(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body instanceof Uint8Array) {
    init.headers["content-type"] = "application/octet-stream";
    init.body = body;
  } else if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", "cannot reach the polydev server");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const err = data && data.error;
    let message = err ? err.message : `the server answered ${response.status}`;
    // A server fault: the request id lets an operator find it in the log.
    const requestId = response.headers.get("x-request-id");
    if (response.status >= 500 && response.status !== 503 && requestId) {
      message += ` (request id ${requestId}, for the server's operator)`;
    }
    const retry = Number(response.headers.get("retry-after")) || null;
    throw new ApiError(response.status, err ? err.code : "http_" + response.status, message, retry);
  }
  return data;
}

export const api = {
  signUp: (body) => call("POST", "/api/users", body),
  logIn: (email, loginCredential) => call("POST", "/api/auth/login", { email, loginCredential }),
  prelogin: (email) => call("GET", `/api/auth/prelogin?email=${encodeURIComponent(email)}`),
  vaultKeys: () => call("GET", "/api/vault/keys"),
  clientConfig: () => call("GET", "/api/client-config"),
  logOut: () => call("POST", "/api/auth/logout"),
  me: () => call("GET", "/api/me"),
  users: (limit = 100, offset = 0) => call("GET", `/api/admin/users?limit=${limit}&offset=${offset}`),
  hostHealth: () => call("GET", "/api/admin/health/system"),
  hostHistory: (metric, range) => call("GET", `/api/admin/health/history?metric=${metric}&range=${range}`),
  alerts: () => call("GET", "/api/admin/alerts"),
  environment: () => call("GET", "/api/admin/environment"),
  sandboxes: () => call("GET", "/api/sandboxes"),
  deleteSandbox: (id) => call("DELETE", `/api/sandboxes/${encodeURIComponent(id)}`),
  startRun: (prompt, providers, workspace) => call("POST", "/api/runs", workspace ? { prompt, providers, workspace } : { prompt, providers }),
  runWorkspace: (id, provider, body) => call("PUT", `/api/runs/${encodeURIComponent(id)}/workspace/${encodeURIComponent(provider)}`, body),
  runDiff: (id, provider) => call("GET", `/api/runs/${encodeURIComponent(id)}/diff/${encodeURIComponent(provider)}`),
  runCredentials: (id, credentials, kinds = {}) => call("POST", `/api/runs/${encodeURIComponent(id)}/credentials`, { credentials, kinds }),
  cancelRun: (id) => call("DELETE", `/api/runs/${encodeURIComponent(id)}`),
  cancelRunProvider: (id, provider) => call("DELETE", `/api/runs/${encodeURIComponent(id)}/providers/${encodeURIComponent(provider)}`),
  runs: () => call("GET", "/api/runs"),
  vaultItem: (id) => call("GET", `/api/vault/items/${encodeURIComponent(id)}`),
  vaultItems: () => call("GET", "/api/vault/items"),
  putVaultItem: (id, version, envelope) => call("PUT", `/api/vault/items/${encodeURIComponent(id)}`, { version, envelope }),
  providers: () => call("GET", "/api/providers"),
  startLogin: (userId, provider, mode) => call("POST", "/api/auth/start", { userId, provider, mode }),
  loginSession: (id) => call("GET", `/api/auth/session/${encodeURIComponent(id)}`),
  cancelLogin: (id) => call("DELETE", `/api/auth/session/${encodeURIComponent(id)}`),
  loginTicket: (id) => call("POST", `/api/auth/session/${encodeURIComponent(id)}/ticket`),
  loginCode: (id, code) => call("POST", `/api/auth/session/${encodeURIComponent(id)}/code`, { code }),
};
