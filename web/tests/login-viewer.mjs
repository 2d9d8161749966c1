// Drives the providers page (web/public/providers.js) in headless Chromium
// for a Rust test (crates/polydev/tests/it/login.rs): reads {config} on
// stdin, starts the real server with it and a real nginx in front of it
// (deploy/nginx/polydev.conf), then signs one provider in directly and
// another through nginx: the real noVNC client connects through the
// controller's bridge and the test clicks "Sign in" on the remote page
// through the VNC canvas. Prints what it saw; the Rust test asserts.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startServer, startBrowser, logIn, artifactPath, repo, readInput } from "./harness.mjs";

const input = await readInput();

const freePort = () => new Promise((resolve) => {
  const s = createServer().listen(0, "127.0.0.1", () => {
    const { port } = s.address();
    s.close(() => resolve(port));
  });
});

// nginx with the shipped site config (TLS, with a throw-away certificate
// for 127.0.0.1), pointed at this server.
async function startNginx(upstream) {
  const dir = mkdtempSync(join(tmpdir(), "polydev-nginx-"));
  const port = await freePort();
  const plain = await freePort();
  execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
    "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")], { stdio: "ignore" });
  const site = readFileSync(join(repo, "deploy/nginx/polydev.conf"), "utf8")
    .replace("server 127.0.0.1:4000;", `server ${upstream};`)
    .replace("listen 443 ssl;", `listen 127.0.0.1:${port} ssl;`)
    .replace("listen 80;", `listen 127.0.0.1:${plain};`)
    .replace("/etc/ssl/polydev/fullchain.pem", join(dir, "cert.pem"))
    .replace("/etc/ssl/polydev/privkey.pem", join(dir, "key.pem"));
  writeFileSync(join(dir, "polydev.conf"), site);
  for (const d of ["body", "proxy", "fastcgi", "uwsgi", "scgi"]) mkdirSync(join(dir, d));
  writeFileSync(join(dir, "nginx.conf"), `user root;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log info;
events { worker_connections 256; }
http {
  access_log ${dir}/access.log;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  include /etc/nginx/mime.types;
  include ${dir}/polydev.conf;
}
`);
  const child = spawn("nginx", ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", "daemon off;"], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr.on("data", (c) => (err += c));
  const base = `https://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try {
      // Node's fetch would refuse the test's own certificate; curl -k.
      execFileSync("curl", ["-sfk", base + "/api/auth/health"], { stdio: "ignore" });
      break;
    } catch { /* not yet */ }
    if (i > 100 || child.exitCode !== null) throw new Error(`nginx did not start: ${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    base,
    log: () => readFileSync(join(dir, "access.log"), "utf8") + readFileSync(join(dir, "error.log"), "utf8"),
    async stop() {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// Signs `provider` in on the providers page reached at `base`.
async function signIn(browser, base, provider) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1100 }, ignoreHTTPSErrors: true });
  const seen = { provider, console: [] };
  page.on("console", (m) => seen.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => seen.console.push(`pageerror: ${e.message}`));
  // RFB PointerEvent messages (type 5) the page sent through the bridge.
  seen.pointerEvents = 0;
  page.on("websocket", (ws) => {
    ws.on("framesent", (f) => {
      const p = typeof f.payload === "string" ? Buffer.from(f.payload) : f.payload;
      if (p[0] === 5 && p.length % 6 === 0) seen.pointerEvents += p.length / 6;
    });
  });
  try {
    await logIn(page, base, "viewer@example.com", "correct horse battery");
    await page.click("a[href='/providers']");
    await page.click(`#signin-${provider}`);
    const started = Date.now();
    await page.locator("#viewer[data-connected=true]").waitFor({ timeout: 40_000 });
    seen.connectedMs = Date.now() - started;
    const canvas = page.locator("#viewer-screen canvas");
    await canvas.scrollIntoViewIfNeeded();
    // The stub's sign-in button fills the remote window: click until the
    // session completes (the first clicks may land on the waiting page).
    const deadline = Date.now() + 40_000;
    while (Date.now() < deadline) {
      const state = await page.getAttribute("#login-state", "data-state");
      if (["completed", "failed", "expired", "cancelled"].includes(state)) break;
      const box = await canvas.boundingBox(); // in the viewport: scrolled above
      if (box) {
        // Move, then press and release as a person would: noVNC sends the
        // pointer position and each button change to the VNC server.
        await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2, { steps: 5 });
        await page.waitForTimeout(100);
        await page.mouse.down();
        await page.waitForTimeout(100);
        await page.mouse.up();
      }
      await page.waitForTimeout(700);
    }
    seen.state = await page.getAttribute("#login-state", "data-state");
    seen.text = await page.textContent("#login-state");
    seen.detail = await page.textContent("#login-detail");
    seen.providerState = await page.textContent(`#provider-state-${provider}`);
    seen.items = await page.evaluate(async () => (await (await fetch("/api/vault/items")).json()).items.map((i) => i.id));
    seen.envelopeHead = await page.evaluate(async (id) => {
      const item = await (await fetch(`/api/vault/items/${id}`)).json();
      return Array.from(atob(item.envelope).slice(0, 3), (c) => c.charCodeAt(0));
    }, `credential.${provider}`);
    await page.screenshot({ path: artifactPath(`login-${provider}.png`), fullPage: true });
  } catch (e) {
    await page.screenshot({ path: artifactPath(`login-${provider}-failed.png`), fullPage: true }).catch(() => {});
    seen.error = String(e);
  }
  await page.close();
  return seen;
}

// As deploy/nginx/polydev.conf says to run it behind nginx.
const server = await startServer(["--config", input.config, "--trusted-proxies", "127.0.0.1/32", "--cookie-secure", "true"], { sandboxes: true });
const nginx = await startNginx(server.base.replace("http://", ""));
const chrome = await startBrowser();
const out = {};
try {
  server.addUser("viewer@example.com", "correct horse battery");
  out.direct = await signIn(chrome.browser, server.base, "codex");
  out.nginx = await signIn(chrome.browser, nginx.base, "claude_code");
  out.nginxLog = nginx.log();
} finally {
  await chrome.stop();
  await nginx.stop();
  out.logs = server.logs.join("\n");
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
