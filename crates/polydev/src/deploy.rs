//! `polydev deploy`, `polydev rollback`, `polydev deployments`: the client
//! side. Builds a release bundle (the binaries, a manifest of content
//! hashes, optionally migrations), ships it with the system `ssh` (key auth;
//! `tar` over the connection), and runs the host side (`release.rs`) from
//! the bundle's own copy of this tool.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::{DeployArgs, SshArgs, Strategy};
use crate::release::{sha256_file, Manifest};

/// The same connection settings for one host.
fn on(s: &SshArgs, host: &str) -> SshArgs {
    SshArgs {
        hosts: vec![host.to_owned()],
        ..s.clone()
    }
}

fn host(s: &SshArgs) -> &str {
    s.hosts.first().map(String::as_str).unwrap_or("")
}

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
    // `--`: the host is never read as an option (checked too, in `check_host`).
    cmd.arg("--").arg(host(s));
    cmd
}

/// A host as ssh should take it: `[user@]name`, no option, no spaces.
pub(crate) fn check_host(host: &str) -> anyhow::Result<()> {
    let plain = !host.is_empty()
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@.-_:[]".contains(&b));
    if !plain {
        bail!("--host {host:?} is not a host name ([user@]host, without spaces or a leading '-')");
    }
    Ok(())
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
        .with_context(|| format!("cannot run ssh to {}", host(s)))
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
    let agent = args
        .agent
        .clone()
        .unwrap_or_else(|| me.with_file_name("polydev-agent"));
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
    // Migrations too: the host refuses a bundle whose SQL differs.
    for f in crate::release::bundle_files(dir, "migrations")? {
        files.insert(f.clone(), sha256_file(&dir.join(&f))?);
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

fn new_id() -> String {
    format!(
        "{}-{}",
        time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]_[hour][minute][second]"
            ))
            .unwrap_or_default(),
        short_sha()
    )
}

/// Creates `releases/<id>` on one host; false when it exists already.
fn reserve(s: &SshArgs, root: &str, id: &str) -> anyhow::Result<bool> {
    let line = format!(
        "mkdir -p {r}/releases && mkdir {r}/releases/{i}",
        r = q(root),
        i = q(id)
    );
    let out = remote(s, &line)?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File exists") {
        return Ok(false);
    }
    bail!("cannot prepare {root} on {}: {}", host(s), err.trim())
}

/// Streams the bundle into `releases/<id>` on one host.
fn ship(s: &SshArgs, root: &str, id: &str, bundle: &Path) -> anyhow::Result<()> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(bundle)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let tar_out = tar.stdout.take().context("tar stdout")?;
    let shipped = ssh(s)
        .arg(format!("tar -C {}/releases/{} -xf -", q(root), q(id)))
        .stdin(Stdio::from(tar_out))
        .output()?;
    let _ = tar.wait();
    if !shipped.status.success() {
        bail!(
            "shipping the bundle to {} failed: {}",
            host(s),
            String::from_utf8_lossy(&shipped.stderr).trim()
        );
    }
    Ok(())
}

/// Runs the host side; true when the new release went live.
fn activate(s: &SshArgs, args: &DeployArgs, root: &str, id: &str) -> anyhow::Result<bool> {
    let mut line = format!(
        "{r}/releases/{i}/.deploy/polydev release activate --root {r} --id {i} --targets {t} --health-timeout-secs {h} --keep {k} --who {w}",
        r = q(root),
        i = q(id),
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
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(out.status.success())
}

fn check_hosts(s: &SshArgs) -> anyhow::Result<()> {
    s.hosts.iter().try_for_each(|h| check_host(h))
}

pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    check_hosts(&args.ssh)?;
    let root = args.root.display().to_string();
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let step = |msg: &str| {
        bar.println(format!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64()));
        bar.set_message(msg.to_owned());
    };
    let hosts: Vec<SshArgs> = args.ssh.hosts.iter().map(|h| on(&args.ssh, h)).collect();

    // One id for every host; a second deploy in the same second waits.
    step("reserving a release directory");
    let mut id = new_id();
    'reserve: loop {
        for (n, h) in hosts.iter().enumerate() {
            if !reserve(h, &root, &id)? {
                if n > 0 {
                    bail!("{} already has release {id}", host(h));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                id = new_id();
                continue 'reserve;
            }
        }
        break;
    }

    step(&format!("building bundle {id}"));
    let local = tempfile::tempdir()?;
    bundle(&args, &id, local.path())?;

    let mut live: Vec<&SshArgs> = Vec::new();
    match args.strategy {
        Strategy::Rolling => {
            for h in &hosts {
                step(&format!("{}: shipping", host(h)));
                ship(h, &root, &id, local.path())?;
                step(&format!("{}: activating", host(h)));
                if !activate(h, &args, &root, &id)? {
                    bar.finish_and_clear();
                    bail!(
                        "deployment {id} did not go live on {} (it rolled itself back); {} host(s) before it run {id}, the rest are untouched",
                        host(h),
                        live.len()
                    );
                }
                live.push(h);
            }
        }
        Strategy::BlueGreen => {
            for h in &hosts {
                step(&format!("{}: shipping", host(h)));
                ship(h, &root, &id, local.path())?;
            }
            for h in &hosts {
                step(&format!("{}: activating", host(h)));
                if !activate(h, &args, &root, &id)? {
                    for done in &live {
                        step(&format!("{}: switching back", host(done)));
                        let back = remote(
                            done,
                            &format!(
                                "{r}/current/.deploy/polydev release rollback --root {r} --health-timeout-secs {t} --who {w}",
                                r = q(&root),
                                t = args.health_timeout_secs,
                                w = q(&who())
                            ),
                        )?;
                        if !back.status.success() {
                            eprint!("{}", String::from_utf8_lossy(&back.stderr));
                        }
                    }
                    bar.finish_and_clear();
                    bail!("deployment {id} did not go live on {}; every host is back on its previous release", host(h));
                }
                live.push(h);
            }
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "deployed {id} to {} host(s) in {:.1}s",
        live.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn rollback(
    all: &SshArgs,
    root: &Path,
    to: Option<String>,
    timeout: u64,
) -> anyhow::Result<()> {
    check_hosts(all)?;
    for h in &all.hosts {
        rollback_one(&on(all, h), root, to.clone(), timeout)?;
    }
    Ok(())
}

fn rollback_one(s: &SshArgs, root: &Path, to: Option<String>, timeout: u64) -> anyhow::Result<()> {
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

pub async fn deployments(all: &SshArgs, root: &Path, json_out: bool) -> anyhow::Result<()> {
    check_hosts(all)?;
    for h in &all.hosts {
        if all.hosts.len() > 1 && !json_out {
            println!("== {h}");
        }
        deployments_one(&on(all, h), root, json_out)?;
    }
    Ok(())
}

fn deployments_one(s: &SshArgs, root: &Path, json_out: bool) -> anyhow::Result<()> {
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
            host(s),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_that_would_be_an_ssh_option_is_refused() {
        for bad in [
            "-oProxyCommand=touch /tmp/x",
            "-p22",
            "host name",
            "a;b",
            "",
            "h\n",
        ] {
            assert!(check_host(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["deploy@10.0.0.5", "web-1.example.com", "[::1]", "host_2"] {
            assert!(check_host(good).is_ok(), "{good:?} refused");
        }
        let args = SshArgs {
            hosts: vec!["h".into()],
            port: None,
            identity: None,
            ssh_option: vec![],
        };
        let cmd = ssh(&args);
        let argv: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dd = argv.iter().position(|a| a == "--").expect("--");
        assert_eq!(argv[dd + 1], "h");
    }
}
