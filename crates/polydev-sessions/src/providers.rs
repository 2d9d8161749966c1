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

/// The CLIs at their pinned versions, one npm spec per line (what the
/// `runtime` and `browser` images install; scripts/test.sh reads it too).
const PINS: &str = include_str!("../cli-packages.txt");

/// The npm specs the images install (`package@version`).
pub fn pinned_packages() -> Vec<String> {
    PINS.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The version of `provider`'s CLI the images install.
pub fn pinned_version(provider: Provider) -> Option<String> {
    let package = info(provider).package;
    pinned_packages().into_iter().find_map(|spec| {
        spec.strip_prefix(package)
            .and_then(|v| v.strip_prefix('@'))
            .map(str::to_owned)
    })
}

/// Whether an installation lets its users sign a provider's CLI in with
/// their own subscription account (the CLI's login file), rather than an
/// API key: per provider, set by the operator, defaulting to what the
/// vendor's terms allow a multi-user installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionLogin {
    /// Nobody: API keys only.
    Off,
    /// The installation's admins only (a single-user installation, the
    /// operator signing in their own account).
    Owner,
    /// Every user.
    All,
}

impl SubscriptionLogin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Owner => "owner",
            Self::All => "all",
        }
    }

    /// Whether a user (an admin or not) may use a subscription sign-in.
    pub fn allows(self, admin: bool) -> bool {
        match self {
            Self::Off => false,
            Self::Owner => admin,
            Self::All => true,
        }
    }
}

impl std::str::FromStr for SubscriptionLogin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "owner" => Ok(Self::Owner),
            "all" => Ok(Self::All),
            other => Err(format!(
                "subscription_login must be \"off\", \"owner\" or \"all\", not {other:?}"
            )),
        }
    }
}

/// What a vendor's terms say about a product signing its users in with
/// their subscription through the vendor's CLI (docs/PROVIDERS.md has the
/// dates and the wording).
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    /// What a multi-user installation gets unless its operator says
    /// otherwise.
    pub default: SubscriptionLogin,
    /// One line a user is shown beside the provider.
    pub reason: &'static str,
    /// The vendor's page that says so.
    pub source: &'static str,
}

/// What a provider's sealed credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialKind {
    /// The provider's API key.
    #[default]
    ApiKey,
    /// The CLI's own credential file from a login session (the vault item
    /// `credential.<provider>`). After the run, the file as the CLI left
    /// it (refreshed tokens included) is sealed back to the user.
    CliLogin,
    /// A long-lived token the CLI's own tooling issues for a person's
    /// subscription (Claude Code's `claude setup-token`): a subscription
    /// sign-in, offered where the policy allows one.
    SubscriptionToken,
    /// A cloud account's key for the vendor's models there (the
    /// registry's `cloud`: Claude Code on Amazon Bedrock, Gemini CLI on
    /// Vertex AI): the sanctioned path for products besides the API key.
    CloudKey,
}

impl std::str::FromStr for CredentialKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "api_key" => Ok(Self::ApiKey),
            "cli_login" => Ok(Self::CliLogin),
            "subscription_token" => Ok(Self::SubscriptionToken),
            "cloud_key" => Ok(Self::CloudKey),
            other => Err(format!(
                "credential kind must be \"api_key\", \"cli_login\", \"subscription_token\" or \"cloud_key\", not {other:?}"
            )),
        }
    }
}

/// The hosts `provider`'s run sandboxes may reach: the registry's, and
/// for Claude Code on Bedrock that region's endpoints.
pub fn egress_hosts(provider: Provider, bedrock_region: &str) -> Vec<String> {
    let mut hosts: Vec<String> = info(provider)
        .egress_hosts
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    if provider == Provider::ClaudeCode && valid_region(bedrock_region) {
        hosts.push(format!("bedrock-runtime.{bedrock_region}.amazonaws.com"));
        hosts.push(format!("bedrock.{bedrock_region}.amazonaws.com"));
    }
    hosts
}

/// Whether `region` can be an AWS region's name (it becomes a host name).
pub fn valid_region(region: &str) -> bool {
    // `<area>-<place>-<number>` (us-east-1, ap-southeast-2, us-gov-west-1).
    let parts: Vec<&str> = region.split('-').collect();
    region.len() <= 32
        && parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1]
            .parse::<u8>()
            .is_ok_and(|_| parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit()))
}

/// A CLI's `cloud_key` credential: a cloud account's key for the vendor's
/// models there.
#[derive(Debug, Clone, Copy)]
pub struct CloudKey {
    /// In a few words (a field's label).
    pub label: &'static str,
    /// What it is, for the person pasting one.
    pub hint: &'static str,
    /// How such a key begins, where that tells it from an API key (a
    /// client then sends a pasted one as a `cloud_key`).
    pub prefixes: &'static [&'static str],
}

/// One CLI, as the rest of polydev knows it.
#[derive(Debug, Clone, Copy)]
pub struct ProviderInfo {
    pub provider: Provider,
    /// Its product name.
    pub name: &'static str,
    /// Its npm package (pinned in `cli-packages.txt`).
    pub package: &'static str,
    /// The command it installs (what an image's check runs `--version` of).
    pub command: &'static str,
    /// `NAME=value` settings it runs with in a sandbox beyond its
    /// credential (the image check runs `--version` with them too).
    pub run_env: &'static [&'static str],
    /// A shell line run once after the install, as the build's
    /// unprivileged uid, with `$PREFIX` the install's prefix: what makes
    /// the CLI ready to run from a read-only image.
    pub prepare: Option<&'static str>,
    /// Its `api_key` credential in a few words (a field's label).
    pub key_label: &'static str,
    /// What its `api_key` credential is, for the person pasting one.
    pub key_hint: &'static str,
    /// Whether it has a subscription sign-in polydev runs as a login
    /// session (its CLI login file then a credential kind).
    pub sign_in: bool,
    /// The long-lived subscription token it takes (the
    /// `subscription_token` credential kind), if any: what it is.
    pub token: Option<&'static str>,
    /// The cloud account's key it takes (the `cloud_key` kind), if any.
    pub cloud: Option<CloudKey>,
    /// The hosts its run sandboxes may reach (its vendor's API and token
    /// endpoints; nothing else).
    pub egress_hosts: &'static [&'static str],
    pub terms: Terms,
}

/// The model Copilot CLI runs on (included in every Copilot plan, no
/// premium requests).
pub const COPILOT_MODEL: &str = "gpt-5-mini";
/// What Copilot CLI runs with: its unpacked package read-only from the
/// image, no self-update (it would fetch and run a newer release).
const COPILOT_RUN_ENV: &[&str] = &[
    "COPILOT_PKG_CACHE_HOME=/usr/local/lib/copilot",
    "COPILOT_AUTO_UPDATE=false",
];
/// Unpacks it there at build time (its `--version` does, once).
const COPILOT_PREPARE: &str =
    "COPILOT_AUTO_UPDATE=false COPILOT_PKG_CACHE_HOME=\"$PREFIX/lib/copilot\" \"$PREFIX/bin/copilot\" --version --no-auto-update";

/// The registry: everything about a CLI that is not how it runs.
pub fn info(provider: Provider) -> ProviderInfo {
    match provider {
        Provider::ClaudeCode => ProviderInfo {
            provider,
            name: "Claude Code",
            package: "@anthropic-ai/claude-code",
            command: "claude",
            run_env: &[],
            prepare: None,
            key_label: "Anthropic API key",
            key_hint: "an Anthropic API key (sk-ant-…) from the Claude Console",
            sign_in: true,
            token: Some("a long-lived token from `claude setup-token` (meant for a person's own automation)"),
            cloud: Some(CloudKey {
                label: "Amazon Bedrock API key",
                hint: "an Amazon Bedrock API key (ABSK… or bedrock-api-key-…) for this installation's Bedrock region: Claude Code then runs on Claude in your AWS account",
                prefixes: &["ABSK", "bedrock-api-key-"],
            }),
            egress_hosts: &["api.anthropic.com", "console.anthropic.com", "platform.claude.com"],
            terms: Terms {
                default: SubscriptionLogin::Off,
                reason: "Anthropic's terms keep Claude Free/Pro/Max sign-in to Claude Code and Claude.ai themselves and do not let other products route requests through it: use an API key (Console)",
                source: "https://code.claude.com/docs/en/legal-and-compliance",
            },
        },
        Provider::Codex => ProviderInfo {
            provider,
            name: "Codex CLI",
            package: "@openai/codex",
            command: "codex",
            run_env: &[],
            prepare: None,
            key_label: "OpenAI API key",
            key_hint: "an OpenAI API key (sk-…)",
            sign_in: true,
            token: None,
            cloud: None,
            egress_hosts: &["api.openai.com", "auth.openai.com", "chatgpt.com"],
            terms: Terms {
                default: SubscriptionLogin::All,
                reason: "OpenAI lets the Codex CLI sign in with a ChatGPT plan (device code for headless machines) as well as with an API key",
                source: "https://developers.openai.com/codex/auth",
            },
        },
        Provider::GeminiCli => ProviderInfo {
            provider,
            name: "Gemini CLI",
            package: "@google/gemini-cli",
            command: "gemini",
            run_env: &[],
            prepare: None,
            key_label: "Gemini API key",
            key_hint: "a Gemini API key (AIza…) restricted to the Gemini API",
            sign_in: true,
            token: None,
            cloud: Some(CloudKey {
                label: "Vertex AI API key",
                hint: "a Google Cloud API key for Vertex AI (express mode): Gemini CLI then runs on Gemini in your Google Cloud project",
                // Like a Gemini API key: told apart only where saved.
                prefixes: &[],
            }),
            egress_hosts: &["generativelanguage.googleapis.com", "cloudcode-pa.googleapis.com", "oauth2.googleapis.com", "aiplatform.googleapis.com"],
            terms: Terms {
                default: SubscriptionLogin::Off,
                reason: "Since 18 June 2026 Gemini CLI no longer serves Google AI Pro/Ultra or Code Assist for individuals; use a Gemini API key (an organisation's Code Assist Standard/Enterprise licence still signs in, if the operator allows it)",
                source: "https://developers.google.com/gemini-code-assist/docs/deprecations",
            },
        },
        Provider::OpenCode => ProviderInfo {
            provider,
            name: "OpenCode",
            package: "opencode-ai",
            command: "opencode",
            run_env: &[],
            prepare: None,
            key_label: "Anthropic, OpenAI or Gemini API key",
            key_hint: "an Anthropic (sk-ant-…), Gemini (AIza…) or OpenAI (sk-…) API key: OpenCode uses that vendor's model",
            sign_in: false,
            token: None,
            cloud: None,
            egress_hosts: &["api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com"],
            terms: Terms {
                default: SubscriptionLogin::Off,
                reason: "OpenCode runs on a vendor's API key (Anthropic, OpenAI or Google, told apart by the key's prefix); it has no subscription sign-in of its own",
                source: "https://opencode.ai/docs/providers",
            },
        },
        Provider::Copilot => ProviderInfo {
            provider,
            name: "Copilot CLI",
            package: "@github/copilot",
            command: "copilot",
            run_env: COPILOT_RUN_ENV,
            prepare: Some(COPILOT_PREPARE),
            key_label: "GitHub token",
            key_hint: "a GitHub fine-grained personal access token with only the Copilot Requests permission (github_pat_…); not a gh or classic token, which can do far more with your account",
            sign_in: false,
            token: None,
            cloud: None,
            egress_hosts: &["api.github.com", "api.githubcopilot.com", "*.githubcopilot.com"],
            terms: Terms {
                default: SubscriptionLogin::Off,
                reason: "Copilot CLI runs on your GitHub account's Copilot plan through a fine-grained token with only the Copilot Requests permission (GitHub's way for headless use); its own sign-in is not offered, because the token it gets also has repo and gist scopes, too much to hand a sandbox",
                source: "https://docs.github.com/en/copilot/how-tos/copilot-cli",
            },
        },
    }
}

/// An installation's subscription sign-in policy: the operator's choice
/// per provider, else the vendor's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignInPolicy {
    pub overrides: BTreeMap<Provider, SubscriptionLogin>,
}

impl SignInPolicy {
    pub fn of(&self, provider: Provider) -> SubscriptionLogin {
        if !info(provider).sign_in {
            return SubscriptionLogin::Off;
        }
        self.overrides
            .get(&provider)
            .copied()
            .unwrap_or(info(provider).terms.default)
    }

    /// Ok when `provider`'s subscription sign-in is offered to a user
    /// (`admin` or not); else the refusal to show them.
    pub fn check(&self, provider: Provider, admin: bool) -> Result<(), NotOffered> {
        if self.of(provider).allows(admin) {
            Ok(())
        } else {
            let info = info(provider);
            Err(NotOffered {
                provider,
                policy: self.of(provider),
                reason: info.terms.reason,
                terms: info.terms.source,
            })
        }
    }
}

/// A subscription sign-in this installation does not offer the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} sign-in with a subscription account is not offered here ({}): {reason}. See {terms}", info(*provider).name, match policy { SubscriptionLogin::Owner => "only this installation's admins may", _ => "the operator's policy is off" })]
pub struct NotOffered {
    pub provider: Provider,
    pub policy: SubscriptionLogin,
    pub reason: &'static str,
    /// The vendor's page that says so.
    pub terms: &'static str,
}

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
        // Where each keeps its own sign-in (never captured: no login
        // session is offered for them).
        Provider::OpenCode => "/home/sandbox/.local/share/opencode/auth.json",
        Provider::Copilot => "/home/sandbox/.copilot/config.json",
    }
}

/// How a run hands one CLI its credential, and where its provider is.
#[derive(Debug, Clone, Copy)]
pub struct RunSetup<'a> {
    /// What the sealed credential is.
    pub kind: CredentialKind,
    /// The providers' API bases, where not the vendors' own.
    pub bases: ApiBases<'a>,
    /// The run's deadline (Claude Code's key helper outlives it).
    pub deadline: Duration,
    /// On a workspace: what the CLI may do with it (its own permission
    /// mode); `None` for a run without one.
    pub mode: Option<crate::workspace::Mode>,
}

/// Whether `provider` takes a workspace: it has a read-only mode of its
/// own for `ask` and an edit mode for `edit`.
pub fn works_on_code(provider: Provider) -> bool {
    matches!(
        provider,
        Provider::ClaudeCode | Provider::Codex | Provider::GeminiCli
    )
}

/// Where the CLIs' providers are, when not the vendors' own API hosts (an
/// installation's gateway, or the tests' stand-ins).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiBases<'a> {
    /// Anthropic's API root (no `/v1`).
    pub anthropic: Option<&'a str>,
    /// OpenAI's API root, `/v1` included.
    pub openai: Option<&'a str>,
    /// Google's Gemini API root (no `/v1beta`).
    pub gemini: Option<&'a str>,
    /// GitHub Copilot's API (and the GitHub API it asks about the user).
    pub copilot: Option<&'a str>,
    /// Codex on a ChatGPT sign-in: its Responses root and its token
    /// (refresh) URL.
    pub chatgpt: Option<&'a str>,
    pub openai_token: Option<&'a str>,
    /// Claude Code on Amazon Bedrock: Bedrock's endpoint (runtime and
    /// control plane at one root) and the region.
    pub bedrock: Option<&'a str>,
    pub bedrock_region: &'a str,
    /// Gemini CLI on Vertex AI: Vertex's endpoint.
    pub vertex: Option<&'a str>,
}

/// OpenCode's configuration for one vendor: its model (`vendor/model` in
/// OpenCode's catalog), the vendor's API
/// base when not its own, no sharing, no self-update.
fn opencode_config(vendor: &str, model: &str, base: Option<String>) -> String {
    // The key comes from a pipe OpenCode reads once as it loads this
    // configuration: never in an environment its tools inherit.
    let mut options = serde_json::json!({ "apiKey": format!("{{file:{OPENCODE_KEY_PIPE}}}") });
    if let Some(b) = base {
        options["baseURL"] = serde_json::json!(b);
    }
    serde_json::json!({
        "model": model,
        "autoupdate": false,
        "share": "disabled",
        "provider": { vendor: { "options": options } },
    })
    .to_string()
}

/// The named pipe OpenCode reads its key from: written once, then gone.
const OPENCODE_KEY_PIPE: &str = "/home/sandbox/.polydev/opencode-key";

/// The shell line that runs `provider`'s CLI headless, and its
/// environment. An API key is read from the unsealed file into the
/// CLI's variable (the file is deleted); a CLI login file is moved to
/// where the CLI reads it.
pub fn run_command(provider: Provider, how: &RunSetup) -> (String, Vec<(String, String)>) {
    let login = how.kind == CredentialKind::CliLogin;
    let cloud = how.kind == CredentialKind::CloudKey;
    let setup = |key_vars: &str| {
        if login {
            let file = credential_file(provider);
            format!("mkdir -p \"$(dirname {file})\" && mv -f {CREDENTIAL_FILE} {file} && chmod 600 {file}")
        } else {
            format!("KEY=\"$(tr -d '\\r\\n' < {CREDENTIAL_FILE})\"; rm -f {CREDENTIAL_FILE}; export {key_vars}")
        }
    };
    use crate::workspace::Mode;
    let mut env = Vec::new();
    let line = match provider {
        Provider::ClaudeCode => {
            env.push((
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ));
            if let Some(u) = how.bases.anthropic {
                env.push(("ANTHROPIC_BASE_URL".into(), u.to_owned()));
            }
            // Plan mode reads and answers; acceptEdits may change files
            // (its other tools still ask, and in print mode are refused).
            let run = format!(
                "exec claude -p --output-format stream-json --verbose{}",
                match how.mode {
                    None => "",
                    Some(Mode::Ask) => " --permission-mode plan",
                    Some(Mode::Edit) => " --permission-mode acceptEdits",
                }
            );
            if login {
                format!("{} && {run} -- \"$POLYDEV_PROMPT\"", setup(""))
            } else if cloud {
                // Claude on Amazon Bedrock with a Bedrock API key: read
                // only from its variable, which Claude Code strips from
                // what its tools run with when asked to (its list of
                // credential variables carries it).
                env.push(("CLAUDE_CODE_USE_BEDROCK".into(), "1".into()));
                env.push(("AWS_REGION".into(), how.bases.bedrock_region.to_owned()));
                if let Some(u) = how.bases.bedrock {
                    env.push(("ANTHROPIC_BEDROCK_BASE_URL".into(), u.to_owned()));
                }
                format!(
                    "{}; unset KEY; {run} -- \"$POLYDEV_PROMPT\"",
                    setup("AWS_BEARER_TOKEN_BEDROCK=\"$KEY\" CLAUDE_CODE_SUBPROCESS_ENV_SCRUB=1")
                )
            } else if how.kind == CredentialKind::SubscriptionToken {
                // Claude Code reads a setup-token only from its variable;
                // it strips it from what its tools run with when asked to.
                format!("KEY=\"$(tr -d '\\r\\n' < {CREDENTIAL_FILE})\"; rm -f {CREDENTIAL_FILE}; export CLAUDE_CODE_OAUTH_TOKEN=\"$KEY\" CLAUDE_CODE_SUBPROCESS_ENV_SCRUB=1; unset KEY; {run} -- \"$POLYDEV_PROMPT\"")
            } else {
                // The key reaches Claude Code through its apiKeyHelper,
                // read once (then deleted), never through an
                // environment its tools would inherit.
                env.push((
                    "CLAUDE_CODE_API_KEY_HELPER_TTL_MS".into(),
                    (how.deadline.as_millis() as u64 + 600_000).to_string(),
                ));
                format!(
                    "printf '#!/bin/sh\\ncat {CREDENTIAL_FILE} && rm -f {CREDENTIAL_FILE}\\n' > {KEY_HELPER} && chmod 700 {KEY_HELPER} && {run} --settings '{{\"apiKeyHelper\":\"{KEY_HELPER}\"}}' -- \"$POLYDEV_PROMPT\""
                )
            }
        }
        Provider::Codex => {
            env.push(("CODEX_HOME".into(), "/home/sandbox/.codex".into()));
            // A custom API base takes the key from the environment.
            let provider_cfg = match (how.bases.openai, how.bases.chatgpt, login) {
                (Some(u), _, false) => format!(
                    " -c model_provider=polydev -c 'model_providers.polydev={{name=\"polydev\",base_url=\"{u}\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}'"
                ),
                // A ChatGPT sign-in's tokens go where the operator said
                // ChatGPT is, never to the API base (another service).
                (_, Some(u), true) => format!(
                    " -c model_provider=polydev -c 'model_providers.polydev={{name=\"polydev\",base_url=\"{u}\",wire_api=\"responses\",requires_openai_auth=true}}'"
                ),
                _ => String::new(),
            };
            if let (Some(u), true) = (how.bases.openai_token, login) {
                env.push(("CODEX_REFRESH_TOKEN_URL_OVERRIDE".into(), u.to_owned()));
            }
            let setup = setup("OPENAI_API_KEY=\"$KEY\" CODEX_API_KEY=\"$KEY\"");
            // Asked about code, it reads only (its own read-only sandbox
            // for the commands it runs); otherwise our sandbox is the
            // boundary.
            let sandbox_mode = match how.mode {
                Some(Mode::Ask) => "read-only",
                _ => "danger-full-access",
            };
            // The commands Codex runs do not inherit variables named
            // like *KEY*, *SECRET*, *TOKEN* (its default excludes, off
            // unless asked for).
            format!("{setup} && mkdir -p \"$CODEX_HOME\" && exec codex exec --skip-git-repo-check --json -c analytics.enabled=false -c cli_auth_credentials_store=file -c sandbox_mode={sandbox_mode} -c shell_environment_policy.ignore_default_excludes=false{provider_cfg} -- \"$POLYDEV_PROMPT\"")
        }
        Provider::GeminiCli => {
            if let Some(u) = how.bases.gemini {
                env.push(("GOOGLE_GEMINI_BASE_URL".into(), u.to_owned()));
            }
            let auth = if login {
                "oauth-personal"
            } else if cloud {
                // Gemini on Vertex AI with an API key (express mode).
                env.push(("GOOGLE_GENAI_USE_VERTEXAI".into(), "true".into()));
                if let Some(u) = how.bases.vertex {
                    env.push(("GOOGLE_VERTEX_BASE_URL".into(), u.to_owned()));
                }
                "vertex-ai"
            } else {
                "gemini-api-key"
            };
            // Its shell tool redacts the key from the environment of
            // the commands it runs.
            let settings = format!(
                r#"{{"security":{{"auth":{{"selectedType":"{auth}"}},"environmentVariableRedaction":{{"enabled":true,"blocked":["GEMINI_API_KEY","GOOGLE_API_KEY"]}}}},"privacy":{{"usageStatisticsEnabled":false}}}}"#
            );
            let setup = setup(if cloud {
                "GOOGLE_API_KEY=\"$KEY\""
            } else {
                "GEMINI_API_KEY=\"$KEY\""
            });
            // Plan mode is read-only; auto_edit takes edits without asking.
            let approval = match how.mode {
                None => "",
                Some(Mode::Ask) => " --approval-mode plan",
                Some(Mode::Edit) => " --approval-mode auto_edit",
            };
            format!("{setup} && mkdir -p ~/.gemini && printf '%s' '{settings}' > ~/.gemini/settings.json && exec gemini --prompt=\"$POLYDEV_PROMPT\" -o stream-json --skip-trust{approval}")
        }
        Provider::OpenCode => {
            // One key, three possible vendors: told apart by the key's
            // prefix inside the sandbox (the controller never sees it).
            // Each vendor's configuration is made here, quoted as JSON;
            // the key goes through a named pipe OpenCode reads once (a
            // background writer, then the pipe is removed; unread, it is
            // removed after 30 s all the same, so no tool can open it).
            env.push((
                "POLYDEV_OC_ANTHROPIC".into(),
                opencode_config(
                    "anthropic",
                    "anthropic/claude-sonnet-4-5",
                    how.bases.anthropic.map(|u| format!("{u}/v1")),
                ),
            ));
            env.push((
                "POLYDEV_OC_GOOGLE".into(),
                opencode_config(
                    "google",
                    "google/gemini-2.5-pro",
                    how.bases.gemini.map(|u| format!("{u}/v1beta")),
                ),
            ));
            env.push((
                "POLYDEV_OC_OPENAI".into(),
                opencode_config(
                    "openai",
                    "openai/gpt-5",
                    how.bases.openai.map(str::to_owned),
                ),
            ));
            env.push(("OPENCODE_DISABLE_AUTOUPDATE".into(), "1".into()));
            env.push(("OPENCODE_DISABLE_MODELS_FETCH".into(), "1".into()));
            env.push(("OPENCODE_DISABLE_LSP_DOWNLOAD".into(), "1".into()));
            format!(
                "KEY=\"$(tr -d '\\r\\n' < {CREDENTIAL_FILE})\"; rm -f {CREDENTIAL_FILE}; case \"$KEY\" in sk-ant-*) export OPENCODE_CONFIG_CONTENT=\"$POLYDEV_OC_ANTHROPIC\";; AIza*) export OPENCODE_CONFIG_CONTENT=\"$POLYDEV_OC_GOOGLE\";; sk-*) export OPENCODE_CONFIG_CONTENT=\"$POLYDEV_OC_OPENAI\";; *) echo 'OpenCode takes an Anthropic (sk-ant-...), Gemini (AIza...) or OpenAI (sk-...) API key; this key is none of them' >&2; exit 2;; esac; unset POLYDEV_OC_ANTHROPIC POLYDEV_OC_GOOGLE POLYDEV_OC_OPENAI; rm -f {OPENCODE_KEY_PIPE}; mkfifo -m 600 {OPENCODE_KEY_PIPE} || exit 2; (sleep 30; rm -f {OPENCODE_KEY_PIPE}) </dev/null >/dev/null 2>&1 & (printf '%s' \"$KEY\" > {OPENCODE_KEY_PIPE}; rm -f {OPENCODE_KEY_PIPE}) </dev/null >/dev/null 2>&1 & unset KEY; exec opencode run --format json --title polydev --print-logs --log-level ERROR -- \"$POLYDEV_PROMPT\""
            )
        }
        Provider::Copilot => {
            if let Some(u) = how.bases.copilot {
                env.push(("COPILOT_API_URL".into(), u.to_owned()));
                env.push(("COPILOT_DEBUG_GITHUB_API_URL".into(), u.to_owned()));
            }
            env.push(("COPILOT_HOME".into(), "/home/sandbox/.copilot".into()));
            // The token is stripped from the environment of the commands
            // it runs and redacted from its output.
            let setup = setup("COPILOT_GITHUB_TOKEN=\"$KEY\"");
            // The model every Copilot plan includes: a run across the CLIs
            // spends none of the user's premium requests unasked.
            format!("{setup} && unset KEY && exec copilot --prompt=\"$POLYDEV_PROMPT\" --model {COPILOT_MODEL} --output-format json --allow-all-tools --no-auto-update --disable-builtin-mcps --no-color --secret-env-vars=COPILOT_GITHUB_TOKEN")
        }
    };
    for pair in info(provider).run_env {
        if let Some((k, v)) = pair.split_once('=') {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
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
    /// The CLI's stream says it failed and it will not go on, though it
    /// may not exit by itself (Copilot CLI stays up after a rate limit):
    /// the provider ends here.
    GaveUp(String),
    /// What the answer has used so far (a running total; the `Done` that
    /// follows may carry none of its own).
    Usage(Usage),
    /// Where the user's subscription stands with its vendor (Claude Code
    /// reports it for a subscription sign-in).
    Limits(Limits),
    /// The answer (or one step of it: several add up) is complete; its
    /// usage.
    Done(Usage),
}

/// One line of a CLI's stream format, in general terms.
pub fn normalise(provider: Provider, line: &str) -> Option<Line> {
    let v: Value = serde_json::from_str(line).ok()?;
    match provider {
        // `claude -p --output-format stream-json --verbose`
        Provider::ClaudeCode => match v["type"].as_str()? {
            // A refusal it made up itself (e.g. "You've hit your 5-hour
            // limit · resets 6pm"): a failure, not the answer.
            "assistant" if !v["error"].is_null() => {
                let text: String = v["message"]["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["type"] == "text")
                    .filter_map(|c| c["text"].as_str())
                    .collect();
                Some(Line::Failure(if text.is_empty() {
                    message_of(&v["error"])
                } else {
                    message_of(&Value::String(text))
                }))
            }
            "rate_limit_event" => Some(Line::Limits(Limits::from_claude(&v["rate_limit_info"])?)),
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
            // Its own retry of a failed API call: what failed, and when it
            // tries again.
            "system" if v["subtype"] == "api_retry" => Some(Line::Retrying(format!(
                "Anthropic answered HTTP {} ({}); retry {} of {} in {} s",
                v["error_status"].as_u64().unwrap_or(0),
                v["error"].as_str().unwrap_or("error"),
                v["attempt"].as_u64().unwrap_or(0),
                v["max_retries"].as_u64().unwrap_or(0),
                v["retry_delay_ms"].as_u64().unwrap_or(0).div_ceil(1000),
            ))),
            "result" => Some(Line::Done(Usage {
                cost_usd: v["total_cost_usd"]
                    .as_f64()
                    .filter(|c| c.is_finite() && *c >= 0.0),
                ..usage(&v["usage"]["input_tokens"], &v["usage"]["output_tokens"])
            })),
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
        // `opencode run --format json`: a text part per message part, a
        // step_finish (tokens, cost) per model call.
        Provider::OpenCode => match v["type"].as_str()? {
            "text" => {
                let text = v["part"]["text"].as_str()?;
                (!text.is_empty()).then(|| Line::Delta(text.to_owned()))
            }
            "step_finish" => Some(Line::Done(Usage {
                cost_usd: v["part"]["cost"]
                    .as_f64()
                    .filter(|c| c.is_finite() && *c >= 0.0),
                ..usage(
                    &v["part"]["tokens"]["input"],
                    &v["part"]["tokens"]["output"],
                )
            })),
            "error" => {
                let data = &v["error"]["data"];
                let message = message_of(&data["message"]);
                Some(Line::Failure(match data["statusCode"].as_u64() {
                    Some(code) => format!("the provider answered HTTP {code}: {message}"),
                    None => message,
                }))
            }
            _ => None,
        },
        // `copilot -p --output-format json`
        Provider::Copilot => match v["type"].as_str()? {
            "assistant.message" => {
                let text = v["data"]["content"].as_str()?;
                (!text.is_empty()).then(|| Line::Delta(text.to_owned()))
            }
            "session.usage_checkpoint" => {
                let metrics = v["data"]["accountingSnapshot"]["modelMetrics"].as_object()?;
                let sum = |field: &str| {
                    metrics
                        .values()
                        .map(|m| m["usage"][field].as_u64())
                        .try_fold(0u64, |acc, n| n.map(|n| acc.saturating_add(n)))
                };
                Some(Line::Usage(Usage {
                    input_tokens: sum("inputTokens"),
                    output_tokens: sum("outputTokens"),
                    cost_usd: None,
                }))
            }
            // A failed model call it will retry (a session.error says when
            // it stops).
            "model.call_failure" => Some(Line::Retrying(format!(
                "GitHub Copilot answered HTTP {} (attempt {})",
                v["data"]["statusCode"].as_u64().unwrap_or(0),
                v["data"]["retryAttempt"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_add(1),
            ))),
            // Final when its provider refused (a rate limit: it stays up
            // after one, measured); any other error is a failure the
            // exit (or the deadline) ends.
            "session.error" => {
                let message = message_of(&v["data"]["message"]);
                let message = match v["data"]["statusCode"].as_u64() {
                    Some(code) => format!("GitHub Copilot answered HTTP {code}: {message}"),
                    None => message,
                };
                Some(if v["data"]["errorType"] == "rate_limit" {
                    Line::GaveUp(message)
                } else {
                    Line::Failure(message)
                })
            }
            "result" if v["exitCode"] == 0 => Some(Line::Done(Usage::default())),
            _ => None,
        },
    }
}

/// Whether what a CLI said (a failure, a retry notice, its stderr) is its
/// provider refusing for a rate or usage limit: HTTP 429 in the words each
/// CLI uses (Claude Code's `rate_limit`, Codex's "429 Too Many Requests",
/// Gemini CLI's "failed with status 429", Google's `RESOURCE_EXHAUSTED`).
pub fn is_rate_limit(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "http 429",
        "status 429",
        "429 too many requests",
        "rate_limit",
        "rate limit",
        "resource_exhausted",
        "usage_limit_reached",
        "usage limit reached",
    ]
    .iter()
    .any(|phrase| has_word(&t, phrase))
}

/// `phrase` in `text` as whole words (not "sepa*rate limit*").
fn has_word(text: &str, phrase: &str) -> bool {
    let edge = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    text.match_indices(phrase).any(|(i, _)| {
        edge(text[..i].chars().next_back()) && edge(text[i + phrase.len()..].chars().next())
    })
}

/// Whether a CLI's stderr says its last retry was for a rate limit:
/// Gemini CLI retries there ("Attempt 3 failed with status 429. Retrying
/// with backoff..."), OpenCode logs each failed call it retries (`message=
/// "stream error" … error.error="AI_APICallError: <the provider's
/// words>"`, its stream silent meanwhile); only the last such line counts
/// (one that got through later is not a limit).
pub fn stderr_says_rate_limited(provider: Provider, stderr: &str) -> bool {
    let retry_line = |l: &str| match provider {
        Provider::GeminiCli => l.trim_start().starts_with("Attempt ") && l.contains(" failed"),
        Provider::OpenCode => l.contains("message=\"stream error\""),
        _ => false,
    };
    stderr
        .lines()
        .rev()
        .find(|l| retry_line(l))
        .is_some_and(is_rate_limit)
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

/// What a CLI's stream reported its answer used (each absent when it
/// reported none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// The cost the CLI computed at its vendor's list prices, in US
    /// dollars (Claude Code reports it; with a subscription it is what the
    /// answer would have cost, not a bill).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// Two steps' usage together (a figure either lacks stays what the
    /// other says).
    pub fn plus(self, other: Usage) -> Usage {
        let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        };
        Usage {
            input_tokens: add(self.input_tokens, other.input_tokens),
            output_tokens: add(self.output_tokens, other.output_tokens),
            cost_usd: match (self.cost_usd, other.cost_usd) {
                (Some(a), Some(b)) => Some(a + b).filter(|c| c.is_finite()),
                (a, b) => a.or(b),
            },
        }
    }

    fn is_empty(&self) -> bool {
        self.input_tokens.is_none() && self.output_tokens.is_none() && self.cost_usd.is_none()
    }

    /// This usage, or `running` (the CLI's running total) when it says
    /// nothing itself.
    pub fn or_running(self, running: Option<Usage>) -> Usage {
        match running {
            Some(r) if self.is_empty() => r,
            _ => self,
        }
    }
}

/// The most windows a limits report keeps.
const MAX_WINDOWS: usize = 4;
/// The latest reset time believed (2100-01-01): later ones are noise.
const MAX_RESET: u64 = 4_102_444_800;

/// Where a user's subscription stands with its vendor, as the CLI reported
/// it: each usage window (e.g. `five_hour`, `seven_day`) with how much of
/// it is used and when it resets; `rejected` when the vendor refused the
/// request for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub windows: Vec<LimitWindow>,
    /// The vendor refused the request for a limit.
    pub rejected: bool,
    /// When the limit that applies resets (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<u64>,
}

/// One usage window of a subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitWindow {
    /// The vendor's name for it (`five_hour`, `seven_day`, …).
    pub name: String,
    /// How much of it is used, 0–100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_percent: Option<f64>,
    /// When it resets (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<u64>,
    /// The vendor's word for it (`allowed`, `allowed_warning`, `rejected`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A short vendor word (a window's name, a status) kept only if it is one:
/// lowercase letters, digits and `_`, at most 32.
fn word(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    (!s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    .then(|| s.to_owned())
}

/// A reset time worth showing: not before a day ago, not after 2100.
fn reset_time(v: &Value) -> Option<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    v.as_u64()
        .filter(|t| (now.saturating_sub(86_400)..=MAX_RESET).contains(t))
}

impl Limits {
    /// Claude Code's `rate_limit_event.rate_limit_info` (2.1.332, measured
    /// against a stand-in sending Anthropic's `anthropic-ratelimit-unified-*`
    /// headers): `status`, `resetsAt`, and `unifiedWindows` with each
    /// window's `utilization` (a fraction), `resetsAt` and `status`.
    fn from_claude(info: &Value) -> Option<Limits> {
        let status = word(&info["status"])?;
        let windows = info["unifiedWindows"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(name, w)| {
                Some(LimitWindow {
                    name: word(&Value::String(name.clone()))?,
                    used_percent: w["utilization"]
                        .as_f64()
                        .filter(|u| u.is_finite())
                        .map(|u| (u * 100.0).clamp(0.0, 100.0)),
                    resets_at: reset_time(&w["resetsAt"]),
                    status: word(&w["status"]),
                })
            })
            .take(MAX_WINDOWS)
            .collect();
        Some(Limits {
            windows,
            rejected: status == "rejected",
            resets_at: reset_time(&info["resetsAt"]),
        })
    }
}

/// A Unix time as people read it, in UTC (`2026-12-01 18:18 UTC`).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn usage(input: &Value, output: &Value) -> Usage {
    Usage {
        input_tokens: input.as_u64(),
        output_tokens: output.as_u64(),
        cost_usd: None,
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

    /// The defaults follow the vendors' terms for a multi-user
    /// installation; the operator's choice wins; `owner` is admins only.
    #[test]
    fn sign_in_policy_defaults_to_the_vendors_terms() {
        let default = SignInPolicy::default();
        assert!(default.check(Provider::ClaudeCode, true).is_err());
        assert!(default.check(Provider::GeminiCli, false).is_err());
        assert!(default.check(Provider::Codex, false).is_ok());
        let refusal = default.check(Provider::ClaudeCode, false).unwrap_err();
        assert!(refusal.to_string().contains("API key"), "{refusal}");
        assert!(refusal.to_string().contains(refusal.terms), "{refusal}");
        let owner = SignInPolicy {
            overrides: [(Provider::ClaudeCode, SubscriptionLogin::Owner)].into(),
        };
        assert!(owner.check(Provider::ClaudeCode, true).is_ok());
        let plain = owner.check(Provider::ClaudeCode, false).unwrap_err();
        assert!(plain.to_string().contains("admins"), "{plain}");
        let off = SignInPolicy {
            overrides: [(Provider::Codex, SubscriptionLogin::Off)].into(),
        };
        assert!(off.check(Provider::Codex, true).is_err());
        assert_eq!("owner".parse(), Ok(SubscriptionLogin::Owner));
        assert!("on".parse::<SubscriptionLogin>().is_err());
    }

    /// Every provider's CLI is pinned, and the registry finds its version.
    #[test]
    fn every_provider_has_a_pinned_version() {
        for p in Provider::ALL {
            let v = pinned_version(p).unwrap_or_else(|| panic!("{} is not pinned", p.as_str()));
            assert!(v.chars().next().is_some_and(|c| c.is_ascii_digit()), "{v}");
        }
        assert_eq!(pinned_packages().len(), Provider::ALL.len());
    }

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
            cost_usd: None,
        })
    }

    /// What each pinned CLI says when its provider answers HTTP 429
    /// (captured 2026-12-01 against a stand-in answering 429 to every
    /// call): Claude Code retries and says why, Codex gives up at once,
    /// Gemini CLI retries on its stderr; each reads as a rate limit.
    #[test]
    fn each_clis_rate_limit_words_read_as_a_rate_limit() {
        let claude = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code_429.jsonl"),
        );
        assert_eq!(
            claude.first(),
            Some(&Line::Retrying(
                "Anthropic answered HTTP 429 (rate_limit); retry 1 of 10 in 1 s".into()
            ))
        );
        assert!(claude
            .iter()
            .all(|l| matches!(l, Line::Retrying(m) if is_rate_limit(m))));
        let codex = read(Provider::Codex, include_str!("../fixtures/codex_429.jsonl"));
        match codex.last() {
            Some(Line::Failure(m)) => assert!(is_rate_limit(m), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(stderr_says_rate_limited(
            Provider::GeminiCli,
            include_str!("../fixtures/gemini_cli_429.stderr")
        ));
        assert!(!stderr_says_rate_limited(
            Provider::GeminiCli,
            "Attempt 1 failed with status 429. Retrying\nAttempt 2 failed with status 500. Retrying"
        ));
        let opencode = include_str!("../fixtures/opencode_429.stderr");
        assert!(stderr_says_rate_limited(Provider::OpenCode, opencode));
        assert!(!stderr_says_rate_limited(Provider::GeminiCli, opencode));
        for not in [
            "Invalid API key · Please run /login",
            "exit code 1",
            "HTTP 500",
            "a separate limit on accurate limits",
            "memory usage limit of 512 MiB",
            "HTTP 4290",
        ] {
            assert!(!is_rate_limit(not), "{not}");
        }
        assert!(is_rate_limit("Claude AI usage limit reached|1767225600"));
    }

    /// Streams captured from the pinned CLIs themselves (2026-12-01: Claude
    /// Code 2.1.332, Codex 0.171.0, Gemini CLI 0.61.0, each answering the
    /// loopback stand-in of its provider; machine paths replaced by the
    /// sandbox's home): what they read as, usage and Claude's cost
    /// included.
    #[test]
    fn streams_captured_from_the_pinned_clis_read_as_answer_and_usage() {
        let claude = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code_captured.jsonl"),
        );
        assert_eq!(claude.first(), Some(&Line::Delta("captured claude".into())));
        match claude.last() {
            Some(Line::Done(u)) => {
                assert_eq!((u.input_tokens, u.output_tokens), (Some(10), Some(5)));
                let cost = u.cost_usd.expect("Claude Code reports its cost");
                assert!(cost > 0.0 && cost < 0.01, "{cost}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read(
                Provider::Codex,
                include_str!("../fixtures/codex_captured.jsonl")
            ),
            vec![Line::Delta("captured codex".into()), done(10, 5)]
        );
        assert_eq!(
            read(
                Provider::GeminiCli,
                include_str!("../fixtures/gemini_cli_captured.jsonl")
            ),
            vec![Line::Delta("captured gemini".into()), done(20, 10)]
        );
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
        let base = "http://127.0.0.1:9";
        for p in Provider::ALL {
            let key = RunSetup {
                kind: CredentialKind::ApiKey,
                bases: ApiBases {
                    anthropic: Some(base),
                    openai: Some(base),
                    gemini: Some(base),
                    copilot: Some(base),
                    ..ApiBases::default()
                },
                deadline: Duration::from_secs(60),
                mode: None,
            };
            let (line, env) = run_command(p, &key);
            assert!(line.contains(CREDENTIAL_FILE), "{p:?}: {line}");
            assert!(
                env.iter()
                    .all(|(k, _)| !k.contains("KEY") || k.contains("HELPER")),
                "{p:?}: no key variable is passed in: {env:?}"
            );
            assert!(
                env.iter().any(|(_, v)| v.contains(base)) || line.contains(base),
                "{p:?}: the base URL reaches the CLI"
            );
            if info(p).sign_in {
                let login = RunSetup {
                    kind: CredentialKind::CliLogin,
                    ..key
                };
                let (line, _) = run_command(p, &login);
                assert!(
                    line.contains(&format!("mv -f {CREDENTIAL_FILE} {}", credential_file(p))),
                    "{p:?}: {line}"
                );
            }
        }
    }

    #[test]
    fn only_aws_region_names_are_regions() {
        for ok in ["us-east-1", "ap-southeast-2", "us-gov-west-1", "eu-west-3"] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            "--",
            "-x-",
            "us-east",
            "US-EAST-1",
            "us-east-1.evil.com",
            "us-east-1 ",
            "us--1",
            "usa-east-1",
            "us-east-+1",
        ] {
            assert!(!valid_region(bad), "{bad}");
        }
    }

    /// A cloud key runs Claude Code on Bedrock and Gemini CLI on Vertex AI:
    /// read from the unsealed file into the one variable each CLI reads
    /// (never passed in), with the region and endpoint beside it.
    #[test]
    fn a_cloud_key_runs_the_cli_on_its_cloud() {
        let how = RunSetup {
            kind: CredentialKind::CloudKey,
            bases: ApiBases {
                bedrock: Some("http://bedrock.test:1"),
                bedrock_region: "eu-west-3",
                vertex: Some("http://vertex.test:2"),
                ..ApiBases::default()
            },
            deadline: Duration::from_secs(60),
            mode: None,
        };
        let (line, env) = run_command(Provider::ClaudeCode, &how);
        for pair in [
            ("CLAUDE_CODE_USE_BEDROCK", "1"),
            ("AWS_REGION", "eu-west-3"),
            ("ANTHROPIC_BEDROCK_BASE_URL", "http://bedrock.test:1"),
        ] {
            assert!(
                env.contains(&(pair.0.into(), pair.1.into())),
                "{pair:?}: {env:?}"
            );
        }
        assert!(
            line.contains(&format!("< {CREDENTIAL_FILE})\"; rm -f {CREDENTIAL_FILE}; export AWS_BEARER_TOKEN_BEDROCK=\"$KEY\" CLAUDE_CODE_SUBPROCESS_ENV_SCRUB=1; unset KEY;")),
            "{line}"
        );
        let (line, env) = run_command(Provider::GeminiCli, &how);
        assert!(env.contains(&("GOOGLE_GENAI_USE_VERTEXAI".into(), "true".into())));
        assert!(env.contains(&(
            "GOOGLE_VERTEX_BASE_URL".into(),
            "http://vertex.test:2".into()
        )));
        assert!(line.contains(r#""selectedType":"vertex-ai""#), "{line}");
        assert!(line.contains("export GOOGLE_API_KEY=\"$KEY\""), "{line}");
        for (_, env) in [
            run_command(Provider::ClaudeCode, &how),
            run_command(Provider::GeminiCli, &how),
        ] {
            assert!(
                env.iter()
                    .all(|(k, _)| !k.contains("KEY") && !k.contains("TOKEN")),
                "{env:?}"
            );
        }
        assert!(Provider::ALL
            .iter()
            .all(|p| info(*p).cloud.is_some()
                == matches!(p, Provider::ClaudeCode | Provider::GeminiCli)));
    }

    /// Codex on a ChatGPT sign-in sends its tokens where ChatGPT is (the
    /// operator's `chatgpt_base_url`), never to the API base, and
    /// refreshes them where it is told.
    #[test]
    fn a_codex_sign_in_goes_to_chatgpt_never_to_the_api_base() {
        let api = "http://api.test:1/v1";
        let mut how = RunSetup {
            kind: CredentialKind::CliLogin,
            bases: ApiBases {
                openai: Some(api),
                ..ApiBases::default()
            },
            deadline: Duration::from_secs(60),
            mode: None,
        };
        let (line, env) = run_command(Provider::Codex, &how);
        assert!(
            !line.contains(api) && !line.contains("model_provider"),
            "{line}"
        );
        assert!(env
            .iter()
            .all(|(k, _)| k != "CODEX_REFRESH_TOKEN_URL_OVERRIDE"));
        how.bases.chatgpt = Some("http://chatgpt.test:2/v1");
        how.bases.openai_token = Some("http://auth.test:3/token");
        let (line, env) = run_command(Provider::Codex, &how);
        assert!(
            line.contains(r#"base_url="http://chatgpt.test:2/v1",wire_api="responses",requires_openai_auth=true"#),
            "{line}"
        );
        assert!(env.contains(&(
            "CODEX_REFRESH_TOKEN_URL_OVERRIDE".to_owned(),
            "http://auth.test:3/token".to_owned()
        )));
        // An API key run keeps the API base.
        how.kind = CredentialKind::ApiKey;
        let (line, env) = run_command(Provider::Codex, &how);
        assert!(
            line.contains(api) && !line.contains("chatgpt.test"),
            "{line}"
        );
        assert!(env
            .iter()
            .all(|(k, _)| k != "CODEX_REFRESH_TOKEN_URL_OVERRIDE"));
    }

    /// OpenCode's key picks its vendor in the sandbox; each vendor's
    /// configuration is JSON made here (the base URL quoted, the model
    /// in OpenCode's catalog).
    #[test]
    fn opencode_gets_one_configuration_per_vendor() {
        let how = RunSetup {
            kind: CredentialKind::ApiKey,
            bases: ApiBases {
                anthropic: Some("http://a.test:1"),
                openai: Some("http://o.test:2/v1"),
                gemini: Some("http://g.test:3"),
                ..ApiBases::default()
            },
            deadline: Duration::from_secs(60),
            mode: None,
        };
        let (line, env) = run_command(Provider::OpenCode, &how);
        let cfg = |name: &str| -> Value {
            serde_json::from_str(&env.iter().find(|(k, _)| k == name).unwrap().1).unwrap()
        };
        let a = cfg("POLYDEV_OC_ANTHROPIC");
        assert_eq!(a["model"], "anthropic/claude-sonnet-4-5");
        assert_eq!(
            a["provider"]["anthropic"]["options"]["baseURL"],
            "http://a.test:1/v1"
        );
        assert_eq!(
            cfg("POLYDEV_OC_GOOGLE")["provider"]["google"]["options"]["baseURL"],
            "http://g.test:3/v1beta"
        );
        assert_eq!(
            cfg("POLYDEV_OC_OPENAI")["provider"]["openai"]["options"]["baseURL"],
            "http://o.test:2/v1"
        );
        assert_eq!(a["share"], "disabled");
        assert!(
            line.contains("sk-ant-*)") && line.contains("AIza*)"),
            "{line}"
        );
        let (_, env) = run_command(
            Provider::OpenCode,
            &RunSetup {
                bases: ApiBases::default(),
                ..how
            },
        );
        assert!(
            env.iter().all(|(_, v)| !v.contains("baseURL")),
            "the vendors' own APIs: {env:?}"
        );
    }

    /// The real shell runs OpenCode's line (a stand-in `opencode` on PATH
    /// prints what it got): a key full of shell syntax stays data (its
    /// CR/LF dropped), reaches OpenCode through its pipe and is in no
    /// variable its tools would inherit, the pipe is gone after, a prompt
    /// that looks like options reaches the CLI after `--`, and a key of
    /// no known vendor stops before the CLI.
    #[test]
    fn hostile_keys_and_prompts_stay_data_in_the_real_shell() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("opencode");
        std::fs::write(
            &fake,
            "#!/bin/sh\nF=$(printf '%s' \"$OPENCODE_CONFIG_CONTENT\" | sed 's/.*{file:\\([^}]*\\)}.*/\\1/')\nprintf 'key=[%s] env=[%s]\\n' \"$(cat \"$F\")\" \"$(env | grep -c sk-ant)\"\nfor a in \"$@\"; do printf 'arg=[%s]\\n' \"$a\"; done\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |key: &str| {
            let cred = dir.path().join("credential");
            std::fs::write(&cred, key).unwrap();
            let how = RunSetup {
                kind: CredentialKind::ApiKey,
                bases: ApiBases::default(),
                deadline: Duration::from_secs(5),
                mode: None,
            };
            let (line, env) = run_command(Provider::OpenCode, &how);
            let pipe = dir.path().join("pipe");
            let here = |s: &str| {
                s.replace(CREDENTIAL_FILE, cred.to_str().unwrap())
                    .replace(OPENCODE_KEY_PIPE, pipe.to_str().unwrap())
            };
            let line = here(&line);
            let env: Vec<(String, String)> =
                env.iter().map(|(k, v)| (k.clone(), here(v))).collect();
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", &line])
                .current_dir(dir.path())
                .env_clear()
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                .envs(env)
                .env("POLYDEV_PROMPT", "--help $(touch pwned-prompt)")
                .output()
                .unwrap();
            assert!(!cred.exists(), "the credential file is gone");
            // Its writer removes it as soon as the key is read.
            let gone = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                !pipe.exists()
            });
            assert!(gone, "the key's pipe is gone");
            out
        };
        let key = "sk-ant-$(touch pwned)`touch pwned2`'\"; touch pwned3\r\n";
        let out = run(key);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("key=[sk-ant-$(touch pwned)`touch pwned2`'\"; touch pwned3] env=[0]"),
            "{stdout}"
        );
        assert!(
            stdout.ends_with("arg=[--]\narg=[--help $(touch pwned-prompt)]\n"),
            "{stdout}"
        );
        for f in ["pwned", "pwned2", "pwned3", "pwned-prompt"] {
            assert!(!dir.path().join(f).exists(), "{f}");
        }
        let out = run("github_pat_not_a_model_key");
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty(), "the CLI never ran");
        assert!(String::from_utf8_lossy(&out.stderr).contains("OpenCode takes an Anthropic"));
    }

    /// The two CLIs without a subscription sign-in here are never offered
    /// one, whatever the operator sets.
    #[test]
    fn a_cli_without_a_sign_in_is_never_offered_one() {
        let all = SignInPolicy {
            overrides: Provider::ALL
                .iter()
                .map(|p| (*p, SubscriptionLogin::All))
                .collect(),
        };
        for p in [Provider::OpenCode, Provider::Copilot] {
            assert!(!info(p).sign_in);
            assert!(all.check(p, true).is_err(), "{p:?}");
            assert_eq!(all.of(p), SubscriptionLogin::Off);
        }
        assert!(all.check(Provider::ClaudeCode, false).is_ok());
    }

    /// OpenCode 1.18.33 and Copilot CLI 1.0.102, captured 2026-12-01
    /// against loopback stand-ins (OpenCode on Anthropic's Messages API,
    /// Copilot on GitHub Copilot's API): answer, usage, cost; and what
    /// each says on HTTP 429 (Copilot stays up after its error: it gives
    /// up in the stream).
    #[test]
    fn opencode_and_copilot_streams_read_as_answer_usage_and_limits() {
        let oc = read(
            Provider::OpenCode,
            include_str!("../fixtures/opencode_captured.jsonl"),
        );
        assert_eq!(
            oc.first(),
            Some(&Line::Delta("hello from anthropic stub".into()))
        );
        match oc.last() {
            Some(Line::Done(u)) => {
                assert_eq!((u.input_tokens, u.output_tokens), (Some(10), Some(5)));
                assert!(u.cost_usd.is_some_and(|c| c > 0.0));
            }
            other => panic!("{other:?}"),
        }
        let oc = read(
            Provider::OpenCode,
            include_str!("../fixtures/opencode_429.jsonl"),
        );
        match oc.as_slice() {
            [Line::Failure(m)] => assert!(is_rate_limit(m), "{m}"),
            other => panic!("{other:?}"),
        }
        let cp = read(
            Provider::Copilot,
            include_str!("../fixtures/copilot_captured.jsonl"),
        );
        assert_eq!(
            cp,
            vec![
                Line::Delta("hello from copilot stub".into()),
                Line::Usage(Usage {
                    input_tokens: Some(10),
                    output_tokens: Some(5),
                    cost_usd: None
                }),
                Line::Done(Usage::default()),
            ]
        );
        let cp = read(
            Provider::Copilot,
            include_str!("../fixtures/copilot_429.jsonl"),
        );
        let (last, retries) = cp.split_last().unwrap();
        assert_eq!(retries.len(), 6, "{cp:?}");
        assert_eq!(
            retries[0],
            Line::Retrying("GitHub Copilot answered HTTP 429 (attempt 1)".into())
        );
        assert!(retries
            .iter()
            .all(|l| matches!(l, Line::Retrying(m) if is_rate_limit(m))));
        match last {
            Line::GaveUp(m) => assert!(is_rate_limit(m) && m.contains("HTTP 429"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// Claude Code 2.1.332 on a subscription token, against a stand-in
    /// sending Anthropic's `anthropic-ratelimit-unified-*` headers
    /// (captured 2026-12-01): the windows beside the answer; refused for
    /// the 5-hour window, the reset time, and its "You've hit your limit"
    /// line read as a failure, not as the answer.
    #[test]
    fn claude_code_reports_its_subscription_windows_and_when_a_limit_resets() {
        let ok = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code_limits.jsonl"),
        );
        let limits = ok
            .iter()
            .find_map(|l| match l {
                Line::Limits(l) => Some(l.clone()),
                _ => None,
            })
            .expect("a limits line");
        assert!(!limits.rejected);
        let five = limits
            .windows
            .iter()
            .find(|w| w.name == "five_hour")
            .unwrap();
        assert_eq!(five.used_percent, Some(82.0));
        assert_eq!(five.status.as_deref(), Some("allowed_warning"));
        assert!(five.resets_at.is_some());
        assert!(limits
            .windows
            .iter()
            .any(|w| w.name == "seven_day" && w.used_percent == Some(40.0)));
        assert_eq!(ok.first(), Some(&Line::Delta("hello".into())));
        assert!(matches!(ok.last(), Some(Line::Done(_))));

        let refused = read(
            Provider::ClaudeCode,
            include_str!("../fixtures/claude_code_limit_reached.jsonl"),
        );
        assert!(
            !refused.iter().any(|l| matches!(l, Line::Delta(_))),
            "{refused:?}"
        );
        match refused.first() {
            Some(Line::Limits(l)) => {
                assert!(l.rejected);
                assert_eq!(l.resets_at, Some(1_796_149_120));
            }
            other => panic!("{other:?}"),
        }
        assert!(refused
            .iter()
            .any(|l| matches!(l, Line::Failure(m) if m.contains("5-hour limit"))));
        assert_eq!(utc(1_796_149_120), "2026-12-01 18:18 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
    }

    /// What a hostile stream puts in a limits line is bounded: names and
    /// statuses that are not short vendor words go, percentages are 0–100,
    /// reset times past 2100 are dropped, at most four windows are kept.
    #[test]
    fn a_hostile_limits_line_is_bounded() {
        let windows: serde_json::Map<String, Value> = (0..50)
            .map(|i| {
                (
                    format!("w{i}"),
                    json!({"utilization": 1e9, "resetsAt": u64::MAX, "status": "<b>x</b>"}),
                )
            })
            .chain([("<script>".to_owned(), json!({"utilization": -5.0}))])
            .collect();
        let line = json!({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 99_999_999_999u64, "unifiedWindows": windows}});
        match normalise(Provider::ClaudeCode, &line.to_string()) {
            Some(Line::Limits(l)) => {
                assert_eq!(l.windows.len(), MAX_WINDOWS);
                assert!(l.windows.iter().all(|w| w.name.starts_with('w')
                    && w.used_percent == Some(100.0)
                    && w.resets_at.is_none()
                    && w.status.is_none()));
                assert!(l.rejected);
                assert_eq!(l.resets_at, None);
            }
            other => panic!("{other:?}"),
        }
        // Nor a reset long past ("try again after 1970" says nothing).
        let past = json!({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 5}});
        match normalise(Provider::ClaudeCode, &past.to_string()) {
            Some(Line::Limits(l)) => assert_eq!(l.resets_at, None),
            other => panic!("{other:?}"),
        }
        let no_status = json!({"type": "rate_limit_event", "rate_limit_info": {"status": "x y"}});
        assert_eq!(
            normalise(Provider::ClaudeCode, &no_status.to_string()),
            None
        );
    }

    /// Only a limit makes Copilot CLI's error final; any other is a
    /// failure its exit ends.
    #[test]
    fn copilot_gives_up_only_on_a_limit() {
        let query = r#"{"type":"session.error","data":{"errorType":"query","message":"Execution failed: 404 Not Found","statusCode":404}}"#;
        assert_eq!(
            normalise(Provider::Copilot, query),
            Some(Line::Failure(
                "GitHub Copilot answered HTTP 404: Execution failed: 404 Not Found".into()
            ))
        );
    }

    #[test]
    fn usage_adds_up_over_steps_and_falls_back_to_the_running_total() {
        let step = |i, o, c| Usage {
            input_tokens: Some(i),
            output_tokens: Some(o),
            cost_usd: c,
        };
        assert_eq!(
            step(1, 2, Some(0.5)).plus(step(3, 4, None)),
            step(4, 6, Some(0.5))
        );
        assert_eq!(
            Usage::default().or_running(Some(step(1, 1, None))),
            step(1, 1, None)
        );
        assert_eq!(
            step(2, 2, None).or_running(Some(step(1, 1, None))),
            step(2, 2, None)
        );
        assert_eq!(Usage::default().or_running(None), Usage::default());
        let huge = step(u64::MAX, 1, None).plus(step(5, 1, None));
        assert_eq!(huge.input_tokens, Some(u64::MAX), "saturates");
    }

    #[test]
    fn every_cli_signs_in_into_its_credential_file_and_gemini_has_no_code_mode() {
        let c = login_commands();
        let signing_in: Vec<Provider> = Provider::ALL
            .into_iter()
            .filter(|p| info(*p).sign_in)
            .collect();
        assert_eq!(c.keys().copied().collect::<Vec<_>>(), signing_in);
        for p in signing_in {
            assert_eq!(c[&p].credential_file, credential_file(p), "{p:?}");
            assert!(credential_file(p).starts_with("/home/sandbox/"), "{p:?}");
        }
        assert!(c[&Provider::GeminiCli].code.is_none());
        assert!(c[&Provider::ClaudeCode].code.is_some() && c[&Provider::Codex].code.is_some());
    }
}
