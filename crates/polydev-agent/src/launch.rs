//! `polydev-agent launch SPEC`: the few privileged steps before a sandbox
//! starts, run on the host by the controller's local driver, ending in an
//! `exec` of bubblewrap (which does the namespaces, the bind mounts and the
//! capability drop, and starts the agent inside).
//!
//! In order: join the sandbox's cgroups (so everything after is counted
//! and limited), enter a private mount namespace, mount a size-limited
//! tmpfs for the writable layer (the disk quota) and an overlay of the
//! image over it, bind the agent's socket in the controller's own
//! directory, hand the seccomp program to bubblewrap through a pipe,
//! drop to the sandbox's own host uid/gid, start listening (so the
//! socket's peer credentials name the sandbox's uid), lower the resource
//! limits, and exec. The mounts live only in that private namespace, so
//! they vanish with the sandbox's last process: nothing is left mounted on
//! the host, even after a crash.
//!
//! Nothing here resolves a path the sandbox can write: every path in the
//! spec lies in directories only the controller can change (bubblewrap,
//! already unprivileged, needs to traverse them: mode 0711, never writable).

use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

/// Where the agent's egress relay finds the controller's end, inside.
pub const EGRESS_DIR_INSIDE: &str = "/run/polydev/egress";

/// Open files a sandbox's processes may hold (soft, hard). Low on purpose:
/// every descriptor a sandbox opens through the egress relay costs the
/// controller some too.
pub const NOFILE: (u64, u64) = (1024, 4096);

/// Written by the driver as JSON, read by `polydev-agent launch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// `cgroup.procs` files to write this process's pid into.
    pub cgroup_procs: Vec<PathBuf>,
    /// A host directory on which the private tmpfs is mounted.
    pub scratch: PathBuf,
    /// Size of that tmpfs: the quota of the sandbox's writable layer.
    pub disk_bytes: u64,
    /// The image's root filesystem, the overlay's read-only lower layer.
    pub lower: PathBuf,
    /// Host uid and gid the sandbox runs as (mapped to 1000 inside).
    pub uid: u32,
    pub gid: u32,
    /// Where to bind the agent's listening socket (a directory of the
    /// controller's; the agent gets the socket as `--listen-fd N`).
    pub agent_socket: PathBuf,
    /// A directory of the controller's holding the egress relay's socket,
    /// bound read-only at `EGRESS_DIR_INSIDE` (network mode `egress`).
    #[serde(default)]
    pub egress_dir: Option<PathBuf>,
    pub bwrap: PathBuf,
    /// bubblewrap arguments after the root's bind.
    pub args: Vec<String>,
    pub seccomp: bool,
    /// The sandbox's first process: the agent; `--listen-fd N` is added
    /// right after the program.
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct LaunchError {
    step: String,
    source: std::io::Error,
}

fn at<E: Into<std::io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> LaunchError {
    let step = step.into();
    move |e| LaunchError {
        step,
        source: e.into(),
    }
}

/// Runs the steps and execs; returns only on failure.
pub fn launch(spec: &LaunchSpec) -> LaunchError {
    match prepare(spec) {
        Ok(mut cmd) => at("exec bubblewrap")(cmd.exec()),
        Err(e) => e,
    }
}

fn prepare(spec: &LaunchSpec) -> Result<std::process::Command, LaunchError> {
    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid).map_err(at(format!("join {}", procs.display())))?;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(at("unshare mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(at("make mounts private"))?;
    let opts = format!("size={},mode=0755", spec.disk_bytes.max(4096));
    mount(
        Some("polydev"),
        &spec.scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(at("mount writable layer"))?;
    let (upper, work, root) = (
        spec.scratch.join("upper"),
        spec.scratch.join("work"),
        spec.scratch.join("root"),
    );
    for dir in [&upper, &work, &root] {
        std::fs::create_dir(dir).map_err(at(format!("create {}", dir.display())))?;
    }
    // The sandbox user's home, /tmp and /run/polydev (its services'
    // sockets) live in the writable layer, inside the disk quota.
    let owner = (
        Some(nix::unistd::Uid::from_raw(spec.uid)),
        Some(nix::unistd::Gid::from_raw(spec.gid)),
    );
    for dir in ["home/sandbox", "run/polydev"] {
        let path = upper.join(dir);
        std::fs::create_dir_all(&path).map_err(at(format!("create {dir}")))?;
        nix::unistd::chown(&path, owner.0, owner.1).map_err(at(format!("chown {dir}")))?;
    }
    let tmp = upper.join("tmp");
    std::fs::create_dir(&tmp).map_err(at("create tmp"))?;
    set_mode(&tmp, 0o1777)?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        escape(&spec.lower),
        escape(&upper),
        escape(&work)
    );
    mount(
        Some("polydev"),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(at("mount image overlay"))?;

    // The agent's socket: bound here as root, in the controller's own
    // directory (nothing inside can reach or replace it).
    let listener = agent_socket(&spec.agent_socket)?;
    let mut cmd = std::process::Command::new(&spec.bwrap);
    cmd.arg("--bind").arg(&root).arg("/").args(&spec.args);
    if let Some(dir) = &spec.egress_dir {
        cmd.arg("--ro-bind").arg(dir).arg(EGRESS_DIR_INSIDE);
    }
    if spec.seccomp {
        let fd = seccomp_fd().map_err(at("seccomp program"))?.into_raw_fd();
        cmd.arg("--seccomp").arg(fd.to_string());
    }
    let (program, rest) = spec
        .command
        .split_first()
        .ok_or_else(|| at("command")(std::io::Error::other("empty")))?;
    cmd.arg("--")
        .arg(program)
        .arg("--listen-fd")
        .arg(listener.as_raw_fd().to_string())
        .args(rest);

    nix::unistd::setgroups(&[]).map_err(at("drop groups"))?;
    let gid = nix::unistd::Gid::from_raw(spec.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(at("set gid"))?;
    let uid = nix::unistd::Uid::from_raw(spec.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(at("set uid"))?;
    // Root loses its capabilities with the uid change; a non-root service
    // user (ambient capabilities) does not, so drop them all explicitly:
    // bubblewrap must start unprivileged.
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set)
            .map_err(|e| at("drop capabilities")(std::io::Error::other(e.to_string())))?;
    }
    // Listening now, as the sandbox's uid: a client's SO_PEERCRED names it.
    nix::sys::socket::listen(
        &listener,
        nix::sys::socket::Backlog::new(64).map_err(at("backlog"))?,
    )
    .map_err(at("listen on the agent socket"))?;
    let _ = listener.into_raw_fd();
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_NOFILE, NOFILE.0, NOFILE.1).map_err(at("limit open files"))?;
    // No core files: a host core_pattern pipe would run on the host.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(at("limit core files"))?;
    Ok(cmd)
}

/// A Unix stream socket bound (not yet listening) at `path`, inheritable.
fn agent_socket(path: &Path) -> Result<OwnedFd, LaunchError> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .map_err(at("agent socket"))?;
    let addr = UnixAddr::new(path).map_err(at("agent socket address"))?;
    bind(fd.as_raw_fd(), &addr).map_err(at(format!("bind {}", path.display())))?;
    set_mode(path, 0o600)?;
    Ok(fd)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LaunchError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(at(format!("chmod {}", path.display())))
}

/// overlayfs splits its options on `,` and `:`; escape them.
fn escape(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

/// A pipe holding the program, its read end inheritable across exec.
fn seccomp_fd() -> std::io::Result<OwnedFd> {
    let program = crate::seccomp::program();
    let (read, write) = nix::unistd::pipe()?;
    let mut write = std::fs::File::from(write);
    write.write_all(&program)?;
    drop(write);
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    Ok(read)
}
