//! The sandbox runtime in the binary: starting the manager for `serve`
//! (and preparing missing images in the background), and `polydev image
//! build|list|activate|rollback|status`. Building itself lives in
//! `polydev_sandbox::build`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use polydev_sandbox::build::{BuildOptions, Preparation, Prepared, Progress};
use polydev_sandbox::{ImageStore, LocalDriver, Manager};
use polydev_store::Store;
use polydev_telemetry::metrics::SandboxMetrics;

use crate::config::SandboxSettings;

pub fn images(dir: &Path) -> ImageStore {
    ImageStore::new(dir)
}

pub fn build_options(mirror: &str) -> BuildOptions {
    BuildOptions {
        mirror: mirror.to_owned(),
        agent: polydev_sandbox::local::default_launcher(),
        // The CLIs at their pinned versions (the provider registry's
        // `cli-packages.txt`; `POLYDEV_CLI_VERSION=latest` in
        // scripts/test.sh overrides them for a test matrix).
        cli_packages: polydev_sessions::providers::pinned_packages(),
        cli_checks: polydev_domain::Provider::ALL
            .iter()
            .map(|p| {
                let info = polydev_sessions::providers::info(*p);
                let mut argv = vec!["env".to_owned()];
                argv.extend(info.run_env.iter().map(|e| (*e).to_owned()));
                argv.extend([info.command.to_owned(), "--version".to_owned()]);
                argv
            })
            .collect(),
        cli_prepare: polydev_domain::Provider::ALL
            .iter()
            .filter_map(|p| polydev_sessions::providers::info(*p).prepare)
            .map(str::to_owned)
            .collect(),
    }
}

/// The manager for `serve`, or why there is none (the API then answers
/// 503 with that reason). Makes the `minimal` image when none exists; the
/// templates in `settings.prepare` that have no image are built by
/// `prepare` (in the background, by `serve`).
pub async fn manager(
    data_dir: &Path,
    images_dir: &Path,
    settings: &SandboxSettings,
    store: &Store,
    metrics: SandboxMetrics,
) -> Result<Arc<Manager>, String> {
    if !settings.enabled {
        return Err("sandboxes are disabled on this controller (--sandboxes false)".into());
    }
    let driver = LocalDriver::for_data_dir(data_dir, settings.keep_failed)?;
    let images = images(images_dir);
    if images.current("minimal").is_err() {
        let validator = LocalDriver::for_validation(data_dir)?;
        let opts = build_options("");
        let image = polydev_sandbox::build::build(&images, &validator, "minimal", &opts, &Quiet)
            .await
            .map_err(|e| format!("cannot build the minimal image: {e}"))?;
        polydev_sandbox::Driver::shutdown(&validator).await;
        images
            .activate("minimal", &image.manifest.hash)
            .map_err(|e| e.to_string())?;
    }
    let mut cfg = settings.manager.clone();
    cfg.memory_commit_max = driver
        .config()
        .budget
        .memory_bytes
        .zip(settings.memory_overcommit)
        .map(|(b, o)| (b as f64 * o) as u64);
    // One user alone never holds most of a small host (the default 12 GiB
    // is more than a 16 GiB host's whole budget).
    if let (false, Some(budget)) = (
        settings.per_user_memory_set,
        driver.config().budget.memory_bytes,
    ) {
        cfg.per_user_memory = cfg.per_user_memory.map(|m| m.min(budget / 2));
    }
    let manager = Manager::new(
        Arc::new(driver),
        store.clone(),
        images.clone(),
        cfg,
        metrics,
    );
    if !settings.prepare.is_empty() {
        manager.set_preparation(Arc::new(Preparation::new(
            &images,
            &settings.prepare,
            &polydev_sessions::providers::pinned_packages(),
        )));
    }
    Ok(manager)
}

/// Builds, in the background, the images the manager is preparing (what a
/// first start needs for runs and logins); a failure is logged and shown in
/// the status, and the controller keeps serving.
pub async fn prepare(manager: Arc<Manager>, data_dir: std::path::PathBuf, mirror: String) {
    let Some(preparation) = manager.preparation().cloned() else {
        return;
    };
    if preparation.missing().is_empty() {
        preparation.finish();
        return;
    }
    let validator = if !nix::unistd::geteuid().is_root() {
        // A service user (deploy/systemd) runs sandboxes with capabilities
        // but cannot debootstrap or chroot.
        Err("building images needs root (debootstrap, chroot): as root, run `polydev image build runtime` and `polydev image build browser` with this controller's --config or --data-dir".to_owned())
    } else {
        tracing::info!(templates = ?preparation.missing(), "preparing the images runs and logins need (first start); this takes a few minutes");
        LocalDriver::for_validation(&data_dir)
    };
    let validator = match validator {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, templates = ?preparation.missing(), "cannot prepare the images runs and logins need");
            for t in preparation.missing() {
                preparation.set(
                    &t,
                    Prepared::Failed {
                        error: e.clone(),
                        at_ms: polydev_store::now_ms(),
                    },
                );
            }
            preparation.finish();
            return;
        }
    };
    polydev_sandbox::build::prepare_missing(
        manager.images(),
        &validator,
        &build_options(&mirror),
        &preparation,
    )
    .await;
    polydev_sandbox::Driver::shutdown(&validator).await;
}

struct Quiet;

impl Progress for Quiet {
    fn step(&self, _: usize, _: usize, _: &str) {}
}

/// Steps on a terminal as a spinner; elsewhere (a log, CI) as plain lines.
struct Steps {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Steps {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{pos}/{len}] {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            started: Instant::now(),
        }
    }

    fn done(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{msg} in {:.1}s", self.started.elapsed().as_secs_f64());
    }
}

impl Progress for Steps {
    fn step(&self, n: usize, of: usize, what: &str) {
        let line = format!(
            "[{n}/{of}] {what} ({:.0}s)",
            self.started.elapsed().as_secs_f64()
        );
        match &self.bar {
            Some(bar) => {
                bar.set_length(of as u64);
                bar.set_position(n as u64);
                bar.set_message(what.to_owned());
                bar.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

/// `polydev image build TEMPLATE`.
pub async fn build(
    data_dir: &Path,
    images_dir: &Path,
    template: &str,
    mirror: &str,
) -> anyhow::Result<()> {
    let validator = LocalDriver::for_validation(data_dir).map_err(anyhow::Error::msg)?;
    let images = images(images_dir);
    let steps = Steps::new();
    let built = polydev_sandbox::build::build(
        &images,
        &validator,
        template,
        &build_options(mirror),
        &steps,
    )
    .await;
    polydev_sandbox::Driver::shutdown(&validator).await;
    let image = built?;
    steps.done(&format!("built {template}"));
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

/// `polydev image status`: every template's current image, and what a
/// controller is preparing (from its status file).
pub fn status(images_dir: &Path, json: bool) -> anyhow::Result<()> {
    let images = images(images_dir);
    let rows: Vec<serde_json::Value> = polydev_sandbox::build::template_status(&images)
        .into_iter()
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    for r in rows {
        let s = &r["status"];
        let detail = match s["state"].as_str().unwrap_or("") {
            // Between attempts there is no step, only what happens next.
            "building" if s["of"] == 0 => {
                format!("building: {}", s["what"].as_str().unwrap_or(""))
            }
            "building" => format!(
                "building: step {} of {}, {}",
                s["step"],
                s["of"],
                s["what"].as_str().unwrap_or("")
            ),
            "queued" => "queued (after the template before it)".into(),
            "failed" => format!("failed: {}", s["error"].as_str().unwrap_or("")),
            other => other.to_owned(),
        };
        println!(
            "{:8} {:18} {detail}",
            r["template"].as_str().unwrap_or(""),
            r["image"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

pub fn list(images_dir: &Path, template: &str) -> anyhow::Result<()> {
    let all = images(images_dir).list(template)?;
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

pub fn activate(images_dir: &Path, template: &str, hash: &str) -> anyhow::Result<()> {
    let image = images(images_dir).activate(template, hash)?;
    println!("{template} {} active", image.manifest.hash);
    Ok(())
}

pub fn rollback(images_dir: &Path, template: &str) -> anyhow::Result<()> {
    let image = images(images_dir).rollback(template)?;
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

    fn last_refusal(&self, sandbox: &str) -> Option<(String, String)> {
        self.0.last_refusal(sandbox).map(|r| (r.host, r.why))
    }

    async fn close(&self, sandbox: &str) {
        if let Err(e) = self.0.revoke_sandbox(sandbox).await {
            tracing::warn!(sandbox, error = %e, "cannot revoke the sandbox's egress credential");
        }
    }
}
