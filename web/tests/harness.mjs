// Starts the real polydev binary on port 0 with a fresh data dir and a
// headless Debian Chromium; both are torn down by `stop()`.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, "../..");
export const artifacts = join(here, "artifacts");
export const bin = process.env.POLYDEV_BIN || join(repo, "target/debug/polydev");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";

// Sandboxes are off unless a test needs them (they need root, and a
// SIGKILLed server would leave its empty cgroups behind).
export async function startServer(extraArgs = [], { sandboxes = false } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), "polydev-web-"));
  const sandboxArgs = sandboxes ? [] : ["--sandboxes", "false"];
  const child = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--egress-listen", "127.0.0.1:0", "--log-format", "json", "--data-dir", dataDir, ...sandboxArgs, ...extraArgs], {
    stdio: ["ignore", "ignore", "pipe"],
    // No background image builds unless a test asks (and passes the flag).
    env: { POLYDEV_SANDBOX_PREPARE: "none", ...process.env },
  });
  const logs = [];
  const base = await new Promise((resolveBase, reject) => {
    const timer = setTimeout(() => reject(new Error(`polydev did not start in 30 s:\n${logs.join("\n")}`)), 30_000);
    child.on("error", (e) => { clearTimeout(timer); reject(new Error(`cannot start ${bin}: ${e.message}`)); });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`polydev exited with ${code}:\n${logs.join("\n")}`)); });
    createInterface({ input: child.stderr }).on("line", (line) => {
      logs.push(line);
      try {
        const entry = JSON.parse(line);
        if (entry.fields?.message === "listening") {
          clearTimeout(timer);
          resolveBase(`http://${entry.fields.addr}`);
        }
      } catch { /* not JSON */ }
    });
  });
  return {
    base,
    logs,
    dataDir,
    // `polydev user add` against this server's store, with a password.
    addUser(email, password, { admin = false } = {}) {
      const args = ["user", "add", "--email", email, "--password-stdin", "--data-dir", dataDir];
      if (admin) args.push("--admin");
      return JSON.parse(execFileSync(bin, args, { input: password + "\n" }).toString());
    },
    async kill() {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await exited;
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        let timer;
        const deadline = new Promise((r) => { timer = setTimeout(r, 10_000); });
        await Promise.race([exited, deadline]);
        clearTimeout(timer);
        if (child.exitCode === null) child.kill("SIGKILL");
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export async function startBrowser() {
  // Playwright gives every launch a fresh, temporary profile.
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    timeout: 30_000,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  return {
    browser,
    async stop() {
      await browser.close();
    },
  };
}

// Logs in through the login page.
export async function logIn(page, base, email, password) {
  await page.goto(base + "/login");
  await page.fill("#email", email);
  await page.fill("#password", password);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
}

export function artifactPath(name) {
  mkdirSync(artifacts, { recursive: true });
  return join(artifacts, name);
}

// What a Rust test hands a browser script: one JSON value on stdin.
export async function readInput() {
  return JSON.parse(await new Promise((resolve) => {
    let data = "";
    process.stdin.on("data", (c) => (data += c));
    process.stdin.on("end", () => resolve(data));
  }));
}
