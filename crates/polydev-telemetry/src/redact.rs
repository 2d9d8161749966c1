use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// What a secret field prints as.
pub const REDACTED: &str = "[redacted]";

/// Field names (any case, any part of the name) whose values are secrets.
const SENSITIVE: [&str; 8] = [
    "password",
    "passwd",
    "token",
    "secret",
    "credential",
    "authorization",
    "cookie",
    "api_key",
];

/// True when a field named `name` must never be printed.
pub fn is_sensitive(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE.iter().any(|s| lower.contains(s)) || lower == "ticket"
}

/// Wraps a field formatter so secret fields print as [`REDACTED`].
#[derive(Debug, Default)]
pub(crate) struct RedactingFields<M = DefaultFields>(M);

impl<'a, M> MakeVisitor<Writer<'a>> for RedactingFields<M>
where
    M: MakeVisitor<Writer<'a>>,
{
    type Visitor = Redacting<M::Visitor>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        Redacting(self.0.make_visitor(target))
    }
}

/// A visitor that hides secret values before its inner visitor sees them.
#[derive(Debug)]
pub(crate) struct Redacting<V>(pub(crate) V);

struct Hidden;

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

macro_rules! forward {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(&mut self, field: &Field, value: $ty) {
            if is_sensitive(field.name()) {
                self.0.record_debug(field, &Hidden);
            } else {
                self.0.$method(field, value);
            }
        })*
    };
}

impl<V: Visit> Visit for Redacting<V> {
    forward!(
        record_f64: f64,
        record_i64: i64,
        record_u64: u64,
        record_i128: i128,
        record_u128: u128,
        record_bool: bool,
        record_str: &str,
        record_bytes: &[u8],
        record_error: &(dyn std::error::Error + 'static),
        record_debug: &dyn fmt::Debug,
    );
}

impl<V: VisitOutput<fmt::Result>> VisitOutput<fmt::Result> for Redacting<V> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for Redacting<V> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

#[cfg(test)]
mod tests {
    use super::is_sensitive;

    #[test]
    fn names_like_secrets_are_sensitive() {
        for name in [
            "password",
            "new_password",
            "api_token",
            "Authorization",
            "client_secret",
            "credentials",
            "set_cookie",
            "ticket",
        ] {
            assert!(is_sensitive(name), "{name}");
        }
        for name in ["email", "user_id", "request_id", "status", "message"] {
            assert!(!is_sensitive(name), "{name}");
        }
    }
}
