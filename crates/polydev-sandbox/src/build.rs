//! Building golden images: `minimal` from the host's binaries; `base`
//! (Debian minbase), `runtime` (+ Node.js and the CLIs) and `browser` (the
//! runtime's tree + TigerVNC's Xvnc and Chromium: a login runs the CLI
//! whose sign-in it is) from a debootstrap base cached in the image store.
//! Every build is validated by booting a sandbox from it before it can be
//! activated. One build at a time per image store (a lock file), so a
//! controller preparing images at first start and an operator's `polydev
//! image build` never write one store at once.
//!
//! `Preparation` is what a controller shows while it builds the images it
//! is missing at start (`serve`, in the background): which template, which
//! step of how many, since when, or why it failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::driver::{now_ms, Driver};
use crate::image::{Image, ImageError, ImageStore};
use crate::local::LocalDriver;
use crate::spec::{SandboxId, SandboxSpec};

/// TigerVNC's Xvnc is the X server and the VNC server in one process
/// (greets in ~50 ms; Xvfb + x11vnc took ~230 ms and more memory).
const BROWSER_PACKAGES: &[&str] = &[
    "tigervnc-standalone-server",
    "chromium",
    "fonts-dejavu-core",
];
const RUNTIME_PACKAGES: &[&str] = &["ca-certificates", "git"];

/// The templates a build knows.
pub const TEMPLATES: [&str; 4] = ["minimal", "base", "runtime", "browser"];

/// What a build needs from its caller.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Debian mirror for debootstrap.
    pub mirror: String,
    /// The `polydev-agent` binary copied into every image.
    pub agent: PathBuf,
    /// npm packages (with versions) of the CLIs the runtime carries.
    pub cli_packages: Vec<String>,
    /// How to ask each of those its version in a booted image (an argv:
    /// `env NAME=value … cli --version`); each must succeed.
    pub cli_checks: Vec<Vec<String>>,
    /// Shell lines run after the install as the build's unprivileged uid,
    /// `$PREFIX` the install's prefix (readying a CLI for a read-only
    /// image).
    pub cli_prepare: Vec<String>,
}

/// Hears about a build's steps.
pub trait Progress: Send + Sync {
    /// Step `n` of `of` (1-based) begins.
    fn step(&self, n: usize, of: usize, what: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "another build of this image store is running ({0}); wait for it (`polydev image status`)"
    )]
    Busy(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn failed(e: impl std::fmt::Display) -> BuildError {
    BuildError::Failed(e.to_string())
}

/// The longest one build step (debootstrap, apt, npm, a copy) may take.
const STEP_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// How much of a step's stderr is kept (its end) for the error message.
const STDERR_KEPT: usize = 16 << 10;

/// Runs a command to its end within `STEP_DEADLINE`, in a process group
/// of its own (killed whole on the deadline); its stdout is dropped and
/// only the end of its stderr kept, for the error when it fails.
async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<(), BuildError> {
    run_within(cmd, what, STEP_DEADLINE).await
}

async fn run_within(
    cmd: &mut tokio::process::Command,
    what: &str,
    deadline: Duration,
) -> Result<(), BuildError> {
    use tokio::io::AsyncReadExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BuildError::Failed(format!("cannot run {what}: {e}")))?;
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut stderr = child.stderr.take();
    let reader = tokio::spawn(async move {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        if let Some(err) = stderr.as_mut() {
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * STDERR_KEPT {
                    kept.drain(..kept.len() - STDERR_KEPT);
                }
            }
        }
        kept
    });
    let status = match tokio::time::timeout(deadline, child.wait()).await {
        Ok(status) => status.map_err(failed)?,
        Err(_) => {
            if let Some(pg) = pgid {
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            reader.abort();
            return Err(BuildError::Failed(format!(
                "{what} did not finish within {} s and was stopped",
                deadline.as_secs()
            )));
        }
    };
    // A leftover of the step that still holds its stderr ends with it.
    if let Some(pg) = pgid {
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
    }
    let kept = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&kept[kept.len().saturating_sub(STDERR_KEPT)..]);
        let tail: Vec<&str> = err.lines().rev().take(20).collect::<Vec<_>>();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(BuildError::Failed(format!(
            "{what} failed ({status}):\n{}",
            tail.join("\n")
        )));
    }
    Ok(())
}

/// Held while this process builds into an image store.
#[derive(Debug)]
pub struct BuildLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl BuildLock {
    /// Takes the store's build lock, or says who holds it.
    pub fn take(images: &ImageStore, holder: &str) -> Result<Self, BuildError> {
        std::fs::create_dir_all(images.dir()).map_err(failed)?;
        let path = images.dir().join(".build.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(failed)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                use std::io::{Seek, Write};
                let _ = lock.set_len(0);
                let _ = lock.seek(std::io::SeekFrom::Start(0));
                let _ = write!(lock, "{holder} (pid {})", std::process::id());
                Ok(Self { _lock: lock })
            }
            Err((_, _)) => Err(BuildError::Busy(
                std::fs::read_to_string(&path).unwrap_or_else(|_| "another process".into()),
            )),
        }
    }
}

/// Debian minbase, made once per image store and copied for each build.
async fn debootstrap_base(
    images: &ImageStore,
    mirror: &str,
    step: &(dyn Fn(&str) + Sync),
) -> Result<PathBuf, BuildError> {
    let cache = images.dir().join(".cache/bookworm-minbase");
    if cache.join("etc/debian_version").exists() {
        step("debootstrap base (cached)");
        return Ok(cache);
    }
    step("debootstrap --variant=minbase bookworm (about half a minute)");
    let tmp = images
        .dir()
        .join(format!(".cache/.bookworm-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(failed)?;
    let result = run(
        tokio::process::Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&tmp)
            .arg(mirror),
        "debootstrap (install the `debootstrap` package)",
    )
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &cache).map_err(failed)?;
    Ok(cache)
}

/// `chroot ROOT ARGS` with the image's own PATH and nothing else of the
/// controller's environment.
fn chroot(root: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("chroot");
    cmd.arg(root)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8");
    cmd
}

/// Debian packages into the image, as root in a chroot: always before
/// anything from npm is in the tree (no root step ever runs in files an
/// unprivileged step wrote).
async fn chroot_apt(root: &Path, packages: &[&str]) -> Result<(), BuildError> {
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).ok();
    run(
        chroot(root).args(["apt-get", "-o", "Acquire::Retries=3", "update", "-qq"]),
        "apt-get update in the image",
    )
    .await?;
    run(
        chroot(root)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "apt-get",
                "-o",
                "Acquire::Retries=3",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
            ])
            .args(packages),
        "apt-get install in the image",
    )
    .await?;
    run(chroot(root).args(["apt-get", "clean"]), "apt-get clean").await?;
    let _ = std::fs::remove_dir_all(root.join("var/lib/apt/lists"));
    std::fs::create_dir_all(root.join("var/lib/apt/lists/partial")).map_err(failed)?;
    Ok(())
}

/// Node.js from this host (Debian's is too old for Gemini CLI) and the
/// CLIs from npm at their pinned versions.
async fn add_node_and_clis(root: &Path, opts: &BuildOptions) -> Result<(), BuildError> {
    let node = crate::local::which("node").ok_or_else(|| {
        BuildError::Failed("the runtime template needs Node.js ≥ 20 on the build host".into())
    })?;
    let version = tokio::process::Command::new(&node)
        .arg("--version")
        .output()
        .await
        .map_err(failed)?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        return Err(BuildError::Failed(format!(
            "the runtime template needs Node.js ≥ 20 on the build host, found {version}"
        )));
    }
    std::fs::create_dir_all(root.join("usr/local/bin")).map_err(failed)?;
    std::fs::copy(&node, root.join("usr/local/bin/node")).map_err(failed)?;
    npm_install_unprivileged(
        &root.join("usr/local"),
        &opts.cli_packages,
        &opts.cli_prepare,
    )
    .await
}

/// The uid npm runs as while it fetches and unpacks the CLIs: just below
/// the sandboxes' uid ranges (which start at 3 000 000), never a
/// sandbox's, owning nothing on the host but its own staging directory.
pub const BUILD_UID: u32 = 2_999_999;

/// The environment npm keeps when it drops to `BUILD_UID`: how to reach
/// the registry (proxies, certificates, npm's own settings), nothing else
/// of the controller's (its database URL, for one).
fn npm_env_kept(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    // Set below, whatever the controller's environment says.
    if [
        "npm_config_cache",
        "npm_config_globalconfig",
        "npm_config_update_notifier",
        "npm_config_ignore_scripts",
        "npm_config_prefix",
        "npm_config_userconfig",
    ]
    .contains(&lower.as_str())
    {
        return false;
    }
    matches!(
        name,
        "PATH"
            | "NODE_EXTRA_CA_CERTS"
            | "SSL_CERT_FILE"
            | "SSL_CERT_DIR"
            | "HTTP_PROXY"
            | "HTTPS_PROXY"
            | "NO_PROXY"
            | "http_proxy"
            | "https_proxy"
            | "no_proxy"
    ) || lower.starts_with("npm_config_")
}

/// `npm install --global --ignore-scripts packages` into `prefix`, run as
/// `BUILD_UID` (not as root: npm fetches and unpacks third-party
/// tarballs) in a staging directory of its own, whose result is then
/// owned by root and copied into `prefix` as the image's last step.
async fn npm_install_unprivileged(
    prefix: &Path,
    packages: &[String],
    prepare: &[String],
) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let staging = tempfile::Builder::new()
        .prefix("polydev-npm-")
        .tempdir()
        .map_err(failed)?;
    let dir = staging.path();
    for d in ["home", "cache", "prefix"] {
        std::fs::create_dir(dir.join(d)).map_err(failed)?;
        std::os::unix::fs::chown(dir.join(d), Some(BUILD_UID), Some(BUILD_UID)).map_err(failed)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(failed)?;
    // With --prefix, npm looks for its global config under the prefix:
    // keep the host's (e.g. the registry's certificate authority).
    let globalconfig = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("npm")
            .args(["config", "get", "globalconfig"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .filter(|p| Path::new(p).is_file());
    let npm = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("setpriv");
        cmd.args([
            &format!("--reuid={BUILD_UID}"),
            &format!("--regid={BUILD_UID}"),
            "--clear-groups",
            "--no-new-privs",
            "npm",
        ])
        .args(args)
        .args(["--global", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir.join("prefix"))
        .current_dir(dir.join("home"))
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(npm_env_kept)))
        .env("HOME", dir.join("home"))
        .env("npm_config_cache", dir.join("cache"))
        .env("npm_config_update_notifier", "false");
        if let Some(g) = &globalconfig {
            cmd.env("npm_config_globalconfig", g);
        }
        cmd
    };
    // No dependency's install script runs (keytar, node-pty: the CLIs
    // work without them)...
    let mut install = npm(&["install", "--ignore-scripts"]);
    install.args(packages);
    run(
        &mut install,
        "npm install of the CLIs (as an unprivileged uid)",
    )
    .await?;
    // ...only the pinned CLIs' own (Claude Code's links its native binary),
    // still as the build uid.
    let names: Vec<&str> = packages.iter().map(|p| package_name(p)).collect();
    let mut rebuild = npm(&["rebuild", "--ignore-scripts=false", "--foreground-scripts"]);
    rebuild.args(&names);
    run(
        &mut rebuild,
        "the CLIs' own install scripts (as an unprivileged uid)",
    )
    .await?;
    // What readies a CLI for a read-only image (the registry says), still
    // as the build uid, in the staging prefix (where the image has it).
    for line in prepare {
        let mut sh = tokio::process::Command::new("setpriv");
        sh.args([
            &format!("--reuid={BUILD_UID}"),
            &format!("--regid={BUILD_UID}"),
            "--clear-groups",
            "--no-new-privs",
            "/bin/sh",
            "-c",
            line,
        ])
        .current_dir(dir.join("home"))
        .env_clear()
        .env(
            "PATH",
            format!(
                "{}:/usr/local/bin:/usr/bin:/bin",
                dir.join("prefix/bin").display()
            ),
        )
        .env("HOME", dir.join("home"))
        .env("PREFIX", dir.join("prefix"));
        run(
            &mut sh,
            "readying the CLIs for the image (as an unprivileged uid)",
        )
        .await?;
    }
    // Whatever those left running (even outside their process group) ends
    // before root takes the files over: nothing can change them under us.
    tokio::task::spawn_blocking(|| end_processes_of(BUILD_UID))
        .await
        .map_err(failed)??;
    // Only what the build uid made itself is taken over: a hard link to
    // someone else's file (possible where fs.protected_hardlinks is off)
    // or a set-id bit would otherwise become root's in the image.
    let staged = dir.join("prefix");
    tokio::task::spawn_blocking(move || check_staged(&staged, BUILD_UID))
        .await
        .map_err(failed)??;
    run(
        tokio::process::Command::new("chown")
            .args(["-R", "-h", "0:0"])
            .arg(dir.join("prefix")),
        "taking ownership of the CLIs",
    )
    .await?;
    run(
        tokio::process::Command::new("cp")
            .arg("-a")
            .arg(dir.join("prefix").join("."))
            .arg(prefix),
        "copying the CLIs into the image",
    )
    .await
}

/// Whether `template`'s images carry the CLIs (npm-installed at build).
pub fn carries_clis(template: &str) -> bool {
    matches!(template, "runtime" | "browser")
}

/// Builds `template` into `images` (validated by booting one sandbox on
/// `validator`; not activated). Takes the store's build lock.
pub async fn build(
    images: &ImageStore,
    validator: &LocalDriver,
    template: &str,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Image, BuildError> {
    let _lock = BuildLock::take(images, &format!("building {template}"))?;
    let total = match template {
        "minimal" => 2,
        "base" => 5,
        "runtime" => 6,
        "browser" => 7,
        other => {
            return Err(BuildError::Failed(format!(
                "unknown template {other:?}: minimal, base, runtime or browser"
            )))
        }
    };
    let n = std::sync::atomic::AtomicUsize::new(0);
    let step = |what: &str| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress.step(i.min(total), total, what);
    };
    let image = if template == "minimal" {
        step("skeleton + agent");
        images.build_minimal(&opts.agent)?
    } else {
        let base = debootstrap_base(images, &opts.mirror, &step).await?;
        let work = images.scratch(template)?;
        let root = work.join("rootfs");
        let made = async {
            step("copy base");
            run(
                tokio::process::Command::new("cp")
                    .arg("-a")
                    .arg(&base)
                    .arg(&root),
                "copying the base",
            )
            .await?;
            match template {
                t if carries_clis(t) => {
                    step("packages (git, certificates)");
                    chroot_apt(&root, RUNTIME_PACKAGES).await?;
                    if template == "browser" {
                        step("Xvnc (TigerVNC) and Chromium");
                        chroot_apt(&root, BROWSER_PACKAGES).await?;
                    }
                    // Last: no root step runs in the tree after npm wrote
                    // to it. The browser gets the same CLIs (a login runs
                    // the CLI whose sign-in it is).
                    step("Node.js and the CLIs");
                    add_node_and_clis(&root, opts).await?;
                }
                _ => step("nothing to add"),
            }
            crate::image::add_agent(&root, &opts.agent)?;
            step("content hash and import");
            images
                .import(
                    template,
                    &root,
                    Vec::new(),
                    if carries_clis(template) {
                        opts.cli_packages.clone()
                    } else {
                        Vec::new()
                    },
                )
                .map_err(BuildError::from)
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        made?
    };
    step("validate: boot one sandbox");
    validate(validator, images, &image, &opts.cli_checks).await?;
    Ok(image)
}

/// Boots one sandbox from `image` and checks what the template is for:
/// the agent runs commands; the runtime's CLIs answer `--version` (the
/// browser's too); the browser's login desktop comes up and its VNC server
/// greets. Marks the image validated.
pub async fn validate(
    driver: &LocalDriver,
    images: &ImageStore,
    image: &Image,
    clis: &[Vec<String>],
) -> Result<(), BuildError> {
    let id = SandboxId::generate();
    let spec = SandboxSpec {
        template: image.manifest.template.clone(),
        limits: crate::spec::Limits {
            memory_bytes: 2048 << 20,
            pids: 1024,
            ..Default::default()
        },
        network: Default::default(),
        env: vec![],
        labels: [("purpose".to_owned(), "image-validation".to_owned())].into(),
        ttl: Duration::from_secs(120),
        egress: None,
        egress_auth: None,
    };
    let result = async {
        driver
            .create(&id, &spec, image, Duration::from_secs(30))
            .await
            .map_err(|e| match e {
                crate::DriverError::Boot {
                    stage,
                    message,
                    log_tail,
                    ..
                } => BuildError::Failed(format!(
                    "image {} does not boot (stage {stage}): {message}\n{}",
                    image.manifest.hash,
                    log_tail.join("\n")
                )),
                other => failed(other),
            })?;
        let mut agent = driver
            .agent(&id, Duration::from_secs(5))
            .await
            .map_err(failed)?;
        let health = agent.health().await.map_err(failed)?;
        let out = agent
            .exec(
                &["/bin/sh", "-c", "echo ok"],
                None,
                Duration::from_secs(10),
                |_| {},
            )
            .await
            .map_err(failed)?;
        if health != "ready" || out.stdout != b"ok\n" {
            return Err(BuildError::Failed(format!(
                "image {}: the agent answered {health:?} and {:?}",
                image.manifest.hash,
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        smoke_check(driver, &id, &image.manifest.template, clis, &mut agent).await
    }
    .await;
    let _ = driver.destroy(&id).await;
    result?;
    images.mark_validated(image)?;
    Ok(())
}

/// What each template is for, tried in the booted sandbox.
async fn smoke_check(
    driver: &LocalDriver,
    id: &SandboxId,
    template: &str,
    clis: &[Vec<String>],
    agent: &mut polydev_agent::AgentClient,
) -> Result<(), BuildError> {
    if carries_clis(template) {
        for check in clis {
            let argv: Vec<&str> = check.iter().map(String::as_str).collect();
            let cli = check.join(" ");
            let out = agent
                .exec(&argv, None, Duration::from_secs(60), |_| {})
                .await
                .map_err(failed)?;
            if out.code != Some(0) {
                return Err(BuildError::Failed(format!(
                    "`{cli}` failed in the {template} image: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
    }
    if template == "browser" {
        let argv = crate::desktop::desktop_command(1280, 800);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        agent
            .exec(&argv, None, Duration::from_secs(10), |_| {})
            .await
            .map_err(failed)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if crate::desktop::vnc_greets(driver, id).await {
                break;
            }
            if Instant::now() > deadline {
                let log = agent
                    .get_file(crate::desktop::DESKTOP_LOG)
                    .await
                    .unwrap_or_default();
                return Err(BuildError::Failed(format!(
                    "the browser image's desktop did not serve VNC within 30 s\n{}",
                    String::from_utf8_lossy(&log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// One template as an operator sees it: its current image and where a
/// preparation of it stands (`polydev image status`, the admin API).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStatus {
    pub template: &'static str,
    /// The current image's content hash, if any.
    pub image: Option<String>,
    pub validated: Option<bool>,
    /// `{"state": "ready" | "missing"}` or a `Prepared` (building with its
    /// step, queued, failed with its error).
    pub status: serde_json::Value,
}

/// Every template's status. A controller that died mid-build left
/// "building" behind: it counts only while a preparation is alive; an
/// image made since a failure (e.g. by hand) outranks the failure.
pub fn template_status(images: &ImageStore) -> Vec<TemplateStatus> {
    let preparing = Preparation::read(images);
    let build_running = Preparation::running(images);
    TEMPLATES
        .iter()
        .map(|&template| {
            let current = images.current(template).ok();
            let state = match (&current, preparing.get(template)) {
                (_, Some(p @ (Prepared::Building { .. } | Prepared::Queued))) if build_running => {
                    serde_json::to_value(p).unwrap_or_default()
                }
                (None, Some(p @ Prepared::Failed { .. })) => {
                    serde_json::to_value(p).unwrap_or_default()
                }
                (Some(_), _) => serde_json::json!({"state": "ready"}),
                (None, _) => serde_json::json!({"state": "missing"}),
            };
            TemplateStatus {
                template,
                image: current.as_ref().map(|i| i.manifest.hash.clone()),
                validated: current.as_ref().map(|i| i.manifest.validated),
                status: state,
            }
        })
        .collect()
}

/// Where one template's preparation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "state"
)]
pub enum Prepared {
    /// Waiting for an earlier template's build.
    Queued,
    Building {
        step: usize,
        of: usize,
        what: String,
        since_ms: i64,
    },
    Ready,
    Failed {
        error: String,
        at_ms: i64,
    },
}

/// The images a controller builds at first start, and how far along it is
/// (also written to `<images>/.prepare.json` for `polydev image status`).
#[derive(Debug)]
pub struct Preparation {
    file: PathBuf,
    /// The templates in the order they are built (runs' first).
    order: Vec<String>,
    states: Mutex<BTreeMap<String, Prepared>>,
    /// Held (`.prepare.lock`) while this controller prepares, so a reader
    /// can tell a live preparation from one a dead controller left.
    live: Mutex<Option<nix::fcntl::Flock<std::fs::File>>>,
}

impl Preparation {
    /// What `templates` need, given the CLIs' pins: a template without a
    /// current image, or whose image carries other CLIs than
    /// `cli_packages`, is queued (a stale image keeps serving meanwhile).
    pub fn new(images: &ImageStore, templates: &[String], cli_packages: &[String]) -> Self {
        let states = templates
            .iter()
            .map(|t| {
                let fresh = images
                    .current(t)
                    .is_ok_and(|i| !carries_clis(t) || i.manifest.cli_packages == cli_packages);
                let s = if fresh {
                    Prepared::Ready
                } else {
                    Prepared::Queued
                };
                (t.clone(), s)
            })
            .collect();
        let live = std::fs::create_dir_all(images.dir())
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(images.dir().join(".prepare.lock"))
            })
            .ok()
            .and_then(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
            });
        let me = Self {
            file: images.dir().join(".prepare.json"),
            order: templates.to_vec(),
            states: Mutex::new(states),
            live: Mutex::new(live),
        };
        me.save();
        me
    }

    /// This controller is done preparing (whatever the outcome).
    pub fn finish(&self) {
        if let Ok(mut l) = self.live.lock() {
            l.take();
        }
    }

    /// Whether some process is preparing this image store now.
    pub fn running(images: &ImageStore) -> bool {
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(images.dir().join(".prepare.lock"))
        else {
            return false;
        };
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    }

    /// The templates still to build, in the order given.
    pub fn missing(&self) -> Vec<String> {
        let Ok(states) = self.states.lock() else {
            return Vec::new();
        };
        self.order
            .iter()
            .filter(|t| !matches!(states.get(*t), Some(Prepared::Ready)))
            .cloned()
            .collect()
    }

    pub fn set(&self, template: &str, state: Prepared) {
        // A failure's text holds tool output: printable and short where it
        // is shown (`polydev image status`, logs).
        let state = match state {
            Prepared::Failed { error, at_ms } => Prepared::Failed {
                error: printable(&error, 4096),
                at_ms,
            },
            other => other,
        };
        if let Ok(mut s) = self.states.lock() {
            s.insert(template.to_owned(), state);
        }
        self.save();
    }

    /// Where `template` stands, if this controller prepares it.
    pub fn of(&self, template: &str) -> Option<Prepared> {
        self.states.lock().ok()?.get(template).cloned()
    }

    pub fn all(&self) -> BTreeMap<String, Prepared> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn save(&self) {
        let all = self.all();
        if let Ok(bytes) = serde_json::to_vec_pretty(&all) {
            let tmp = self
                .file
                .with_extension(format!("json.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(tmp, &self.file);
            }
        }
    }

    /// What a previous or running controller wrote (for `polydev image status`).
    pub fn read(images: &ImageStore) -> BTreeMap<String, Prepared> {
        std::fs::read(images.dir().join(".prepare.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// A `Progress` that records into a `Preparation` and logs each step.
#[derive(Debug)]
pub struct Prepare<'a> {
    pub preparation: &'a Preparation,
    pub template: String,
    pub since_ms: i64,
}

impl Progress for Prepare<'_> {
    fn step(&self, n: usize, of: usize, what: &str) {
        tracing::info!(template = %self.template, step = n, of, what, "preparing an image");
        self.preparation.set(
            &self.template,
            Prepared::Building {
                step: n,
                of,
                what: what.to_owned(),
                since_ms: self.since_ms,
            },
        );
    }
}

/// The pauses before a failed first-start build is tried again: a build
/// fetches from Debian's mirror and the npm registry, whose hiccups pass.
pub const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(45)];

/// Builds and activates every template `preparation` is missing, one after
/// the other; each ends `Ready` or `Failed` (the next is still tried).
pub async fn prepare_missing(
    images: &ImageStore,
    validator: &LocalDriver,
    opts: &BuildOptions,
    preparation: &Preparation,
) {
    prepare_each(
        preparation,
        &RETRY_PAUSES,
        |template, progress| async move {
            let image = build(images, validator, &template, opts, &progress).await?;
            let active = images.activate(&template, &image.manifest.hash)?;
            Ok(active.manifest.hash)
        },
    )
    .await;
}

/// `prepare_missing` around any build: a failed attempt is logged and
/// tried again after each of `pauses` (from a fresh copy of the base:
/// every attempt starts clean), then recorded as `Failed`.
async fn prepare_each<'a, F, Fut>(preparation: &'a Preparation, pauses: &[Duration], build_one: F)
where
    F: Fn(String, Prepare<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<String, BuildError>>,
{
    for template in preparation.missing() {
        let since_ms = now_ms();
        let started = Instant::now();
        let attempts = pauses.len() + 1;
        for attempt in 1..=attempts {
            let progress = Prepare {
                preparation,
                template: template.clone(),
                since_ms,
            };
            match build_one(template.clone(), progress).await {
                Ok(hash) => {
                    tracing::info!(template = %template, hash = %hash, attempt, secs = started.elapsed().as_secs(), "image prepared and active");
                    preparation.set(&template, Prepared::Ready);
                    break;
                }
                Err(e) if attempt < attempts => {
                    tracing::warn!(template = %template, error = %e, attempt, of = attempts, "preparing the image failed; trying again");
                    let pause = pauses[attempt - 1];
                    preparation.set(
                        &template,
                        Prepared::Building {
                            step: 0,
                            of: 0,
                            what: format!(
                                "an attempt failed; trying again in {} s (attempt {} of {attempts})",
                                pause.as_secs(),
                                attempt + 1
                            ),
                            since_ms,
                        },
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(template = %template, error = %e, attempts, "cannot prepare the image");
                    preparation.set(
                        &template,
                        Prepared::Failed {
                            error: e.to_string(),
                            at_ms: now_ms(),
                        },
                    );
                }
            }
        }
    }
    preparation.finish();
}

/// Kills every process running as `uid` (ours: only the build runs as
/// it), until none is left (a few rounds, for one that forks meanwhile).
fn end_processes_of(uid: u32) -> Result<(), BuildError> {
    for _ in 0..20 {
        let mut found = 0;
        for entry in std::fs::read_dir("/proc").map_err(failed)?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim_start)
            };
            let owner = field("Uid:")
                .and_then(|v| v.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok());
            // A zombie runs nothing any more (its parent reaps it).
            let dead = field("State:").is_some_and(|v| v.starts_with(['Z', 'X']));
            if owner == Some(uid) && !dead {
                found += 1;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if found == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(BuildError::Failed(format!(
        "processes of the build uid {uid} kept coming back; the build stopped before taking their files"
    )))
}

/// Walks `root` without following a symlink and refuses any entry not
/// owned by `uid`, any set-id file and anything but files, directories and
/// symlinks.
fn check_staged(root: &Path, uid: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::MetadataExt;
    let mut pending = vec![root.to_path_buf()];
    let mut seen = 0usize;
    while let Some(path) = pending.pop() {
        seen += 1;
        if seen > 2_000_000 {
            return Err(BuildError::Failed(
                "the CLIs' install left more than two million files; the build stopped".into(),
            ));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(failed)?;
        let shown = path.strip_prefix(root).unwrap_or(&path).display();
        if meta.uid() != uid {
            return Err(BuildError::Failed(format!(
                "the CLIs' install left {shown}, owned by uid {} and not by the build uid: the build stopped before taking it into the image",
                meta.uid()
            )));
        }
        let kind = meta.file_type();
        if !kind.is_dir() && meta.mode() & 0o6000 != 0 {
            return Err(BuildError::Failed(format!(
                "the CLIs' install left the set-id file {shown}: the build stopped before taking it into the image"
            )));
        }
        if kind.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(failed)? {
                pending.push(entry.map_err(failed)?.path());
            }
        } else if !kind.is_file() && !kind.is_symlink() {
            return Err(BuildError::Failed(format!(
                "the CLIs' install left {shown}, neither a file, a directory nor a symlink: the build stopped before taking it into the image"
            )));
        }
    }
    Ok(())
}

/// `@scope/name@1.2.3` → `@scope/name`; `name@1` → `name`.
fn package_name(spec: &str) -> &str {
    match spec.rfind('@') {
        Some(at) if at > 0 => &spec[..at],
        _ => spec,
    }
}

/// `text` without control characters other than newlines and tabs, cut
/// to at most `max` bytes (at a character boundary).
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build that fails is tried again (a mirror's hiccup passes) and
    /// says so meanwhile; one that keeps failing ends `Failed` with its
    /// last error after every pause, and the next template is still tried.
    #[tokio::test]
    async fn a_failed_build_is_tried_again_then_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::new(dir.path());
        let templates = ["runtime".to_owned(), "browser".to_owned()];
        let p = Preparation::new(&images, &templates, &[]);
        let tries = Mutex::new(Vec::<String>::new());
        let pauses = [Duration::from_millis(1), Duration::from_millis(1)];
        prepare_each(&p, &pauses, |template, progress| {
            let n = {
                let mut t = tries.lock().unwrap();
                t.push(template.clone());
                t.iter().filter(|x| **x == template).count()
            };
            if n > 1 {
                // The retry is visible while it waits.
                let Some(Prepared::Building { what, .. }) = p.of(&template) else {
                    panic!("{:?}", p.of(&template));
                };
                assert!(what.contains(&format!("attempt {n} of 3")), "{what}");
            }
            async move {
                progress.step(1, 1, "a step");
                match (template.as_str(), n) {
                    ("runtime", 2) => Ok("hash-of-runtime".to_owned()),
                    _ => Err(BuildError::Failed(format!("{template} failed on try {n}"))),
                }
            }
        })
        .await;
        assert_eq!(
            *tries.lock().unwrap(),
            ["runtime", "runtime", "browser", "browser", "browser"]
        );
        assert_eq!(p.of("runtime"), Some(Prepared::Ready));
        let Some(Prepared::Failed { error, .. }) = p.of("browser") else {
            panic!("{:?}", p.of("browser"));
        };
        assert!(error.contains("browser failed on try 3"), "{error}");
        assert!(!Preparation::running(&images), "finished");
    }

    #[test]
    fn a_preparation_counts_as_running_only_while_its_controller_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::new(dir.path());
        assert!(!Preparation::running(&images));
        let p = Preparation::new(&images, &["runtime".to_owned()], &[]);
        assert!(Preparation::running(&images));
        assert_eq!(Preparation::read(&images)["runtime"], Prepared::Queued);
        // A controller that dies mid-build (here: drops it) leaves its
        // states behind, but not the lock.
        drop(p);
        assert!(!Preparation::running(&images));
        assert_eq!(Preparation::read(&images)["runtime"], Prepared::Queued);
        let p = Preparation::new(&images, &["runtime".to_owned()], &[]);
        p.finish();
        assert!(!Preparation::running(&images));
    }

    /// An image built with other CLI pins than today's is prepared anew
    /// (an upgrade that adds or moves a CLI rebuilds it); one with
    /// today's is ready; a template without CLIs only needs an image.
    #[test]
    fn an_image_with_other_cli_pins_is_prepared_anew() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::new(dir.path());
        let tree = |name: &str| {
            let t = dir.path().join(name);
            std::fs::create_dir_all(t.join("etc")).unwrap();
            std::fs::write(t.join("etc/marker"), name).unwrap();
            t
        };
        let old = vec!["cli-a@1".to_owned()];
        let now = vec!["cli-a@1".to_owned(), "cli-b@2".to_owned()];
        let i = images
            .import("runtime", &tree("r1"), Vec::new(), old)
            .unwrap();
        images.activate("runtime", &i.manifest.hash).unwrap();
        let i = images
            .import("base", &tree("b1"), Vec::new(), Vec::new())
            .unwrap();
        images.activate("base", &i.manifest.hash).unwrap();
        let all = ["runtime".to_owned(), "base".to_owned()];
        let p = Preparation::new(&images, &all, &now);
        assert_eq!(p.of("runtime"), Some(Prepared::Queued));
        assert_eq!(p.of("base"), Some(Prepared::Ready));
        assert_eq!(p.missing(), vec!["runtime".to_owned()]);
        drop(p);
        let i = images
            .import("runtime", &tree("r2"), Vec::new(), now.clone())
            .unwrap();
        images.activate("runtime", &i.manifest.hash).unwrap();
        assert_eq!(
            Preparation::new(&images, &all, &now).of("runtime"),
            Some(Prepared::Ready)
        );
    }

    fn sh(line: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args(["-c", line]);
        cmd
    }

    #[tokio::test]
    async fn a_build_step_keeps_only_the_end_of_its_output_and_its_deadline() {
        // 10 MB of stderr: the error holds the last lines only.
        let err = run(
            &mut sh("yes flooding | head -c 10000000 >&2; echo the end >&2; exit 3"),
            "flood",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.len() < STDERR_KEPT + 200, "{}", err.len());
        assert!(
            err.contains("the end") && err.contains("exit status: 3"),
            "{}",
            &err[err.len() - 100..]
        );
        // A step that hangs is stopped at its deadline, with what it left.
        let t = Instant::now();
        let err = run_within(
            &mut sh("sleep 30 & sleep 30"),
            "hang",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not finish within 1 s"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        // A step that leaves a process holding its stderr still ends.
        let t = Instant::now();
        run(&mut sh("sleep 30 & exit 0"), "leftover").await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_failures_text_is_printable_and_short() {
        let hostile = format!("\x1b]0;owned\x07bad\r\x1b[2Jnews\n{}", "é".repeat(5000));
        let p = printable(&hostile, 4096);
        assert!(!p.chars().any(|c| c.is_control() && c != '\n'), "{p:?}");
        assert!(p.starts_with("]0;ownedbad[2Jnews\n"), "{p:?}");
        assert!(p.len() <= 4096 + '…'.len_utf8());
    }

    #[test]
    fn npm_keeps_how_to_reach_the_registry_and_nothing_of_the_controllers() {
        for kept in [
            "PATH",
            "NODE_EXTRA_CA_CERTS",
            "https_proxy",
            "npm_config_registry",
            "NPM_CONFIG_CAFILE",
        ] {
            assert!(npm_env_kept(kept), "{kept}");
        }
        for dropped in [
            "POLYDEV_DATABASE_URL",
            "HOME",
            "AWS_SECRET_ACCESS_KEY",
            "ANTHROPIC_API_KEY",
            "NPM_TOKEN",
        ] {
            assert!(!npm_env_kept(dropped), "{dropped}");
        }
    }

    #[test]
    fn nothing_the_build_uid_left_running_survives() {
        // A process detached into its own session, as an install script
        // could leave one, running as the build uid.
        let status = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={BUILD_UID}"),
                &format!("--regid={BUILD_UID}"),
                "--clear-groups",
                "setsid",
                "-f",
                "sleep",
                "300",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(200));
        let of_build_uid = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                        s.lines()
                            .any(|l| l.starts_with(&format!("Uid:\t{BUILD_UID}\t")))
                            && !s.lines().any(|l| l.starts_with("State:\tZ"))
                    })
                })
                .count()
        };
        assert_eq!(of_build_uid(), 1, "the detached process runs");
        end_processes_of(BUILD_UID).unwrap();
        assert_eq!(of_build_uid(), 0);
    }

    #[test]
    fn only_what_the_build_uid_made_is_taken_into_the_image() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let owner = nix::unistd::getuid().as_raw();
        let tree = dir.path().join("prefix");
        std::fs::create_dir_all(tree.join("lib/node_modules/cli")).unwrap();
        std::fs::write(tree.join("lib/node_modules/cli/index.js"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", tree.join("bin-link")).unwrap();
        // A tree of the owner's own files and symlinks (not followed) passes.
        check_staged(&tree, owner).unwrap();
        // The same tree is refused for any other uid.
        let err = check_staged(&tree, owner + 1).unwrap_err().to_string();
        assert!(err.contains("not by the build uid"), "{err}");
        // A hard link to a file someone else owns is refused by its owner.
        let other = dir.path().join("someone-elses");
        std::fs::write(&other, "secret").unwrap();
        std::os::unix::fs::chown(&other, Some(owner + 7), None).ok();
        if nix::unistd::getuid().is_root() {
            std::fs::hard_link(&other, tree.join("lib/linked")).unwrap();
            let err = check_staged(&tree, owner).unwrap_err().to_string();
            assert!(
                err.contains("lib/linked") && err.contains(&format!("uid {}", owner + 7)),
                "{err}"
            );
            std::fs::remove_file(tree.join("lib/linked")).unwrap();
        }
        // A set-id file is refused.
        let suid = tree.join("lib/node_modules/cli/index.js");
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let err = check_staged(&tree, owner).unwrap_err().to_string();
        assert!(err.contains("set-id"), "{err}");
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A FIFO is refused.
        nix::unistd::mkfifo(
            &tree.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = check_staged(&tree, owner).unwrap_err().to_string();
        assert!(err.contains("neither a file"), "{err}");
    }

    #[test]
    fn package_specs_name_their_package() {
        assert_eq!(
            package_name("@anthropic-ai/claude-code@2.1.197"),
            "@anthropic-ai/claude-code"
        );
        assert_eq!(package_name("@openai/codex"), "@openai/codex");
        assert_eq!(package_name("left-pad@1.3.0"), "left-pad");
    }

    #[test]
    fn the_build_uid_is_below_every_sandbox_uid_range() {
        let cfg = crate::LocalConfig::for_data_dir(Path::new("/nonexistent/polydev"));
        assert!(BUILD_UID < cfg.uid_base);
        assert!(BUILD_UID < crate::LocalConfig::for_validation(Path::new("/x")).uid_base);
    }
}
