//! polydev's telemetry: structured logs (human or JSON) with secret
//! redaction, Prometheus metrics, the host-health sampler with its history,
//! and alerts.
//!
//! Invariants: a field whose name looks like a secret (see [`is_sensitive`])
//! is printed as `[redacted]` in every format, on events and on spans; no
//! metric label carries a per-user or per-sandbox value.

pub mod alerts;
pub mod history;
pub mod host;
mod json;
pub mod metrics;
mod redact;
pub mod sample;
mod sampler;

pub use sampler::run_sampler;

use std::io;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Registry};

pub use redact::{is_sensitive, REDACTED};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected human or json"
            )),
        }
    }
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log filter {filter:?} is not valid: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Builds the subscriber polydev logs through, writing to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Result<Box<dyn Subscriber + Send + Sync>, LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LogError::BadFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
    let registry = Registry::default().with(filter);
    Ok(match format {
        LogFormat::Human => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .fmt_fields(redact::RedactingFields::<
                        tracing_subscriber::fmt::format::DefaultFields,
                    >::default()),
            ),
        ),
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .fmt_fields(json::JsonFields)
                    .event_format(json::JsonEvent),
            ),
        ),
    })
}

/// Installs the global logger writing to stderr.
pub fn init(format: LogFormat, filter: &str) -> Result<(), LogError> {
    let subscriber = subscriber(format, filter, io::stderr)?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| LogError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("buffer lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(format: LogFormat) -> String {
        let buf = Buffer::default();
        let sub = subscriber(format, "trace", buf.clone()).expect("subscriber");
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "request",
                request_id = "req-1",
                session_token = "CANARY-span-7f3a",
                later = tracing::field::Empty
            );
            let _guard = span.enter();
            span.record("later", "visible-later");
            tracing::info!(
                password = "CANARY-pw-19c2",
                api_token = %"CANARY-tok-88d1",
                client_secret = ?"CANARY-sec-4e0b",
                credential = 42,
                authorization = "Bearer CANARY-auth-0a1b",
                email = "ada@example.com",
                "signed in"
            );
        });
        let out = buf.0.lock().expect("buffer lock").clone();
        String::from_utf8(out).expect("utf8 logs")
    }

    #[test]
    fn secrets_never_print_in_either_format() {
        for format in [LogFormat::Human, LogFormat::Json] {
            let out = capture(format);
            assert!(
                !out.contains("CANARY"),
                "{format:?} leaked a canary:\n{out}"
            );
            assert!(out.contains(REDACTED), "{format:?}: {out}");
            assert!(out.contains("ada@example.com"), "{format:?}: {out}");
            assert!(out.contains("signed in"), "{format:?}: {out}");
            assert!(out.contains("req-1"), "{format:?} lost span fields: {out}");
            assert!(
                out.contains("visible-later"),
                "{format:?} lost recorded span fields: {out}"
            );
        }
    }

    #[test]
    fn json_lines_are_objects_with_span_fields() {
        let out = capture(LogFormat::Json);
        let line: serde_json::Value =
            serde_json::from_str(out.lines().next().expect("a line")).expect("json");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "signed in");
        assert_eq!(line["fields"]["password"], REDACTED);
        assert_eq!(line["spans"][0]["name"], "request");
        assert_eq!(line["spans"][0]["request_id"], "req-1");
        assert_eq!(line["spans"][0]["session_token"], REDACTED);
        assert!(line["timestamp"].as_str().is_some());
    }

    #[test]
    fn bad_filters_are_reported() {
        assert!(matches!(
            subscriber(LogFormat::Human, "info,[[", io::sink),
            Err(LogError::BadFilter { .. })
        ));
    }
}
