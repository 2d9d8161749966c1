//! `polydev`: the one binary. Parses the command line, layers the config,
//! and hands off to the command. Errors end here as one line and exit 1.

mod cli;
mod config;
mod deploy;
mod mcp;
mod release;
mod sandbox_cli;
mod serve;
mod supervise;
mod user;
mod vault_cli;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, UserCommand};
use crate::config::{FileConfig, StoreConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = config::ServeConfig::resolve(&args)?;
            init_logging(&config.store, None)?;
            serve::run(config).await
        }
        Command::User(UserCommand::Add(args)) => {
            let file = FileConfig::load(args.store.config.as_deref())?;
            let store = StoreConfig::resolve(&args.store, &file)?;
            init_logging(&store, Some("warn"))?;
            user::add(&store, &args).await
        }
        Command::Login { server, email } => {
            polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn")?;
            vault_cli::login(&server, &email).await
        }
        Command::Vault(command) => {
            polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn")?;
            vault_cli::run(command).await
        }
        Command::Egress(args) => {
            let file = FileConfig::load(args.store.config.as_deref())?;
            let store = StoreConfig::resolve(&args.store, &file)?;
            init_logging(&store, None)?;
            let egress = config::egress_config(&args.egress, &file)?;
            let metrics_listen = args
                .metrics_listen
                .as_deref()
                .map(|a| {
                    a.parse()
                        .map_err(|_| anyhow::anyhow!("--metrics-listen {a:?} is not IP:PORT"))
                })
                .transpose()?;
            serve::egress_only(&store, egress, metrics_listen).await
        }
        Command::Image(cmd) => {
            use cli::ImageCommand as I;
            let (store_args, template) = match &cmd {
                I::Build {
                    store, template, ..
                }
                | I::List { store, template }
                | I::Activate {
                    store, template, ..
                }
                | I::Rollback { store, template } => (store, template.clone()),
                I::Status { store, .. } => (store, String::new()),
            };
            let file = FileConfig::load(store_args.config.as_deref())?;
            let store = StoreConfig::resolve(store_args, &file)?;
            init_logging(&store, None)?;
            match cmd {
                I::Build { mirror, .. } => {
                    sandbox_cli::build(&store.data_dir, &store.images_dir, &template, &mirror).await
                }
                I::Status { json, .. } => sandbox_cli::status(&store.images_dir, json),
                I::List { .. } => sandbox_cli::list(&store.images_dir, &template),
                I::Activate { hash, .. } => {
                    sandbox_cli::activate(&store.images_dir, &template, &hash)
                }
                I::Rollback { .. } => sandbox_cli::rollback(&store.images_dir, &template),
            }
        }
        Command::Deploy(args) => {
            polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn")?;
            deploy::deploy(args).await
        }
        Command::Rollback {
            ssh,
            root,
            to,
            health_timeout_secs,
        } => {
            polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn")?;
            deploy::rollback(&ssh, &root, to, health_timeout_secs).await
        }
        Command::Deployments { ssh, root, json } => deploy::deployments(&ssh, &root, json).await,
        Command::Supervise {
            root,
            listen,
            serve_args,
        } => {
            let listen = listen
                .parse()
                .map_err(|_| anyhow::anyhow!("--listen {listen:?} is not IP:PORT"))?;
            supervise::run(root, listen, serve_args).await
        }
        Command::Mcp {
            server,
            token,
            listen,
        } => {
            // stdout carries the protocol: logs go to stderr only.
            polydev_telemetry::init(polydev_telemetry::LogFormat::Human, "warn")?;
            match listen {
                Some(l) => {
                    let addr = l
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--listen {l:?} is not IP:PORT"))?;
                    mcp::serve_http(server, token, addr).await
                }
                None => mcp::serve_stdio(server, token).await,
            }
        }
        Command::Release(cmd) => {
            use cli::ReleaseCommand as R;
            match cmd {
                R::Activate {
                    root,
                    id,
                    targets,
                    bootstrap,
                    listen,
                    health_timeout_secs,
                    keep,
                    who,
                } => {
                    release::activate(release::Activate {
                        root,
                        id,
                        targets,
                        bootstrap,
                        health_timeout: std::time::Duration::from_secs(health_timeout_secs),
                        who,
                        keep,
                        listen,
                    })
                    .await
                }
                R::Rollback {
                    root,
                    to,
                    health_timeout_secs,
                    who,
                } => {
                    release::rollback(
                        root,
                        to,
                        std::time::Duration::from_secs(health_timeout_secs),
                        who,
                    )
                    .await
                }
                R::List { root } => release::list(&root),
            }
        }
        Command::Migrate(args) => {
            let file = FileConfig::load(args.store.config.as_deref())?;
            let store = StoreConfig::resolve(&args.store, &file)?;
            init_logging(&store, None)?;
            serve::migrate_only(&store, args.migrations_dir.as_deref()).await
        }
    }
}

/// Logs go to stderr, so stdout stays machine-readable for commands that
/// print JSON.
fn init_logging(store: &StoreConfig, quiet_default: Option<&str>) -> anyhow::Result<()> {
    let filter = match quiet_default {
        Some(q) if store.log_level == "info" => q,
        _ => store.log_level.as_str(),
    };
    polydev_telemetry::init(store.log_format, filter)?;
    Ok(())
}
