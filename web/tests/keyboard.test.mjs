// Keyboard use at a desktop width (1280 px) in headless Chromium: every
// page has its own title, Tab reaches the header's links and the page's
// controls with a visible focus ring, and Enter on a focused link
// navigates (as an admin, who has the most pages).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, startBrowser, logIn } from "./harness.mjs";

let server;
let chrome;

before(async () => {
  server = await startServer();
  server.addUser("keys@example.com", "admin password 1", { admin: true });
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

/// The focused element and whether its focus is visible (an outline).
async function focused(page) {
  return page.evaluate(() => {
    const e = document.activeElement;
    const s = getComputedStyle(e);
    return {
      tag: e.tagName.toLowerCase(),
      text: (e.textContent || e.getAttribute("placeholder") || e.id || "").trim().slice(0, 40),
      href: e.getAttribute("href"),
      ring: s.outlineStyle !== "none" && parseFloat(s.outlineWidth) >= 1,
    };
  });
}

test("keyboard alone: titles, a visible focus on every stop, Enter follows a link", async () => {
  const context = await chrome.browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await logIn(page, server.base, "keys@example.com", "admin password 1");
  const titles = {
    "/": "Home · polydev",
    "/runs": "Runs · polydev",
    "/providers": "Providers · polydev",
    "/admin/health": "Host health · polydev",
    "/admin/sandboxes": "Sandboxes · polydev",
    "/admin/users": "Users · polydev",
  };
  for (const [path, title] of Object.entries(titles)) {
    await page.evaluate((p) => { history.pushState({}, "", p); dispatchEvent(new PopStateEvent("popstate")); }, path);
    await page.waitForLoadState("networkidle");
    await page.waitForTimeout(300);
    assert.equal(await page.title(), title, path);
    // From the top of the page (its first link), the next dozen Tab stops
    // all show focus.
    await page.locator("a").first().focus();
    const stops = [];
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press("Tab");
      const f = await focused(page);
      if (f.tag === "body") break;
      stops.push(f);
    }
    assert.ok(stops.length >= 4, `${path}: ${JSON.stringify(stops)}`);
    for (const s of stops) assert.ok(s.ring, `${path}: no visible focus on ${JSON.stringify(s)}`);
  }
  // Tab to the Runs link in the header and press Enter: the Runs page.
  await page.evaluate(() => { history.pushState({}, "", "/"); dispatchEvent(new PopStateEvent("popstate")); });
  await page.waitForTimeout(300);
  await page.locator("a").first().focus();
  for (let i = 0; i < 20; i++) {
    await page.keyboard.press("Tab");
    if ((await focused(page)).href === "/runs") break;
  }
  assert.equal((await focused(page)).href, "/runs");
  await page.keyboard.press("Enter");
  await page.waitForURL("**/runs");
  await page.locator("#prompt").waitFor();
  assert.equal(await page.title(), "Runs · polydev");
  await context.close();
});
