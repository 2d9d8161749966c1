//! What each provider's CLI is, in one place: how it runs headless (its
//! command line, how it is handed a key or its own login file, the
//! variables that point it at its provider's API), its stream format and
//! how that reads in general terms, where it keeps its login, and how it
//! signs in. Runs and login sessions take everything CLI-specific from
//! here; a new CLI is a new arm in each function below (and an entry in
//! `Provider`).

use std::collections::BTreeMap;
use std::time::Duration;

use polydev_domain::Provider;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a run's unsealed credential lands for the CLI's wrapper (deleted
/// once read or moved).
pub const CREDENTIAL_FILE: &str = "/home/sandbox/.polydev/credential";
/// Claude Code's `apiKeyHelper`: prints the unsealed key once and deletes
/// it, so the key is never in an environment the CLI's tools inherit.
const KEY_HELPER: &str = "/home/sandbox/.polydev/key-helper";

/// The longest message a retry notice or failure carries.
const MAX_MESSAGE: usize = 1000;

/// Where each CLI keeps its login credential in a sandbox (the same file a
/// login session captures).
pub fn credential_file(provider: Provider) -> &'static str {
    match provider {
        Provider::ClaudeCode => "/home/sandbox/.claude/.credentials.json",
        Provider::Codex => "/home/sandbox/.codex/auth.json",
        Provider::GeminiCli => "/home/sandbox/.gemini/oauth_creds.json",
    }
}

/// How a run hands one CLI its credential, and where its provider is.
#[derive(Debug, Clone, Copy)]
pub struct RunSetup<'a> {
    /// The CLI's own login file (a login session's capture), not an API key.
    pub login: bool,
    /// The provider's API base, when not the vendor's own.
    pub base_url: Option<&'a str>,
    /// The run's deadline (Claude Code's key helper outlives it).
    pub deadline: Duration,
}

/// The shell line that runs `provider`'s CLI headless, and its
/// environment. An API key is read from the unsealed file into the
/// CLI's variable (the file is deleted); a CLI login file is moved to
/// where the CLI reads it.
pub fn run_command(provider: Provider, how: &RunSetup) -> (String, Vec<(String, String)>) {
    let login = how.login;
    let setup = |key_vars: &str| {
        if login {
            let file = credential_file(provider);
            format!("mkdir -p \"$(dirname {file})\" && mv -f {CREDENTIAL_FILE} {file} && chmod 600 {file}")
        } else {
            format!("KEY=\"$(cat {CREDENTIAL_FILE})\"; rm -f {CREDENTIAL_FILE}; export {key_vars}")
        }
    };
    let mut env = Vec::new();
    let line = match provider {
        Provider::ClaudeCode => {
            env.push((
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ));
            if let Some(u) = how.base_url {
                env.push(("ANTHROPIC_BASE_URL".into(), u.to_owned()));
            }
            let run = "exec claude -p \"$POLYDEV_PROMPT\" --output-format stream-json --verbose";
            if login {
                format!("{} && {run}", setup(""))
            } else {
                // The key reaches Claude Code through its apiKeyHelper,
                // read once (then deleted), never through an
                // environment its tools would inherit.
                env.push((
                    "CLAUDE_CODE_API_KEY_HELPER_TTL_MS".into(),
                    (how.deadline.as_millis() as u64 + 600_000).to_string(),
                ));
                format!(
                    "printf '#!/bin/sh\\ncat {CREDENTIAL_FILE} && rm -f {CREDENTIAL_FILE}\\n' > {KEY_HELPER} && chmod 700 {KEY_HELPER} && {run} --settings '{{\"apiKeyHelper\":\"{KEY_HELPER}\"}}'"
                )
            }
        }
        Provider::Codex => {
            env.push(("CODEX_HOME".into(), "/home/sandbox/.codex".into()));
            // A custom API base takes the key from the environment.
            let provider_cfg = match (how.base_url, login) {
                (Some(u), false) => format!(
                    " -c model_provider=polydev -c 'model_providers.polydev={{name=\"polydev\",base_url=\"{u}\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}'"
                ),
                _ => String::new(),
            };
            let setup = setup("OPENAI_API_KEY=\"$KEY\" CODEX_API_KEY=\"$KEY\"");
            // The commands Codex runs do not inherit variables named
            // like *KEY*, *SECRET*, *TOKEN* (its default excludes, off
            // unless asked for).
            format!("{setup} && mkdir -p \"$CODEX_HOME\" && exec codex exec --skip-git-repo-check --json -c analytics.enabled=false -c cli_auth_credentials_store=file -c sandbox_mode=danger-full-access -c shell_environment_policy.ignore_default_excludes=false{provider_cfg} \"$POLYDEV_PROMPT\"")
        }
        Provider::GeminiCli => {
            if let Some(u) = how.base_url {
                env.push(("GOOGLE_GEMINI_BASE_URL".into(), u.to_owned()));
            }
            let auth = if login {
                "oauth-personal"
            } else {
                "gemini-api-key"
            };
            // Its shell tool redacts the key from the environment of
            // the commands it runs.
            let settings = format!(
                r#"{{"security":{{"auth":{{"selectedType":"{auth}"}},"environmentVariableRedaction":{{"enabled":true,"blocked":["GEMINI_API_KEY","GOOGLE_API_KEY"]}}}},"privacy":{{"usageStatisticsEnabled":false}}}}"#
            );
            let setup = setup("GEMINI_API_KEY=\"$KEY\"");
            format!("{setup} && mkdir -p ~/.gemini && printf '%s' '{settings}' > ~/.gemini/settings.json && exec gemini -p \"$POLYDEV_PROMPT\" -o stream-json --skip-trust")
        }
    };
    (line, env)
}

/// What one line of a CLI's stream format says.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Answer text.
    Delta(String),
    /// The CLI retries (a reconnect): not the end.
    Retrying(String),
    /// The CLI's stream says it failed, and why.
    Failure(String),
    /// The answer is complete; its usage.
    Done(Usage),
}

/// One line of a CLI's stream format, in general terms.
pub fn normalise(provider: Provider, line: &str) -> Option<Line> {
    let v: Value = serde_json::from_str(line).ok()?;
    match provider {
        // `claude -p --output-format stream-json --verbose`
        Provider::ClaudeCode => match v["type"].as_str()? {
            "assistant" => {
                let text: String = v["message"]["content"]
                    .as_array()?
                    .iter()
                    .filter(|c| c["type"] == "text")
                    .filter_map(|c| c["text"].as_str())
                    .collect();
                (!text.is_empty()).then_some(Line::Delta(text))
            }
            "result" if v["is_error"] == true => Some(Line::Failure(message_of(&v["result"]))),
            "result" => Some(Line::Done(usage(
                &v["usage"]["input_tokens"],
                &v["usage"]["output_tokens"],
            ))),
            _ => None,
        },
        // `codex exec --json`
        Provider::Codex => match v["type"].as_str()? {
            "item.completed" if v["item"]["type"] == "agent_message" => {
                Some(Line::Delta(v["item"]["text"].as_str()?.to_owned()))
            }
            "turn.completed" => Some(Line::Done(usage(
                &v["usage"]["input_tokens"],
                &v["usage"]["output_tokens"],
            ))),
            "turn.failed" => Some(Line::Failure(message_of(&v["error"]))),
            // "Reconnecting... 2/5": it tries again, it has not failed.
            "error" => {
                let m = message_of(&v["message"]);
                let lower = m.to_ascii_lowercase();
                if lower.starts_with("reconnecting") || lower.contains("retrying") {
                    Some(Line::Retrying(m))
                } else {
                    Some(Line::Failure(m))
                }
            }
            _ => None,
        },
        // `gemini -p -o stream-json`
        Provider::GeminiCli => match v["type"].as_str()? {
            "message" if v["role"] == "assistant" => {
                Some(Line::Delta(v["content"].as_str()?.to_owned()))
            }
            "result" if v["status"] == "success" => Some(Line::Done(usage(
                &v["stats"]["input_tokens"],
                &v["stats"]["output_tokens"],
            ))),
            "result" => Some(Line::Failure(message_of(&v["error"]))),
            _ => None,
        },
    }
}

/// A message from a CLI's stream as one short sentence: a string as is, an
/// object by its `message`, bounded.
pub fn message_of(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .or_else(|| o.get("error").and_then(|e| e.get("message")))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| "an error it did not describe".to_owned()),
        Value::Null => "an error it did not describe".to_owned(),
        other => other.to_string(),
    };
    let text = text.trim();
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The last line of a CLI's stderr worth showing a person: not a stack
/// frame, not blank.
pub fn last_meaningful_line(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("at ")
                && !l.starts_with("node:")
                && !l.contains("node_modules/")
                && !l.chars().all(|c| "^~-=*".contains(c) || c.is_whitespace())
        })
        .map(|l| message_of(&Value::String(l.to_owned())))
}

/// The tokens a CLI's stream reported for its answer (absent when it
/// reported none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

fn usage(input: &Value, output: &Value) -> Usage {
    Usage {
        input_tokens: input.as_u64(),
        output_tokens: output.as_u64(),
    }
}

/// How one provider's CLI signs in, as shell lines run in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginCommand {
    /// Browser mode: opens its sign-in page with `$BROWSER`/`xdg-open`.
    #[serde(default)]
    pub browser: Option<String>,
    /// Code-relay mode: prints a URL, reads a code on stdin (or polls a
    /// device code). None: the CLI has no such flow.
    #[serde(default)]
    pub code: Option<String>,
    /// Written to the command's stdin at start (kept open in code mode).
    #[serde(default)]
    pub stdin: Option<String>,
    /// The file the CLI writes its credential to (absolute, in the sandbox).
    pub credential_file: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The real CLIs' login flows (see docs/LOGIN.md for what each supports).
pub fn login_commands() -> BTreeMap<Provider, LoginCommand> {
    let mut m = BTreeMap::new();
    m.insert(
        Provider::ClaudeCode,
        LoginCommand {
            // Opens claude.com's authorize page with a localhost callback;
            // also prints a manual URL and reads a pasted code.
            browser: Some("exec claude auth login".into()),
            code: Some("exec claude auth login".into()),
            stdin: None,
            credential_file: credential_file(Provider::ClaudeCode).into(),
            env: BTreeMap::new(),
        },
    );
    m.insert(
        Provider::Codex,
        LoginCommand {
            // Callback server on localhost:1455; `--device-auth` is a
            // device-code flow (the user types the shown code at OpenAI).
            browser: Some(
                "mkdir -p \"$CODEX_HOME\" && exec codex login -c cli_auth_credentials_store='\"file\"'"
                    .into(),
            ),
            code: Some(
                "mkdir -p \"$CODEX_HOME\" && exec codex login --device-auth -c cli_auth_credentials_store='\"file\"'"
                    .into(),
            ),
            stdin: None,
            credential_file: credential_file(Provider::Codex).into(),
            env: [("CODEX_HOME".to_owned(), "/home/sandbox/.codex".to_owned())].into(),
        },
    );
    m.insert(
        Provider::GeminiCli,
        LoginCommand {
            // No login subcommand: a headless prompt with OAuth selected
            // asks for consent (stdin `y`), opens Google's page with a
            // callback on 127.0.0.1:8085, then writes oauth_creds.json.
            // Its paste-a-code flow needs an interactive terminal: no code mode.
            browser: Some(
                "mkdir -p ~/.gemini && printf '%s' '{\"security\":{\"auth\":{\"selectedType\":\"oauth-personal\"}},\"privacy\":{\"usageStatisticsEnabled\":false}}' > ~/.gemini/settings.json && exec gemini -p 'reply with ok' --skip-trust"
                    .into(),
            ),
            code: None,
            stdin: Some("y\n".into()),
            credential_file: credential_file(Provider::GeminiCli).into(),
            env: [("OAUTH_CALLBACK_PORT".to_owned(), "8085".to_owned())].into(),
        },
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a whole stream (one fixture per CLI's format, shaped like the
    /// pinned CLIs' output) reads as.
    fn read(provider: Provider, stream: &str) -> Vec<Line> {
        stream
            .lines()
            .filter_map(|l| normalise(provider, l))
            .collect()
    }

    fn done(input: u64, output: u64) -> Line {
        Line::Done(Usage {
            input_tokens: Some(input),
            output_tokens: Some(output),
        })
    }

    #[test]
    fn claude_code_stream_json_reads_as_text_then_usage() {
        let lines = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code.jsonl"),
        );
        assert_eq!(
            lines,
            vec![
                Line::Delta("Hello from ".into()),
                Line::Delta("Claude.".into()),
                done(12, 5)
            ]
        );
        let lines = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code_error.jsonl"),
        );
        assert_eq!(
            lines,
            vec![Line::Failure("Invalid API key · Please run /login".into())]
        );
    }

    #[test]
    fn codex_json_reads_a_reconnect_as_a_retry_and_its_messages_as_text() {
        let lines = read(Provider::Codex, include_str!("../fixtures/codex.jsonl"));
        assert_eq!(
            lines,
            vec![
                Line::Retrying(
                    "Reconnecting... 1/5 (stream disconnected before completion)".into()
                ),
                Line::Delta("Hello from Codex.".into()),
                done(20, 6)
            ]
        );
        let lines = read(
            Provider::Codex,
            include_str!("../fixtures/codex_error.jsonl"),
        );
        let why = "unexpected status 401 Unauthorized: Incorrect API key provided";
        assert_eq!(
            lines,
            vec![Line::Failure(why.into()), Line::Failure(why.into())]
        );
    }

    #[test]
    fn gemini_cli_stream_json_reads_assistant_deltas_not_the_prompt() {
        let lines = read(
            Provider::GeminiCli,
            include_str!("../fixtures/gemini_cli.jsonl"),
        );
        assert_eq!(
            lines,
            vec![
                Line::Delta("Hello from ".into()),
                Line::Delta("Gemini.".into()),
                done(24, 6)
            ]
        );
        let lines = read(
            Provider::GeminiCli,
            include_str!("../fixtures/gemini_cli_error.jsonl"),
        );
        assert_eq!(
            lines,
            vec![Line::Failure(
                "API key not valid. Please pass a valid API key.".into()
            )]
        );
    }

    #[test]
    fn lines_that_are_not_json_or_not_known_read_as_nothing() {
        for p in Provider::ALL {
            assert_eq!(normalise(p, "not json"), None);
            assert_eq!(normalise(p, "{\"type\":\"unheard-of\"}"), None);
            assert_eq!(normalise(p, "[1,2]"), None);
        }
    }

    #[test]
    fn messages_are_one_bounded_sentence() {
        let long = "x".repeat(MAX_MESSAGE + 50);
        let m = message_of(&Value::String(long));
        assert_eq!(m.chars().count(), MAX_MESSAGE + 1, "cut, with an ellipsis");
        assert_eq!(
            message_of(&json!({"error": {"message": " nested "}})),
            "nested"
        );
        assert_eq!(message_of(&Value::Null), "an error it did not describe");
        let stderr = "Error: connect ECONNREFUSED\n    at TCPConnectWrap (node:net:1)\n    at /usr/lib/node_modules/x.js:1\n\n";
        assert_eq!(
            last_meaningful_line(stderr).as_deref(),
            Some("Error: connect ECONNREFUSED")
        );
        assert_eq!(last_meaningful_line("  \n^^^^\n"), None);
    }

    #[test]
    fn a_key_never_reaches_the_cli_s_environment_and_a_login_moves_to_its_file() {
        for p in Provider::ALL {
            let key = RunSetup {
                login: false,
                base_url: Some("http://127.0.0.1:9"),
                deadline: Duration::from_secs(60),
            };
            let (line, env) = run_command(p, &key);
            assert!(line.contains(CREDENTIAL_FILE), "{p:?}: {line}");
            assert!(
                env.iter()
                    .all(|(k, _)| !k.contains("KEY") || k.contains("HELPER")),
                "{p:?}: no key variable is passed in: {env:?}"
            );
            assert!(
                env.iter().any(|(_, v)| v == "http://127.0.0.1:9")
                    || line.contains("http://127.0.0.1:9"),
                "{p:?}: the base URL reaches the CLI"
            );
            let login = RunSetup { login: true, ..key };
            let (line, _) = run_command(p, &login);
            assert!(
                line.contains(&format!("mv -f {CREDENTIAL_FILE} {}", credential_file(p))),
                "{p:?}: {line}"
            );
        }
    }

    #[test]
    fn every_cli_signs_in_into_its_credential_file_and_gemini_has_no_code_mode() {
        let c = login_commands();
        assert_eq!(c.len(), Provider::ALL.len());
        for p in Provider::ALL {
            assert_eq!(c[&p].credential_file, credential_file(p), "{p:?}");
            assert!(credential_file(p).starts_with("/home/sandbox/"), "{p:?}");
        }
        assert!(c[&Provider::GeminiCli].code.is_none());
        assert!(c[&Provider::ClaudeCode].code.is_some() && c[&Provider::Codex].code.is_some());
    }
}
