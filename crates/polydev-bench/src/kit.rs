//! What every area shares: the polydev server a bench starts, percentiles,
//! the report, and the http and vault areas.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::BenchArgs;

/// The `p` quantile (0..=1) of `v` (nearest rank); NaN for no samples
/// (reported as `null`: no figure, not a zero one).
pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Prints a benchmark's figures: one flat JSON object with `--json`, else
/// one aligned line each.
pub(crate) fn report(json: bool, figures: Map<String, Value>) {
    if json {
        println!("{}", Value::Object(figures));
    } else {
        for (k, v) in &figures {
            println!("{k:>36}  {v}");
        }
    }
}

/// The three stub providers (Anthropic, OpenAI, Gemini, in that order),
/// each answering its text.
pub(crate) async fn start_stubs(
    answers: [&str; 3],
) -> anyhow::Result<Vec<polydev_stubs::StubServer>> {
    let kinds = [
        polydev_stubs::Provider::Anthropic,
        polydev_stubs::Provider::OpenAi,
        polydev_stubs::Provider::Gemini,
    ];
    let mut stubs = Vec::new();
    for (kind, answer) in kinds.into_iter().zip(answers) {
        stubs.push(polydev_stubs::start(kind, answer, None).await?);
    }
    Ok(stubs)
}

/// The `[egress.hosts]` lines naming the stubs (for the egress section).
pub(crate) const STUB_HOSTS: &str = "[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n";

/// The `[runs]` base-URL lines pointing the CLIs at `start_stubs`' stubs.
pub(crate) fn stub_bases(stubs: &[polydev_stubs::StubServer]) -> String {
    format!(
        "anthropic_base_url = \"http://anthropic.stub.test:{}\"\nopenai_base_url = \"http://openai.stub.test:{}/v1\"\ngemini_base_url = \"http://gemini.stub.test:{}\"\n",
        stubs[0].addr.port(),
        stubs[1].addr.port(),
        stubs[2].addr.port()
    )
}

/// A `polydev serve` started for the benchmark; stopped on drop.
pub(crate) struct Server {
    serve: polydev_testkit::Serve,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub(crate) fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let exe = crate::polydev_exe()?;
        let dir = tempfile::tempdir()?;
        let mut cmd = polydev_testkit::Serve::command(&exe);
        cmd.args([
            "--log-level",
            "info",
            // Benchmarks name their templates; no image builds beside them.
            "--sandbox-prepare",
            "none",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(extra);
        let serve = polydev_testkit::Serve::start_discarding_logs(cmd)?;
        Ok(Self {
            addr: serve.addr.clone(),
            serve,
            _dir: dir,
        })
    }

    /// The server's data directory.
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub(crate) fn admin_token(&self) -> anyhow::Result<String> {
        self.user_token("bench@example.com", true)
    }

    pub(crate) fn user_token(&self, email: &str, admin: bool) -> anyhow::Result<String> {
        let v = polydev_testkit::user_add(
            crate::polydev_exe()?,
            &[
                std::ffi::OsStr::new("--data-dir"),
                self._dir.path().as_os_str(),
            ],
            email,
            admin,
            None,
        )?;
        Ok(v["token"].as_str().unwrap_or_default().to_owned())
    }

    /// A user with a vault (enrolled from a password); returns (id, token).
    pub(crate) fn vault_user(&self, email: &str) -> anyhow::Result<(String, String)> {
        let v = polydev_testkit::user_add(
            crate::polydev_exe()?,
            &[
                std::ffi::OsStr::new("--data-dir"),
                self._dir.path().as_os_str(),
            ],
            email,
            false,
            Some("correct horse battery"),
        )?;
        Ok((
            v["id"].as_str().unwrap_or_default().to_owned(),
            v["token"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Graceful: the controller destroys its sandboxes and removes its
        // cgroups on the way out.
        self.serve.stop(Duration::from_secs(10));
    }
}

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `wrk --latency` against `url`; parses requests/s and the p50/p99 lines.
fn wrk(args: &BenchArgs, url: &str, header: Option<&str>) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        &args.threads.to_string(),
        "-c",
        &args.connections.to_string(),
        "-d",
        &format!("{}s", args.duration_secs),
        "--latency",
    ]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("cannot run wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk against {url} failed or saw errors:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("wrk printed no Requests/sec")?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        let value = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(str::trim)
            .with_context(|| format!("wrk printed no {p} latency"))?;
        parse_wrk_duration(value)
    };
    Ok(WrkResult {
        rps,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
    })
}

fn parse_wrk_duration(v: &str) -> anyhow::Result<f64> {
    let (num, unit) = v
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| v.split_at(i))
        .context("no unit")?;
    let n: f64 = num.parse()?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        other => bail!("unknown wrk unit {other:?}"),
    })
}

pub(crate) async fn http(args: &BenchArgs) -> anyhow::Result<()> {
    let mut figures = Map::new();
    let mut put = |k: &str, v: f64| {
        figures.insert(k.to_owned(), json!((v * 1000.0).round() / 1000.0));
    };
    let with = Server::start(&[])?;
    let without = Server::start(&["--http-metrics", "false"])?;
    let token = with.admin_token()?;
    let auth = format!("Authorization: Bearer {token}");
    // Let the host sampler take its first readings.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let base = |s: &Server, p: &str| format!("http://{}{p}", s.addr);
    let health = wrk(args, &base(&with, "/api/auth/health"), None)?;
    put("health_rps", health.rps);
    put("health_p50_ms", health.p50_ms);
    put("health_p99_ms", health.p99_ms);
    let metrics = wrk(args, &base(&with, "/metrics"), None)?;
    put("metrics_rps", metrics.rps);
    put("metrics_p99_ms", metrics.p99_ms);
    let system = wrk(args, &base(&with, "/api/admin/health/system"), Some(&auth))?;
    put("system_rps", system.rps);
    put("system_p99_ms", system.p99_ms);

    // Middleware cost: the same cheap route with and without metrics,
    // alternated twice; best of each.
    let mut on = Vec::new();
    let mut off = Vec::new();
    for _ in 0..2 {
        off.push(wrk(args, &base(&without, "/api/auth/health"), None)?);
        on.push(wrk(args, &base(&with, "/api/auth/health"), None)?);
    }
    let best = |v: &[WrkResult]| v.iter().map(|r| r.rps).fold(0.0, f64::max);
    let (on_rps, off_rps) = (best(&on), best(&off));
    put("health_rps_metrics_on", on_rps);
    put("health_rps_metrics_off", off_rps);
    put("middleware_cost_us", 1e6 / on_rps - 1e6 / off_rps);

    // The observe call alone, in process.
    let mut registry = polydev_telemetry::metrics::MetricsRegistry::default();
    let http = polydev_api::HttpMetrics::register(&mut registry);
    let method = axum::http::Method::GET;
    let n = 1_000_000u32;
    let started = Instant::now();
    for i in 0..n {
        http.observe(
            &method,
            "/api/users/{id}",
            if i % 10 == 0 { 404 } else { 200 },
            Duration::from_micros(250),
        );
    }
    put(
        "observe_ns",
        started.elapsed().as_nanos() as f64 / f64::from(n),
    );

    if args.json {
        println!("{}", Value::Object(figures));
    } else {
        println!(
            "wrk -t{} -c{} -d{}s --latency, controller release build, both on this machine",
            args.threads, args.connections, args.duration_secs
        );
        for (k, v) in &figures {
            println!("{k:>24}  {v}");
        }
    }
    Ok(())
}

pub(crate) fn vault(args: &BenchArgs) -> anyhow::Result<()> {
    use polydev_vault::{ItemContext, KdfParams, KdfSpec, SealingKeyPair, VaultKey};
    let mut figures = Map::new();
    let mut put = |k: &str, v: f64| {
        figures.insert(k.to_owned(), json!((v * 1000.0).round() / 1000.0));
    };
    let password = secrecy::SecretString::from("bench password".to_owned());
    let spec = KdfSpec {
        params: KdfParams::default(),
        salt: [1; 16],
    };
    let started = Instant::now();
    let master = spec.derive(&password)?;
    put(
        "kdf_pbkdf2_600k_ms",
        started.elapsed().as_secs_f64() * 1000.0,
    );
    let argon = KdfSpec {
        params: KdfParams::Argon2id {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        },
        salt: [1; 16],
    };
    let started = Instant::now();
    argon.derive(&password)?;
    put(
        "kdf_argon2id_19mib_t2_ms",
        started.elapsed().as_secs_f64() * 1000.0,
    );

    let key = VaultKey::generate();
    let ctx = ItemContext::new("bench-user", "bench-item", 1);
    let data = vec![0x5au8; 16 << 20];
    let started = Instant::now();
    let sealed = key.seal_item(&ctx, &data);
    put(
        "item_seal_mb_s",
        data.len() as f64 / 1e6 / started.elapsed().as_secs_f64(),
    );
    let started = Instant::now();
    key.open_item(&ctx, &sealed)?;
    put(
        "item_open_mb_s",
        data.len() as f64 / 1e6 / started.elapsed().as_secs_f64(),
    );
    let pair = SealingKeyPair::generate();
    let credential = vec![7u8; 4096];
    let n = 200;
    let started = Instant::now();
    let boxes: Vec<Vec<u8>> = (0..n)
        .map(|_| pair.public().seal("bench", b"", &credential))
        .collect();
    put(
        "hpke_seal_4kib_us",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(n),
    );
    let started = Instant::now();
    for b in &boxes {
        pair.open("bench", b"", b)?;
    }
    put(
        "hpke_open_4kib_us",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(n),
    );

    // The same in Chromium, through the browser module.
    let (wrapping, _) = master.split();
    let user = "bench-user";
    let sandbox = SealingKeyPair::derive(&[9; 32]);
    let request = json!({
        "bench": true,
        "password": "bench password",
        "salt": hex::encode([1u8; 16]),
        "userId": user,
        "rust": {
            "wrappedVaultKey": hex::encode(key.wrap(&wrapping, user)),
            "ctx": {"userId": user, "itemId": "i", "version": 1},
            "item": hex::encode(key.seal_item(&ItemContext::new(user, "i", 1), b"x")),
            "sealingIkm": hex::encode([9u8; 32]),
            "purpose": "bench",
            "aad": "",
            "sealed": hex::encode(sandbox.public().seal("bench", b"", b"x")),
            "userPublicKey": hex::encode(pair.public().to_bytes()),
        },
        "browserCtx": {"userId": user, "itemId": "j", "version": 1},
        "browserPlaintext": "x",
    });
    let root = std::env::current_dir()?;
    let script = root.join("web/tests/vault-interop.mjs");
    if !script.exists() {
        bail!("run the vault bench from the repository root (needs web/tests/vault-interop.mjs and scripts/build-web.sh done)");
    }
    let mut child = Command::new("node")
        .arg(&script)
        .env("POLYDEV_BIN", crate::polydev_exe()?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run node")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(request.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the Chromium side failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    for (k, name) in [
        ("kdf_ms", "chromium_kdf_pbkdf2_600k_ms"),
        ("seal_mb_s", "chromium_item_seal_mb_s"),
        ("open_mb_s", "chromium_item_open_mb_s"),
    ] {
        put(name, answer["bench"][k].as_f64().unwrap_or(f64::NAN));
    }
    if args.json {
        println!("{}", Value::Object(figures));
    } else {
        println!("vault crypto: KDF at the defaults, 16 MiB items, 4 KiB sealed boxes; Rust release build and headless Chromium");
        for (k, v) in &figures {
            println!("{k:>30}  {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_wrk_duration, percentile};

    #[test]
    fn wrk_durations_parse_to_milliseconds() {
        assert_eq!(parse_wrk_duration("250.00us").unwrap(), 0.25);
        assert_eq!(parse_wrk_duration("1.50ms").unwrap(), 1.5);
        assert_eq!(parse_wrk_duration("2.00s").unwrap(), 2000.0);
        assert!(parse_wrk_duration("12").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank_and_absent_without_samples() {
        assert!(percentile(Vec::new(), 0.5).is_nan());
        assert_eq!(
            serde_json::json!(percentile(Vec::new(), 0.5)),
            serde_json::Value::Null
        );
        let v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(v.clone(), 0.0), 1.0);
        assert_eq!(percentile(v.clone(), 0.5), 3.0);
        assert_eq!(percentile(v.clone(), 0.99), 5.0);
        assert_eq!(percentile(vec![7.0], 0.99), 7.0);
    }
}
