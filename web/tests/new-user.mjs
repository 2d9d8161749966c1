// A new user's first minutes, in headless Chromium, on the real images
// (for crates/polydev/tests/it/first_start.rs): reads {config, imagesDir,
// key} as JSON on stdin, starts the real server with them, then signs up,
// unlocks after a reload, connects Claude Code by code (the stub OAuth
// provider), runs a prompt across the three CLIs (Claude Code on its
// login, the others on a typed key), reads the answers, logs out, logs
// back in and finds the run in the history. Prints what it saw; the Rust
// test owns the assertions.

import { startServer, startBrowser, artifactPath, readInput } from "./harness.mjs";

const input = await readInput();

const EMAIL = "newcomer@example.com";
const PASSWORD = "a long first password";
const server = await startServer(["--config", input.config, "--images-dir", input.imagesDir], { sandboxes: true });
const chrome = await startBrowser();
const out = { states: {}, answers: {}, notes: {}, console: [] };
const page = await chrome.browser.newPage({ viewport: { width: 1280, height: 1000 } });
page.setDefaultTimeout(30_000);
page.on("console", (m) => { if (m.type() === "error") out.console.push(`${m.text()} at ${m.location()?.url}`); });
page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
try {
  // Sign up (the vault is set up in the tab), then a reload locks it.
  await page.goto(server.base + "/");
  await page.waitForURL("**/login");
  await page.click("text=Create an account");
  await page.fill("#email", EMAIL);
  await page.fill("#password", PASSWORD);
  await page.check("#acknowledge");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  await page.reload();
  await page.waitForURL("**/unlock");
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();

  // Connect Claude Code by code: the link opens the sign-in page (here the
  // stub, reached directly as the user's own browser would); paste the code.
  await page.click("a[href='/providers']");
  // Gemini CLI's consumer sign-in is off here (the vendor retired it): the
  // page says why and offers no sign-in button, only the key.
  await page.locator("#policy-gemini_cli").waitFor();
  out.geminiPolicy = await page.textContent("#policy-gemini_cli");
  out.geminiSignIn = await page.isDisabled("#signin-gemini_cli") ? "disabled" : "enabled";
  out.claudePolicy = await page.getAttribute("#policy-claude_code", "data-offered");
  await page.click("#code-claude_code");
  await page.locator("#login-url").waitFor({ timeout: 90_000 });
  const authUrl = await page.getAttribute("#login-url", "href");
  out.authUrl = authUrl;
  const direct = new URL(authUrl.replaceAll("auth.stub.test", "127.0.0.1"));
  const approved = await (await fetch(`${direct.origin}/approve${direct.search}`)).text();
  const code = approved.split('<pre id="code">')[1].split("<")[0];
  await page.fill("#login-code", code);
  await page.click("#login-code-send");
  await page.locator("#login-state[data-state=completed]").waitFor({ timeout: 60_000 });
  out.connected = await page.textContent("#provider-state-claude_code");

  // One prompt, three CLIs: Claude Code on its login, the others on keys.
  await page.click("a[href='/runs']");
  await page.fill("#prompt", "What is polydev?");
  await page.fill("#key-codex", input.key);
  await page.fill("#key-gemini_cli", input.key);
  await page.click("#run");
  await Promise.all(["claude_code", "codex", "gemini_cli"].map(async (p) => {
    await page.locator(`#state-${p}`).filter({ hasText: /^(done|failed|timed out|rate-limited|gave up waiting|cancelled)$/ }).waitFor({ timeout: 180_000 });
    out.states[p] = await page.textContent(`#state-${p}`);
    out.answers[p] = await page.textContent(`#answer-${p}`);
    out.notes[p] = await page.textContent(`#note-${p}`);
  }));
  await page.locator("#run:not([disabled])").waitFor({ timeout: 30_000 });
  await page.screenshot({ path: artifactPath("new-user-run.png"), fullPage: true });

  // Log out and back in: the run is in the history, its answers open.
  await page.click("#logout");
  await page.waitForURL("**/login");
  await page.fill("#email", EMAIL);
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  await page.click("a[href='/runs']");
  await page.locator("#history li.run-row").first().waitFor();
  await page.click("#history li.run-row >> nth=0 >> button[data-open]");
  await page.locator("#history li.run-row >> nth=0 >> .answer").first().waitFor();
  out.history = await page.textContent("#history");
  await page.screenshot({ path: artifactPath("new-user-history.png"), fullPage: true });
} catch (e) {
  out.error = `${e}${e.cause ? ` (${e.cause})` : ""}`;
  await page.screenshot({ path: artifactPath("new-user-failed.png"), fullPage: true }).catch(() => {});
} finally {
  out.logs = server.logs.join("\n");
  await chrome.stop();
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
