//! `polydev-bench <area>`: figures for docs/PERFORMANCE.md, measured against
//! the real `polydev` binary (started as a process, as users run it), side by
//! side with the reference tool where there is one. `--json` prints one flat
//! JSON object so runs compare. Lives outside the product: `polydev` does not
//! depend on this crate or on the stand-ins it uses.

mod deploy;
mod egress;
mod kit;
mod load;
mod runs;
mod sandboxes;
mod stream;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchArea {
    /// wrk on /api/auth/health, /metrics, /api/admin/health/system, and the
    /// cost of the HTTP metrics middleware.
    Http,
    /// The egress proxy side by side with tinyproxy: CONNECT throughput,
    /// tunnel setup rate, latency over 1000 tunnels, memory per idle tunnel.
    Egress,
    /// Vault crypto: KDF time at the default parameters, item and sealing
    /// throughput, in Rust and (through web/tests/vault-interop.mjs) in Chromium.
    Vault,
    /// Sandboxes on the local driver: cold create, concurrent creates, warm
    /// hand-out, exec round trip, idle density and memory.
    Sandboxes,
    /// Deploys to a throw-away sshd on loopback under request load: time per
    /// step, rollback time, failed requests.
    Deploy,
    /// Runs against loopback stub providers: request → first delta through
    /// polydev vs the same CLI run directly; 20 concurrent 3-provider runs.
    Runs,
    /// The login viewer's WebSocket bridge vs websockify (throughput, round
    /// trips) and login start → first framebuffer update.
    Stream,
    /// A load test for `--duration-secs`: API clients, runs in flight
    /// against the stubs, login sessions; requests/s and p50/p99 per route,
    /// answers by status; fails on a 5xx, an overload answer without
    /// Retry-After, a timeout or a leak.
    Load,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "polydev-bench",
    version,
    about = "polydev's benchmarks: figures for docs/PERFORMANCE.md, measured against the real polydev binary"
)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub area: BenchArea,
    /// Print one flat JSON object of figures.
    #[arg(long)]
    pub json: bool,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// egress, stream: bytes for the throughput transfer.
    #[arg(long, default_value_t = 1 << 30)]
    pub transfer_bytes: u64,
    /// runs: only the workspace figures (a 50 MiB workspace in three
    /// sandboxes), not the per-CLI and concurrent runs.
    #[arg(long)]
    pub workspace_only: bool,
    /// sandboxes: idle sandboxes to hold for the density figure.
    #[arg(long, default_value_t = 2000)]
    pub idle_target: usize,
    /// stream: serve only the bridge in front of this TCP address and print
    /// its address (the bench runs its bridge in a process of its own, as
    /// websockify runs in its own).
    #[arg(long, hide = true)]
    pub bridge_to: Option<std::net::SocketAddr>,
    /// The polydev binary measured (default: `polydev` beside this one).
    #[arg(long, env = "POLYDEV_BIN")]
    pub polydev: Option<PathBuf>,
    /// egress: tunnels held open for the latency and memory figures.
    #[arg(long, default_value_t = 1000)]
    pub tunnels: usize,
    /// load: simulated API clients.
    #[arg(long, default_value_t = 200)]
    pub load_clients: usize,
    /// load: runs kept in flight (one user each).
    #[arg(long, default_value_t = 50)]
    pub load_runs: usize,
    /// load: login sessions kept going.
    #[arg(long, default_value_t = 10)]
    pub load_logins: usize,
}

/// The polydev binary the benches start: `--polydev`, else `polydev` beside
/// this binary (both land in the same `target/<profile>`).
pub(crate) fn polydev_exe() -> anyhow::Result<PathBuf> {
    let given = ARGS.get().and_then(|a| a.polydev.clone());
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("polydev"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no polydev binary at {} (build it: cargo build --release -p polydev -p polydev-agent, or pass --polydev)",
        path.display()
    );
    Ok(path)
}

static ARGS: std::sync::OnceLock<BenchArgs> = std::sync::OnceLock::new();

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.area {
        BenchArea::Http => kit::http(&args).await,
        BenchArea::Egress => egress::run(&args).await,
        BenchArea::Vault => kit::vault(&args),
        BenchArea::Sandboxes => sandboxes::run(&args).await,
        BenchArea::Deploy => deploy::run(&args).await,
        BenchArea::Runs => runs::run(&args).await,
        BenchArea::Load => load::run(&args).await,
        BenchArea::Stream => match args.bridge_to {
            Some(echo) => stream::serve_bridge(echo).await,
            None => stream::run(&args).await,
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let _ = ARGS.set(args.clone());
    if let Err(e) = polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn") {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Ctrl-C or SIGTERM ends the area's future, so its guards drop: the
    // servers, proxies and bridge processes it started stop with it.
    let stopped = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let outcome = tokio::select! {
        r = run(args) => r,
        () = stopped => Err(anyhow::anyhow!("interrupted; what it started is stopped")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
