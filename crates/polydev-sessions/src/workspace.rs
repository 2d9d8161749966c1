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
/// Where the archive is put together before it is unpacked (deleted
/// after).
const ARCHIVE: &str = "/home/sandbox/.polydev/workspace.tar";
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

/// Where chunks are put together inside the sandbox.
pub fn archive_path() -> &'static str {
    ARCHIVE
}

/// Git as the workspace uses it: no system or user configuration (the
/// repository is the sandbox's own, made here), a fixed identity for the
/// base commit (no user's name or address).
const GIT: &str = "GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null git -c user.name=polydev -c user.email=polydev@localhost -c commit.gpgsign=false -c core.hooksPath=/dev/null";

/// The shell line that unpacks the archive into an empty `DIR` and
/// commits it as the base (members naming `..` or absolute paths are not
/// extracted by GNU tar; an archive's own `.git` is left out, the base is
/// a repository of its own; everything happens inside the sandbox as its
/// user). The archive is removed whatever happens.
pub fn unpack_line() -> String {
    format!(
        "trap 'rm -f {ARCHIVE}' EXIT; set -e; rm -rf {DIR}; mkdir -p {DIR}; tar -xf {ARCHIVE} -C {DIR} --no-same-owner --no-same-permissions --exclude=.git; cd {DIR}; {GIT} init -q; {GIT} add -A; {GIT} commit -q --allow-empty --no-verify -m 'polydev: workspace base'; {GIT} tag -f polydev-base >/dev/null"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_is_cut_into_whole_chunks() {
        let w = |bytes| Workspace {
            mode: Mode::Edit,
            bytes,
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
}
