//! `polydev-agent launch SPEC`: the few privileged steps before a sandbox
//! starts, run on the host by the controller's local driver, ending in an
//! `exec` of bubblewrap (which does the namespaces, the bind mounts and the
//! capability drop, and starts the agent inside).
//!
//! In order: join the sandbox's cgroups (so everything after is counted
//! and limited), enter a private mount namespace, mount a size-limited
//! tmpfs for the writable layer (the disk quota) and an overlay of the
//! image over it, hand the seccomp program to bubblewrap through a pipe,
//! drop to the sandbox's own host uid/gid, and exec. The mounts live only
//! in that private namespace, so they vanish with the sandbox's last
//! process: nothing is left mounted on the host, even after a crash.

use std::io::Write;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

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
    pub bwrap: PathBuf,
    /// bubblewrap arguments after `--bind ROOT /`.
    pub args: Vec<String>,
    pub seccomp: bool,
    /// The sandbox's first process.
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
    // The sandbox user's home and /tmp live in the writable layer.
    let owner = (
        Some(nix::unistd::Uid::from_raw(spec.uid)),
        Some(nix::unistd::Gid::from_raw(spec.gid)),
    );
    let home = upper.join("home/sandbox");
    std::fs::create_dir_all(&home).map_err(at("create home"))?;
    nix::unistd::chown(&home, owner.0, owner.1).map_err(at("chown home"))?;
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

    let mut cmd = std::process::Command::new(&spec.bwrap);
    cmd.arg("--bind").arg(&root).arg("/").args(&spec.args);
    if spec.seccomp {
        // Left open (and inheritable) for bubblewrap to read after the exec.
        let fd = seccomp_fd().map_err(at("seccomp program"))?.into_raw_fd();
        cmd.arg("--seccomp").arg(fd.to_string());
    }
    cmd.arg("--").args(&spec.command);

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
    Ok(cmd)
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
