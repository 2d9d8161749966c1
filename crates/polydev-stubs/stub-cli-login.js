// A stand-in for a CLI's login command (like `codex login` or `claude auth
// login`), for tests against the stub OAuth provider. Environment:
//   STUB_AUTH_BASE       the provider, e.g. http://auth.stub.test:PORT
//   STUB_CREDENTIAL_FILE where to write the credential (JSON)
//   STUB_CALLBACK_PORT   localhost callback port (default 1455)
//   NO_BROWSER=true      paste-a-code flow: print the URL, read the code on stdin
//   BROWSER              program that opens a URL (else xdg-open)
//   HTTP_PROXY           the token request goes through it (absolute form)
//   STUB_CREDENTIAL_FORMAT=claude  write Claude Code's .credentials.json shape
//   STUB_CREDENTIAL_FORMAT=codex   write Codex's auth.json shape, dated 30
//                                  days back (so its first use refreshes)
const http = require("node:http");
const fs = require("node:fs");
const path = require("node:path");
const { spawn } = require("node:child_process");

const base = process.env.STUB_AUTH_BASE;
const file = process.env.STUB_CREDENTIAL_FILE;
const port = Number(process.env.STUB_CALLBACK_PORT || 1455);
const state = Math.random().toString(16).slice(2);

function exchange(code) {
  return new Promise((resolve, reject) => {
    const target = new URL("/token", base);
    const proxy = process.env.HTTP_PROXY ? new URL(process.env.HTTP_PROXY) : null;
    const body = `grant_type=authorization_code&code=${encodeURIComponent(code)}`;
    const req = http.request({
      host: proxy ? proxy.hostname : target.hostname,
      port: proxy ? proxy.port : target.port,
      path: proxy ? target.href : target.pathname,
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded", "content-length": Buffer.byteLength(body), host: target.host },
    }, (res) => {
      let data = "";
      res.on("data", (c) => (data += c));
      res.on("end", () => (res.statusCode === 200 ? resolve(JSON.parse(data)) : reject(new Error(`token endpoint: ${res.statusCode} ${data}`))));
    });
    req.on("error", reject);
    req.end(body);
  });
}

function save(tokens) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const format = process.env.STUB_CREDENTIAL_FORMAT;
  const body = format === "claude"
    ? { claudeAiOauth: { accessToken: tokens.access_token, refreshToken: tokens.refresh_token, expiresAt: Date.now() + tokens.expires_in * 1000, scopes: ["user:inference", "user:profile"], subscriptionType: "pro" } }
    : format === "codex"
    ? { OPENAI_API_KEY: null, tokens: { id_token: tokens.id_token, access_token: tokens.access_token, refresh_token: tokens.refresh_token, account_id: "stub-account" }, last_refresh: new Date(Date.now() - 30 * 86400e3).toISOString() }
    : { stubOauth: { accessToken: tokens.access_token, refreshToken: tokens.refresh_token, expiresIn: tokens.expires_in } };
  fs.writeFileSync(file, JSON.stringify(body), { mode: 0o600 });
  console.log("Login successful.");
}

if (process.env.NO_BROWSER === "true") {
  const url = `${base}/authorize?response_type=code&redirect_uri=${encodeURIComponent(base + "/code")}&state=${state}`;
  console.log(`Visit this URL to sign in:\n${url}`);
  process.stdout.write("Paste code here if prompted > ");
  let input = "";
  process.stdin.on("data", async (c) => {
    input += c;
    if (!input.includes("\n")) return;
    try {
      save(await exchange(input.trim()));
      process.exit(0);
    } catch (e) {
      console.error(String(e));
      process.exit(1);
    }
  });
} else {
  const redirect = `http://localhost:${port}/callback`;
  const url = `${base}/authorize?response_type=code&redirect_uri=${encodeURIComponent(redirect)}&state=${state}`;
  const server = http.createServer(async (req, res) => {
    const u = new URL(req.url, redirect);
    if (u.pathname !== "/callback") { res.writeHead(404); res.end(); return; }
    if (u.searchParams.get("state") !== state) { res.writeHead(400); res.end("state mismatch"); return; }
    try {
      save(await exchange(u.searchParams.get("code")));
      res.writeHead(200, { "content-type": "text/html" });
      res.end("<h1 id='done'>Signed in. You may close this window.</h1>");
      setTimeout(() => process.exit(0), 200);
    } catch (e) {
      res.writeHead(500); res.end(String(e));
      console.error(String(e));
      process.exit(1);
    }
  });
  server.listen(port, "127.0.0.1", () => {
    console.log(`Starting local login server on http://localhost:${port}.`);
    console.log(`If your browser did not open, navigate to this URL to authenticate:\n\n${url}\n`);
    const opener = spawn(process.env.BROWSER || "xdg-open", [url], { stdio: "ignore", detached: true });
    opener.on("error", (e) => console.error(`cannot open a browser: ${e}`));
    opener.unref();
  });
}
