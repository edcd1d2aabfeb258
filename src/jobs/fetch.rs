//! Fetching an import's source: reqwest, streamed into a temporary blob (SHA-256 as it
//! goes, the upload size limit, connect/read/total timeouts, at most 5 redirects), with
//! an SSRF guard. Only http and https; an address that is loopback, private,
//! link-local, multicast, unspecified or otherwise not public (v4 and v6, v4-mapped
//! and other embeddings included) is refused after DNS resolution, by the resolver
//! itself, so the connection goes to an address that was checked (reqwest connects to
//! what the resolver returned; nothing resolves twice). A URL whose host is an address
//! never reaches the resolver: it is checked before the request and at every redirect.
//! `ASSETD_IMPORT_ALLOWLIST` opens chosen hosts, addresses or networks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use crate::blobs::TempBlob;

/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;

/// Hosts and networks imports may reach although they are not public.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    hosts: Vec<String>,
    networks: Vec<ipnet::IpNet>,
}

impl AllowList {
    /// Comma-separated host names, addresses and CIDR networks.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut list = Self::default();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(network) = entry.parse::<ipnet::IpNet>() {
                list.networks.push(network);
            } else if let Ok(address) = entry.parse::<IpAddr>() {
                list.networks.push(address.into());
            } else if entry.bytes().all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b)) {
                list.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(format!("{entry:?} is not a host name, an address or a CIDR network"));
            }
        }
        Ok(list)
    }

    /// Whether `host` may be reached at `address`.
    pub fn permits(&self, host: &str, address: IpAddr) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        is_public(address)
            || self.hosts.contains(&host)
            || self.networks.iter().any(|network| network.contains(&canonical(address)))
    }
}

/// An address as IPv4 when it is one in IPv6 clothing (`::ffff:a.b.c.d`).
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether an address is on the public internet (what imports may reach by default).
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network", 0.0.0.0 among it
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded_v4 = |ip: Ipv6Addr| {
        let o = ip.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    };
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96) carry a v4 address.
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(embedded_v4(ip));
    }
    // 6to4 (2002::/16) embeds one in its second and third segments.
    if segments[0] == 0x2002 {
        let [s1, s2] = [segments[1], segments[2]];
        return is_public_v4(Ipv4Addr::new((s1 >> 8) as u8, s1 as u8, (s2 >> 8) as u8, s2 as u8));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local
        || (segments[0] & 0xffc0) == 0xfe80 // link-local
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (segments[0] == 0x2001 && segments[1] == 0x0db8)) // documentation
}

/// Why an address was not connected to: found in the error chain to tell a refusal
/// (which will not pass) from a failure to connect (which may).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

/// Resolves names and keeps only the addresses the allow-list permits.
struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> =
                resolved.iter().copied().filter(|address| allow.permits(&host, address.ip())).collect();
            if permitted.is_empty() && !resolved.is_empty() {
                let error = Refused(format!(
                    "{host} resolves to {}, which imports may not reach (not a public address; see ASSETD_IMPORT_ALLOWLIST)",
                    resolved[0].ip()
                ));
                return Err(Box::new(error) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Refuses a URL imports may not fetch, before any connection: not http(s), or a host
/// that is a non-public address. (Names are checked by the resolver.)
pub fn check_url(url: &Url, allow: &AllowList) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("only http and https URLs can be imported, not {}:", url.scheme()));
    }
    match url.host() {
        None => Err("the URL has no host".into()),
        Some(url::Host::Ipv4(v4)) if !allow.permits(&v4.to_string(), IpAddr::V4(v4)) => {
            Err(format!("{v4} is not a public address; imports may not reach it (see ASSETD_IMPORT_ALLOWLIST)"))
        }
        Some(url::Host::Ipv6(v6)) if !allow.permits(&v6.to_string(), IpAddr::V6(v6)) => {
            Err(format!("{v6} is not a public address; imports may not reach it (see ASSETD_IMPORT_ALLOWLIST)"))
        }
        Some(_) => Ok(()),
    }
}

/// How an import fetches.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub allow: AllowList,
    pub connect_timeout: Duration,
    /// Longest silence while reading the response.
    pub read_timeout: Duration,
    /// Longest a whole fetch may take.
    pub total_timeout: Duration,
    pub max_size: u64,
}

/// Why a fetch failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchError {
    pub message: String,
    pub retryable: bool,
}

impl FetchError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false }
    }
    pub fn passing(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true }
    }
}

/// What the source said about what it sent.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub content_type: Option<String>,
    /// The last path segment of the final URL, a name to fall back on.
    pub file_name: Option<String>,
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    settings: Arc<FetchSettings>,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Self, String> {
        let allow = Arc::new(settings.allow.clone());
        let redirect_allow = allow.clone();
        let client = reqwest::Client::builder()
            // Never through a proxy from the environment (HTTP_PROXY…): the proxy would
            // resolve and connect, and the guard would check nothing.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(Refused(format!("more than {MAX_REDIRECTS} redirects")));
                }
                match check_url(attempt.url(), &redirect_allow) {
                    Ok(()) => attempt.follow(),
                    Err(reason) => {
                        let reason = format!("redirected to {}: {reason}", attempt.url());
                        attempt.error(Refused(reason))
                    }
                }
            }))
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .timeout(settings.total_timeout)
            // Bytes as sent: a compressed body would not be the file the source has.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .user_agent(concat!("assetd/", env!("CARGO_PKG_VERSION"), " (import)"))
            .build()
            .map_err(|error| error.to_string())?;
        Ok(Self { client, settings: Arc::new(settings) })
    }

    pub fn settings(&self) -> &FetchSettings {
        &self.settings
    }

    /// Streams `url` into `blob`, reporting `(done, total)` to `progress`; stops (with a
    /// permanent error) when `cancel` fires.
    pub async fn fetch(
        &self,
        url: &Url,
        blob: &mut TempBlob,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        check_url(url, &self.settings.allow).map_err(FetchError::permanent)?;
        let max = self.settings.max_size;
        let response = tokio::select! {
            response = self.client.get(url.clone()).send() => response.map_err(describe)?,
            _ = cancel.cancelled() => return Err(FetchError::permanent("cancelled")),
        };
        let status = response.status();
        if !status.is_success() {
            let message = format!("the source answered {status}");
            // Asked too often, timed out, or failing on its side: may pass.
            let passing = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
            return Err(FetchError { message, retryable: passing });
        }
        let total = response.content_length();
        if total.is_some_and(|length| length > max) {
            return Err(FetchError::permanent(format!(
                "the source announces {} bytes, more than the upload limit of {max}",
                total.unwrap_or_default()
            )));
        }
        let fetched = Fetched {
            content_type: response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned),
            file_name: response
                .url()
                .path_segments()
                .and_then(|mut segments| segments.next_back())
                .filter(|s| !s.is_empty())
                .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()),
        };
        progress.send_replace((0, total));
        let mut body = response.bytes_stream();
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                _ = cancel.cancelled() => return Err(FetchError::permanent("cancelled")),
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(describe)?;
            if blob.size() + chunk.len() as u64 > max {
                return Err(FetchError::permanent(format!(
                    "the source sent more than the upload limit of {max} bytes"
                )));
            }
            blob.write(chunk).await.map_err(|error| FetchError::passing(format!("storing the bytes: {error}")))?;
            progress.send_replace((blob.size(), total));
        }
        // hyper ends a body at its Content-Length and errors when it ends early; check
        // anyway, so no framing quirk can make a short file an asset.
        if let Some(total) = total.filter(|total| *total != blob.size()) {
            return Err(FetchError::passing(format!("the source announced {total} bytes but sent {}", blob.size())));
        }
        Ok(fetched)
    }
}

/// A reqwest error as a message, permanent when the guard refused or the URL cannot be
/// fetched as written, passing otherwise (connection, timeout, cut body).
fn describe(error: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = source {
        if let Some(refused) = current.downcast_ref::<Refused>() {
            return FetchError::permanent(format!("refused: {refused}"));
        }
        source = current.source();
    }
    let mut message = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    if error.is_builder() || error.is_redirect() {
        FetchError::permanent(message)
    } else {
        FetchError::passing(message)
    }
}

/// The URL as events may show it: without user and password, and with the values of
/// query parameters that look secret (signatures, tokens, keys) replaced.
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    if shown.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let lower = name.to_ascii_lowercase();
                let secret = ["sig", "token", "key", "secret", "password", "passwd", "auth", "credential", "x-amz-"]
                    .iter()
                    .any(|word| lower.contains(word));
                (name.into_owned(), if secret { "REDACTED".to_owned() } else { value.into_owned() })
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass_by_default() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(refused.parse().unwrap()), "{refused} must be refused");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public} is public");
        }
    }

    #[test]
    fn the_allow_list_opens_hosts_addresses_and_networks() {
        let allow = AllowList::parse("files.internal, 127.0.0.1, 10.0.0.0/8").unwrap();
        assert!(allow.permits("anything", "127.0.0.1".parse().unwrap()));
        assert!(allow.permits("anything", "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allow.permits("anything", "127.0.0.2".parse().unwrap()));
        assert!(allow.permits("anything", "10.9.9.9".parse().unwrap()));
        assert!(allow.permits("FILES.internal.", "192.168.0.1".parse().unwrap()));
        assert!(AllowList::parse("not a host").is_err());
    }

    #[test]
    fn urls_are_checked_before_any_connection_and_shown_without_secrets() {
        let none = AllowList::default();
        assert!(check_url(&"ftp://example.org/x".parse().unwrap(), &none).is_err());
        assert!(check_url(&"http://127.0.0.1/x".parse().unwrap(), &none).is_err());
        assert!(check_url(&"http://[::1]/x".parse().unwrap(), &none).is_err());
        assert!(check_url(&"https://example.org/x".parse().unwrap(), &none).is_ok());
        let url: Url = "https://user:pw@example.org/a.bin?X-Amz-Signature=abc&part=2#f".parse().unwrap();
        assert_eq!(redacted(&url), "https://example.org/a.bin?X-Amz-Signature=REDACTED&part=2");
    }
}
