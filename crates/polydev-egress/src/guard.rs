//! Where traffic may go: the built-in deny of loopback, private, link-local
//! and other non-public ranges (checked on the addresses a name resolves
//! to, and the connection made to exactly that address, so DNS rebinding
//! cannot slip through), operator exceptions, and per-template host
//! allow-lists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::config::PolicyConfig;

/// Ranges no sandbox may reach unless an operator exception says so.
const DENIED: [&str; 20] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    // Site-local (deprecated, still routed on some networks), Teredo
    // (tunnels to any IPv4), documentation, discard.
    "fec0::/10",
    "2001::/32",
    "2001:db8::/32",
    "100::/64",
    "ff00::/8",
];

/// Why a destination was refused or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("destination {0} is in a private or reserved range")]
    Denied(IpAddr),
    #[error("destination {0} is this host")]
    Host(IpAddr),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("cannot connect to {target}: {source}")]
    Refused {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Guard {
    denied: Vec<IpNet>,
    exceptions: Vec<IpNet>,
    /// The operator's own denials; they beat the exceptions.
    always_denied: Vec<IpNet>,
    /// Names resolved here before DNS (lower case).
    hosts: std::collections::HashMap<String, IpAddr>,
    /// This host's own addresses (any interface): services listening on
    /// 0.0.0.0 are reachable on them, public or not.
    own: std::sync::Arc<std::sync::RwLock<Vec<IpAddr>>>,
}

/// The addresses of this host's interfaces.
pub fn host_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    let sa = a.address?;
                    if let Some(v4) = sa.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Guard {
    /// `exceptions` are CIDRs (or single addresses) from operator config.
    pub fn new(exceptions: &[String]) -> Result<Self, String> {
        let denied = DENIED
            .iter()
            .map(|c| c.parse::<IpNet>().map_err(|e| format!("{c}: {e}")))
            .collect::<Result<_, _>>()?;
        let exceptions = exceptions
            .iter()
            .map(|c| {
                c.parse::<IpNet>()
                    .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("allow_private entry {c:?} is not a CIDR or IP address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            denied,
            exceptions,
            always_denied: Vec::new(),
            hosts: Default::default(),
            own: std::sync::Arc::new(std::sync::RwLock::new(host_addresses())),
        })
    }

    /// Adds the operator's `deny` CIDRs (or single addresses).
    pub fn with_denied(mut self, deny: &[String]) -> Result<Self, String> {
        self.always_denied = deny
            .iter()
            .map(|c| {
                c.parse::<IpNet>()
                    .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("deny entry {c:?} is not a CIDR or IP address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Reads this host's addresses again (interfaces come and go).
    pub fn refresh_host_addresses(&self) {
        let now = host_addresses();
        if let Ok(mut own) = self.own.write() {
            *own = now;
        }
    }

    /// Sets the host's addresses (tests).
    pub fn with_host_addresses(self, addrs: Vec<IpAddr>) -> Self {
        if let Ok(mut own) = self.own.write() {
            *own = addrs;
        }
        self
    }

    /// Why `ip` may not be reached, or `None` when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<ConnectError> {
        let ip = canonical(ip);
        if self.always_denied.iter().any(|n| n.contains(&ip)) {
            return Some(ConnectError::Denied(ip));
        }
        if self.exceptions.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        if self.is_denied(ip) {
            return Some(ConnectError::Denied(ip));
        }
        let own = self
            .own
            .read()
            .map(|o| o.iter().any(|a| canonical(*a) == ip))
            .unwrap_or(true);
        own.then_some(ConnectError::Host(ip))
    }

    /// Adds names the guard resolves itself (`[egress] hosts`).
    pub fn with_hosts(mut self, hosts: &std::collections::BTreeMap<String, IpAddr>) -> Self {
        self.hosts = hosts
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), *v))
            .collect();
        self
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        match self.hosts.get(&host.to_ascii_lowercase()) {
            Some(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
            None => resolve(host, port).await,
        }
    }

    /// True when `ip` may not be reached.
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.exceptions.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if let IpAddr::V6(v6) = ip {
            // NAT64 and 6to4 can carry any IPv4 address: not public targets.
            let seg = v6.segments();
            if (seg[0] == 0x64 && seg[1] == 0xff9b) || seg[0] == 0x2002 {
                return true;
            }
        }
        self.denied.iter().any(|n| n.contains(&ip))
    }

    /// Resolves `host` and connects to the first allowed address within
    /// `deadline`. Never connects to a denied address.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        deadline: Duration,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let target = format!("{host}:{port}");
        let work = async {
            let addrs = self.resolve(host, port).await?;
            if addrs.is_empty() {
                return Err(ConnectError::Resolve(host.to_owned()));
            }
            let mut last = None;
            let mut denied = None;
            for addr in addrs {
                if let Some(why) = self.refusal(addr.ip()) {
                    denied.get_or_insert(why);
                    continue;
                }
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => last = Some(e),
                }
            }
            match (last, denied) {
                (Some(source), _) => Err(ConnectError::Refused {
                    target: target.clone(),
                    source,
                }),
                (None, Some(why)) => Err(why),
                (None, None) => Err(ConnectError::Resolve(host.to_owned())),
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| ConnectError::Timeout(target.clone()))?
    }
}

impl Guard {
    /// Resolves `host` to its first allowed address without connecting
    /// (for chaining: the upstream proxy is told this exact address).
    pub async fn resolve_allowed(
        &self,
        host: &str,
        port: u16,
        deadline: Duration,
    ) -> Result<SocketAddr, ConnectError> {
        let work = async {
            let addrs = self.resolve(host, port).await?;
            let first_denied = addrs.first().and_then(|a| self.refusal(a.ip()));
            match addrs.into_iter().find(|a| self.refusal(a.ip()).is_none()) {
                Some(addr) => Ok(addr),
                None => Err(first_denied.unwrap_or_else(|| ConnectError::Resolve(host.to_owned()))),
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| ConnectError::Timeout(format!("{host}:{port}")))?
    }
}

/// Every address `host` stands for (an IP literal is itself).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
    match parse_ip_literal(host) {
        Some(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        None => tokio::net::lookup_host((host, port))
            .await
            .map(|a| a.collect())
            .map_err(|_| ConnectError::Resolve(host.to_owned())),
    }
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses are checked as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                if s[..6] == [0, 0, 0, 0, 0, 0]
                    && v6 != Ipv6Addr::UNSPECIFIED
                    && v6 != Ipv6Addr::LOCALHOST
                {
                    let [a, b] = s[6].to_be_bytes();
                    let [c, d] = s[7].to_be_bytes();
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

/// `1.2.3.4`, `[::1]` or `::1` as an address; names return `None` (the
/// resolver also turns forms like `2130706433` into addresses, which are
/// then checked like any other).
fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Lower-case, without a trailing dot or IPv6 brackets.
pub fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// True when `policy` lets `host` through (no policy: any host).
pub fn host_allowed(policy: Option<&PolicyConfig>, host: &str) -> bool {
    let Some(policy) = policy else {
        return true;
    };
    let host = normalize_host(host);
    policy.allow_hosts.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        if pattern == "*" {
            true
        } else if let Some(suffix) = pattern.strip_prefix("*.") {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host[..host.len() - suffix.len()].ends_with('.')
        } else {
            host == pattern
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_reserved_ranges_are_denied_in_every_spelling() {
        let guard = Guard::new(&[]).unwrap();
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
        ] {
            assert!(guard.is_denied(ip.parse().unwrap()), "{ip} allowed");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(!guard.is_denied(ip.parse().unwrap()), "{ip} denied");
        }
    }

    #[test]
    fn this_host_s_own_addresses_are_refused_even_when_public() {
        let guard = Guard::new(&[]).unwrap().with_host_addresses(vec![
            "203.0.113.7".parse().unwrap(),
            "2606:4700::7".parse().unwrap(),
        ]);
        for ip in ["203.0.113.7", "::ffff:203.0.113.7", "2606:4700::7"] {
            assert!(
                matches!(
                    guard.refusal(ip.parse().unwrap()),
                    Some(ConnectError::Host(_))
                ),
                "{ip} allowed"
            );
        }
        assert!(guard.refusal("203.0.113.8".parse().unwrap()).is_none());
        // The real interfaces are learnt too (loopback at least).
        let real = Guard::new(&[]).unwrap();
        assert!(host_addresses().iter().any(|a| a.is_loopback()));
        assert!(real.refusal("127.0.0.1".parse().unwrap()).is_some());
    }

    #[test]
    fn the_operator_s_denials_beat_every_exception() {
        let guard = Guard::new(&["127.0.0.0/8".into()])
            .unwrap()
            .with_denied(&["127.0.0.9".into(), "198.51.100.0/24".into()])
            .unwrap();
        assert!(guard.refusal("127.0.0.1".parse().unwrap()).is_none());
        assert!(guard.refusal("127.0.0.9".parse().unwrap()).is_some());
        assert!(guard.refusal("198.51.100.20".parse().unwrap()).is_some());
        assert!(Guard::new(&[]).unwrap().with_denied(&["x".into()]).is_err());
    }

    #[test]
    fn exceptions_open_exactly_their_range() {
        let guard = Guard::new(&["127.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(!guard.is_denied("127.0.0.1".parse().unwrap()));
        assert!(!guard.is_denied("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!guard.is_denied("::1".parse().unwrap()));
        assert!(guard.is_denied("10.0.0.1".parse().unwrap()));
        assert!(Guard::new(&["nope".into()]).is_err());
    }

    #[test]
    fn allow_lists_match_exact_hosts_and_subdomains() {
        let policy = PolicyConfig {
            allow_hosts: vec!["api.anthropic.com".into(), "*.googleapis.com".into()],
        };
        assert!(host_allowed(Some(&policy), "API.Anthropic.com."));
        assert!(host_allowed(
            Some(&policy),
            "generativelanguage.googleapis.com"
        ));
        assert!(!host_allowed(Some(&policy), "googleapis.com"));
        assert!(!host_allowed(Some(&policy), "evilgoogleapis.com"));
        assert!(!host_allowed(Some(&policy), "api.anthropic.com.evil.test"));
        assert!(host_allowed(None, "anything.test"));
        assert!(host_allowed(
            Some(&PolicyConfig {
                allow_hosts: vec!["*".into()]
            }),
            "x.test"
        ));
    }

    #[tokio::test]
    async fn configured_hosts_resolve_before_dns_and_stay_guarded() {
        let hosts = [("Stub.Test".to_owned(), "127.0.0.1".parse().unwrap())].into();
        // Without an exception, the configured address is still denied.
        let guard = Guard::new(&[]).unwrap().with_hosts(&hosts);
        let err = guard
            .resolve_allowed("stub.test", 80, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Denied(_)), "{err:?}");
        let guard = Guard::new(&["127.0.0.0/8".into()])
            .unwrap()
            .with_hosts(&hosts);
        let addr = guard
            .resolve_allowed("STUB.test", 8080, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(addr, "127.0.0.1:8080".parse().unwrap());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_without_connecting() {
        let guard = Guard::new(&[]).unwrap();
        match guard.connect("localhost", 9, Duration::from_secs(5)).await {
            Err(ConnectError::Denied(ip)) => assert!(ip.is_loopback()),
            other => panic!("expected a denial, got {other:?}"),
        }
        match guard.connect("2130706433", 9, Duration::from_secs(5)).await {
            Err(ConnectError::Denied(ip)) => assert_eq!(ip, IpAddr::from([127, 0, 0, 1])),
            other => panic!("expected a denial for the decimal form, got {other:?}"),
        }
    }
}
