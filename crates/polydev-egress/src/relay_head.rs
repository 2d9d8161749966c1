//! The head of a request a sandbox sends its egress relay, made safe to
//! forward to the proxy: parsed with httparse, any `Proxy-Authorization` it
//! carries replaced by the sandbox's own credential, and `Connection: close`
//! on plain-HTTP requests so each later request arrives on a new connection
//! and is rewritten too. The sandbox driver's relay calls this before it
//! dials the proxy.

/// What a relay's buffer holds so far.
pub enum Head {
    /// The rewritten head and whatever followed it.
    Complete(Vec<u8>),
    Partial,
    Invalid,
}

/// Never the bytes: a rewritten head carries the sandbox's credential.
impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Head::Complete(b) => write!(f, "Complete({} bytes)", b.len()),
            Head::Partial => f.write_str("Partial"),
            Head::Invalid => f.write_str("Invalid"),
        }
    }
}

/// The request head in `buf`, with any `Proxy-Authorization` the sandbox
/// sent replaced by `auth` (so a sandbox can only ever use its own
/// credential); for requests other than CONNECT also `Connection: close`,
/// so every later request arrives on a new connection and gets it too.
pub fn rewrite_head(buf: &[u8], auth: Option<&str>) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Invalid,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Head::Invalid;
    };
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let mut out = Vec::with_capacity(len + 128);
    out.extend_from_slice(format!("{method} {path} HTTP/1.{version}\r\n").as_bytes());
    for h in req.headers.iter() {
        let name = h.name;
        let drop = name.eq_ignore_ascii_case("proxy-authorization")
            || (!connect
                && ["connection", "proxy-connection", "keep-alive"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n)));
        if drop {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !connect {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    if let Some(auth) = auth {
        out.extend_from_slice(b"Proxy-Authorization: ");
        out.extend_from_slice(auth.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[len..]);
    Head::Complete(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(head: &str, auth: &str) -> String {
        match rewrite_head(head.as_bytes(), Some(auth)) {
            Head::Complete(b) => String::from_utf8(b).unwrap(),
            Head::Partial => panic!("partial"),
            Head::Invalid => panic!("invalid"),
        }
    }

    #[test]
    fn requests_get_the_sandbox_s_own_credential_and_close() {
        let get =
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nProxy-Connection: keep-alive\r\n\r\n";
        assert_eq!(
            rewritten(get, "Basic abc"),
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nProxy-Authorization: Basic abc\r\n\r\n"
        );
        let connect = "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\nTLS";
        assert_eq!(
            rewritten(connect, "Basic abc"),
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nProxy-Authorization: Basic abc\r\n\r\nTLS"
        );
    }

    #[test]
    fn a_credential_the_sandbox_presents_is_replaced_by_its_own() {
        let other = "GET http://a.test/ HTTP/1.1\r\nproxy-authorization: Basic another-sandbox\r\nPROXY-AUTHORIZATION: Basic x\r\n\r\n";
        let out = rewritten(other, "Basic mine");
        assert!(
            !out.contains("another-sandbox") && !out.contains("Basic x\r"),
            "{out}"
        );
        assert!(out.contains("Proxy-Authorization: Basic mine\r\n"), "{out}");
        assert!(matches!(
            rewrite_head(b"GET / HTTP/1.1\r\nHost: a", Some("x")),
            Head::Partial
        ));
        assert!(matches!(
            rewrite_head(b"\x00\x01 nonsense\r\n\r\n", Some("x")),
            Head::Invalid
        ));
    }
}
