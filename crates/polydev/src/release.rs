//! The host side of deploys: `polydev release activate|rollback|list`, run
//! over SSH by `polydev deploy` / `polydev rollback` / `polydev deployments`
//! from the bundle's own copy of the tool (`.deploy/polydev`).
//!
//! ```text
//! R/releases/<id>/            bin/polydev, bin/polydev-agent, manifest.json, [migrations/]
//! R/current -> releases/<id>  swapped atomically (rename of a new symlink)
//! R/deployments/<id>.json     one record per deployment or rollback
//! R/deploy.log                one line per step, every deployment
//! R/shared/polydev.toml       the controller's config (passed to every release)
//! R/run/supervisor.sock       the supervisor's control socket
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use crate::supervise;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub version: String,
    pub git_sha: String,
    pub created_at: String,
    /// File (relative path) → SHA-256, hex.
    pub files: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    pub ms: u64,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    /// `deploy` or `rollback`.
    pub kind: String,
    pub who: String,
    pub git_sha: String,
    pub version: String,
    pub targets: Vec<String>,
    pub bootstrap: bool,
    pub previous: Option<String>,
    pub started_at: String,
    pub steps: Vec<Step>,
    /// `success`, `bootstrapped`, `rolled_back` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
    pub log_tail: Vec<String>,
    pub total_ms: u64,
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

fn current(root: &Path) -> Option<String> {
    std::fs::read_link(root.join("current"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Points `R/current` at `releases/<id>` in one rename.
fn switch(root: &Path, id: &str) -> anyhow::Result<()> {
    let tmp = root.join(format!(".current-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new("releases").join(id), &tmp)?;
    std::fs::rename(&tmp, root.join("current")).context("cannot switch current")?;
    Ok(())
}

fn config_args(root: &Path) -> Vec<String> {
    let cfg = root.join("shared/polydev.toml");
    if cfg.is_file() {
        vec!["--config".into(), cfg.display().to_string()]
    } else {
        vec![
            "--data-dir".into(),
            root.join("shared/data").display().to_string(),
        ]
    }
}

struct Run {
    root: PathBuf,
    record: Record,
    started: Instant,
}

impl Run {
    /// A record in progress for deployment or rollback `id`.
    #[allow(clippy::too_many_arguments)]
    fn begin(
        root: &Path,
        id: &str,
        kind: &str,
        who: String,
        manifest: Option<&Manifest>,
        targets: Vec<String>,
        bootstrap: bool,
        previous: Option<String>,
    ) -> Self {
        Self {
            root: root.to_owned(),
            started: Instant::now(),
            record: Record {
                id: id.to_owned(),
                kind: kind.to_owned(),
                who,
                git_sha: manifest.map(|m| m.git_sha.clone()).unwrap_or_default(),
                version: manifest.map(|m| m.version.clone()).unwrap_or_default(),
                targets,
                bootstrap,
                previous,
                started_at: now(),
                steps: Vec::new(),
                outcome: String::new(),
                error: None,
                log_tail: Vec::new(),
                total_ms: 0,
            },
        }
    }

    fn log(&self, line: &str) {
        use std::io::Write;
        eprintln!("{line}");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("deploy.log"))
        {
            let _ = writeln!(f, "{} {} {line}", now(), self.record.id);
        }
    }

    /// Runs one step, timing it and recording the result.
    async fn step<T>(
        &mut self,
        name: &str,
        work: impl std::future::Future<Output = anyhow::Result<(T, String)>>,
    ) -> anyhow::Result<T> {
        self.log(&format!("step {name} …"));
        let t = Instant::now();
        let result = work.await;
        let ms = t.elapsed().as_millis() as u64;
        let (ok, detail) = match &result {
            Ok((_, d)) => (true, d.clone()),
            Err(e) => (false, format!("{e:#}")),
        };
        self.log(&format!(
            "step {name} {} in {ms} ms {detail}",
            if ok { "ok" } else { "FAILED" }
        ));
        self.record.steps.push(Step {
            name: name.to_owned(),
            ms,
            ok,
            detail,
        });
        result.map(|(v, _)| v)
    }

    fn finish(mut self, outcome: &str, error: Option<String>) -> anyhow::Result<Record> {
        self.record.outcome = outcome.to_owned();
        self.record.error = error;
        self.record.total_ms = self.started.elapsed().as_millis() as u64;
        std::fs::create_dir_all(self.root.join("deployments"))?;
        let name = if self.record.kind == "rollback" {
            format!(
                "{}-rollback-{}.json",
                self.record.id,
                time::OffsetDateTime::now_utc().unix_timestamp()
            )
        } else {
            format!("{}.json", self.record.id)
        };
        std::fs::write(
            self.root.join("deployments").join(name),
            serde_json::to_vec_pretty(&self.record)?,
        )?;
        self.log(&format!("outcome {outcome}"));
        println!("{}", serde_json::to_string(&self.record)?);
        Ok(self.record)
    }
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let r = client.get(format!("http://{addr}{path}")).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

/// Waits until the controller on `listen` answers health as `release`,
/// readiness, and the smoke check (the OpenAPI document).
async fn health_gate(listen: &str, release: &str, timeout: Duration) -> anyhow::Result<String> {
    let until = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < until {
        match http_get(listen, "/api/auth/health").await {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if v["release"] == release {
                    let (ready, _) = http_get(listen, "/readyz")
                        .await
                        .unwrap_or((0, String::new()));
                    let (smoke, _) = http_get(listen, "/api/openapi.json")
                        .await
                        .unwrap_or((0, String::new()));
                    if ready == 200 && smoke == 200 {
                        return Ok(format!("{release} healthy, ready, smoke check passed"));
                    }
                    last = format!("readyz {ready}, openapi {smoke}");
                } else {
                    last = format!("answering as {}", v["release"]);
                }
            }
            Ok((status, _)) => last = format!("health answered {status}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{release} did not pass the health gate within {timeout:?} ({last})")
}

/// Hands traffic to the release `current` points at, behind the gate;
/// on failure, back to `previous`. Returns (outcome, error, log tail).
async fn handover(
    run: &mut Run,
    id: &str,
    previous: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let root = run.root.clone();
    let status = supervise::control(&root, "status", Duration::from_secs(5)).await?;
    let listen = status["listen"].as_str().unwrap_or_default().to_owned();
    let reload = run
        .step("start new version", async {
            let a = supervise::control(&root, "reload", Duration::from_secs(10)).await?;
            if a["ok"] != true {
                bail!("{}", a["error"]);
            }
            Ok(((), format!("pid {}", a["candidate"]["pid"])))
        })
        .await;
    let gate = match reload {
        Ok(()) => {
            run.step("health gate", async {
                let detail = health_gate(&listen, id, timeout).await?;
                Ok(((), detail))
            })
            .await
        }
        Err(e) => Err(e),
    };
    match gate {
        Ok(()) => {
            run.step("switch traffic", async {
                let a = supervise::control(&root, "commit", Duration::from_secs(10)).await?;
                Ok(((), format!("old version draining; active {}", a["active"])))
            })
            .await?;
            Ok(())
        }
        Err(e) => {
            let tail = run
                .step("roll back", async {
                    let a = supervise::control(&root, "abort", Duration::from_secs(10)).await?;
                    if let Some(prev) = previous {
                        switch(&root, prev)?;
                    }
                    let tail: Vec<String> = a["logTail"]
                        .as_array()
                        .map(|t| {
                            t.iter()
                                .filter_map(|l| l.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok((tail, format!("back on {}", previous.unwrap_or("nothing"))))
                })
                .await
                .unwrap_or_default();
            run.record.log_tail = tail;
            Err(e)
        }
    }
}

pub struct Activate {
    pub root: PathBuf,
    pub id: String,
    pub targets: Vec<String>,
    pub bootstrap: bool,
    pub health_timeout: Duration,
    pub who: String,
    pub keep: usize,
    /// Bootstrap: where the controller listens (kept in R/shared/listen).
    pub listen: Option<String>,
}

/// Checks every file of the manifest against its hash, and that no
/// migration outside the manifest came along; the number of files.
pub(crate) fn verify_bundle(dir: &std::path::Path, manifest: &Manifest) -> anyhow::Result<usize> {
    for (file, want) in &manifest.files {
        let got = sha256_file(&dir.join(file))?;
        if &got != want {
            bail!("{file}: content hash {got} is not the manifest's {want}");
        }
    }
    // Nothing unlisted runs: every migration must be in the manifest.
    for file in bundle_files(dir, "migrations")? {
        if !manifest.files.contains_key(&file) {
            bail!("{file} is in the bundle but not in its manifest");
        }
    }
    Ok(manifest.files.len())
}

/// Every file under `root/sub`, as paths relative to `root` (sorted).
pub(crate) fn bundle_files(root: &std::path::Path, sub: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(sub)];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub async fn activate(a: Activate) -> anyhow::Result<()> {
    let root = a.root.clone();
    let dir = root.join("releases").join(&a.id);
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json"))
            .with_context(|| format!("no release {}", a.id))?,
    )
    .context("the release's manifest is not valid")?;
    let previous = current(&root);
    let mut run = Run::begin(
        &root,
        &a.id,
        "deploy",
        a.who.clone(),
        Some(&manifest),
        a.targets.clone(),
        a.bootstrap,
        previous.clone(),
    );
    let wants = |t: &str| a.targets.iter().any(|x| x == t || x == "all");
    let verified = run
        .step("verify bundle", async {
            let n = verify_bundle(&dir, &manifest)?;
            Ok(((), format!("{n} files")))
        })
        .await;
    if let Err(e) = verified {
        run.finish("failed", Some(format!("{e:#}")))?;
        bail!("deployment {} failed: {e:#}", a.id);
    }
    if a.bootstrap && previous.is_some() {
        let e = "--bootstrap is for a first install only; this host already has a current release";
        run.finish("failed", Some(e.into()))?;
        bail!("{e}");
    }
    if wants("migrations") {
        let bin = dir.join("bin/polydev");
        let mig = dir.join("migrations");
        let migrated = run
            .step("migrations", async {
                let mut cmd = tokio::process::Command::new(&bin);
                cmd.arg("migrate").args(config_args(&root));
                if mig.is_dir() {
                    cmd.arg("--migrations-dir").arg(&mig);
                }
                let out = cmd
                    .output()
                    .await
                    .context("cannot run the new version's migrate")?;
                if !out.status.success() {
                    let err = String::from_utf8_lossy(&out.stderr);
                    bail!("{}", err.lines().last().unwrap_or("migrate failed"));
                }
                Ok(((), String::from_utf8_lossy(&out.stdout).trim().to_owned()))
            })
            .await;
        if let Err(e) = migrated {
            run.finish("failed", Some(format!("{e:#}")))?;
            bail!(
                "deployment {} failed before the switch (nothing changed): {e:#}",
                a.id
            );
        }
    }
    if wants("agent") && !a.bootstrap {
        let agent_changed = previous
            .as_ref()
            .map(|p| {
                let old =
                    sha256_file(&root.join("releases").join(p).join("bin/polydev-agent")).ok();
                old.as_deref() != manifest.files.get("bin/polydev-agent").map(String::as_str)
            })
            .unwrap_or(true);
        if agent_changed {
            let bin = dir.join("bin/polydev");
            // Before the switch: a failed rebuild changes nothing (each
            // image is boot-validated before it is activated).
            let rebuilt = run
                .step("rebuild images (agent changed)", async {
                    let mut done = Vec::new();
                    for template in ["minimal", "base", "runtime", "browser"] {
                        let has = tokio::process::Command::new(&bin)
                            .args(["image", "list", template])
                            .args(config_args(&root))
                            .output()
                            .await?
                            .status
                            .success();
                        if !has {
                            continue;
                        }
                        let out = tokio::process::Command::new(&bin)
                            .args(["image", "build", template])
                            .args(config_args(&root))
                            .output()
                            .await?;
                        if !out.status.success() {
                            bail!(
                                "{template}: {}",
                                String::from_utf8_lossy(&out.stderr)
                                    .lines()
                                    .last()
                                    .unwrap_or("image build failed")
                            );
                        }
                        done.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
                    }
                    Ok(((), done.join("; ")))
                })
                .await;
            if let Err(e) = rebuilt {
                run.finish("failed", Some(format!("{e:#}")))?;
                bail!(
                    "deployment {} failed before the switch (nothing changed): {e:#}",
                    a.id
                );
            }
        }
    }
    run.step("switch current", async {
        switch(&root, &a.id)?;
        Ok((
            (),
            format!("{} -> {}", previous.as_deref().unwrap_or("none"), a.id),
        ))
    })
    .await?;
    if a.bootstrap {
        if let Some(listen) = &a.listen {
            std::fs::create_dir_all(root.join("shared"))?;
            std::fs::write(root.join("shared/listen"), listen)?;
        }
        let started = run
            .step("start supervisor", async {
                start_supervisor(&root).await?;
                Ok(((), "bootstrap: health gate skipped".to_owned()))
            })
            .await;
        return match started {
            Ok(()) => {
                run.finish("bootstrapped", None)?;
                Ok(())
            }
            Err(e) => {
                run.finish("failed", Some(format!("{e:#}")))?;
                bail!("bootstrap failed: {e:#}")
            }
        };
    }
    match handover(&mut run, &a.id, previous.as_deref(), a.health_timeout).await {
        Ok(()) => {
            prune(&root, a.keep, &a.id, previous.as_deref());
            run.finish("success", None)?;
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            run.finish("rolled_back", Some(msg.clone()))?;
            bail!(
                "deployment {} failed and was rolled back to {}: {msg}",
                a.id,
                previous.as_deref().unwrap_or("nothing")
            )
        }
    }
}

/// Starts `polydev supervise` detached (hosts without systemd; with it, the
/// unit in deploy/systemd runs the supervisor).
async fn start_supervisor(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let dir = root.join("current");
    let cfg = std::fs::read_to_string(root.join("shared/listen"))
        .unwrap_or_else(|_| "127.0.0.1:4000".into());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("supervisor.log"))?;
    let mut cmd = std::process::Command::new(dir.join("bin/polydev"));
    cmd.args(["supervise", "--root"])
        .arg(root)
        .args(["--listen", cfg.trim(), "--"])
        .args(config_args(root))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    cmd.spawn().context("cannot start the supervisor")?;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if supervise::control(root, "status", Duration::from_secs(1))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "the supervisor did not come up within 15 s (see {}/supervisor.log)",
        root.display()
    )
}

/// Keeps the newest `keep` releases (and always current and previous).
fn prune(root: &Path, keep: usize, current: &str, previous: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(root.join("releases")) else {
        return;
    };
    let mut ids: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let excess = ids.len().saturating_sub(keep.max(2));
    for id in ids.into_iter().take(excess) {
        if id != current && Some(id.as_str()) != previous {
            let _ = std::fs::remove_dir_all(root.join("releases").join(id));
        }
    }
}

pub fn records(root: &Path) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root.join("deployments")) {
        for e in rd.flatten() {
            if let Ok(r) = serde_json::from_slice::<Record>(&std::fs::read(e.path())?) {
                out.push(r);
            }
        }
    }
    out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Back to `to` (a deployment id, or a git sha prefix: the newest release
/// with it), or by default to the release that was current before this one.
pub async fn rollback(
    root: PathBuf,
    to: Option<String>,
    timeout: Duration,
    who: String,
) -> anyhow::Result<()> {
    let cur = current(&root).context("this host has no current release")?;
    let releases: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(root.join("releases"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let all = records(&root)?;
    let target = match to {
        Some(t) if releases.contains(&t) => t,
        // By sha: the newest release with it that once went live.
        Some(t) => releases
            .iter()
            .rev()
            .filter(|id| **id != cur)
            .filter(|id| {
                id.rsplit('-')
                    .next()
                    .is_some_and(|sha| sha.starts_with(&t) || t.starts_with(sha))
            })
            .find(|id| {
                all.iter().any(|r| {
                    &r.id == *id && ["success", "bootstrapped"].contains(&r.outcome.as_str())
                })
            })
            .cloned()
            .with_context(|| {
                format!(
                    "no release with id or sha {t:?} (have: {})",
                    releases.join(", ")
                )
            })?,
        None => all
            .iter()
            .rev()
            .find(|r| r.id == cur && r.kind == "deploy")
            .and_then(|r| r.previous.clone())
            .or_else(|| releases.iter().rev().find(|id| **id != cur).cloned())
            .context("no earlier release to roll back to")?,
    };
    if target == cur {
        bail!("{target} is already current");
    }
    if !root
        .join("releases")
        .join(&target)
        .join("bin/polydev")
        .is_file()
    {
        bail!("release {target} is not on this host any more");
    }
    let manifest: Option<Manifest> =
        std::fs::read(root.join("releases").join(&target).join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let mut run = Run::begin(
        &root,
        &target,
        "rollback",
        who,
        manifest.as_ref(),
        vec!["controller".into()],
        false,
        Some(cur.clone()),
    );
    run.log("rollback never runs down-migrations: the schema stays at its newest version");
    run.step("switch current", async {
        switch(&root, &target)?;
        Ok(((), format!("{cur} -> {target}")))
    })
    .await?;
    match handover(&mut run, &target, Some(&cur), timeout).await {
        Ok(()) => {
            run.finish("success", None)?;
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            run.finish("rolled_back", Some(msg.clone()))?;
            bail!("rollback to {target} failed; still on {cur}: {msg}")
        }
    }
}

pub fn list(root: &Path) -> anyhow::Result<()> {
    let out = json!({"current": current(root), "deployments": records(root)?});
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_or_unlisted_migration_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let mig = dir.path().join("migrations/sqlite");
        std::fs::create_dir_all(&mig).unwrap();
        std::fs::write(mig.join("0001_a.sql"), "CREATE TABLE a (x INT);").unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/polydev"), "binary").unwrap();
        let mut files = std::collections::BTreeMap::new();
        for f in ["bin/polydev".to_owned()]
            .into_iter()
            .chain(bundle_files(dir.path(), "migrations").unwrap())
        {
            files.insert(f.clone(), sha256_file(&dir.path().join(&f)).unwrap());
        }
        assert!(files.contains_key("migrations/sqlite/0001_a.sql"));
        let manifest = Manifest {
            id: "x".into(),
            version: "0".into(),
            git_sha: "0".into(),
            created_at: String::new(),
            files,
        };
        assert_eq!(verify_bundle(dir.path(), &manifest).unwrap(), 2);
        std::fs::write(mig.join("0001_a.sql"), "DROP TABLE users;").unwrap();
        let e = verify_bundle(dir.path(), &manifest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0001_a.sql"), "{e}");
        std::fs::write(mig.join("0001_a.sql"), "CREATE TABLE a (x INT);").unwrap();
        std::fs::write(mig.join("0002_b.sql"), "DROP TABLE users;").unwrap();
        let e = verify_bundle(dir.path(), &manifest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in its manifest"), "{e}");
    }
}
