//! The outbound URL guard: every URL the system dials on a client's behalf
//! (webhooks today; reference images and media URLs with the image and
//! video jobs) goes through one HTTP client whose DNS resolver refuses
//! addresses a client must not reach: loopback, link-local, private, CGNAT,
//! multicast, unspecified, reserved, unique-local, and the IPv4-mapped /
//! NAT64 / 6to4 forms of those. The client connects to the address the
//! resolver checked (no second lookup) and follows no redirects. A URL whose
//! host is an address literal (`127.1`, `2130706433`, `0x7f000001`,
//! `[::ffff:127.0.0.1]` are all 127.0.0.1 once parsed) is checked before
//! the request, since no resolver sees it.
//!
//! `OUTBOUND_ALLOW` (comma-separated CIDRs and host names) lets an operator
//! allow an in-cluster receiver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// What an operator allows past the guard.
#[derive(Debug, Clone, Default)]
pub struct OutboundAllow {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    /// Only what is named is dialled: public addresses are refused too and
    /// other host names are not even resolved (`OUTBOUND_ALLOW_ONLY`, for
    /// closed networks and tests).
    only: bool,
}

impl OutboundAllow {
    /// Parses `OUTBOUND_ALLOW`: CIDRs (`10.0.0.0/8`, `::1/128`), bare
    /// addresses, and host names (allowed whatever they resolve to).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut allow = Self::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(net) = item.parse::<IpNet>() {
                allow.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                allow.nets.push(IpNet::from(ip));
            } else if item
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                allow.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "OUTBOUND_ALLOW: {item:?} is neither a CIDR, an address nor a host name"
                ));
            }
        }
        Ok(allow)
    }

    /// Refuse everything `OUTBOUND_ALLOW` does not name.
    pub fn only_named(mut self) -> Self {
        self.only = true;
        self
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Whether the guard lets a connection to `ip` through.
    pub fn permits(&self, ip: IpAddr) -> bool {
        (!self.only && is_public(ip)) || self.allows_ip(ip)
    }

    /// Whether a host name may be looked up at all.
    fn may_resolve(&self, host: &str) -> bool {
        !self.only || self.allows_host(host)
    }
}

/// Whether `ip` is an address on the public internet (what a client's URL
/// may reach without the operator's leave).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18/15
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // Forms that carry an IPv4 address: judged by that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) and IPv4-compatible (::a.b.c.d) addresses.
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || s[..6] == [0; 6] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(v4);
    }
    // 6to4 (2002::/16) embeds an IPv4 address in bits 16..48.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
        || (s[0] == 0x100 && s[1..4] == [0; 3])) // discard-only 100::/64
}

/// Why a URL was not dialled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    #[error("{0} is not a URL this service may call")]
    NotHttp(String),
    #[error("the address {0} is not public (loopback, private, link-local or reserved); an operator may allow it with OUTBOUND_ALLOW")]
    Address(IpAddr),
    #[error("{0} resolves only to addresses that are not public; an operator may allow it with OUTBOUND_ALLOW")]
    Host(String),
}

/// The guard: checks URLs before a request and resolves host names for
/// the client, keeping only the addresses it permits.
#[derive(Debug, Clone, Default)]
pub struct OutboundGuard {
    allow: Arc<OutboundAllow>,
}

impl OutboundGuard {
    pub fn new(allow: OutboundAllow) -> Self {
        Self {
            allow: Arc::new(allow),
        }
    }

    /// Checks `url` before it is dialled: http(s) only, and an address
    /// literal must be one the guard permits (a host name is checked when
    /// it is resolved).
    pub fn check_url(&self, url: &str) -> Result<reqwest::Url, Refused> {
        let parsed = reqwest::Url::parse(url).map_err(|_| Refused::NotHttp(redact_url(url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refused::NotHttp(redact_url(url)));
        }
        match parsed.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip))?,
            Some(url::Host::Domain(host)) if !self.allow.may_resolve(host) => {
                return Err(Refused::Host(host.to_string()))
            }
            Some(url::Host::Domain(_)) => {}
            None => return Err(Refused::NotHttp(redact_url(url))),
        }
        Ok(parsed)
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allow.permits(ip) {
            Ok(())
        } else {
            Err(Refused::Address(ip))
        }
    }

    /// An HTTP client for client-given URLs: this guard as its resolver, no
    /// redirects, `timeout` per request.
    pub fn client(&self, timeout: std::time::Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(self.clone()))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
    }
}

impl reqwest::dns::Resolve for OutboundGuard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            if !guard.allow.may_resolve(&host) {
                return Err(
                    Box::new(Refused::Host(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed_host = guard.allow.allows_host(&host);
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| allowed_host || guard.allow.permits(a.ip()))
                .collect();
            if kept.is_empty() {
                tracing::warn!(host, "outbound call refused: no public address");
                return Err(
                    Box::new(Refused::Host(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// `url` without its user info and query (where tokens live), for logs and
/// for what a client is shown.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_non_public_range_is_refused_and_public_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(bad)), "{bad} must be refused");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(good)), "{good} is public");
        }
    }

    #[test]
    fn address_literals_in_every_spelling_are_checked_before_dialling() {
        let guard = OutboundGuard::default();
        for url in [
            "http://127.0.0.1/cb",
            "http://127.1/cb",
            "http://2130706433/cb",
            "http://0x7f000001/cb",
            "http://0177.0.0.1/cb",
            "http://[::ffff:127.0.0.1]/cb",
            "http://[::1]:8080/cb",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            assert!(
                matches!(guard.check_url(url), Err(Refused::Address(_))),
                "{url}"
            );
        }
        assert!(matches!(
            guard.check_url("ftp://example.com/"),
            Err(Refused::NotHttp(_))
        ));
        assert!(guard.check_url("https://example.com/hook").is_ok());
        // The operator's allow list opens exactly what it names.
        let allowed = OutboundGuard::new(OutboundAllow::parse("127.0.0.0/8, ::1").unwrap());
        assert!(allowed.check_url("http://127.1/cb").is_ok());
        assert!(allowed.check_url("http://[::1]/cb").is_ok());
        assert!(allowed.check_url("http://10.0.0.1/cb").is_err());
        assert!(OutboundAllow::parse("10.0.0.0/8,receiver.svc.cluster.local").is_ok());
        assert!(OutboundAllow::parse("not a host!").is_err());
        // Only what is named: public addresses and unnamed hosts refused
        // before any lookup.
        let only = OutboundGuard::new(OutboundAllow::parse("127.0.0.0/8").unwrap().only_named());
        assert!(only.check_url("http://127.0.0.1/cb").is_ok());
        assert!(matches!(
            only.check_url("http://8.8.8.8/cb"),
            Err(Refused::Address(_))
        ));
        assert!(matches!(
            only.check_url("https://0.com/cb"),
            Err(Refused::Host(_))
        ));
    }

    #[test]
    fn redaction_drops_credentials_and_query() {
        assert_eq!(
            redact_url("https://user:pw@hooks.example.com/cb?token=s3cret#x"),
            "https://hooks.example.com/cb"
        );
    }
}
