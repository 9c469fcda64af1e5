//! What the local API lets in from web pages. Any page a user opens can send requests to
//! `127.0.0.1`; two rules keep it out unless the operator allows it:
//!
//! - **Origin**: a browser names the page's origin on cross-origin requests. One not in
//!   `[api] allowed_origins` is refused (403), and so is its CORS preflight; an allowed one gets
//!   the CORS headers. Native apps and command-line clients send no `Origin` and are not
//!   affected.
//! - **Host** (DNS rebinding: a page whose own name now resolves to 127.0.0.1): the `Host` must
//!   be `localhost` (or a name under `.localhost`) or an IP literal, with any port; any other
//!   name is refused (403).

use hyper::HeaderMap;
use hyper::header::{HOST, HeaderValue, ORIGIN};

/// Why a request was refused (403), in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    /// A web page from an origin the config does not allow.
    #[error("requests from origin {0:?} are not allowed (api.allowed_origins)")]
    Origin(String),
    /// A `Host` that is neither localhost nor an address.
    #[error("host {0:?} is not this device (use localhost or an IP address)")]
    Host(String),
    /// More than one `Host` header: RFC 9112 (section 3.2) makes that a bad request (400).
    #[error("the request has {0} Host headers; it must have one")]
    Hosts(usize),
}

impl Refused {
    /// Whether it is a malformed request (400) rather than a refused one (403).
    pub(crate) fn is_malformed(&self) -> bool {
        matches!(self, Refused::Hosts(_))
    }
}

/// The request's origin, when it has one and it is allowed; `Err` when it must be refused.
pub(crate) fn check(
    headers: &HeaderMap,
    allowed: &[String],
) -> Result<Option<HeaderValue>, Refused> {
    let hosts = headers.get_all(HOST).iter().count();
    if hosts > 1 {
        return Err(Refused::Hosts(hosts));
    }
    if let Some(host) = headers.get(HOST) {
        let text = host.to_str().unwrap_or_default();
        if !is_local_host(text) {
            return Err(Refused::Host(
                String::from_utf8_lossy(host.as_bytes()).into_owned(),
            ));
        }
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|a| a == text) {
        Ok(Some(origin.clone()))
    } else {
        Err(Refused::Origin(
            String::from_utf8_lossy(origin.as_bytes()).into_owned(),
        ))
    }
}

/// `localhost`, `*.localhost` or an IP literal (`127.0.0.1`, `[::1]`), each with an optional
/// port.
fn is_local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || valid_port(port) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn valid_port(port: &str) -> bool {
    port.strip_prefix(':')
        .unwrap_or(port)
        .parse::<u16>()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn two_host_headers_are_a_bad_request_whatever_they_say() {
        let mut h = HeaderMap::new();
        h.append(HOST, HeaderValue::from_static("127.0.0.1"));
        h.append(HOST, HeaderValue::from_static("evil.example"));
        let refused = check(&h, &[]).unwrap_err();
        assert_eq!(refused, Refused::Hosts(2));
        assert!(refused.is_malformed());
        assert!(!Refused::Host("evil.example".into()).is_malformed());
    }

    #[test]
    fn local_hosts_pass_and_other_names_are_refused() {
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:8080",
            "app.localhost:8080",
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert_eq!(check(&headers(&[("host", ok)]), &[]), Ok(None), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8080",
            "[::1]x",
            "localhost:99999",
        ] {
            assert!(
                matches!(
                    check(&headers(&[("host", bad)]), &[]),
                    Err(Refused::Host(_))
                ),
                "{bad}"
            );
        }
        // No Host at all (HTTP/1.0): nothing to rebind.
        assert_eq!(check(&HeaderMap::new(), &[]), Ok(None));
    }

    #[test]
    fn only_allowed_origins_pass() {
        let allowed = vec!["https://app.example".to_owned()];
        let from = |origin: &'static str| {
            check(
                &headers(&[("host", "localhost:8080"), ("origin", origin)]),
                &allowed,
            )
        };
        assert_eq!(
            from("https://app.example"),
            Ok(Some(HeaderValue::from_static("https://app.example")))
        );
        assert_eq!(
            from("https://evil.example"),
            Err(Refused::Origin("https://evil.example".into()))
        );
        // A sandboxed page or a file says "null": refused unless listed.
        assert!(from("null").is_err());
        assert!(check(&headers(&[("origin", "https://app.example")]), &[]).is_err());
    }
}
