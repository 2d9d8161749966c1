//! `polydev deploy`, `polydev rollback`, `polydev deployments`: the client
//! side. Builds a release bundle (the binaries, a manifest of content
//! hashes, optionally migrations), ships it with the system `ssh` (key auth;
//! `tar` over the connection), and runs the host side (`release.rs`) from
//! the bundle's own copy of this tool.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::{DeployArgs, SshArgs};
use crate::release::{sha256_file, Manifest};

fn ssh(s: &SshArgs) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
    if let Some(port) = s.port {
        cmd.args(["-p", &port.to_string()]);
    }
    if let Some(key) = &s.identity {
        cmd.arg("-i").arg(key);
    }
    for o in &s.ssh_option {
        cmd.args(["-o", o]);
    }
    cmd.arg(&s.host);
    cmd
}

/// Quotes one word for the remote shell.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn remote(s: &SshArgs, line: &str) -> anyhow::Result<std::process::Output> {
    ssh(s)
        .arg(line)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ssh to {}", s.host))
}

fn who() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn short_sha() -> String {
    env!("POLYDEV_GIT_SHA").chars().take(7).collect()
}

/// `bin/polydev`, `bin/polydev-agent`, `.deploy/polydev`, `[migrations/]`,
/// `manifest.json`, in a fresh directory.
fn bundle(args: &DeployArgs, id: &str, dir: &Path) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find this polydev binary")?;
    let agent = me.with_file_name("polydev-agent");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::create_dir_all(dir.join(".deploy"))?;
    let controller = args.binary.clone().unwrap_or_else(|| me.clone());
    std::fs::copy(&controller, dir.join("bin/polydev"))
        .with_context(|| format!("cannot copy {}", controller.display()))?;
    std::fs::copy(&agent, dir.join("bin/polydev-agent"))
        .with_context(|| format!("cannot copy {} (build the workspace)", agent.display()))?;
    // The deploy tool itself (the host side runs from it); a hard link when
    // it is the controller binary too (tar keeps the link).
    if controller == me {
        std::fs::hard_link(dir.join("bin/polydev"), dir.join(".deploy/polydev"))?;
    } else {
        std::fs::copy(&me, dir.join(".deploy/polydev"))?;
    }
    if let Some(m) = &args.migrations_dir {
        let status = Command::new("cp")
            .arg("-a")
            .arg(m)
            .arg(dir.join("migrations"))
            .status()?;
        if !status.success() {
            bail!("cannot copy migrations from {}", m.display());
        }
    }
    let mut files = std::collections::BTreeMap::new();
    for f in ["bin/polydev", "bin/polydev-agent", ".deploy/polydev"] {
        files.insert(f.to_owned(), sha256_file(&dir.join(f))?);
    }
    let manifest = Manifest {
        id: id.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_sha: env!("POLYDEV_GIT_SHA").to_owned(),
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        files,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
}

pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let s = &args.ssh;
    let root = args.root.display().to_string();
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let step = |msg: &str| {
        bar.println(format!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64()));
        bar.set_message(msg.to_owned());
    };

    // A fresh id; if one with the same second exists on the host, wait.
    step("reserving a release directory");
    let mut id;
    loop {
        id = format!(
            "{}-{}",
            time::OffsetDateTime::now_utc()
                .format(time::macros::format_description!(
                    "[year][month][day]_[hour][minute][second]"
                ))
                .unwrap_or_default(),
            short_sha()
        );
        let line = format!(
            "mkdir -p {r}/releases && mkdir {r}/releases/{i}",
            r = q(&root),
            i = q(&id)
        );
        let out = remote(s, &line)?;
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("File exists") {
            bail!("cannot prepare {root} on {}: {}", s.host, err.trim());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    step(&format!("building bundle {id}"));
    let local = tempfile::tempdir()?;
    bundle(&args, &id, local.path())?;

    step("shipping bundle");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(local.path())
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let tar_out = tar.stdout.take().context("tar stdout")?;
    let shipped = ssh(s)
        .arg(format!("tar -C {}/releases/{} -xf -", q(&root), q(&id)))
        .stdin(Stdio::from(tar_out))
        .output()?;
    let _ = tar.wait();
    if !shipped.status.success() {
        bail!(
            "shipping the bundle failed: {}",
            String::from_utf8_lossy(&shipped.stderr).trim()
        );
    }

    step("activating on the host");
    let mut line = format!(
        "{r}/releases/{i}/.deploy/polydev release activate --root {r} --id {i} --targets {t} --health-timeout-secs {h} --keep {k} --who {w}",
        r = q(&root),
        i = q(&id),
        t = q(&args.target.join(",")),
        h = args.health_timeout_secs,
        k = args.keep,
        w = q(&who()),
    );
    if args.bootstrap {
        line.push_str(" --bootstrap");
    }
    if let Some(l) = &args.listen {
        line.push_str(&format!(" --listen {}", q(l)));
    }
    let out = remote(s, &line)?;
    bar.finish_and_clear();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("deployment {id} did not go live (see the record above)");
    }
    eprintln!("deployed {id} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub async fn rollback(
    s: &SshArgs,
    root: &Path,
    to: Option<String>,
    timeout: u64,
) -> anyhow::Result<()> {
    let root = root.display().to_string();
    let mut line = format!(
        "{r}/current/.deploy/polydev release rollback --root {r} --health-timeout-secs {timeout} --who {w}",
        r = q(&root),
        w = q(&who())
    );
    if let Some(t) = &to {
        line.push_str(&format!(" --to {}", q(t)));
    }
    let started = Instant::now();
    let out = remote(s, &line)?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("rollback failed");
    }
    eprintln!("rolled back in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub async fn deployments(s: &SshArgs, root: &Path, json_out: bool) -> anyhow::Result<()> {
    let root = root.display().to_string();
    let out = remote(
        s,
        &format!(
            "{r}/current/.deploy/polydev release list --root {r}",
            r = q(&root)
        ),
    )?;
    if !out.status.success() {
        bail!(
            "cannot read deployments on {}: {}",
            s.host,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the host's answer is not JSON")?;
    if json_out {
        println!("{v}");
        return Ok(());
    }
    println!("current: {}", v["current"].as_str().unwrap_or("none"));
    for r in v["deployments"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:<8} {:<12} {:>7} ms  {}{}",
            r["id"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["outcome"].as_str().unwrap_or(""),
            r["totalMs"],
            r["who"].as_str().unwrap_or(""),
            r["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
