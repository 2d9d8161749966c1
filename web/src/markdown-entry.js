// Entry point bundled by scripts/build-web.sh into public/vendor/markdown.js:
// marked (Markdown to HTML), DOMPurify (what may stay of that HTML) and
// highlight.js's common languages, from npm, as one ES module.
import { marked } from "marked";
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/common";
export { marked, DOMPurify, hljs };
