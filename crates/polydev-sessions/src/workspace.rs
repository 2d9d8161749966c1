//! A run's workspace: the user's code, sent as a tar archive sealed by
//! the client to each sandbox's agent key in chunks, so the controller
//! relays ciphertext only; unpacked inside the sandbox into a git
//! repository whose first commit is the base. In `edit` mode the CLI may
//! change it, and what it changed comes back as one `git diff --binary`
//! against that base, sealed inside the sandbox to the user's vault key.
//!
//! The stream: the archive cut into chunks of at most `CHUNK` bytes, each
//! sealed on its own (HPKE, info `WORKSPACE_PURPOSE`) with the AAD
//! `<run id>/<provider>/workspace/<index>/<count>`: chunks cannot be
//! reordered, dropped, repeated or moved to another run or provider
//! without failing to open, and the count in every AAD means a cut-short
//! stream never passes for a whole one.

use serde::{Deserialize, Serialize};

/// HPKE `info` of a workspace's chunks (sealed to the agent).
pub const WORKSPACE_PURPOSE: &str = "polydev/run-workspace/v1";
/// HPKE `info` of a provider's diff (sealed to the user's vault key);
/// the AAD is `<run id>/<provider>`.
pub const DIFF_PURPOSE: &str = "polydev/run-diff/v1";
/// Most plaintext bytes in one chunk.
pub const CHUNK: u64 = 1 << 20;
/// What sealing adds to a chunk (the encapsulated key and the tag),
/// with room to spare: a sealed chunk longer than `CHUNK + SEAL_SLACK`
/// is refused before it reaches the agent.
pub const SEAL_SLACK: u64 = 256;
/// The largest diff a provider brings back (kept with the run: a user's
/// 200 runs may hold three each).
pub const MAX_DIFF: u64 = 2 << 20;
/// Where the workspace is, inside each sandbox: the CLI runs there.
pub const DIR: &str = "/home/sandbox/work";
/// Where the archive is put together (chunk by chunk) before it is
/// unpacked (deleted after).
pub const ARCHIVE: &str = "/home/sandbox/.polydev/workspace.tar";
/// Where the diff is written before it is sealed (deleted after).
pub const DIFF_FILE: &str = "/home/sandbox/.polydev/workspace.diff";

/// What the CLI may do with the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Read, not write: each CLI in its own read-only (plan) mode; no
    /// diff comes back.
    Ask,
    /// Change files within the workspace; the changes come back as a
    /// diff.
    Edit,
}

/// A run's workspace as the client announces it when the run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workspace {
    pub mode: Mode,
    /// The archive's size in bytes (plaintext), which fixes the number
    /// of chunks.
    pub bytes: u64,
    /// A key of the client's own (P-256, uncompressed) that each diff is
    /// sealed to as well, for a client without the user's vault (`polydev
    /// mcp`); that copy is kept only while the run is in memory.
    pub recipient: Option<[u8; 65]>,
}

impl Workspace {
    /// How many chunks carry `bytes`.
    pub fn chunks(&self) -> u64 {
        self.bytes.div_ceil(CHUNK)
    }
}

/// The AAD of chunk `index` of `count` of a provider's workspace.
pub fn chunk_aad(run: &str, provider: &str, index: u64, count: u64) -> String {
    format!("{run}/{provider}/workspace/{index}/{count}")
}

/// Git as the workspace uses it: no system or user configuration (the
/// repository is the sandbox's own, made here), a fixed identity for the
/// base commit (no user's name or address), objects stored uncompressed
/// (zlib was most of a 50 MiB workspace's unpack; the repository lives
/// only as long as the sandbox).
const GIT: &str = "GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null git -c user.name=polydev -c user.email=polydev@localhost -c commit.gpgsign=false -c core.hooksPath=/dev/null -c core.compression=0 -c core.looseCompression=0";

/// The shell line that unpacks the archive into an empty `DIR` and makes
/// it the base, tagged `polydev-base`; everything happens inside the
/// sandbox as its user, and the archive is removed whatever happens.
/// - A `git bundle` (its first line says so) is cloned: the base is its
///   `HEAD`, with its history (a clone's own configuration, no hooks).
/// - Anything else is a tar archive: members naming `..` or absolute
///   paths are not extracted (GNU tar), its own `.git` is left out, and
///   the tree is committed as the first commit of a repository of its own.
pub fn unpack_line() -> String {
    format!(
        "trap 'rm -f {ARCHIVE}' EXIT; set -e; rm -rf {DIR}; \
         if head -c 15 {ARCHIVE} | grep -qE '^# v[23] git bundle$'; then \
           {GIT} clone -q {ARCHIVE} {DIR} 2>&1 || {{ echo 'the git bundle could not be cloned' >&2; exit 1; }}; cd {DIR}; \
           {GIT} rev-parse -q --verify HEAD >/dev/null || {{ echo 'the git bundle has no HEAD (make it with: git bundle create repo.bundle HEAD --branches)' >&2; exit 1; }}; \
           {GIT} remote remove origin; \
         else \
           mkdir -p {DIR}; tar -xf {ARCHIVE} -C {DIR} --no-same-owner --no-same-permissions --exclude=.git; cd {DIR}; \
           {GIT} init -q; {GIT} add -A; {GIT} commit -q --allow-empty --no-verify -m 'polydev: workspace base'; \
         fi; \
         {GIT} tag -f polydev-base >/dev/null"
    )
}

/// The shell line that writes what changed since the base (new, changed,
/// deleted and binary files, as `git apply` takes it: the plain `a/` and
/// `b/` prefixes, no text conversion) to `DIFF_FILE` and prints its size.
pub fn diff_line() -> String {
    format!(
        "set -e; cd {DIR}; {GIT} add -A; {GIT} -c core.quotepath=off diff --cached --binary --no-color --no-ext-diff --no-textconv --src-prefix=a/ --dst-prefix=b/ polydev-base > {DIFF_FILE}; wc -c < {DIFF_FILE}"
    )
}

/// The upload body for one provider (what a client sends): each chunk of
/// `archive` sealed to its sandbox's key with its AAD, as a 4-byte
/// big-endian length and the sealed bytes.
pub fn sealed_upload(
    key: &polydev_vault::SealingPublicKey,
    run: &str,
    provider: &str,
    archive: &[u8],
) -> Vec<u8> {
    let chunks: Vec<&[u8]> = archive.chunks(CHUNK as usize).collect();
    let count = chunks.len() as u64;
    let mut body = Vec::with_capacity(archive.len() + chunks.len() * 128);
    for (i, c) in chunks.iter().enumerate() {
        let aad = chunk_aad(run, provider, i as u64, count);
        let sealed = key.seal(WORKSPACE_PURPOSE, aad.as_bytes(), c);
        body.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        body.extend_from_slice(&sealed);
    }
    body
}

/// A POSIX ustar archive of regular files (mode 0644), as the web UI
/// makes one (`web/public/workspace.js`): for clients on the user's side
/// (`polydev mcp`, the benchmark).
pub fn tar_of(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (path, bytes) in files {
        out.extend_from_slice(&tar_header(path, bytes.len() as u64)?);
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

fn tar_header(path: &str, size: u64) -> Result<[u8; 512], String> {
    if size >= 8 << 30 {
        return Err(format!("{path}: larger than a tar entry holds (8 GiB)"));
    }
    let mut h = [0u8; 512];
    let (prefix, name) = if path.len() <= 100 {
        ("", path)
    } else {
        // prefix (≤ 155 bytes) / name (≤ 100 bytes), split at a slash.
        let cut = path.as_bytes()[..path.len().min(156)]
            .iter()
            .rposition(|b| *b == b'/')
            .filter(|&c| c > 0 && path.len() - c - 1 <= 100)
            .ok_or_else(|| format!("{path}: the path is too long for a tar archive"))?;
        (&path[..cut], &path[cut + 1..])
    };
    let mut put = |at: usize, text: &[u8]| h[at..at + text.len()].copy_from_slice(text);
    put(0, name.as_bytes());
    put(100, b"0000644\0");
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0");
    put(148, b"        ");
    put(156, b"0");
    put(257, b"ustar\0");
    put(263, b"00");
    put(345, prefix.as_bytes());
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// The files of `dir` as a tar archive, refused past `max` bytes; and how
/// many files it holds. In a git work tree, the files git would keep
/// (tracked, and untracked ones `.gitignore` does not exclude: no build
/// output, no ignored `.env`); elsewhere every regular file. Always: the
/// `.git` directory left out, symbolic links and other special files
/// skipped (never followed), each file's size checked before it is read.
pub fn tar_dir(dir: &std::path::Path, max: u64) -> Result<(Vec<u8>, usize), String> {
    let names = match git_files(dir) {
        Some(names) => names,
        None => walk(dir)?,
    };
    let mut files = Vec::new();
    let mut total = 1024u64;
    for rel in names {
        let path = dir.join(&rel);
        let Some(bytes) = read_regular(&path, max.saturating_sub(total))? else {
            continue;
        };
        total += 512 + (bytes.len() as u64).div_ceil(512) * 512;
        if total > max {
            return Err(too_much(dir, max));
        }
        files.push((rel, bytes));
    }
    files.sort();
    let n = files.len();
    Ok((tar_of(&files)?, n))
}

fn too_much(dir: &std::path::Path, max: u64) -> String {
    format!(
        "{} holds more than {} MiB of files",
        dir.display(),
        max >> 20
    )
}

/// The files git keeps in the work tree at `dir` (relative paths), or
/// `None` when it is not one (or git is not here).
fn git_files(dir: &std::path::Path) -> Option<Vec<String>> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let names = out
        .stdout
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| std::str::from_utf8(n).ok().map(str::to_owned))
        .filter(|n| !n.split('/').any(|c| c == ".git"))
        .collect();
    Some(names)
}

/// Every regular file under `dir` (relative paths), `.git` left out.
fn walk(dir: &std::path::Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", d.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if entry.file_name() == ".git" {
                continue;
            }
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(|e| e.to_string())?
                    .to_str()
                    .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))?
                    .to_owned();
                names.push(rel);
            }
        }
    }
    Ok(names)
}

/// A regular file's bytes, opened without following a link or blocking
/// on a FIFO, its size checked before it is read (`None`: not a regular
/// file, or gone).
fn read_regular(path: &std::path::Path, room: u64) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > room {
        return Err(format!(
            "{}: {} bytes, more than the archive has room for",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(room + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > room {
        return Err(format!("{}: grew while it was read", path.display()));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_is_cut_into_whole_chunks() {
        let w = |bytes| Workspace {
            mode: Mode::Edit,
            bytes,
            recipient: None,
        };
        assert_eq!(w(1).chunks(), 1);
        assert_eq!(w(CHUNK).chunks(), 1);
        assert_eq!(w(CHUNK + 1).chunks(), 2);
        assert_eq!(w(200 << 20).chunks(), 200);
        assert_eq!(
            chunk_aad("run-1", "codex", 2, 3),
            "run-1/codex/workspace/2/3"
        );
    }

    /// The archive GNU tar reads back: every file, long paths included.
    #[test]
    fn tar_of_is_read_by_gnu_tar() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}/{}.txt", "d".repeat(120), "f".repeat(90));
        let files = vec![
            ("README.md".to_owned(), b"# hi\n".to_vec()),
            ("src/a.txt".to_owned(), vec![b'x'; 1500]),
            (long.clone(), b"deep\n".to_vec()),
        ];
        let tar = tar_of(&files).unwrap();
        let archive = dir.path().join("a.tar");
        std::fs::write(&archive, &tar).unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&out_dir)
            .status()
            .unwrap();
        assert!(st.success());
        for (p, b) in &files {
            assert_eq!(&std::fs::read(out_dir.join(p)).unwrap(), b, "{p}");
        }
        let (again, n) = tar_dir(&out_dir, 1 << 20).unwrap();
        assert_eq!(n, 3);
        assert_eq!(again.len(), tar.len());
        assert!(tar_dir(&out_dir, 1000).is_err());
        assert!(tar_of(&[("x/".repeat(200), vec![])]).is_err());
        // A multi-byte character across the byte where the prefix is cut
        // (155/156): a clear error, no panic.
        let odd = format!("x/{}é{}", "a".repeat(153), "c");
        assert!(tar_of(&[(odd, vec![])]).is_err());
        let fits = format!("{}é/{}", "d".repeat(100), "e".repeat(20));
        assert!(tar_of(&[(fits, vec![])]).is_ok());
    }

    /// What a directory holds that is not the user's code stays out: a
    /// link to elsewhere (never followed), a FIFO (never read), `.git`,
    /// and in a work tree what `.gitignore` excludes.
    #[test]
    fn tar_dir_takes_regular_files_only_and_honours_gitignore() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside canary").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.txt"), "code").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.join("link")).unwrap();
        nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(d.join(".git")).unwrap();
        std::fs::write(d.join(".git/config"), "git canary").unwrap();
        let (tar, n) = tar_dir(d, 1 << 20).unwrap();
        assert_eq!(n, 1);
        let text = String::from_utf8_lossy(&tar);
        assert!(!text.contains("outside canary") && !text.contains("git canary"));
        // A work tree: ignored files stay out.
        std::fs::remove_dir_all(d.join(".git")).unwrap();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(d)
                .args(args)
                .output()
                .unwrap()
        };
        assert!(git(&["init", "-q"]).status.success());
        std::fs::write(d.join(".gitignore"), ".env\n").unwrap();
        std::fs::write(d.join(".env"), "ignored canary").unwrap();
        let (tar, _) = tar_dir(d, 1 << 20).unwrap();
        let text = String::from_utf8_lossy(&tar);
        assert!(text.contains("code") && !text.contains("ignored canary"));
    }
}
