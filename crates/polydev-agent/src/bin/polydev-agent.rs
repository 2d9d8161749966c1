//! `polydev-agent --listen-fd N | --socket PATH [--egress-relay IP:PORT
//! --egress-socket PATH]`: serves the agent protocol (inside a sandbox, on
//! the listening socket the launcher passed as descriptor N; or on PATH,
//! for tests) and prints `polydev-agent ready` on stdout once it listens.
//! `polydev-agent launch SPEC.json`: the host-side privileged steps that
//! start a sandbox (see `polydev_agent::launch`).

use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: polydev-agent (--listen-fd N | --socket PATH) [--egress-relay IP:PORT --egress-socket PATH] | polydev-agent launch SPEC.json";

enum Listen {
    Fd(i32),
    Socket(String),
}

struct Serve {
    listen: Listen,
    relay: Option<(std::net::SocketAddr, std::path::PathBuf)>,
}

fn parse(args: &[String]) -> Result<Serve, String> {
    let mut listen = None;
    let mut relay_addr = None;
    let mut relay_socket = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen-fd" => {
                let v = value()?;
                let fd =
                    v.parse::<i32>().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                        format!("--listen-fd needs a descriptor above 2, got {v:?}")
                    })?;
                listen = Some(Listen::Fd(fd));
            }
            "--socket" => listen = Some(Listen::Socket(value()?)),
            "--egress-relay" => {
                let v = value()?;
                relay_addr = Some(
                    v.parse::<std::net::SocketAddr>()
                        .map_err(|_| format!("--egress-relay needs IP:PORT, got {v:?}"))?,
                );
            }
            "--egress-socket" => relay_socket = Some(std::path::PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("--listen-fd or --socket is required")?;
    let relay = match (relay_addr, relay_socket) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => return Err("--egress-relay and --egress-socket go together".into()),
    };
    Ok(Serve { listen, relay })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, spec] = args.as_slice() {
        if cmd == "launch" {
            return launch(spec);
        }
    }
    match parse(&args) {
        Ok(s) => serve(s),
        Err(e) => {
            eprintln!("polydev-agent: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn launch(path: &str) -> ExitCode {
    let spec: polydev_agent::launch::LaunchSpec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("polydev-agent launch: cannot read {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let err = polydev_agent::launch::launch(&spec);
    eprintln!("polydev-agent launch: {err}");
    ExitCode::FAILURE
}

fn serve(s: Serve) -> ExitCode {
    if let Err(e) = polydev_agent::server::harden_process() {
        eprintln!("polydev-agent: cannot make itself non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polydev-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        if let Some((listen, to)) = s.relay {
            polydev_agent::server::relay_egress(listen, to).await?;
        }
        let agent = Arc::new(polydev_agent::Agent::default());
        match s.listen {
            Listen::Socket(path) => agent.serve(std::path::Path::new(&path)).await,
            Listen::Fd(fd) => {
                let std_listener = polydev_agent::server::inherited_listener(fd)?;
                let listener = tokio::net::UnixListener::from_std(std_listener)?;
                agent.serve_listener(listener).await
            }
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("polydev-agent: cannot serve: {e}");
            ExitCode::FAILURE
        }
    }
}
