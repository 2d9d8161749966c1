//! The sandbox runtime in the binary: starting the manager for `serve`,
//! and `polydev image build|list|activate|rollback`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use polydev_sandbox::{
    Driver, Image, ImageStore, LocalConfig, LocalDriver, Manager, SandboxId, SandboxSpec,
};
use polydev_store::Store;
use polydev_telemetry::metrics::SandboxMetrics;

use crate::config::SandboxSettings;

pub fn images(data_dir: &Path) -> ImageStore {
    ImageStore::new(data_dir.join("images"))
}

pub fn local_driver(data_dir: &Path, keep_failed: bool) -> Result<LocalDriver, String> {
    // The sandboxes' uids must traverse the data dir to their state
    // directories (not list it): add o+x when it is missing.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
        let mode = std::fs::metadata(data_dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o001 == 0 {
            std::fs::set_permissions(
                data_dir,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o711),
            )
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
        }
    }
    let mut cfg = LocalConfig::for_data_dir(data_dir);
    cfg.keep_failed = keep_failed;
    LocalDriver::new(cfg).map_err(|e| e.to_string())
}

/// The manager for `serve`, or why there is none (the API then answers
/// 503 with that reason). Makes the `minimal` image when none exists.
pub async fn manager(
    data_dir: &Path,
    settings: &SandboxSettings,
    store: &Store,
    metrics: SandboxMetrics,
) -> Result<Arc<Manager>, String> {
    if !settings.enabled {
        return Err("sandboxes are disabled on this controller (--sandboxes false)".into());
    }
    let driver = local_driver(data_dir, settings.keep_failed)?;
    let images = images(data_dir);
    if images.current("minimal").is_err() {
        let image = images
            .build_minimal(&driver.config().launcher)
            .map_err(|e| format!("cannot build the minimal image: {e}"))?;
        validate(&driver, &images, &image)
            .await
            .map_err(|e| format!("{e:#}"))?;
        images
            .activate("minimal", &image.manifest.hash)
            .map_err(|e| e.to_string())?;
    }
    Ok(Manager::new(
        Arc::new(driver),
        store.clone(),
        images,
        settings.manager.clone(),
        metrics,
    ))
}

/// Boots one sandbox from `image` and checks its agent runs commands.
pub async fn validate(
    driver: &LocalDriver,
    images: &ImageStore,
    image: &Image,
) -> anyhow::Result<()> {
    let id = SandboxId::generate();
    let spec = SandboxSpec {
        template: image.manifest.template.clone(),
        limits: Default::default(),
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
                polydev_sandbox::DriverError::Boot {
                    stage,
                    message,
                    log_tail,
                    ..
                } => anyhow::anyhow!(
                    "image {} does not boot (stage {stage}): {message}\n{}",
                    image.manifest.hash,
                    log_tail.join("\n")
                ),
                other => anyhow::anyhow!(other),
            })?;
        let mut agent = driver.agent(&id, Duration::from_secs(5)).await?;
        let health = agent.health().await?;
        let out = agent
            .exec(
                &["/bin/sh", "-c", "echo ok"],
                None,
                Duration::from_secs(10),
                |_| {},
            )
            .await?;
        if health != "ready" || out.stdout != b"ok\n" {
            bail!(
                "image {}: the agent answered {health:?} and {:?}",
                image.manifest.hash,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        smoke_check(driver, &id, &image.manifest.template, &mut agent).await?;
        anyhow::Ok(())
    }
    .await;
    let _ = driver.destroy(&id).await;
    result?;
    images.mark_validated(image)?;
    Ok(())
}

/// What each template is for, tried in the booted sandbox: the runtime's
/// three CLIs answer `--version`; the browser's login desktop (the one
/// login sessions run) comes up and its VNC server greets.
async fn smoke_check(
    driver: &LocalDriver,
    id: &SandboxId,
    template: &str,
    agent: &mut polydev_agent::AgentClient,
) -> anyhow::Result<()> {
    match template {
        "runtime" => {
            for cli in ["claude", "codex", "gemini"] {
                let out = agent
                    .exec(&[cli, "--version"], None, Duration::from_secs(60), |_| {})
                    .await?;
                if out.code != Some(0) {
                    bail!(
                        "`{cli} --version` failed in the runtime image: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        "browser" => {
            let argv = polydev_sandbox::login::desktop_command(1280, 800);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            agent
                .exec(&argv, None, Duration::from_secs(10), |_| {})
                .await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if polydev_sandbox::login::vnc_greets(driver, id).await {
                    break;
                }
                if Instant::now() > deadline {
                    let log = agent
                        .get_file(polydev_sandbox::login::DESKTOP_LOG)
                        .await
                        .unwrap_or_default();
                    bail!(
                        "the browser image's desktop did not serve VNC within 30 s\n{}",
                        String::from_utf8_lossy(&log)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The three CLIs at pinned versions, in one place
/// (`crates/polydev/cli-packages.txt`, also read by scripts/test.sh;
/// `POLYDEV_CLI_VERSION=latest` there overrides them for a test matrix).
const CLI_PACKAGES_FILE: &str = include_str!("../cli-packages.txt");

fn cli_packages() -> Vec<&'static str> {
    CLI_PACKAGES_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}
/// TigerVNC's Xvnc is the X server and the VNC server in one process
/// (greets in ~50 ms; Xvfb + x11vnc took ~230 ms and more memory).
const BROWSER_PACKAGES: &[&str] = &[
    "tigervnc-standalone-server",
    "chromium",
    "fonts-dejavu-core",
];
const RUNTIME_PACKAGES: &[&str] = &["ca-certificates", "git"];

struct Steps {
    total: usize,
    n: usize,
    bar: indicatif::ProgressBar,
    started: Instant,
}

impl Steps {
    fn new(total: usize) -> Self {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_length(total as u64);
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            total,
            n: 0,
            bar,
            started: Instant::now(),
        }
    }

    fn step(&mut self, msg: &str) {
        self.n += 1;
        self.bar.set_position(self.n as u64);
        self.bar.set_message(msg.to_owned());
        self.bar
            .println(format!("[{}/{}] {msg}", self.n, self.total));
    }

    fn done(self, msg: &str) {
        self.bar.finish_and_clear();
        eprintln!("{msg} in {:.1}s", self.started.elapsed().as_secs_f64());
    }
}

fn run(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Debian minbase, made once per image store and copied for each build.
fn debootstrap_base(
    images: &ImageStore,
    mirror: &str,
    steps: &mut Steps,
) -> anyhow::Result<PathBuf> {
    let cache = images.dir().join(".cache/bookworm-minbase");
    if cache.join("etc/debian_version").exists() {
        steps.step("debootstrap base (cached)");
        return Ok(cache);
    }
    steps.step("debootstrap --variant=minbase bookworm (about half a minute)");
    let tmp = images
        .dir()
        .join(format!(".cache/.bookworm-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = run(
        std::process::Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&tmp)
            .arg(mirror),
        "debootstrap (install the `debootstrap` package)",
    );
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &cache)?;
    Ok(cache)
}

fn chroot_apt(root: &Path, packages: &[&str]) -> anyhow::Result<()> {
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).ok();
    run(
        std::process::Command::new("chroot")
            .arg(root)
            .args(["apt-get", "update", "-qq"]),
        "apt-get update in the image",
    )?;
    run(
        std::process::Command::new("chroot")
            .arg(root)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["apt-get", "install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
        "apt-get install in the image",
    )?;
    run(
        std::process::Command::new("chroot")
            .arg(root)
            .args(["apt-get", "clean"]),
        "apt-get clean",
    )?;
    let _ = std::fs::remove_dir_all(root.join("var/lib/apt/lists"));
    std::fs::create_dir_all(root.join("var/lib/apt/lists/partial"))?;
    Ok(())
}

/// Node.js from this host (Debian's is too old for Gemini CLI) and the
/// three CLIs from npm at their pinned versions.
fn add_node_and_clis(root: &Path) -> anyhow::Result<()> {
    let node = polydev_sandbox::local::which("node")
        .context("the runtime template needs Node.js ≥ 20 on the build host")?;
    let version = std::process::Command::new(&node)
        .arg("--version")
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        bail!("the runtime template needs Node.js ≥ 20 on the build host, found {version}");
    }
    let dest = root.join("usr/local/bin/node");
    std::fs::create_dir_all(root.join("usr/local/bin"))?;
    std::fs::copy(&node, &dest)?;
    run(
        std::process::Command::new("npm")
            .args(["install", "--global", "--no-audit", "--no-fund", "--prefix"])
            .arg(root.join("usr/local"))
            .args(cli_packages()),
        "npm install of the CLIs",
    )
}

/// `polydev image build TEMPLATE`.
pub async fn build(data_dir: &Path, template: &str, mirror: &str) -> anyhow::Result<()> {
    let driver = local_driver(data_dir, false).map_err(anyhow::Error::msg)?;
    let images = images(data_dir);
    let agent = driver.config().launcher.clone();
    let image = match template {
        "minimal" => {
            let mut steps = Steps::new(2);
            steps.step("skeleton + agent");
            let image = images.build_minimal(&agent)?;
            steps.step("validate: boot one sandbox");
            validate(&driver, &images, &image).await?;
            steps.done("built minimal");
            image
        }
        "base" | "runtime" | "browser" => {
            let mut steps = Steps::new(5);
            let base = debootstrap_base(&images, mirror, &mut steps)?;
            steps.step("copy base");
            let work = images.scratch(template)?;
            let root = work.join("rootfs");
            run(
                std::process::Command::new("cp")
                    .arg("-a")
                    .arg(&base)
                    .arg(&root),
                "copying the base",
            )?;
            steps.step(match template {
                "runtime" => "packages, Node.js and the CLIs",
                "browser" => "Xvnc (TigerVNC) and Chromium",
                _ => "nothing to add",
            });
            let added = match template {
                "runtime" => {
                    chroot_apt(&root, RUNTIME_PACKAGES).and_then(|()| add_node_and_clis(&root))
                }
                "browser" => chroot_apt(&root, BROWSER_PACKAGES),
                _ => Ok(()),
            };
            if let Err(e) = added {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
            polydev_sandbox::image::add_agent(&root, &agent)?;
            steps.step("content hash and import");
            let image = images.import(template, &root, Vec::new());
            let _ = std::fs::remove_dir_all(&work);
            let image = image?;
            steps.step("validate: boot one sandbox");
            validate(&driver, &images, &image).await?;
            steps.done(&format!("built {template}"));
            image
        }
        other => bail!("unknown template {other:?}: minimal, base, runtime or browser"),
    };
    let previous = images.current(template).ok().map(|i| i.manifest.hash);
    images.activate(template, &image.manifest.hash)?;
    println!(
        "{template} {} active{}",
        image.manifest.hash,
        previous
            .filter(|p| *p != image.manifest.hash)
            .map(|p| format!(" (previous: {p})"))
            .unwrap_or_default()
    );
    Ok(())
}

pub fn list(data_dir: &Path, template: &str) -> anyhow::Result<()> {
    let all = images(data_dir).list(template)?;
    if all.is_empty() {
        bail!("no images for {template}: build one with `polydev image build {template}`");
    }
    for (image, current) in all {
        let m = image.manifest;
        println!(
            "{} {}  built {}  {}",
            if current { "*" } else { " " },
            m.hash,
            m.built_at,
            if m.validated {
                "validated"
            } else {
                "not validated"
            }
        );
    }
    Ok(())
}

pub fn activate(data_dir: &Path, template: &str, hash: &str) -> anyhow::Result<()> {
    let image = images(data_dir).activate(template, hash)?;
    println!("{template} {} active", image.manifest.hash);
    Ok(())
}

pub fn rollback(data_dir: &Path, template: &str) -> anyhow::Result<()> {
    let image = images(data_dir).rollback(template)?;
    println!("{template} {} active (rolled back)", image.manifest.hash);
    Ok(())
}

/// The in-process egress proxy as the sandboxes' gate: a credential per
/// sandbox (on the user's own port when per-user ports are on), revoked
/// when the sandbox ends.
#[derive(Debug)]
pub struct EgressGateway(pub polydev_egress::Egress);

#[async_trait::async_trait]
impl polydev_sandbox::EgressGate for EgressGateway {
    async fn open(
        &self,
        user: polydev_domain::UserId,
        sandbox: &str,
        template: &str,
    ) -> Result<polydev_sandbox::EgressGrant, String> {
        let access = self
            .0
            .mint(user, sandbox, template)
            .await
            .map_err(|e| format!("cannot get an egress credential: {e}"))?;
        let listen = self.0.config().listen;
        let ip = if listen.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            listen.ip()
        };
        let port = access
            .user_port
            .or_else(|| self.0.port())
            .unwrap_or(listen.port());
        Ok(polydev_sandbox::EgressGrant {
            target: std::net::SocketAddr::new(ip, port),
            username: access.credential.username.clone(),
            password: access.credential.secret.clone(),
        })
    }

    async fn close(&self, sandbox: &str) {
        if let Err(e) = self.0.revoke_sandbox(sandbox).await {
            tracing::warn!(sandbox, error = %e, "cannot revoke the sandbox's egress credential");
        }
    }
}
