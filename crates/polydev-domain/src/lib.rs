//! polydev's nouns, parsed and validated at the edge.
//!
//! Invariant: this crate does no IO. Every type here is constructed through a
//! `parse` (or `new`) that rejects bad input with a typed [`ParseError`], so
//! the rest of the system only ever holds valid values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod state;
pub use state::{LoginState, ProviderState, RunState, SandboxStatus, UnknownState};

/// Why a value from outside could not become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{field} must be a UUID, got {value:?}")]
    InvalidUuid { field: &'static str, value: String },
    #[error("{0}")]
    InvalidEmail(&'static str),
    #[error("{0}")]
    InvalidPassword(&'static str),
    #[error("unknown role {0:?}: expected user or admin")]
    UnknownRole(String),
    #[error("unknown provider {0:?}: expected one of {valid}", valid = Provider::VALID)]
    UnknownProvider(String),
}

/// Longest value echoed back inside an error message.
const ECHO_LIMIT: usize = 64;

fn echo(value: &str) -> String {
    let mut out: String = value.chars().take(ECHO_LIMIT).collect();
    if value.chars().count() > ECHO_LIMIT {
        out.push('…');
    }
    out
}

/// A user's id (a UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses a user id that arrived in the field named `field`, so the
    /// error can say where the malformed value was.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, ParseError> {
        Uuid::parse_str(value.trim())
            .map(Self)
            .map_err(|_| ParseError::InvalidUuid {
                field,
                value: echo(value),
            })
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for UserId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for UserId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An email address, trimmed and lower-cased; validated for shape only
/// (one `@`, a non-empty local part, a dotted domain, no whitespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(value: &str) -> Result<Self, ParseError> {
        let value = value.trim().to_lowercase();
        if value.is_empty() {
            return Err(ParseError::InvalidEmail("email must not be empty"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(ParseError::InvalidEmail("email is longer than 254 bytes"));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ParseError::InvalidEmail(
                "email must not contain whitespace or control characters",
            ));
        }
        let Some((local, domain)) = value.split_once('@') else {
            return Err(ParseError::InvalidEmail("email must contain an @"));
        };
        if local.is_empty() || domain.contains('@') {
            return Err(ParseError::InvalidEmail(
                "email must have exactly one @ with a name before it",
            ));
        }
        let labels_ok = domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
        if !domain.contains('.') || !labels_ok {
            return Err(ParseError::InvalidEmail(
                "email domain must be a dotted host name such as example.com",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Rules a new password must meet. The password itself is never held here:
/// callers keep it in a secret type and only ask for validation.
#[derive(Debug, Clone, Copy)]
pub struct PasswordPolicy;

impl PasswordPolicy {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_BYTES: usize = 1024;

    pub fn check(password: &str) -> Result<(), ParseError> {
        if password.chars().count() < Self::MIN_CHARS {
            return Err(ParseError::InvalidPassword(
                "password must be at least 8 characters",
            ));
        }
        if password.len() > Self::MAX_BYTES {
            return Err(ParseError::InvalidPassword(
                "password must be at most 1024 bytes",
            ));
        }
        Ok(())
    }
}

/// What a user may do. Admins may also reach `/api/admin/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Role::Admin)
    }
}

impl FromStr for Role {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(ParseError::UnknownRole(echo(other))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An AI coding CLI polydev can run for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    ClaudeCode,
    Codex,
    GeminiCli,
    /// OpenCode, on an Anthropic, OpenAI or Google API key.
    #[serde(rename = "opencode")]
    OpenCode,
    /// GitHub Copilot CLI.
    Copilot,
}

impl Provider {
    pub const ALL: [Provider; 5] = [
        Provider::ClaudeCode,
        Provider::Codex,
        Provider::GeminiCli,
        Provider::OpenCode,
        Provider::Copilot,
    ];
    /// The accepted spellings, for error messages.
    pub const VALID: &'static str = "claude_code|codex|gemini_cli|opencode|copilot";

    pub fn as_str(&self) -> &'static str {
        match self {
            Provider::ClaudeCode => "claude_code",
            Provider::Codex => "codex",
            Provider::GeminiCli => "gemini_cli",
            Provider::OpenCode => "opencode",
            Provider::Copilot => "copilot",
        }
    }

    /// The CLI's name as people say it.
    pub fn display_name(&self) -> &'static str {
        match self {
            Provider::ClaudeCode => "Claude Code",
            Provider::Codex => "Codex",
            Provider::GeminiCli => "Gemini CLI",
            Provider::OpenCode => "OpenCode",
            Provider::Copilot => "Copilot CLI",
        }
    }
}

impl FromStr for Provider {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == value)
            .ok_or_else(|| ParseError::UnknownProvider(echo(value)))
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_names_the_field_and_echoes_a_bounded_value() {
        let err = UserId::parse("userId", "not-a-uuid").unwrap_err();
        assert_eq!(err.to_string(), "userId must be a UUID, got \"not-a-uuid\"");
        let long = "x".repeat(500);
        let msg = UserId::parse("id", &long).unwrap_err().to_string();
        assert!(msg.len() < 120, "{msg}");
        let id = UserId::new();
        assert_eq!(UserId::parse("id", &id.to_string()).unwrap(), id);
    }

    #[test]
    fn emails_are_normalised_and_validated() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "a b@example.com",
            "a@b@example.com",
            "ada@.example.com",
            "ada@example..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn password_policy_bounds() {
        assert!(PasswordPolicy::check("short").is_err());
        assert!(PasswordPolicy::check("long enough").is_ok());
        assert!(PasswordPolicy::check(&"p".repeat(1025)).is_err());
    }

    #[test]
    fn providers_round_trip_and_name_the_valid_ones() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>().unwrap(), p);
        }
        let msg = "chatgpt".parse::<Provider>().unwrap_err().to_string();
        assert!(msg.contains("claude_code|codex|gemini_cli"), "{msg}");
    }

    #[test]
    fn roles_parse() {
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }
}
