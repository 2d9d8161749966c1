// Answers rendered as Markdown in headless Chromium, from the page's own
// module: formatting and highlighted code with copy buttons, and hostile
// markup (what a prompt-injected page could put in a model's answer) made
// inert: no script runs, no handler or style survives, links open apart.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, startBrowser, artifactPath } from "./harness.mjs";

let server;
let chrome;

before(async () => {
  server = await startServer();
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

const ANSWER = [
  "Use **bold** and a list:",
  "",
  "- one",
  "- two",
  "",
  "```rust",
  "fn main() { println!(\"hi\"); }",
  "```",
  "",
  "[docs](https://example.com/docs) and [bad](javascript:window.pwned=1)",
  "",
  "<img src=x onerror=\"window.pwned=2\"> <script>window.pwned=3</script>",
  "<a href=\"#\" onclick=\"window.pwned=4\" style=\"position:fixed\">x</a>",
  "<iframe src=\"https://example.com\"></iframe><form action=\"/x\"><input name=a></form>",
].join("\n");

test("answers render as sanitised Markdown with highlighted, copyable code", async () => {
  const context = await chrome.browser.newContext({ permissions: ["clipboard-read", "clipboard-write"] });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(server.base + "/login");
  const out = await page.evaluate(async (text) => {
    const { showAnswer } = await import("/markdown.js");
    const node = document.createElement("div");
    node.id = "answer";
    node.className = "answer";
    document.body.append(node);
    showAnswer(node, text);
    const q = (s) => node.querySelectorAll(s);
    return {
      strong: q("strong").length,
      items: q("li").length,
      highlighted: q("pre > code.hljs").length,
      keyword: q("pre code .hljs-keyword").length,
      copy: q(".code-tools button").length,
      links: [...q("a")].map((a) => ({ href: a.getAttribute("href"), target: a.target, rel: a.rel, onclick: a.getAttribute("onclick"), style: a.getAttribute("style") })),
      dangerous: q("script, iframe, form, input, [onerror], [onclick], [style]").length,
      img: [...q("img")].map((i) => i.outerHTML),
    };
  }, ANSWER);
  await page.waitForTimeout(300);
  const pwned = await page.evaluate(() => window.pwned);
  await page.screenshot({ path: artifactPath("markdown.png"), fullPage: true });
  assert.equal(pwned, undefined, "no markup in an answer ran");
  assert.equal(out.dangerous, 0, JSON.stringify(out));
  assert.ok(out.img.every((i) => !i.includes("onerror")), JSON.stringify(out.img));
  assert.equal(out.strong, 1);
  assert.equal(out.items, 2);
  assert.equal(out.highlighted, 1);
  assert.ok(out.keyword >= 1, "Rust keywords are coloured");
  assert.equal(out.copy, 1);
  const docs = out.links.find((l) => l.href === "https://example.com/docs");
  assert.deepEqual({ target: docs.target, rel: docs.rel }, { target: "_blank", rel: "noopener noreferrer" });
  assert.ok(!out.links.some((l) => (l.href || "").startsWith("javascript:")), JSON.stringify(out.links));
  assert.ok(out.links.every((l) => l.onclick === null && l.style === null), JSON.stringify(out.links));
  // The copy button copies the code as written.
  await page.click(".code-tools button");
  await page.locator(".code-tools button", { hasText: "Copied" }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'fn main() { println!("hi"); }\n');
  assert.deepEqual(errors, []);
  await context.close();
});
