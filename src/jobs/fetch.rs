//! Fetching an import's source: hyper's HTTP/1 client on a connection opened here,
//! streamed into a temporary blob (SHA-256 as it goes, the upload size limit,
//! connect/read/total timeouts, at most 5 redirects), with an SSRF guard. Only http and
//! https; an address that is loopback, private, link-local, multicast, unspecified or
//! otherwise not public (v4 and v6, v4-mapped and other embeddings included) is refused
//! after DNS resolution, and the connection goes to the very address that was checked
//! (nothing resolves twice); every redirect is checked the same way.
//! `ASSETD_IMPORT_ALLOWLIST` opens chosen hosts, addresses or networks.
//!
//! Why hyper's connection API rather than a pooled client: owning the connection shows
//! what a source sent beyond the `Content-Length` it announced (hyper ends the body at
//! that length; the rest stays in the connection), and a source that lies about its
//! length must fail the import, not make a truncated asset.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use url::Url;

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
    // IPv4-compatible (::a.b.c.d, deprecated), NAT64 (64:ff9b::/96) and SIIT's
    // IPv4-translated (::ffff:0:a.b.c.d) carry a v4 address.
    if segments[..6] == [0; 6]
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || segments[..6] == [0, 0, 0, 0, 0xffff, 0]
    {
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(embedded_v4(ip));
    }
    // Local-use NAT64 (64:ff9b:1::/48, RFC 8215) leads to a network of the operator's.
    if segments[..3] == [0x64, 0xff9b, 1] {
        return false;
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
    /// Certificate authorities trusted besides the public ones (`ASSETD_IMPORT_CA_FILE`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// The certificates of a PEM file (`ASSETD_IMPORT_CA_FILE`); at least one.
pub fn read_certificates(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certificates)
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

/// A byte stream a request can go over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// How long, once a body has ended, the connection is watched for bytes beyond it.
const EXCESS_WATCH: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct Fetcher {
    settings: Arc<FetchSettings>,
    tls: tokio_rustls::TlsConnector,
}

type ConnectionTask =
    tokio::task::JoinHandle<Result<hyper1::client::conn::http1::Parts<TokioIo<Box<dyn Io>>>, hyper1::Error>>;

/// The task driving a request's connection; dropping it ends the connection.
struct Connection(Option<ConnectionTask>);

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A response whose head has arrived, and its connection.
struct Exchange {
    response: hyper1::Response<hyper1::body::Incoming>,
    sender: hyper1::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    connection: Connection,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for certificate in &settings.extra_roots {
            roots
                .add(certificate.clone())
                .map_err(|error| format!("a certificate of ASSETD_IMPORT_CA_FILE: {error}"))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { settings: Arc::new(settings), tls: tokio_rustls::TlsConnector::from(Arc::new(tls)) })
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
        let total_timeout = self.settings.total_timeout;
        tokio::select! {
            fetched = tokio::time::timeout(total_timeout, self.fetch_following(url, blob, progress)) => {
                fetched.unwrap_or_else(|_| {
                    Err(FetchError::passing(format!("the import took longer than {} s", total_timeout.as_secs())))
                })
            }
            _ = cancel.cancelled() => Err(FetchError::permanent("cancelled")),
        }
    }

    /// Requests `url`, following at most [`MAX_REDIRECTS`] redirects (each checked as
    /// the first URL was), and streams the answer's body into `blob`.
    async fn fetch_following(
        &self,
        url: &Url,
        blob: &mut TempBlob,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
    ) -> Result<Fetched, FetchError> {
        let mut url = url.clone();
        check_url(&url, &self.settings.allow).map_err(|reason| FetchError::permanent(format!("refused: {reason}")))?;
        let mut redirects = 0;
        loop {
            let exchange = self.request(&url).await?;
            let status = exchange.response.status();
            let location = exchange.response.headers().get(hyper1::header::LOCATION);
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) && location.is_some() {
                let location = location
                    .and_then(|value| value.to_str().ok())
                    .ok_or_else(|| FetchError::permanent("refused: a redirect whose Location is not visible ASCII"))?;
                let next = url.join(location).map_err(|error| {
                    FetchError::permanent(format!("refused: a redirect to something that is not a URL ({error})"))
                })?;
                if redirects == MAX_REDIRECTS {
                    return Err(FetchError::permanent(format!("refused: more than {MAX_REDIRECTS} redirects")));
                }
                check_url(&next, &self.settings.allow).map_err(|reason| {
                    FetchError::permanent(format!("refused: redirected to {}: {reason}", redacted(&next)))
                })?;
                redirects += 1;
                url = next;
                continue;
            }
            // Only a whole file: not a part of one (206, never asked for), nor no
            // content at all (204).
            if status.is_success() && !matches!(status.as_u16(), 200 | 203) {
                return Err(FetchError::permanent(format!("the source answered {status}, not the whole file (200)")));
            }
            if !status.is_success() {
                let message = format!("the source answered {status}");
                // Asked too often, timed out, or failing on its side: may pass.
                let passing = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
                return Err(FetchError { message, retryable: passing });
            }
            return self.receive(&url, exchange, blob, progress).await;
        }
    }

    /// Streams a successful answer's body into `blob`, then makes sure the source sent
    /// nothing beyond the length it announced.
    async fn receive(
        &self,
        url: &Url,
        exchange: Exchange,
        blob: &mut TempBlob,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
    ) -> Result<Fetched, FetchError> {
        use http_body_util::BodyExt;
        let max = self.settings.max_size;
        let Exchange { response, sender, connection } = exchange;
        // hyper has checked the header: the body is exactly this long, or cut short.
        let total = hyper1::body::Body::size_hint(response.body()).exact();
        if let Some(total) = total.filter(|total| *total > max) {
            return Err(FetchError::permanent(format!(
                "the source announces {total} bytes, more than the upload limit of {max}"
            )));
        }
        let fetched = Fetched {
            content_type: response
                .headers()
                .get(hyper1::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            file_name: url
                .path_segments()
                .and_then(|mut segments| segments.next_back())
                .filter(|s| !s.is_empty())
                .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()),
        };
        progress.send_replace((0, total));
        let mut body = response.into_body();
        loop {
            let frame = tokio::time::timeout(self.settings.read_timeout, body.frame()).await.map_err(|_| {
                FetchError::passing(format!("the source sent nothing for {} s", self.settings.read_timeout.as_secs()))
            })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|error| FetchError::passing(format!("receiving the body: {}", chain(&error))))?;
            let Ok(chunk) = frame.into_data() else { continue };
            if blob.size() + chunk.len() as u64 > max {
                return Err(FetchError::permanent(format!(
                    "the source sent more than the upload limit of {max} bytes"
                )));
            }
            blob.write(chunk).await.map_err(|error| FetchError::passing(format!("storing the bytes: {error}")))?;
            progress.send_replace((blob.size(), total));
        }
        if let Some(total) = total.filter(|total| *total != blob.size()) {
            return Err(FetchError::passing(format!("the source announced {total} bytes but sent {}", blob.size())));
        }
        // The exchange is over: the connection ends and hands back what it read beyond
        // the body, and whatever else arrives soon after.
        drop(sender);
        if let Some(total) = total {
            if let Some(excess) = excess_after_body(connection).await {
                return Err(FetchError::permanent(format!(
                    "the source sent more than the {total} bytes it announced ({excess})"
                )));
            }
        }
        Ok(fetched)
    }

    /// Opens a connection to `url`'s host (at an address the allow-list permits, the
    /// one that was checked), and sends the request.
    async fn request(&self, url: &Url) -> Result<Exchange, FetchError> {
        let host = url.host_str().ok_or_else(|| FetchError::permanent("the URL has no host"))?;
        let port = url.port_or_known_default().ok_or_else(|| FetchError::permanent("the URL has no port"))?;
        let tcp = self.connect(url, port).await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if url.scheme() == "https" {
            let name = match url.host() {
                Some(url::Host::Ipv4(v4)) => rustls::pki_types::ServerName::IpAddress(IpAddr::V4(v4).into()),
                Some(url::Host::Ipv6(v6)) => rustls::pki_types::ServerName::IpAddress(IpAddr::V6(v6).into()),
                _ => rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|error| FetchError::permanent(format!("{host} is not a TLS server name: {error}")))?,
            };
            let handshake = tokio::time::timeout(self.settings.connect_timeout, self.tls.connect(name, tcp));
            Box::new(
                handshake
                    .await
                    .map_err(|_| FetchError::passing(format!("the TLS handshake with {host} timed out")))?
                    .map_err(|error| FetchError::passing(format!("TLS with {host}: {error}")))?,
            )
        } else {
            Box::new(tcp)
        };
        let (mut sender, connection) =
            hyper1::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(io))
                .await
                .map_err(|error| FetchError::passing(format!("HTTP with {host}: {}", chain(&error))))?;
        let connection = Connection(Some(tokio::spawn(connection.without_shutdown())));
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let mut request = hyper1::Request::get(if target.is_empty() { "/" } else { target })
            .header(hyper1::header::HOST, authority)
            .header(hyper1::header::USER_AGENT, concat!("assetd/", env!("CARGO_PKG_VERSION"), " (import)"))
            .header(hyper1::header::ACCEPT, "*/*")
            // Bytes as stored: a compressed body would not be the file the source has.
            .header(hyper1::header::ACCEPT_ENCODING, "identity")
            .header(hyper1::header::CONNECTION, "close");
        if !url.username().is_empty() {
            // The URL's own credentials only: a redirect elsewhere does not carry them.
            use base64::Engine as _;
            let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy();
            let password = url.password().map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy());
            let pair = format!("{user}:{}", password.unwrap_or_default());
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            request = request.header(hyper1::header::AUTHORIZATION, format!("Basic {basic}"));
        }
        let request = request
            .body(http_body_util::Empty::new())
            .map_err(|error| FetchError::permanent(format!("the request cannot be written: {error}")))?;
        let response = tokio::time::timeout(self.settings.read_timeout, sender.send_request(request))
            .await
            .map_err(|_| {
                FetchError::passing(format!("{host} did not answer within {} s", self.settings.read_timeout.as_secs()))
            })?
            .map_err(|error| {
                // An answer hyper cannot read as HTTP (a bad or doubled Content-Length,
                // a head too large, not HTTP at all) will not read better next time.
                let message = format!("requesting from {host}: {}", chain(&error));
                if error.is_parse() {
                    FetchError::permanent(message)
                } else {
                    FetchError::passing(message)
                }
            })?;
        Ok(Exchange { response, sender, connection })
    }

    /// Resolves `url`'s host and connects to the first permitted address that answers.
    async fn connect(&self, url: &Url, port: u16) -> Result<tokio::net::TcpStream, FetchError> {
        let host = url.host_str().unwrap_or_default();
        let addresses: Vec<SocketAddr> = match url.host() {
            // An address in the URL was checked by `check_url`.
            Some(url::Host::Ipv4(v4)) => vec![SocketAddr::new(IpAddr::V4(v4), port)],
            Some(url::Host::Ipv6(v6)) => vec![SocketAddr::new(IpAddr::V6(v6), port)],
            _ => {
                let lookup = tokio::time::timeout(self.settings.connect_timeout, tokio::net::lookup_host((host, port)));
                let resolved: Vec<SocketAddr> = lookup
                    .await
                    .map_err(|_| FetchError::passing(format!("resolving {host} timed out")))?
                    .map_err(|error| FetchError::passing(format!("resolving {host}: {error}")))?
                    .collect();
                let permitted: Vec<SocketAddr> = resolved
                    .iter()
                    .copied()
                    .filter(|address| self.settings.allow.permits(host, address.ip()))
                    .collect();
                if permitted.is_empty() {
                    return Err(match resolved.first() {
                        Some(first) => FetchError::permanent(format!(
                            "refused: {host} resolves to {}, which imports may not reach (not a public address; see ASSETD_IMPORT_ALLOWLIST)",
                            first.ip()
                        )),
                        None => FetchError::passing(format!("{host} has no address")),
                    });
                }
                permitted
            }
        };
        let mut last_error = None;
        for address in addresses {
            match tokio::time::timeout(self.settings.connect_timeout, tokio::net::TcpStream::connect(address)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(error)) => last_error = Some(format!("connecting to {host} ({address}): {error}")),
                Err(_) => last_error = Some(format!("connecting to {host} ({address}) timed out")),
            }
        }
        Err(FetchError::passing(last_error.unwrap_or_else(|| format!("{host}: nothing to connect to"))))
    }
}

/// Once a body of announced length has ended: what the source sent beyond it, read by
/// hyper (and then refused as an unexpected message, or left in its buffer) or arriving
/// within [`EXCESS_WATCH`]; `None` when the connection ended cleanly.
async fn excess_after_body(mut connection: Connection) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let task = connection.0.as_mut()?;
    let ended = tokio::time::timeout(EXCESS_WATCH, task).await;
    match ended {
        Ok(Ok(Ok(parts))) => {
            if !parts.read_buf.is_empty() {
                return Some(format!("{} more bytes", parts.read_buf.len()));
            }
            let mut io = parts.io.into_inner();
            let mut probe = [0u8; 1];
            match tokio::time::timeout(EXCESS_WATCH, io.read(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => Some("more bytes after the body".to_owned()),
                _ => None,
            }
        }
        // hyper read bytes after the response it was not waiting for (an unexpected
        // message). An I/O error (a reset, TLS ended without close_notify) is the
        // connection closing, not more bytes.
        Ok(Ok(Err(error))) if !crate::app::caused_by_io(&error) && !error.is_closed() && !error.is_canceled() => {
            Some(chain(&error))
        }
        _ => None,
    }
}

/// An error and its causes, as one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
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
                let secret = [
                    "sig",
                    "token",
                    "key",
                    "secret",
                    "password",
                    "passwd",
                    "pwd",
                    "auth",
                    "credential",
                    "x-amz-",
                    "jwt",
                    "session",
                    "code",
                    "hmac",
                ]
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
            "64:ff9b:1::808:808",
            "::ffff:0:a00:1",
            "::ffff:0:7f00:1",
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
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(read_certificates(&empty).unwrap_err().contains("no certificate"));
        assert!(read_certificates(&dir.path().join("missing.pem")).is_err());
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(read_certificates(&broken).is_err());
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
        let url: Url = "https://example.org/f?jwt=a&pwd=b&sessionid=c&code=d&hmac=e&name=f".parse().unwrap();
        assert_eq!(
            redacted(&url),
            "https://example.org/f?jwt=REDACTED&pwd=REDACTED&sessionid=REDACTED&code=REDACTED&hmac=REDACTED&name=f"
        );
    }
}
