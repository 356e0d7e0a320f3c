//! The onboarding server over real TLS on loopback, with a test core behind the port and the
//! crate's own prover and channel as the client. Each test starts its own gateway.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming};
use proptest::prelude::*;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::onboard::code::SetupCode;
use crate::onboard::port::Phase;
use crate::onboard::register::derive_secret;
use crate::onboard::session::Sealed;
use crate::onboard::spake2plus::{Prover, ProverConfirmed};

const SERIAL: &str = "IOTGW-0001234";
const ITERATIONS: u32 = 1000;
const CLAIM_TEXT: &str = r#"{"v":1,"certificate_pem":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n","private_key_pem":"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n","not_after":"2026-12-01T00:05:00Z","template":"GatewayTemplate"}"#;

// ---------------------------------------------------------------------------------------------
// TLS: a self-signed certificate for the gateway (and one for the relay), and a client that
// accepts any certificate and keeps the one it saw, as iotctl does.

/// A software P-256 key that rcgen signs with (rcgen has no crypto backend in iotd).
struct TestKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl rcgen::PublicKeyData for TestKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TestKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self
            .pair
            .sign(&SystemRandom::new(), msg)
            .unwrap()
            .as_ref()
            .to_vec())
    }
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed server certificate for `name`: the server's configuration and the leaf.
fn self_signed(name: &str) -> (Arc<rustls::ServerConfig>, Vec<u8>) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = TestKey {
        pair: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap(),
        pkcs8: pkcs8.as_ref().to_vec(),
    };
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(digest.as_ref()[..20].to_vec());
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
    let leaf = params.self_signed(&key).unwrap().der().to_vec();
    let config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.clone())],
            PrivateKeyDer::Pkcs8(key.pkcs8.clone().into()),
        )
        .unwrap();
    (Arc::new(config), leaf)
}

fn accept_any() -> Arc<rustls::ClientConfig> {
    iotd_testkit::tls::accept_any().0
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("gateway.local").unwrap(), tcp)
        .await
        .unwrap()
}

/// A body of chunks with no length: hyper sends it chunked.
struct Chunks(VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }
}

/// An HTTPS client: one connection per request, the server's leaf certificate kept.
struct Client {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        let (config, seen) = iotd_testkit::tls::accept_any();
        Self { addr, config, seen }
    }

    /// The leaf certificate of the last connection.
    fn leaf(&self) -> Vec<u8> {
        lock(&self.seen).clone().unwrap()
    }

    async fn send<B>(&self, method: &str, path: &str, body: B) -> hyper::Response<Incoming>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = tls_connect(self.addr, self.config.clone()).await;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "gateway.local")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap();
        sender.send_request(request).await.unwrap()
    }

    async fn read(response: hyper::Response<Incoming>) -> (u16, Value) {
        let status = response.status().as_u16();
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        Self::read(self.send("POST", path, Full::new(Bytes::from(body))).await).await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_bytes(path, body.to_string().into_bytes()).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        Self::read(self.send("GET", path, Full::new(Bytes::new())).await).await
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway: the server and a test core behind the port.

/// What the test core saw.
#[derive(Debug, Default)]
struct CoreLog {
    /// CountAttempt requests received (before any `count_delay`).
    asked: u32,
    counted: u32,
    paired: u32,
    /// Paired sessions that ended without a claim.
    unpaired: u32,
    handed_over: Vec<Vec<u8>>,
}

/// Wakes the waiters of the core's log when dropped (after a request was handled).
struct NotifyOnDrop<'a>(&'a tokio::sync::Notify);

impl Drop for NotifyOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

struct Gateway {
    addr: SocketAddr,
    /// The page's plain-HTTP listener, when the gateway serves it (`Gateway::with_page`).
    page: Option<SocketAddr>,
    leaf: Vec<u8>,
    code: SetupCode,
    view: watch::Sender<View>,
    log: Arc<Mutex<CoreLog>>,
    /// Told each time the core's log changes.
    logged: Arc<tokio::sync::Notify>,
    /// What the core answers to a hand-over.
    hand_over: Arc<Mutex<Result<(), Refusal>>>,
    /// How long the core takes to count an attempt.
    count_delay: Arc<Mutex<Duration>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn open_view(attempts_left: u32) -> View {
    View {
        open: true,
        closes_at: Some(unix_now() + 900),
        attempts_left,
        ..View::default()
    }
}

fn unix_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

impl Gateway {
    /// Waits until the core's log satisfies `done` (5 s at most).
    async fn wait_log(&self, what: &str, done: impl Fn(&CoreLog) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let notified = self.logged.notified();
                tokio::pin!(notified);
                // Registered before the check, so a change right after it is not missed.
                notified.as_mut().enable();
                if done(&lock(&self.log)) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the core's log never showed {what}");
    }

    /// Waits until the core was told of `n` paired sessions that ended without a claim.
    async fn wait_unpaired(&self, n: u32) {
        self.wait_log(&format!("{n} ended paired sessions"), |log| {
            log.unpaired >= n
        })
        .await;
    }

    async fn start() -> Self {
        Self::with(Limits::default(), open_view(20)).await
    }

    async fn with(limits: Limits, view: View) -> Self {
        Self::serving(limits, view, None).await
    }

    /// A gateway that also serves the page on a plain listener on loopback, whose connections
    /// are handed to the server as coming over `link` (as `page::listen` does per interface),
    /// and lets the installer supply Site.
    async fn with_page(link: Link) -> Self {
        Self::serving(Limits::default(), open_view(20), Some(link)).await
    }

    async fn serving(limits: Limits, view: View, page_link: Option<Link>) -> Self {
        let (tls, leaf) = self_signed("gateway.local");
        let code = SetupCode::generate().unwrap();
        let salt: Vec<u8> = (0..32).collect();
        let record = OnboardingRecord::create(&code, SERIAL, &salt, ITERATIONS).unwrap();
        let (view_tx, view_rx) = watch::channel(view);
        let (requests, mut incoming) = mpsc::channel(4);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Server::new(
            listener,
            tls,
            &leaf,
            record,
            Port {
                requests,
                view: view_rx,
            },
            limits,
        )
        .with_installer_parameters(vec!["Site".to_owned()]);
        let addr = server.local_addr().unwrap();
        let mut tasks = Vec::new();
        let mut page = None;
        if let Some(link) = page_link {
            let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
            page = Some(plain.local_addr().unwrap());
            let (accepted, connections) = mpsc::channel(4);
            server = server.with_page(connections);
            tasks.push(tokio::spawn(async move {
                while let Ok((tcp, peer)) = plain.accept().await {
                    let _ = accepted.send(Accepted { tcp, peer, link }).await;
                }
            }));
        }
        let log = Arc::new(Mutex::new(CoreLog::default()));
        let hand_over = Arc::new(Mutex::new(Ok(())));
        let count_delay = Arc::new(Mutex::new(Duration::ZERO));
        let logged = Arc::new(tokio::sync::Notify::new());
        let core = {
            let (view, log, hand_over) = (view_tx.clone(), log.clone(), hand_over.clone());
            let (count_delay, logged) = (count_delay.clone(), logged.clone());
            tokio::spawn(async move {
                while let Some(request) = incoming.recv().await {
                    // Whatever the request changes in the log, waiters look again afterwards.
                    let _notify = NotifyOnDrop(&logged);
                    match request {
                        Request::CountAttempt { reply, .. } => {
                            lock(&log).asked += 1;
                            logged.notify_waiters();
                            let delay = *lock(&count_delay);
                            tokio::time::sleep(delay).await;
                            let current = view.borrow().clone();
                            if !current.open || current.attempts_left == 0 {
                                let _ = reply.send(Err(Refusal {
                                    code: "window_closed",
                                    status: 403,
                                    message: "The onboarding window is closed.".to_owned(),
                                }));
                                continue;
                            }
                            lock(&log).counted += 1;
                            let left = current.attempts_left - 1;
                            view.send_modify(|v| {
                                v.attempts_left = left;
                                v.open = left > 0;
                            });
                            let _ = reply.send(Ok(left));
                        }
                        Request::Paired { .. } => {
                            lock(&log).paired += 1;
                            view.send_modify(|v| v.phase = Phase::Paired);
                        }
                        Request::Unpaired => {
                            lock(&log).unpaired += 1;
                            view.send_modify(|v| v.phase = Phase::Waiting);
                        }
                        Request::HandOver { plaintext, reply } => {
                            lock(&log).handed_over.push(plaintext.to_vec());
                            let answer = lock(&hand_over).clone();
                            if answer.is_ok() {
                                view.send_modify(|v| {
                                    v.phase = Phase::ClaimReceived;
                                    v.open = false;
                                });
                            }
                            let _ = reply.send(answer);
                        }
                        // Only iotd's discovery task sends it; this gateway has none.
                        Request::Discovery { .. } => {}
                    }
                }
            })
        };
        let server = tokio::spawn(async move {
            server.run().await.unwrap();
        });
        tasks.extend([server, core]);
        Self {
            addr,
            page,
            leaf,
            code,
            view: view_tx,
            log,
            logged,
            hand_over,
            count_delay,
            tasks,
        }
    }

    fn client(&self) -> Client {
        Client::new(self.addr)
    }

    fn counted(&self) -> u32 {
        lock(&self.log).counted
    }
}

// ---------------------------------------------------------------------------------------------
// The client's side of the protocol.

/// What `/pair/params` gave, and what the client sent.
struct Params {
    session_id: [u8; SESSION_ID_LEN],
    client_random: [u8; RANDOM_LEN],
    gateway_random: [u8; RANDOM_LEN],
    salt: Vec<u8>,
    iterations: u32,
    serial: String,
    binding: Binding,
}

fn decode<const N: usize>(value: &Value) -> [u8; N] {
    <[u8; N]>::try_from(URL_SAFE_NO_PAD.decode(value.as_str().unwrap()).unwrap()).unwrap()
}

fn params_body(client_random: &[u8], binding: &str) -> Value {
    json!({
        "v": 1,
        "client_random": b64(client_random),
        "client_id": "iotctl/0.1",
        "binding": binding,
    })
}

async fn params(client: &Client, binding: &str) -> Params {
    let client_random = [7; RANDOM_LEN];
    let (status, body) = client
        .post(PARAMS, &params_body(&client_random, binding))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["v"], 1);
    assert_eq!(body["suite"], SUITE);
    assert_eq!(body["pbkdf"]["alg"], PBKDF_ALG);
    let binding = match binding {
        "none" => Binding::None,
        _ => Binding::tls_server_end_point(&client.leaf()),
    };
    Params {
        session_id: decode(&body["session_id"]),
        client_random,
        gateway_random: decode(&body["gateway_random"]),
        salt: URL_SAFE_NO_PAD
            .decode(body["pbkdf"]["salt"].as_str().unwrap())
            .unwrap(),
        iterations: u32::try_from(body["pbkdf"]["iterations"].as_u64().unwrap()).unwrap(),
        serial: body["serial"].as_str().unwrap().to_owned(),
        binding,
    }
}

impl Params {
    fn info(&self) -> crate::onboard::spake2plus::SessionInfo {
        session::session_info(
            &ContextParams {
                client_random: &self.client_random,
                gateway_random: &self.gateway_random,
                session_id: &self.session_id,
                salt: &self.salt,
                iterations: self.iterations,
                binding: &self.binding,
            },
            "iotctl/0.1",
            &self.serial,
        )
        .unwrap()
    }

    fn secret(&self, code: &SetupCode) -> crate::onboard::spake2plus::ProverSecret {
        derive_secret(code, &self.serial, &self.salt, self.iterations).unwrap()
    }

    fn prover(&self, code: &SetupCode) -> Prover {
        Prover::start(self.info(), &self.secret(code)).unwrap()
    }

    fn start_body(&self, share_p: &[u8]) -> Value {
        json!({ "v": 1, "session_id": b64(&self.session_id), "share_p": b64(share_p) })
    }

    fn finish_body(&self, confirm_p: &[u8]) -> Value {
        json!({ "v": 1, "session_id": b64(&self.session_id), "confirm_p": b64(confirm_p) })
    }

    fn claim_body(&self, sealed: &Sealed) -> Value {
        json!({
            "v": 1,
            "session_id": b64(&self.session_id),
            "seq": sealed.seq,
            "ct": b64(&sealed.ciphertext),
        })
    }
}

/// `share_v` and `confirm_v` from a `/pair/start` answer.
fn start_reply(body: &Value) -> ([u8; 65], [u8; 32]) {
    (decode(&body["share_v"]), decode(&body["confirm_v"]))
}

/// Params, start and the prover's check of `confirm_v`; not finish.
async fn confirm(client: &Client, code: &SetupCode, binding: &str) -> (Params, ProverConfirmed) {
    let params = params(client, binding).await;
    let prover = params.prover(code);
    let (status, body) = client.post(START, &params.start_body(prover.share())).await;
    assert_eq!(status, 200, "{body}");
    let (share_v, confirm_v) = start_reply(&body);
    let confirmed = prover.finish(&share_v, &confirm_v).unwrap();
    (params, confirmed)
}

/// A whole pairing: the client's channel.
async fn pair(client: &Client, code: &SetupCode, binding: &str) -> (Params, Channel) {
    let (params, confirmed) = confirm(client, code, binding).await;
    let (status, body) = client
        .post(FINISH, &params.finish_body(&confirmed.confirm_p))
        .await;
    assert_eq!((status, &body), (200, &json!({"v": 1, "status": "paired"})));
    let channel = Channel::new(Role::Client, confirmed.shared, &params.session_id).unwrap();
    (params, channel)
}

fn assert_refused(reply: &(u16, Value), status: u16, code: &str) {
    let (got, body) = reply;
    assert_eq!(
        (*got, body["error"].as_str().unwrap()),
        (status, code),
        "{body}"
    );
    assert_eq!(body["v"], 1);
    assert!(body["message"].as_str().unwrap().len() > 10, "{body}");
    assert!(body["attempts_left"].is_u64(), "{body}");
}

// ---------------------------------------------------------------------------------------------
// The protocol.

#[tokio::test]
async fn a_full_pairing_hands_the_core_exactly_the_claim() {
    for binding in ["tls-server-end-point", "none"] {
        let gateway = Gateway::start().await;
        let client = gateway.client();
        let (params, mut channel) = pair(&client, &gateway.code, binding).await;
        assert_eq!(params.serial, SERIAL);
        assert_eq!(client.leaf(), gateway.leaf);
        assert_eq!(lock(&gateway.log).paired, 1);

        let sealed = channel
            .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
            .unwrap();
        let (status, body) = client.post(CLAIM, &params.claim_body(&sealed)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["v"], 1);
        let ack = channel
            .open(
                MessageType::ClaimAck,
                body["seq"].as_u64().unwrap(),
                &URL_SAFE_NO_PAD
                    .decode(body["ct"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&ack).unwrap(),
            json!({"v": 1, "status": "accepted"})
        );
        assert_eq!(
            lock(&gateway.log).handed_over,
            vec![CLAIM_TEXT.as_bytes().to_vec()]
        );
        assert_eq!(gateway.counted(), 1);

        // The session is gone: a replayed claim, and the server's own ack reflected back.
        assert_refused(
            &client.post(CLAIM, &params.claim_body(&sealed)).await,
            404,
            "no_session",
        );
        let ack = Sealed {
            seq: body["seq"].as_u64().unwrap(),
            ciphertext: URL_SAFE_NO_PAD
                .decode(body["ct"].as_str().unwrap())
                .unwrap(),
        };
        assert_refused(
            &client.post(CLAIM, &params.claim_body(&ack)).await,
            404,
            "no_session",
        );
        assert_eq!(lock(&gateway.log).handed_over.len(), 1);
        // The test core closed the window and published the phase.
        let (_, status) = client.get("/v1/status").await;
        assert_eq!(status["window"], "closed");
        assert_eq!(status["phase"], "claim-received");
    }
}

#[tokio::test]
async fn a_wrong_code_fails_at_the_client_and_the_attempt_was_counted() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let params = params(&client, "tls-server-end-point").await;
    let wrong = SetupCode::generate().unwrap();
    let prover = params.prover(&wrong);
    let (status, body) = client.post(START, &params.start_body(prover.share())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["attempts_left"], 19);
    let (share_v, confirm_v) = start_reply(&body);
    assert!(prover.finish(&share_v, &confirm_v).is_err());
    assert_eq!(gateway.counted(), 1);
    assert_eq!(gateway.view.borrow().attempts_left, 19);
}

#[tokio::test]
async fn a_wrong_confirm_p_is_refused_and_ends_the_session() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    for flip in [0, 31 * 8 + 7] {
        let (params, confirmed) = confirm(&client, &gateway.code, "none").await;
        let mut wrong = confirmed.confirm_p;
        wrong[flip / 8] ^= 1 << (flip % 8);
        assert_refused(
            &client.post(FINISH, &params.finish_body(&wrong)).await,
            401,
            "confirmation_failed",
        );
        assert_refused(
            &client
                .post(FINISH, &params.finish_body(&confirmed.confirm_p))
                .await,
            404,
            "no_session",
        );
    }
    // The wrong length is malformed, and ends the session too.
    let (params, confirmed) = confirm(&client, &gateway.code, "none").await;
    assert_refused(
        &client
            .post(FINISH, &params.finish_body(&confirmed.confirm_p[..31]))
            .await,
        400,
        "malformed",
    );
    assert_refused(
        &client
            .post(FINISH, &params.finish_body(&confirmed.confirm_p))
            .await,
        404,
        "no_session",
    );
    assert_eq!(lock(&gateway.log).paired, 0);
}

#[tokio::test]
async fn a_recorded_exchange_replayed_into_a_new_session_fails_confirmation() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let (first, confirmed) = confirm(&client, &gateway.code, "tls-server-end-point").await;
    let share_p = {
        // The share the first session used, as a recorder saw it.
        let prover = first.prover(&gateway.code);
        let share = *prover.share();
        let (status, _) = client.post(START, &first.start_body(&share)).await;
        assert_eq!(status, 409, "a step repeated in the session");
        share
    };
    // The repeat ended the first session.
    assert_refused(
        &client
            .post(FINISH, &first.finish_body(&confirmed.confirm_p))
            .await,
        404,
        "no_session",
    );

    let second = params(&client, "tls-server-end-point").await;
    let (status, body) = client.post(START, &second.start_body(&share_p)).await;
    assert_eq!(status, 200, "{body}");
    assert_refused(
        &client
            .post(FINISH, &second.finish_body(&confirmed.confirm_p))
            .await,
        401,
        "confirmation_failed",
    );
}

#[tokio::test]
async fn steps_out_of_order_or_repeated_are_wrong_state_and_end_the_session() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    // /claim before /finish.
    let (params, confirmed) = confirm(&client, &gateway.code, "none").await;
    let mut channel = Channel::new(Role::Client, confirmed.shared, &params.session_id).unwrap();
    let sealed = channel.seal(MessageType::Claim, b"{}").unwrap();
    assert_refused(
        &client.post(CLAIM, &params.claim_body(&sealed)).await,
        409,
        "wrong_state",
    );
    assert_refused(
        &client
            .post(FINISH, &params.finish_body(&confirmed.confirm_p))
            .await,
        404,
        "no_session",
    );
    // /finish twice.
    let (params, confirmed) = confirm(&client, &gateway.code, "none").await;
    let finish = params.finish_body(&confirmed.confirm_p);
    assert_eq!(client.post(FINISH, &finish).await.0, 200);
    assert_refused(&client.post(FINISH, &finish).await, 409, "wrong_state");
    // /finish before /start.
    let params = self::params(&client, "none").await;
    assert_refused(
        &client.post(FINISH, &params.finish_body(&[0; 32])).await,
        409,
        "wrong_state",
    );
    assert!(lock(&gateway.log).handed_over.is_empty());
}

#[tokio::test]
async fn bad_shares_are_refused_uncounted_and_end_the_session() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let params_for_mask = params(&client, "none").await;
    let secret = params_for_mask.secret(&gateway.code);
    // x = 0: shareP = 0·P + w0·M, the mask itself.
    let mask = *Prover::start_with_fixed(params_for_mask.info(), &secret, &[0; 32])
        .unwrap()
        .share();
    let good = *params_for_mask.prover(&gateway.code).share();
    let mut compressed = vec![2 + (good[64] & 1)];
    compressed.extend_from_slice(&good[1..33]);
    let mut off_curve = good;
    off_curve[64] ^= 1;
    let mut not_uncompressed = good;
    not_uncompressed[0] = 0x06;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("mask", mask.to_vec()),
        ("compressed", compressed),
        ("off the curve", off_curve.to_vec()),
        ("identity", vec![0]),
        ("zeros", vec![0x04; 1].into_iter().chain([0; 64]).collect()),
        ("hybrid prefix", not_uncompressed.to_vec()),
        ("empty", vec![]),
    ];
    let mut first = Some(params_for_mask);
    for (name, share) in cases {
        let params = match first.take() {
            Some(params) => params,
            None => params(&client, "none").await,
        };
        let reply = client.post(START, &params.start_body(&share)).await;
        assert_refused(&reply, 400, "bad_share");
        assert!(reply.1.get("confirm_v").is_none(), "{name}");
        assert_refused(
            &client.post(START, &params.start_body(&good)).await,
            404,
            "no_session",
        );
    }
    assert_eq!(gateway.counted(), 0);
    assert_eq!(gateway.view.borrow().attempts_left, 20);
}

#[tokio::test]
async fn a_changed_ciphertext_or_sequence_number_is_refused_and_ends_the_session() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    for flip in [0, 100, 8 * (CLAIM_TEXT.len() + 15) + 7] {
        let (params, mut channel) = pair(&client, &gateway.code, "none").await;
        let mut sealed = channel
            .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
            .unwrap();
        let good = sealed.clone();
        sealed.ciphertext[flip / 8] ^= 1 << (flip % 8);
        assert_refused(
            &client.post(CLAIM, &params.claim_body(&sealed)).await,
            400,
            "decrypt_failed",
        );
        assert_refused(
            &client.post(CLAIM, &params.claim_body(&good)).await,
            404,
            "no_session",
        );
    }
    // Wrong sequence numbers.
    for seq in [1, u64::MAX] {
        let (params, mut channel) = pair(&client, &gateway.code, "none").await;
        let mut sealed = channel
            .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
            .unwrap();
        sealed.seq = seq;
        assert_refused(
            &client.post(CLAIM, &params.claim_body(&sealed)).await,
            400,
            "bad_sequence",
        );
    }
    // Sealed as the other message type.
    let (params, mut channel) = pair(&client, &gateway.code, "none").await;
    let sealed = channel
        .seal(MessageType::ClaimAck, CLAIM_TEXT.as_bytes())
        .unwrap();
    assert_refused(
        &client.post(CLAIM, &params.claim_body(&sealed)).await,
        400,
        "decrypt_failed",
    );
    assert!(lock(&gateway.log).handed_over.is_empty());
    // Each paired session that ended this way was reported, so the installer no longer shows
    // as paired.
    let paired = lock(&gateway.log).paired;
    gateway.wait_unpaired(paired).await;
}

#[tokio::test]
async fn a_reflected_gateway_message_does_not_open_as_a_claim() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let params = params(&client, "none").await;
    let secret = params.secret(&gateway.code);
    // Two provers with the same x: the client's keys twice, so that the test can seal what the
    // gateway would send in this very session (its s2c ack) and reflect it.
    let x = loop {
        let mut x = [0; 32];
        SystemRandom::new().fill(&mut x).unwrap();
        if Prover::start_with_fixed(params.info(), &secret, &x).is_ok() {
            break x;
        }
    };
    let prover = Prover::start_with_fixed(params.info(), &secret, &x).unwrap();
    let twin = Prover::start_with_fixed(params.info(), &secret, &x).unwrap();
    let (status, body) = client.post(START, &params.start_body(prover.share())).await;
    assert_eq!(status, 200);
    let (share_v, confirm_v) = start_reply(&body);
    let confirmed = prover.finish(&share_v, &confirm_v).unwrap();
    let as_gateway = twin.finish(&share_v, &confirm_v).unwrap();
    let (status, _) = client
        .post(FINISH, &params.finish_body(&confirmed.confirm_p))
        .await;
    assert_eq!(status, 200);
    let mut gateway_side =
        Channel::new(Role::Gateway, as_gateway.shared, &params.session_id).unwrap();
    // The ack the gateway would send in this session, sent back to it as the claim.
    let reflected = gateway_side
        .seal(MessageType::ClaimAck, br#"{"v":1,"status":"accepted"}"#)
        .unwrap();
    assert_eq!(reflected.seq, 0);
    assert_refused(
        &client.post(CLAIM, &params.claim_body(&reflected)).await,
        400,
        "decrypt_failed",
    );
    assert!(lock(&gateway.log).handed_over.is_empty());
}

#[tokio::test]
async fn a_tls_terminating_relay_makes_confirmation_fail_with_the_binding() {
    let gateway = Gateway::start().await;
    let relay = Relay::start(gateway.addr).await;
    let client = Client::new(relay.addr);

    let params = params(&client, "tls-server-end-point").await;
    assert_ne!(
        client.leaf(),
        gateway.leaf,
        "the client saw the relay's certificate"
    );
    let prover = params.prover(&gateway.code);
    let (status, body) = client.post(START, &params.start_body(prover.share())).await;
    assert_eq!(status, 200, "{body}");
    let (share_v, confirm_v) = start_reply(&body);
    assert!(
        prover.finish(&share_v, &confirm_v).is_err(),
        "the right code, and still no confirmation through the relay"
    );
    assert_eq!(gateway.counted(), 1);

    // Through the same kind of relay, a client with no binding (a browser) pairs: the relay
    // only relays. (A new gateway: the session above waits for its deadline.)
    let gateway = Gateway::start().await;
    let relay = Relay::start(gateway.addr).await;
    let client = Client::new(relay.addr);
    let (params, _) = pair(&client, &gateway.code, "none").await;
    assert_eq!(params.serial, SERIAL);
}

/// A relay that terminates TLS with its own certificate and opens its own TLS connection to
/// the gateway, copying the plaintext both ways.
struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let (tls, _) = self_signed("gateway.local");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut downstream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let config = accept_any();
                    let mut up = tls_connect(upstream, config).await;
                    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut up).await;
                });
            }
        });
        Self { addr, task }
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions, the window, the core's refusals.

#[tokio::test]
async fn a_second_client_is_busy_while_one_is_pairing() {
    let gateway = Gateway::start().await;
    let first = gateway.client();
    let second = gateway.client();
    let (params, confirmed) = confirm(&first, &gateway.code, "none").await;
    assert_refused(
        &second
            .post(PARAMS, &params_body(&[1; 32], "tls-server-end-point"))
            .await,
        409,
        "busy",
    );
    // The first is not disturbed.
    let (status, _) = first
        .post(FINISH, &params.finish_body(&confirmed.confirm_p))
        .await;
    assert_eq!(status, 200);
    assert_refused(
        &second.post(PARAMS, &params_body(&[1; 32], "none")).await,
        409,
        "busy",
    );
}

#[tokio::test]
async fn a_client_that_goes_away_while_its_attempt_is_counted_frees_the_slot() {
    use tokio::io::AsyncWriteExt as _;

    let limits = Limits {
        params_burst: 100,
        ..Limits::default()
    };
    let gateway = Gateway::with(limits, open_view(20)).await;
    *lock(&gateway.count_delay) = Duration::from_secs(2);
    let client = gateway.client();
    let params = params(&client, "none").await;
    let prover = params.prover(&gateway.code);
    let body = params.start_body(prover.share()).to_string();
    let mut tls = tls_connect(gateway.addr, accept_any()).await;
    tls.write_all(
        format!(
            "POST {START} HTTP/1.1\r\nhost: gateway.local\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The client leaves once the core has the attempt (and sits on it for 2 s).
    gateway
        .wait_log("the attempt asked for", |log| log.asked == 1)
        .await;
    let _ = tls.shutdown().await;
    drop(tls);
    // Well before the core answers, the session is gone and another client may pair.
    let started = Instant::now();
    loop {
        let (status, body) = client.post(PARAMS, &params_body(&[2; 32], "none")).await;
        if status == 200 {
            break;
        }
        assert_refused(&(status, body), 409, "busy");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "still busy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The attempt was counted all the same: the core had it.
    gateway
        .wait_log("the attempt counted", |log| log.counted >= 1)
        .await;
    assert_eq!(gateway.counted(), 1);
}

#[tokio::test]
async fn params_are_refused_while_the_window_is_closed() {
    let gateway = Gateway::with(Limits::default(), View::default()).await;
    let client = gateway.client();
    let reply = client.post(PARAMS, &params_body(&[1; 32], "none")).await;
    assert_refused(&reply, 403, "window_closed");
    assert_eq!(reply.1["attempts_left"], 0);
    // Open, but no attempts left.
    gateway.view.send_replace(open_view(0));
    assert_refused(
        &client.post(PARAMS, &params_body(&[1; 32], "none")).await,
        403,
        "window_closed",
    );
    gateway.view.send_replace(open_view(3));
    let params = params(&client, "none").await;
    assert_eq!(params.serial, SERIAL);
}

#[tokio::test]
async fn the_last_attempt_may_still_finish_and_hand_over() {
    let gateway = Gateway::with(Limits::default(), open_view(1)).await;
    let client = gateway.client();
    let (params, mut channel) = pair(&client, &gateway.code, "none").await;
    assert!(
        !gateway.view.borrow().open,
        "the test core closed the window"
    );
    let sealed = channel
        .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
        .unwrap();
    let (status, body) = client.post(CLAIM, &params.claim_body(&sealed)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lock(&gateway.log).handed_over.len(), 1);
}

#[tokio::test]
async fn the_cores_refusals_are_passed_on_and_end_the_session() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    // The count refused (the window closed between params and start): no confirm_v.
    let params = params(&client, "none").await;
    gateway.view.send_modify(|v| v.open = false);
    let prover = params.prover(&gateway.code);
    let reply = client.post(START, &params.start_body(prover.share())).await;
    assert_refused(&reply, 403, "window_closed");
    assert!(reply.1.get("confirm_v").is_none());
    gateway.view.send_modify(|v| v.open = true);
    assert_refused(
        &client.post(START, &params.start_body(prover.share())).await,
        404,
        "no_session",
    );

    // The claim refused.
    *lock(&gateway.hand_over) = Err(Refusal {
        code: "claim_invalid",
        status: 422,
        message: "The claim's template is not allowed on this gateway.".to_owned(),
    });
    let (params, mut channel) = pair(&client, &gateway.code, "none").await;
    let sealed = channel
        .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
        .unwrap();
    let reply = client.post(CLAIM, &params.claim_body(&sealed)).await;
    assert_refused(&reply, 422, "claim_invalid");
    assert_eq!(
        reply.1["message"],
        "The claim's template is not allowed on this gateway."
    );
    assert_refused(
        &client.post(CLAIM, &params.claim_body(&sealed)).await,
        404,
        "no_session",
    );
}

#[tokio::test]
async fn sessions_expire_after_a_step_deadline_or_their_lifetime() {
    let limits = Limits {
        step_deadline: Duration::from_millis(1500),
        session_lifetime: Duration::from_millis(2200),
        ..Limits::default()
    };
    let gateway = Gateway::with(limits, open_view(20)).await;
    let client = gateway.client();
    let other = gateway.client();

    // A step too late.
    let params = params(&client, "none").await;
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // The slot freed itself: another client gets a session.
    let others = self::params(&other, "none").await;
    let prover = params.prover(&gateway.code);
    assert_refused(
        &client.post(START, &params.start_body(prover.share())).await,
        404,
        "no_session",
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let prover = others.prover(&gateway.code);
    assert_refused(
        &other.post(START, &others.start_body(prover.share())).await,
        404,
        "no_session",
    );

    // Each step in time, but the session too old.
    let params = self::params(&client, "none").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let prover = params.prover(&gateway.code);
    let (status, body) = client.post(START, &params.start_body(prover.share())).await;
    assert_eq!(status, 200, "{body}");
    let (share_v, confirm_v) = start_reply(&body);
    let confirmed = prover.finish(&share_v, &confirm_v).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, body) = client
        .post(FINISH, &params.finish_body(&confirmed.confirm_p))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut channel = Channel::new(Role::Client, confirmed.shared, &params.session_id).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sealed = channel
        .seal(MessageType::Claim, CLAIM_TEXT.as_bytes())
        .unwrap();
    assert_refused(
        &client.post(CLAIM, &params.claim_body(&sealed)).await,
        404,
        "no_session",
    );
    assert!(lock(&gateway.log).handed_over.is_empty());
    // The paired session that expired was reported.
    gateway.wait_unpaired(1).await;
}

#[tokio::test]
async fn params_are_rate_limited() {
    let limits = Limits {
        params_burst: 3,
        params_refill: Duration::from_secs(60),
        ..Limits::default()
    };
    let gateway = Gateway::with(limits, open_view(20)).await;
    let client = gateway.client();
    let body = params_body(&[1; 32], "none");
    assert_eq!(client.post(PARAMS, &body).await.0, 200);
    assert_refused(&client.post(PARAMS, &body).await, 409, "busy");
    assert_refused(
        &client.post(PARAMS, &b"{}".to_vec().into()).await,
        400,
        "malformed",
    );
    let refused = client
        .send("POST", PARAMS, Full::new(Bytes::from(body.to_string())))
        .await;
    // The next token comes in a minute: the client is told when, in whole seconds.
    let wait: u64 = refused.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59..=60).contains(&wait), "Retry-After: {wait}");
    let refused = Client::read(refused).await;
    assert_refused(&refused, 429, "rate_limited");
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("try again in {wait} seconds.")),
        "{}",
        refused.1
    );
}

#[test]
fn the_bucket_refills_one_token_per_period_up_to_the_burst() {
    let limits = Limits {
        params_burst: 2,
        params_refill: Duration::from_secs(5),
        ..Limits::default()
    };
    let start = Instant::now();
    let mut bucket = Bucket {
        tokens: 2,
        last: start,
    };
    let at = |seconds: u64| start + Duration::from_secs(seconds);
    assert_eq!(bucket.take(&limits, start), Ok(()));
    assert_eq!(bucket.take(&limits, start), Ok(()));
    // Empty: the wait is until the next token.
    assert_eq!(bucket.take(&limits, at(4)), Err(Duration::from_secs(1)));
    assert_eq!(bucket.take(&limits, at(5)), Ok(()));
    assert_eq!(bucket.take(&limits, at(6)), Err(Duration::from_secs(4)));
    // A long pause fills it to the burst only.
    let later = at(3600);
    assert_eq!(bucket.take(&limits, later), Ok(()));
    assert_eq!(bucket.take(&limits, later), Ok(()));
    assert_eq!(bucket.take(&limits, later), Err(Duration::from_secs(5)));
}

// ---------------------------------------------------------------------------------------------
// Bodies.

#[tokio::test]
async fn oversized_bodies_are_too_large() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    for (path, limit) in [
        (PARAMS, PARAMS_BODY_LIMIT),
        (START, PARAMS_BODY_LIMIT),
        (FINISH, PARAMS_BODY_LIMIT),
        (CLAIM, CLAIM_BODY_LIMIT),
    ] {
        // Declared.
        let body = format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(limit));
        assert_refused(
            &client.post_bytes(path, body.into_bytes()).await,
            413,
            "too_large",
        );
        // Chunked, with no length: counted as it arrives.
        let chunks = (0..=limit / 256)
            .map(|_| Bytes::from(vec![b' '; 257]))
            .collect();
        let response = client.send("POST", path, Chunks(chunks)).await;
        assert_refused(&Client::read(response).await, 413, "too_large");
    }
    // A claim body under its limit but over the others' is read.
    let body = format!(
        r#"{{"v":1,"session_id":"{}","seq":0,"ct":"{}"}}"#,
        b64(&[0; 16]),
        "A".repeat(CLAIM_BODY_LIMIT - 100)
    );
    assert_refused(
        &client.post_bytes(CLAIM, body.into_bytes()).await,
        404,
        "no_session",
    );
}

#[tokio::test]
async fn malformed_bodies_and_other_versions_are_refused() {
    let limits = Limits {
        params_burst: 100,
        ..Limits::default()
    };
    let gateway = Gateway::with(limits, open_view(20)).await;
    let client = gateway.client();
    let good = params_body(&[1; 32], "none");
    let with = |key: &str, value: Value| {
        let mut body = good.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    for (body, code) in [
        (b"not json".to_vec(), "malformed"),
        (b"[1,2]".to_vec(), "malformed"),
        (b"".to_vec(), "malformed"),
        (without("v").to_string().into_bytes(), "malformed"),
        (
            without("client_random").to_string().into_bytes(),
            "malformed",
        ),
        (with("v", json!("1")).to_string().into_bytes(), "malformed"),
        (with("v", json!(1.5)).to_string().into_bytes(), "malformed"),
        (
            with("client_random", json!(7)).to_string().into_bytes(),
            "malformed",
        ),
        (
            with("client_random", json!(b64(&[1; 31])))
                .to_string()
                .into_bytes(),
            "malformed",
        ),
        (
            with("client_random", json!("AAAA="))
                .to_string()
                .into_bytes(),
            "malformed",
        ),
        (
            with("client_id", json!("")).to_string().into_bytes(),
            "malformed",
        ),
        (
            with("client_id", json!("x".repeat(65)))
                .to_string()
                .into_bytes(),
            "malformed",
        ),
        (
            with("binding", json!("tls-unique"))
                .to_string()
                .into_bytes(),
            "malformed",
        ),
        (
            with("v", json!(2)).to_string().into_bytes(),
            "unsupported_version",
        ),
        (
            with("v", json!(0)).to_string().into_bytes(),
            "unsupported_version",
        ),
        (
            with("v", json!(-1)).to_string().into_bytes(),
            "unsupported_version",
        ),
    ] {
        let reply = client.post_bytes(PARAMS, body.clone()).await;
        assert_refused(&reply, 400, code);
    }
    // A whole number is a whole number.
    let (status, body) = client.post(PARAMS, &with("v", json!(1.0))).await;
    assert_eq!(status, 200, "{body}");

    // A malformed step ends the session it names: the next start finds none (a live session
    // would say bad_share).
    let session_id = body["session_id"].clone();
    assert_refused(
        &client
            .post(
                START,
                &json!({"v": 1, "session_id": session_id, "share_p": 5}),
            )
            .await,
        400,
        "malformed",
    );
    let start = json!({"v": 1, "session_id": session_id, "share_p": b64(&[4; 65])});
    assert_refused(&client.post(START, &start).await, 404, "no_session");
    // And a step of another version.
    let params = params(&client, "none").await;
    let prover = params.prover(&gateway.code);
    let mut body = params.start_body(prover.share());
    body["v"] = json!(2);
    assert_refused(&client.post(START, &body).await, 400, "unsupported_version");
    assert_refused(
        &client.post(START, &params.start_body(prover.share())).await,
        404,
        "no_session",
    );
    assert_eq!(gateway.counted(), 0);
}

// ---------------------------------------------------------------------------------------------
// Status and events.

#[tokio::test]
async fn status_shows_the_window_and_the_progress_without_secrets() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let (status, body) = client.get("/v1/status").await;
    assert_eq!(status, 200);
    let closes_in = body["closes_in"].as_i64().unwrap();
    assert!((890..=900).contains(&closes_in), "{body}");
    assert_eq!(
        body,
        json!({
            "v": 1,
            "serial": SERIAL,
            "window": "open",
            "closes_in": closes_in,
            "attempts_left": 20,
            "phase": "waiting",
        })
    );
    gateway.view.send_replace(View {
        open: false,
        closes_at: None,
        attempts_left: 17,
        phase: Phase::Failed,
        thing_name: Some("gw-0001234".to_owned()),
        error: Some((
            "claim_expired".to_owned(),
            "the claim expired before the gateway could use it".to_owned(),
        )),
    });
    let (_, body) = client.get("/v1/status").await;
    assert_eq!(
        body,
        json!({
            "v": 1,
            "serial": SERIAL,
            "window": "closed",
            "closes_in": 0,
            "attempts_left": 17,
            "phase": "failed",
            "thing_name": "gw-0001234",
            "error": {
                "code": "claim_expired",
                "message": "the claim expired before the gateway could use it",
            },
        })
    );
}

/// Reads the next `data:` event of a Server-Sent Events body.
async fn next_event(body: &mut Incoming, buffer: &mut String) -> Value {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            return serde_json::from_str(&data.join("\n")).unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

#[tokio::test]
async fn events_deliver_every_change_of_the_view() {
    let gateway = Gateway::start().await;
    let client = gateway.client();
    let response = client
        .send("GET", "/v1/events", Full::new(Bytes::new()))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get(header::CONTENT_TYPE).unwrap(),
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut buffer = String::new();
    let first = next_event(&mut body, &mut buffer).await;
    assert_eq!(first["phase"], "waiting");
    assert_eq!(first["serial"], SERIAL);

    // A pairing moves the phase (the test core publishes it).
    let other = gateway.client();
    let _ = pair(&other, &gateway.code, "none").await;
    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut body, &mut buffer).await;
        seen.push(event["attempts_left"].as_u64().unwrap());
        if event["phase"] == "paired" {
            assert_eq!(event["attempts_left"], 19);
            break;
        }
    }
    gateway.view.send_modify(|v| {
        v.phase = Phase::Connected;
        v.thing_name = Some("gw-1".to_owned());
    });
    let event = next_event(&mut body, &mut buffer).await;
    assert_eq!(
        (&event["phase"], &event["thing_name"]),
        (&json!("connected"), &json!("gw-1"))
    );
    assert_eq!(event, status_body(&gateway.view.borrow(), SERIAL));
}

// ---------------------------------------------------------------------------------------------
// The request parsers.

fn known(error: &ApiError) -> bool {
    ERROR_CODES.contains(&error.code)
        && error.status.is_client_error()
        && !error.message.is_empty()
        && error.body(3)["error"] == error.code
}

/// JSON values shaped like requests: the fields the parsers read, with values of any kind.
fn request_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(1)),
        Just(json!(1.0)),
        Just(json!("none")),
        Just(json!("tls-server-end-point")),
        "[ -~]{0,70}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..70).prop_map(|b| Value::from(b64(&b))),
        Just(Value::from(b64(&[4; 65]))),
        Just(Value::from(b64(&[0; 16]))),
        Just(Value::from(b64(&[0; 32]))),
    ];
    let value = leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop_oneof![
        Just("v".to_owned()),
        Just("client_random".to_owned()),
        Just("client_id".to_owned()),
        Just("binding".to_owned()),
        Just("session_id".to_owned()),
        Just("share_p".to_owned()),
        Just("confirm_p".to_owned()),
        Just("seq".to_owned()),
        Just("ct".to_owned()),
        "[a-z_]{1,12}",
    ];
    proptest::collection::btree_map(key, value, 0..10)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn check_all_parsers(body: &[u8]) {
    if let Err(error) = parse_params(body) {
        assert!(known(&error), "{error:?}");
    }
    for parsed in [
        parse_start(body).map(|_| ()),
        parse_finish(body).map(|_| ()),
        parse_claim(body).map(|_| ()),
    ] {
        if let Err(ParseError { error, .. }) = parsed {
            assert!(known(&error), "{error:?}");
            assert!(
                ["malformed", "unsupported_version"].contains(&error.code),
                "{error:?}"
            );
        }
    }
}

proptest! {
    // 256 cases each in the suite; PROPTEST_CASES=100000 for a long run.
    #[test]
    fn arbitrary_bytes_never_panic_the_parsers(body in proptest::collection::vec(any::<u8>(), 0..1200)) {
        check_all_parsers(&body);
    }

    #[test]
    fn request_shaped_json_never_panics_the_parsers(value in request_like()) {
        check_all_parsers(value.to_string().as_bytes());
    }
}

#[test]
fn the_parsers_take_what_the_profile_says() {
    let params = parse_params(
        params_body(&[3; 32], "tls-server-end-point")
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        params,
        ParamsRequest {
            client_random: [3; 32],
            client_id: "iotctl/0.1".to_owned(),
            binding: BindingChoice::TlsServerEndPoint,
        }
    );
    let claim = parse_claim(
        json!({"v": 1, "session_id": b64(&[5; 16]), "seq": 0, "ct": b64(b"sealed"), "extra": 1})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        claim,
        ClaimRequest {
            session_id: [5; 16],
            seq: 0,
            ct: b"sealed".to_vec(),
        }
    );
    // The session named by a refused request is known, so that the refusal can end it.
    let refused = parse_claim(
        json!({"v": 1, "session_id": b64(&[5; 16]), "seq": -1, "ct": ""})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(refused.session_id, Some([5; 16]));
    assert_eq!(refused.error.code, "malformed");
    let refused = parse_finish(
        json!({"v": 2, "session_id": b64(&[5; 16])})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(
        (refused.session_id, refused.error.code),
        (Some([5; 16]), "unsupported_version")
    );
    // Padded base64 is not unpadded base64url.
    let refused = parse_finish(
        json!({"v": 1, "session_id": URL_SAFE_NO_PAD.encode([5; 16]) + "==", "confirm_p": ""})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(
        (refused.session_id, refused.error.code),
        (None, "malformed")
    );
}

// ---------------------------------------------------------------------------------------------
// The installer's page and the browser API on plain HTTP.

/// One plain HTTP/1.1 request to `addr`: the status, the headers and the body.
async fn plain(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, axum::http::HeaderMap, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "10.0.0.1:8080");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// The hash a CSP names for an inline element's text.
fn csp_hash(text: &str) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn the_page_is_sent_gzip_compressed_with_a_policy_that_allows_its_own_code_only() {
    let gateway = Gateway::with_page(Link::Direct).await;
    let page = gateway.page.unwrap();
    let (status, headers, body) = plain(
        page,
        "GET",
        "/",
        &[("accept-encoding", "gzip, deflate")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(&body[..2], [0x1f, 0x8b], "gzip's magic");
    assert_eq!(body, PAGE_GZIP);
    // The policy names the page's one script and one style by their hashes, nothing else.
    let html = include_str!("../../../page/dist/index.html");
    let inner = |open: &str, close: &str| {
        html.split_once(open)
            .unwrap()
            .1
            .split_once(close)
            .unwrap()
            .0
    };
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'; "), "{csp}");
    assert!(
        csp.contains(&format!(
            "script-src 'sha256-{}';",
            csp_hash(inner("<script>", "</script>"))
        )),
        "{csp}"
    );
    assert!(
        csp.contains(&format!(
            "style-src 'sha256-{}';",
            csp_hash(inner("<style>", "</style>"))
        )),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"));

    // A client that takes no gzip is told so; so is one that refuses it with q=0.
    for accept in [
        None,
        Some("identity"),
        Some("gzip;q=0, identity"),
        Some("gzip;q=0.000"),
    ] {
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        let (status, _, body) = plain(page, "GET", "/", &headers, "").await;
        assert_eq!(status, 406, "{accept:?}");
        assert!(String::from_utf8_lossy(&body).contains("curl --compressed"));
    }
    for accept in ["*", "br;q=1.0, gzip;q=0.5", "GZIP"] {
        let (status, _, _) = plain(page, "GET", "/", &[("accept-encoding", accept)], "").await;
        assert_eq!(status, 200, "{accept}");
    }

    // Not on the HTTPS port: that is the API's, for iotctl and apps.
    let response = gateway
        .client()
        .send("GET", "/", Full::new(Bytes::new()))
        .await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn the_form_says_what_the_page_asks_and_whether_the_link_is_direct() {
    for (link, direct) in [(Link::Direct, true), (Link::Shared, false)] {
        let gateway = Gateway::with_page(link).await;
        let (status, _, body) = plain(gateway.page.unwrap(), "GET", "/v1/form", &[], "").await;
        assert_eq!(status, 200);
        let form: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(form["v"], 1, "{form}");
        assert_eq!(form["serial"], SERIAL, "{form}");
        assert_eq!(form["parameters"], json!(["Site"]), "{form}");
        assert_eq!(form["direct_link"], direct, "{form}");
        assert_eq!(form["status"]["window"], "open", "{form}");
        assert_eq!(form["status"]["attempts_left"], 20, "{form}");
        // Over HTTPS the form is there too (for apps), never as a direct link.
        let (status, form) = gateway.client().get("/v1/form").await;
        assert_eq!(status, 200);
        assert_eq!(form["direct_link"], false, "{form}");
    }
}

/// On plain HTTP there is no certificate to bind to: `tls-server-end-point` is refused before a
/// session is made; `none` starts one (the browser tests pair the whole way over it).
#[tokio::test]
async fn plain_http_pairs_with_binding_none_only() {
    let gateway = Gateway::with_page(Link::Direct).await;
    let page = gateway.page.unwrap();
    let pair = |binding: &'static str| async move {
        let body = params_body(&[7; RANDOM_LEN], binding).to_string();
        let json = [("content-type", "application/json")];
        let (status, _, answer) = plain(page, "POST", PARAMS, &json, &body).await;
        (status, serde_json::from_slice::<Value>(&answer).unwrap())
    };
    let (status, answer) = pair("tls-server-end-point").await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "malformed", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("must be \"none\" on plain HTTP"),
        "{answer}"
    );
    let (status, answer) = pair("none").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["serial"], SERIAL, "{answer}");
    assert_eq!(gateway.counted(), 0);
}
