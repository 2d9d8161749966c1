// A run's workspace in the tab: the files you pick become a tar archive
// here, sealed chunk by chunk to each run sandbox's key (the server relays
// ciphertext only; docs/RUNS.md has the format); each CLI's changes come
// back as a diff sealed to your vault key, opened and shown here.

import { el } from "/dom.js";
import { seal } from "/vault.js";

/// Plaintext bytes per sealed chunk (the server's `workspace::CHUNK`).
export const CHUNK = 1 << 20;
const PURPOSE = "polydev/run-workspace/v1";
const enc = new TextEncoder();

/// Lines of one file's diff shown at most (the patch download has all).
const MAX_LINES = 2000;

/// The picked files as [{path, bytes}], paths relative to the picked
/// folder (its own name and any `.git` directory left out). A single
/// picked `.tar` or `git bundle` (`.bundle`) is the archive itself.
export async function readPicked(fileList) {
  const files = [...fileList];
  if (files.length === 1 && /\.(tar|bundle)$/i.test(files[0].name) && !files[0].webkitRelativePath) {
    return { archive: new Uint8Array(await files[0].arrayBuffer()), count: null };
  }
  const out = [];
  for (const f of files) {
    let path = f.webkitRelativePath || f.name;
    // A picked folder's files carry its name first.
    if (f.webkitRelativePath) path = path.split("/").slice(1).join("/");
    if (!path || path.split("/").includes(".git")) continue;
    out.push({ path, bytes: new Uint8Array(await f.arrayBuffer()) });
  }
  return { archive: tarOf(out), count: out.length };
}

/// A POSIX ustar archive of regular files (mode 0644).
export function tarOf(files) {
  let total = 1024;
  for (const f of files) total += 512 + Math.ceil(f.bytes.length / 512) * 512;
  const out = new Uint8Array(total);
  let at = 0;
  for (const f of files) {
    out.set(header(f.path, f.bytes.length), at);
    at += 512;
    out.set(f.bytes, at);
    at += Math.ceil(f.bytes.length / 512) * 512;
  }
  return out;
}

function header(path, size) {
  const h = new Uint8Array(512);
  const name = enc.encode(path);
  let prefix = new Uint8Array(0);
  let rest = name;
  if (name.length > 100) {
    // Split at a slash: prefix (≤ 155 bytes) / name (≤ 100 bytes).
    const cut = path.lastIndexOf("/", 155);
    const p = enc.encode(path.slice(0, cut));
    const n = enc.encode(path.slice(cut + 1));
    if (cut <= 0 || p.length > 155 || n.length > 100) throw new Error(`${path}: the path is too long for a tar archive (255 bytes at most)`);
    prefix = p;
    rest = n;
  }
  const put = (text, offset, length) => h.set(enc.encode(text).subarray(0, length), offset);
  h.set(rest, 0);
  put("0000644\0", 100, 8);
  put("0000000\0", 108, 8);
  put("0000000\0", 116, 8);
  put(size.toString(8).padStart(11, "0") + "\0", 124, 12);
  put(Math.floor(Date.now() / 1000).toString(8).padStart(11, "0") + "\0", 136, 12);
  put("        ", 148, 8);
  put("0", 156, 1);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  h.set(prefix, 345);
  let sum = 0;
  for (const b of h) sum += b;
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
  return h;
}

/// The upload body for one provider: each chunk sealed to its sandbox's
/// key with aad `<run>/<provider>/workspace/<index>/<count>`, as a 4-byte
/// big-endian length and the sealed bytes.
export async function sealedUpload(publicKey, runId, provider, archive) {
  const count = Math.max(1, Math.ceil(archive.length / CHUNK));
  const parts = [];
  let length = 0;
  for (let i = 0; i < count; i++) {
    const chunk = archive.subarray(i * CHUNK, Math.min(archive.length, (i + 1) * CHUNK));
    const sealed = await seal(publicKey, PURPOSE, enc.encode(`${runId}/${provider}/workspace/${i}/${count}`), chunk);
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, sealed.length);
    parts.push(len, sealed);
    length += 4 + sealed.length;
  }
  const body = new Uint8Array(length);
  let at = 0;
  for (const p of parts) {
    body.set(p, at);
    at += p.length;
  }
  return body;
}

/// A unified diff (git's) cut into its files: {path, kind, lines}.
export function filesOf(patch) {
  const files = [];
  let cur = null;
  for (const line of patch.split("\n")) {
    const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
    if (m) {
      cur = { path: m[2], kind: "changed", lines: [line] };
      files.push(cur);
      continue;
    }
    if (!cur) continue;
    if (line.startsWith("new file mode")) cur.kind = "added";
    else if (line.startsWith("deleted file mode")) cur.kind = "deleted";
    else if (line.startsWith("GIT binary patch") || line.startsWith("Binary files")) cur.kind = cur.kind === "changed" ? "binary" : `${cur.kind}, binary`;
    else if (line.startsWith("rename from")) cur.kind = "renamed";
    cur.lines.push(line);
  }
  return files;
}

/// One provider's changes: a list of files, each opening to its diff, and
/// the whole patch to download.
export function diffView(patchBytes, fileName) {
  const text = new TextDecoder().decode(patchBytes);
  const files = filesOf(text);
  const url = URL.createObjectURL(new Blob([patchBytes], { type: "text/x-diff" }));
  const list = files.map((f) => {
    const shown = f.lines.slice(0, MAX_LINES);
    const pre = el("pre", { class: "diff" }, ...shown.map((l) => el("span", {
      class: l.startsWith("+") && !l.startsWith("+++") ? "add" : l.startsWith("-") && !l.startsWith("---") ? "del" : l.startsWith("@@") ? "hunk" : "",
    }, l || " ")));
    if (f.lines.length > MAX_LINES) pre.append(el("span", { class: "hunk" }, `… ${f.lines.length - MAX_LINES} more lines: download the patch for all of it`));
    return el("details", { class: "diff-file" }, el("summary", {}, el("code", {}, f.path), ` (${f.kind})`), pre);
  });
  return el("div", { class: "diff-view" },
    el("p", { class: "small" }, files.length === 1 ? "1 file changed. " : `${files.length} files changed. `,
      el("a", { href: url, download: fileName, class: "download-patch" }, "Download patch"),
      " (apply with git apply)"),
    ...list);
}
