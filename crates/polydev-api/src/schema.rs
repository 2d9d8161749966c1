//! Request-body schemas that state what the handlers check: the byte
//! shapes of base64 key material, names and enums, the bounds of every
//! number and map. Patterns are computed from the same constants the
//! handlers use, and unit-tested against the decoders, so a client
//! generated from the document (or a fuzzer) sends what the server takes.
//!
//! Where a limit is in bytes and JSON Schema counts characters, the schema
//! states the character count that always fits (a quarter: UTF-8 takes at
//! most four bytes a character) and the description says the byte limit.

use polydev_domain::Provider;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use crate::limits::{
    MAX_ARG_BYTES, MAX_ENV_NAME_BYTES, MAX_ENV_VALUE_BYTES, MAX_ENV_VARS, MAX_EXEC_ARGS,
    WRAPPED_KEY_LEN,
};

const B64_CHAR: &str = "[A-Za-z0-9+/]";

/// The regex body (no anchors) for canonical padded standard base64 of
/// exactly `n` bytes (the decoder rejects non-zero trailing bits).
pub(crate) fn b64_exact(n: usize) -> String {
    let (groups, rem) = (n / 3, n % 3);
    let mut p = if groups > 0 {
        format!("{B64_CHAR}{{{}}}", groups * 4)
    } else {
        String::new()
    };
    match rem {
        1 => p.push_str(&format!("{B64_CHAR}[AQgw]==")),
        2 => p.push_str(&format!("{B64_CHAR}{{2}}[AEIMQUYcgkosw048]=")),
        _ => {}
    }
    p
}

/// The regex body for canonical base64 of `min` bytes or more.
pub(crate) fn b64_at_least(min: usize) -> String {
    const TAIL: &str = "(?:[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=|[A-Za-z0-9+/][AQgw]==)";
    let (groups, rem) = (min / 3, min % 3);
    let more = format!("(?:{B64_CHAR}{{4}})+{TAIL}?");
    let rest = match rem {
        0 => format!("(?:{more}|{TAIL})?"),
        // Exactly `groups` groups are one or two bytes short: a tail of
        // at least `rem` bytes, or another group.
        1 => format!("(?:{more}|{TAIL})"),
        _ => format!("(?:{more}|{B64_CHAR}{{2}}[AEIMQUYcgkosw048]=)"),
    };
    format!("(?:{B64_CHAR}{{4}}){{{groups}}}{rest}")
}

/// The base64 text of an envelope header (magic, format version, kind):
/// three bytes, so four characters every envelope of that kind starts with.
pub(crate) fn envelope_prefix(kind_byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([
        polydev_vault::MAGIC,
        polydev_vault::FORMAT_VERSION,
        kind_byte,
    ])
}

fn string(pattern: String, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!("^{pattern}$")))
        .description(Some(description))
}

/// Base64 of the 32-byte login credential.
pub(crate) fn login_credential() -> Schema {
    string(
        b64_exact(32),
        "Base64 of the 32-byte login credential the client derives (docs/VAULT.md).",
    )
    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
        utoipa::openapi::KnownFormat::Password,
    )))
    .into()
}

pub(crate) fn salt() -> Schema {
    string(b64_exact(16), "16 random bytes, base64.").into()
}

/// A wrapped key (vault key: kind 2, sealing key: kind 3), fixed size.
pub(crate) fn wrapped_key_2() -> Schema {
    wrapped_key(
        2,
        "The vault key wrapped by the key-wrapping key (envelope kind 2, 63 bytes), base64.",
    )
}

pub(crate) fn wrapped_key_3() -> Schema {
    wrapped_key(
        3,
        "The sealing private key wrapped by the vault key (envelope kind 3, 63 bytes), base64.",
    )
}

fn wrapped_key(kind: u8, description: &str) -> Schema {
    string(
        format!(
            "{}{}",
            envelope_prefix(kind),
            b64_exact(WRAPPED_KEY_LEN - 3)
        ),
        description,
    )
    .into()
}

/// A 65-byte uncompressed P-256 point (0x04, then x and y). Whether the
/// point is on the curve is checked by the server (`invalid_public_key`);
/// no schema can say it.
pub(crate) fn public_key() -> Schema {
    // 0x04 puts `B` first and one of A–P second.
    string(
        format!("B[A-P]{B64_CHAR}{{2}}{}", b64_exact(65 - 3)),
        "The sealing public key: a 65-byte uncompressed P-256 point, base64 (400 `invalid_public_key` when it is not on the curve).",
    )
    .into()
}

/// A vault item envelope (kind 1): header, nonce and tag at least, at most
/// `max_bytes`.
pub(crate) fn item_envelope(max_bytes: usize) -> Schema {
    string(
        format!("{}{}", envelope_prefix(1), b64_at_least(12 + 16)),
        "The item envelope (kind 1), standard base64: at least 31 bytes (header, nonce, tag), at most 256 KiB (the schema's length allows 262 143 bytes: base64 rounds).",
    )
    .max_length(Some(max_bytes / 3 * 4))
    .into()
}

/// A sealed credential box (HPKE), base64; whether it opens is the
/// sandbox's to say.
pub(crate) fn sealed_box() -> Schema {
    string(b64_at_least(1), "An HPKE box, standard base64.")
        .max_length(Some(64 * 1024))
        .into()
}

/// A UUID as the server parses it (hyphenated, either case).
pub(crate) fn uuid() -> Schema {
    string(
        "[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}".into(),
        "A UUID.",
    )
    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
        utoipa::openapi::KnownFormat::Uuid,
    )))
    .into()
}

pub(crate) fn optional_uuid() -> Schema {
    let mut s: Schema = uuid();
    if let Schema::Object(o) = &mut s {
        o.schema_type = utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]);
    }
    s
}

/// The shape `Email::parse` takes, kept to ASCII so its 254-byte limit is
/// a character limit: a name, one `@`, a dotted host name.
pub(crate) fn email() -> Schema {
    const LABEL: &str = "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?";
    string(
        format!("[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]+@{LABEL}(?:\\.{LABEL})+"),
        "An email address (at most 254 characters; compared in lower case).",
    )
    .max_length(Some(polydev_domain::Email::MAX_LEN))
    .examples(["ada@example.com"])
    .into()
}

fn enumeration<I: IntoIterator<Item = &'static str>>(
    values: I,
    description: &str,
) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .description(Some(description))
}

pub(crate) fn provider() -> Schema {
    enumeration(Provider::ALL.map(|p| p.as_str()), "A provider (CLI).").into()
}

pub(crate) fn providers() -> Schema {
    ArrayBuilder::new()
        .items(RefOr::T(provider()))
        .max_items(Some(Provider::ALL.len() * 4))
        .description(Some("Providers to run (default: all; repeats count once)."))
        .into()
}

pub(crate) fn login_mode() -> Schema {
    let mut s: Schema = enumeration(
        ["browser", "code"],
        "`browser` (default: a streamed remote browser) or `code` (code relay); which a provider offers is in `/api/auth/providers` (400 `invalid_login_request` otherwise).",
    )
    .into();
    if let Schema::Object(o) = &mut s {
        o.schema_type = utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]);
        if let Some(e) = &mut o.enum_values {
            e.push(serde_json::Value::Null);
        }
    }
    s
}

/// Provider → base64 HPKE box.
pub(crate) fn credential_boxes() -> Schema {
    ObjectBuilder::new()
        .property_names(Some(provider()))
        .additional_properties(Some(sealed_box()))
        .max_properties(Some(Provider::ALL.len()))
        .description(Some("Provider → base64 HPKE box of its credential, sealed to that sandbox's `publicKey` with info `polydev/run-credential/v1` and aad `<runId>/<provider>`."))
        .into()
}

/// Provider → credential kind.
pub(crate) fn credential_kinds() -> Schema {
    ObjectBuilder::new()
        .property_names(Some(provider()))
        .additional_properties(Some(enumeration(["api_key", "cli_login", "subscription_token", "cloud_key"], "")))
        .max_properties(Some(Provider::ALL.len()))
        .description(Some("Provider → `api_key` (default) or `cli_login`: the box holds the CLI's credential file from a login session (the vault item `credential.<provider>`); it is sealed back to you after the run; or `subscription_token`: a long-lived subscription token (Claude Code's `claude setup-token`), where the sign-in policy offers it to you; or `cloud_key`: a cloud account's key (Claude Code: an Amazon Bedrock API key; Gemini CLI: a Vertex AI API key)."))
        .into()
}

/// What Rust's `trim` takes away (Unicode White_Space), spelled out: a
/// schema's `\s` is ECMAScript's, which differs (U+0085).
const WHITE_SPACE: &str =
    "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

/// A run's prompt: something besides white space, no NUL (it becomes a
/// process argument), at most 100 000 bytes.
pub(crate) fn prompt() -> Schema {
    string(
        format!("[^\\x00]*[^\\x00{WHITE_SPACE}][^\\x00]*"),
        "The prompt: at most 100 000 bytes of UTF-8 (25 000 characters always fit), not only white space, no NUL.",
    )
    .max_length(Some(polydev_sessions::runs::MAX_PROMPT_BYTES / 4))
    .into()
}

/// The code a provider showed: printable, not blank, at most 4096 bytes.
pub(crate) fn login_code() -> Schema {
    string(
        format!("[^\\x00-\\x1f\\x7f-\\x9f]*[^\\x00-\\x1f\\x7f-\\x9f{WHITE_SPACE}][^\\x00-\\x1f\\x7f-\\x9f]*"),
        "The code the provider showed after sign-in: printable, at most 4096 bytes (1024 characters always fit).",
    )
    .max_length(Some(1024))
    .into()
}

/// Environment variables: names without `=` or NUL, values without NUL.
pub(crate) fn env() -> Schema {
    ObjectBuilder::new()
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^=\\x00]+$"))
                .max_length(Some(MAX_ENV_NAME_BYTES / 4)),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^\\x00]*$"))
                .max_length(Some(MAX_ENV_VALUE_BYTES / 4)),
        ))
        .max_properties(Some(MAX_ENV_VARS))
        .description(Some("Environment variables: at most 128; names ≤ 256 bytes without `=` or NUL, values ≤ 64 KiB without NUL."))
        .into()
}

/// The label names the controller keeps for itself, as a pattern that
/// refuses exactly them.
pub(crate) fn unreserved_label() -> String {
    format!("^(?!(?:{})$)", polydev_sandbox::RESERVED_LABELS.join("|"))
}

/// Labels: at most 16; keys ≤ 64 and values ≤ 256 bytes; the controller's
/// own keys (`RESERVED_LABELS`) are refused.
pub(crate) fn labels() -> Schema {
    ObjectBuilder::new()
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(unreserved_label()))
                .max_length(Some(16)),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(64)),
        ))
        .max_properties(Some(16))
        .description(Some("Labels: at most 16; keys ≤ 64 bytes (16 characters always fit) and values ≤ 256 bytes (64 characters); `system`, `run`, `login`, `pool`, `provider` and `purpose` are the controller's own."))
        .into()
}

/// A command: a program and its arguments, none empty, no NUL.
pub(crate) fn command() -> Schema {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^\\x00]+$"))
                .max_length(Some(MAX_ARG_BYTES / 4)),
        )
        .min_items(Some(1))
        .max_items(Some(MAX_EXEC_ARGS))
        .description(Some("Program and arguments: at most 4096, none empty or containing NUL, each at most 131 071 bytes (the kernel's limit; 32 767 characters always fit)."))
        .examples([serde_json::json!(["sh", "-c", "echo hi"])])
        .into()
}

/// The key-derivation parameters, with the floors `KdfParams::check`
/// enforces (weaker ones are refused: 400 `weak_kdf`).
pub(crate) fn kdf() -> Schema {
    let int = |min: u32| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(min))
            .maximum(Some(u32::MAX))
    };
    let pbkdf2 = ObjectBuilder::new()
        .property("algorithm", enumeration(["pbkdf2-sha256"], ""))
        .property("iterations", int(polydev_vault::MIN_PBKDF2_ITERATIONS))
        .required("algorithm")
        .required("iterations")
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ));
    let argon2 = ObjectBuilder::new()
        .property("algorithm", enumeration(["argon2id"], ""))
        .property("memoryKib", int(polydev_vault::MIN_ARGON2_MEMORY_KIB))
        .property("iterations", int(polydev_vault::MIN_ARGON2_ITERATIONS))
        .property("parallelism", int(1))
        .required("algorithm")
        .required("memoryKib")
        .required("iterations")
        .required("parallelism")
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ));
    OneOfBuilder::new()
        .item(pbkdf2)
        .item(argon2)
        .description(Some("How the key-wrapping key is derived from the password (PBKDF2-SHA256 ≥ 600 000 iterations, or Argon2id ≥ 19 MiB and 2 passes)."))
        .into()
}

/// An unsigned integer field with bounds (`null` allowed: the default).
pub(crate) fn bounded(min: u64, max: u64, description: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Integer,
            Type::Null,
        ]))
        .minimum(Some(min))
        .maximum(Some(max))
        .description(Some(description))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn matches(pattern: &str, text: &str) -> bool {
        regex_lite::Regex::new(&format!("^{pattern}$"))
            .unwrap()
            .is_match(text)
    }

    fn pattern_of(s: &Schema) -> String {
        match s {
            Schema::Object(o) => o
                .pattern
                .clone()
                .unwrap()
                .trim_start_matches('^')
                .trim_end_matches('$')
                .to_owned(),
            _ => panic!("not an object schema"),
        }
    }

    /// The patterns take exactly what the decoder and the shape checks
    /// take: every length's encodings of random bytes match `b64_exact`,
    /// no other length does, and a non-canonical last character does not.
    #[test]
    fn base64_patterns_match_the_decoder() {
        let b64 = base64::engine::general_purpose::STANDARD;
        for n in 1..70usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + n * 11) as u8).collect();
            let text = b64.encode(&bytes);
            assert!(matches(&b64_exact(n), &text), "{n} bytes: {text}");
            assert!(!matches(&b64_exact(n + 1), &text), "{n} bytes matched n+1");
            if n % 3 != 0 {
                // Flip the low bits of the last data character: the decoder
                // refuses it, so the pattern must too.
                let mut chars: Vec<char> = text.chars().collect();
                let last = chars.iter().rposition(|c| *c != '=').unwrap();
                chars[last] = if chars[last] == 'B' { 'C' } else { 'B' };
                let odd: String = chars.into_iter().collect();
                assert_eq!(
                    b64.decode(&odd).is_ok(),
                    matches(&b64_exact(n), &odd),
                    "{odd}"
                );
            }
        }
    }

    /// `b64_at_least(n)` takes every length from `n` up and none below.
    #[test]
    fn at_least_patterns_take_exactly_the_lengths_from_their_minimum() {
        let b64 = base64::engine::general_purpose::STANDARD;
        for min in [1usize, 27, 28, 29, 30] {
            for n in 0..40usize {
                let text = b64.encode(vec![0xA5u8; n]);
                assert_eq!(
                    matches(&b64_at_least(min), &text),
                    n >= min,
                    "min {min}, {n} bytes"
                );
            }
        }
    }

    /// The template enum in the document is the list of templates.
    #[test]
    fn the_template_schema_lists_the_templates() {
        use utoipa::PartialSchema;
        let s = serde_json::to_value(crate::routes::sandboxes::Template::schema()).unwrap();
        let listed: Vec<&str> = s["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(listed, polydev_sandbox::build::TEMPLATES);
    }

    #[test]
    fn key_material_patterns_take_real_keys() {
        let e = polydev_vault::Enrollment::new(
            &secrecy::SecretString::from("a password".to_owned()),
            "00000000-0000-4000-8000-000000000000",
        )
        .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        assert!(matches(&pattern_of(&salt()), &b64.encode(e.spec.salt)));
        assert!(matches(
            &pattern_of(&wrapped_key_2()),
            &b64.encode(&e.wrapped_vault_key)
        ));
        assert!(matches(
            &pattern_of(&wrapped_key_3()),
            &b64.encode(&e.wrapped_private_key)
        ));
        assert!(!matches(
            &pattern_of(&wrapped_key_2()),
            &b64.encode(&e.wrapped_private_key)
        ));
        assert!(matches(
            &pattern_of(&public_key()),
            &b64.encode(&e.public_key)
        ));
        assert!(matches(
            &pattern_of(&login_credential()),
            &b64.encode(e.login_credential.as_bytes())
        ));
    }

    #[test]
    fn email_pattern_only_takes_what_email_parse_takes() {
        let p = pattern_of(&email());
        for ok in ["ada@example.com", "a.b+c@x-y.example.org", "Z@A.B"] {
            assert!(matches(&p, ok), "{ok}");
            assert!(polydev_domain::Email::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ada",
            "@x.com",
            "a@b",
            "a@-b.com",
            "a@b-.com",
            "a@@b.com",
            "a b@c.com",
        ] {
            assert!(!matches(&p, bad), "{bad}");
        }
    }
}
