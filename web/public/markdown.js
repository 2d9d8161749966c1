// Answers as Markdown, safely: a CLI's answer is text a model wrote (and
// whatever a prompt-injected page put in it), so it is parsed by marked,
// then DOMPurify keeps only inert markup (no scripts, handlers, styles,
// forms or frames; links open apart, without a referrer; the page's CSP
// already keeps remote images out), then highlight.js colours code blocks
// from their text. Each code block gets a copy button.

import { marked, DOMPurify, hljs } from "/vendor/markdown.js";
import { el } from "/dom.js";

/// Longer answers stay plain text (parsing megabytes would stall the tab).
const MAX_MARKDOWN = 200_000;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/// Copies `text`, saying so on the button.
export function copyButton(label, text) {
  const b = el("button", { type: "button", class: "secondary copy" }, label);
  b.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(typeof text === "function" ? text() : text);
      b.textContent = "Copied";
    } catch {
      b.textContent = "Cannot copy";
    }
    setTimeout(() => { b.textContent = label; }, 1500);
  });
  return b;
}

/// `text` as a rendered, sanitised fragment (plain text when too long).
export function renderAnswer(text) {
  const s = String(text ?? "");
  if (s.length > MAX_MARKDOWN) return document.createTextNode(s);
  const html = marked.parse(s, { gfm: true, async: false });
  const frag = DOMPurify.sanitize(html, {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "svg", "math"],
    FORBID_ATTR: ["style"],
  });
  for (const code of frag.querySelectorAll("pre > code")) {
    hljs.highlightElement(code);
    const pre = code.parentElement;
    const source = code.textContent;
    pre.before(el("div", { class: "code-tools" }, copyButton("Copy code", source)));
  }
  return frag;
}

/// Replaces `node`'s content with `text` rendered.
export function showAnswer(node, text) {
  node.replaceChildren(renderAnswer(text));
  node.classList.add("rendered");
}
