//! The HTTPS side of `iotctl onboard`: one HTTP/1.1 connection (hyper over tokio-rustls) to the
//! gateway's onboarding endpoint, JSON requests and answers, and its Server-Sent Events.
//!
//! The gateway's certificate is self-signed and nobody can verify it: the verifier here accepts
//! any certificate (the handshake's signature is still checked, so the peer holds the key of
//! the certificate it showed) and records the leaf it saw. The SPAKE2+ pairing authenticates
//! the gateway, and the `tls-server-end-point` binding ties the pairing to that leaf. A new
//! connection (after the gateway closed an idle one) must show the same leaf, or iotctl stops:
//! what it sealed and what it reads of the progress belong to the certificate it paired over.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, header};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

/// A TCP connection to one address of the gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// One request and its whole answer (the gateway waits at most 10 s for its core).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: the gateway's are a few hundred bytes.
const MAX_ANSWER: usize = 64 * 1024;
/// The largest Server-Sent Event: one status object.
const MAX_EVENT: usize = 64 * 1024;

/// Where to connect: as the installer named it, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A host name or an IP address (an IPv6 one without brackets).
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `HOST[:PORT]`: a host name, an IPv4 address, `[IPv6]` (or a bare IPv6 address, which
    /// then takes the default port), each optionally followed by `:PORT`.
    pub fn parse(text: &str, default_port: u16) -> Result<Self, String> {
        if text.contains("://") || text.contains('/') {
            return Err(format!(
                "{text:?} is not HOST[:PORT]: give the gateway's host name or address and, if it \
                 is not {default_port}, its port (e.g. 192.168.1.20 or gw.local:8443), not a URL"
            ));
        }
        let port_of = |port: &str| match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("{text:?}: {port:?} is not a port (1 to 65535)")),
        };
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: the IPv6 address has no closing ']'"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{text:?}: {host:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => default_port,
                _ => port_of(after.strip_prefix(':').ok_or_else(|| {
                    format!("{text:?}: expected ':PORT' after the IPv6 address")
                })?)?,
            };
            (host, port)
        } else if text.matches(':').count() > 1 {
            if text.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "{text:?} is not HOST[:PORT] (write an IPv6 address with a port as [ADDRESS]:PORT)"
                ));
            }
            (text, default_port)
        } else if let Some((host, port)) = text.split_once(':') {
            (host, port_of(port)?)
        } else {
            (text, default_port)
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{text:?}: the host is empty or has spaces"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port`, with an IPv6 address in brackets: for messages and the Host header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Accepts any server certificate and records the leaf (see the module's comment).
#[derive(Debug)]
struct RecordAnyCertificate {
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for RecordAnyCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a request got no answer: the connection or the peer's HTTP, not a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetError(pub String);

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An answer: its HTTP status and its JSON body (`Value::Null` when it had none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// The connection to the gateway's onboarding endpoint.
pub struct Gateway {
    target: Target,
    addresses: Vec<SocketAddr>,
    /// The address of the current (or last) connection.
    address: SocketAddr,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    /// The leaf certificate of the first connection.
    leaf: Vec<u8>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("target", &self.target)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Resolves `target` and connects (TCP, then TLS).
    pub async fn connect(target: &Target) -> Result<Self, NetError> {
        let addresses: Vec<SocketAddr> =
            tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| {
                    NetError(format!(
                        "{}: cannot resolve {}: {e}",
                        target.authority(),
                        target.host
                    ))
                })?
                .collect();
        let Some(&first) = addresses.first() else {
            return Err(NetError(format!(
                "{}: {} has no address",
                target.authority(),
                target.host
            )));
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = Arc::new(Mutex::new(None));
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError(format!("setting up TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RecordAnyCertificate {
                provider,
                seen: seen.clone(),
            }))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection shows the certificate (a resumed session would not), so that each
        // can be compared with the one iotctl paired over.
        config.resumption = rustls::client::Resumption::disabled();
        // The name only goes into SNI (none for an address, or for a name rustls does not
        // take); the certificate is not checked against it.
        let server_name = ServerName::try_from(target.host.clone()).unwrap_or_else(|_| {
            ServerName::from(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED))
        });
        let mut gateway = Self {
            target: target.clone(),
            addresses,
            address: first,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            seen,
            leaf: Vec::new(),
            sender: None,
        };
        gateway.reconnect().await?;
        Ok(gateway)
    }

    /// The address connected to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The leaf certificate (DER) the gateway showed.
    pub fn leaf(&self) -> &[u8] {
        &self.leaf
    }

    /// A new connection, to the first address that answers; its leaf must be the first
    /// connection's.
    async fn reconnect(&mut self) -> Result<(), NetError> {
        self.sender = None;
        let authority = self.target.authority();
        let mut errors = Vec::new();
        let mut connected = None;
        for address in &self.addresses {
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
                .await
            {
                Ok(Ok(tcp)) => {
                    connected = Some((*address, tcp));
                    break;
                }
                Ok(Err(e)) => errors.push(format!("{address}: {e}")),
                Err(_) => errors.push(format!("{address}: no answer within {CONNECT_TIMEOUT:?}")),
            }
        }
        let Some((address, tcp)) = connected else {
            return Err(NetError(format!(
                "cannot connect to {authority} ({})",
                errors.join("; ")
            )));
        };
        // Nagle would hold the small requests back for the acks.
        let _ = tcp.set_nodelay(true);
        self.address = address;
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return Err(NetError(format!(
                    "the TLS handshake with {authority} ({address}) failed: {e}"
                )));
            }
            Err(_) => {
                return Err(NetError(format!(
                    "no TLS handshake with {authority} ({address}) within {HANDSHAKE_TIMEOUT:?}"
                )));
            }
        };
        let leaf = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| NetError(format!("{authority} showed no TLS certificate")))?;
        if self.leaf.is_empty() {
            self.leaf = leaf;
        } else if self.leaf != leaf {
            return Err(NetError(format!(
                "{authority} showed another TLS certificate on a new connection than the one \
                 iotctl paired over: someone else is answering at that address"
            )));
        }
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| NetError(format!("starting HTTP with {authority}: {e}")))?;
        tokio::spawn(async move {
            // Ends when the gateway or iotctl closes the connection; errors show in requests.
            let _ = connection.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends a request on the connection, making a new one first if the gateway closed it
    /// (an idle connection is closed after a few seconds). A request that was sent is never
    /// sent again.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> Result<hyper::Response<Incoming>, NetError> {
        let ready = match self.sender.as_mut() {
            Some(sender) if !sender.is_closed() => sender.ready().await.is_ok(),
            _ => false,
        };
        if !ready {
            self.reconnect().await?;
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| NetError("no connection".to_owned()))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.target.authority())
            .header(header::ACCEPT, accept)
            .header(
                header::USER_AGENT,
                concat!("iotctl/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(body.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| NetError(format!("building the request for {path}: {e}")))?;
        let sent = sender.send_request(request).await;
        sent.map_err(|e| {
            // The connection is broken: the next request makes a new one.
            self.sender = None;
            NetError(format!("{path}: {}: {e}", self.target.authority()))
        })
    }

    /// A request with a JSON body (or none) and its JSON answer.
    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, NetError> {
        let authority = self.target.authority();
        let exchange = async {
            let response = self.send(method, path, body, "application/json").await?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| NetError(format!("{path}: reading the answer of {authority}: {e}")))?
                .to_bytes();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).map_err(|_| {
                    NetError(format!(
                        "{path}: {authority} answered HTTP {status} without JSON: is this an iotd \
                         gateway's onboarding port?"
                    ))
                })?
            };
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(answer) => answer,
            Err(_) => {
                self.sender = None;
                Err(NetError(format!(
                    "{path}: {} did not answer within {REQUEST_TIMEOUT:?}",
                    self.target.authority()
                )))
            }
        }
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Result<Answer, NetError> {
        self.exchange(Method::POST, path, Some(body)).await
    }

    pub async fn get(&mut self, path: &str) -> Result<Answer, NetError> {
        self.exchange(Method::GET, path, None).await
    }

    /// `GET path` as Server-Sent Events. The connection carries the stream until it is dropped;
    /// the next request makes a new connection.
    pub async fn events(&mut self, path: &str) -> Result<Events, NetError> {
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send(Method::GET, path, None, "text/event-stream"),
        )
        .await;
        // Whatever happens to the stream, this connection is not used again.
        self.sender = None;
        let response = response
            .map_err(|_| NetError(format!("{path}: no answer within {REQUEST_TIMEOUT:?}")))??;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if status != 200 || !content_type.starts_with("text/event-stream") {
            return Err(NetError(format!(
                "{path}: the gateway answered HTTP {status} ({content_type}), not an event stream"
            )));
        }
        Ok(Events {
            body: response.into_body(),
            parser: SseParser::default(),
            ready: std::collections::VecDeque::new(),
        })
    }
}

/// A stream of Server-Sent Events' data, each parsed as JSON.
pub struct Events {
    body: Incoming,
    parser: SseParser,
    ready: std::collections::VecDeque<String>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// The next event's data as JSON; `None` when the gateway ended the stream.
    pub async fn next(&mut self) -> Option<Result<Value, NetError>> {
        loop {
            if let Some(data) = self.ready.pop_front() {
                return Some(serde_json::from_str(&data).map_err(|_| {
                    NetError("an event's data is not JSON: is this an iotd gateway?".to_owned())
                }));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        match self.parser.push(&data) {
                            Ok(events) => self.ready.extend(events),
                            Err(e) => return Some(Err(e)),
                        }
                    }
                }
                Err(e) => return Some(Err(NetError(format!("the event stream broke: {e}")))),
            }
        }
    }
}

/// The `text/event-stream` format, as far as the gateway uses it: `data:` lines make an
/// event's data (joined with newlines), a blank line ends the event, `:` lines are comments
/// (keep-alives), other fields are ignored. Lines end with LF, CRLF or CR.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The unfinished line.
    line: Vec<u8>,
    /// The current event's data lines.
    data: Vec<String>,
    /// The last byte was a CR (a following LF belongs to it).
    after_cr: bool,
    /// Bytes of the current event so far.
    size: usize,
}

impl SseParser {
    /// Takes the next bytes of the stream; returns the data of the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, NetError> {
        let mut done = Vec::new();
        for &byte in bytes {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(data) = self.line_done(&line) {
                        done.push(data);
                    }
                }
                _ => self.line.push(byte),
            }
            self.size += 1;
            if self.size > MAX_EVENT {
                return Err(NetError(format!(
                    "an event is larger than {MAX_EVENT} bytes: is this an iotd gateway?"
                )));
            }
        }
        Ok(done)
    }

    fn line_done(&mut self, line: &[u8]) -> Option<String> {
        if line.is_empty() {
            self.size = 0;
            let data = std::mem::take(&mut self.data);
            return (!data.is_empty()).then(|| data.join("\n"));
        }
        if line.starts_with(b":") {
            return None;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            self.data.push(String::from_utf8_lossy(value).into_owned());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn targets_take_the_default_port_or_their_own() {
        let t = |host: &str, port| Target {
            host: host.to_owned(),
            port,
        };
        for (text, expected) in [
            ("192.168.1.20", t("192.168.1.20", 8443)),
            ("192.168.1.20:9000", t("192.168.1.20", 9000)),
            ("gw.local", t("gw.local", 8443)),
            ("gw.local:1", t("gw.local", 1)),
            ("[fe80::1]", t("fe80::1", 8443)),
            ("[::1]:8444", t("::1", 8444)),
            ("::1", t("::1", 8443)),
        ] {
            assert_eq!(Target::parse(text, 8443).unwrap(), expected, "{text}");
        }
        assert_eq!(t("::1", 8444).authority(), "[::1]:8444");
        assert_eq!(t("gw", 8443).authority(), "gw:8443");
        for text in [
            "",
            ":8443",
            "gw:",
            "gw:0",
            "gw:65536",
            "gw:http",
            "https://gw.local",
            "gw.local/v1",
            "[::1",
            "[::1]8443",
            "[gw]:1",
            "a:b:c",
            "g w",
        ] {
            assert!(Target::parse(text, 8443).is_err(), "{text:?}");
        }
    }

    #[test]
    fn the_sse_parser_joins_data_lines_and_skips_comments() {
        let mut parser = SseParser::default();
        assert!(parser.push(b": keep-alive\n\n").unwrap().is_empty());
        assert_eq!(
            parser
                .push(b"data: {\"a\":1}\n\ndata:x\r\ndata: y\r\n\r\nda")
                .unwrap(),
            vec!["{\"a\":1}".to_owned(), "x\ny".to_owned()]
        );
        assert_eq!(
            parser.push(b"ta: z\nevent: e\nid: 3\n\n").unwrap(),
            vec!["z".to_owned()]
        );
        // A CR at the end of one chunk and the LF at the start of the next are one line end.
        assert!(parser.push(b"data: w\r").unwrap().is_empty());
        assert!(parser.push(b"\n").unwrap().is_empty());
        assert_eq!(parser.push(b"\r\n").unwrap(), vec!["w".to_owned()]);
        assert!(parser.push(&vec![b'a'; MAX_EVENT + 1]).is_err());
    }
}
