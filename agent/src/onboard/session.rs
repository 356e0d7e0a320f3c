//! The profile's session layer (§5.5): the SPAKE2+ context, the identities, and the sealed
//! messages that carry the claim once both sides confirmed.
//!
//! - `Context = SHA-256(lp("iotd-onboard/1") ‖ lp(suite) ‖ lp(client_random) ‖
//!   lp(gateway_random) ‖ lp(session_id) ‖ lp(salt) ‖ lp(be32(iterations)) ‖ lp(binding))`: it
//!   binds both randoms, the session, the PBKDF parameters and (for the CLI) the TLS
//!   certificate the client saw, so a replayed or relayed exchange fails confirmation.
//! - `idProver` is the client's self-declared id (`iotctl/<version>`), `idVerifier` the serial.
//! - `k_c2s`, `k_s2c = HKDF-SHA256(K_shared, salt = session_id, "iotd-onboard/1 c2s"/"s2c")`.
//! - AES-256-GCM with nonce `0⁴ ‖ be64(seq)` and AAD `lp("iotd-onboard/1") ‖ lp(session_id) ‖
//!   lp(msg_type) ‖ be64(seq)`: one key per direction and fresh keys per session, so nonces never
//!   repeat; the message type in the AAD stops a message being taken for another kind; the
//!   receiver takes only the exact next `seq`, which stops replays within a session.

use std::fmt;

use ring::aead;
use sha2::Digest as _;
use zeroize::Zeroizing;

use super::spake2plus::{SessionInfo, SharedKey, hkdf_sha256, push_length_prefixed};

/// The profile's name, first in the context and the AAD.
pub const PROFILE: &str = "iotd-onboard/1";
/// The SPAKE2+ suite, as `/v1/pair/params` names it.
pub const SUITE: &str = "P256-SHA256-HKDF-SHA256-HMAC-SHA256";
/// Bytes of a session id.
pub const SESSION_ID_LEN: usize = 16;
/// Bytes of the client's and the gateway's randoms.
pub const RANDOM_LEN: usize = 32;
/// The longest client id (`idProver`).
pub const MAX_CLIENT_ID_LEN: usize = 64;
/// The AES-GCM tag that follows each ciphertext.
pub const TAG_LEN: usize = 16;

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// An AES-256-GCM key, wiped when dropped.
type Key = Zeroizing<[u8; KEY_LEN]>;

/// Why a session message could not be sealed or opened, or a client id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// `400 bad_sequence`.
    #[error("refusing the message: its sequence number is {got}, and the next one is {expected}")]
    BadSequence { expected: u64, got: u64 },
    /// `400 decrypt_failed`: a wrong key (another session, the other direction), another
    /// message type, or a changed ciphertext.
    #[error(
        "opening the message failed: it was not sealed for this session, direction and message \
         type, or it was changed on the way"
    )]
    DecryptFailed,
    #[error("sealing the message: the session has used up its sequence numbers")]
    SequenceExhausted,
    #[error("sealing the message with AES-256-GCM failed")]
    SealFailed,
    #[error("deriving the session's {0} key with HKDF-SHA256 failed")]
    Kdf(&'static str),
    #[error("client id {client_id:?}: {problem}")]
    ClientId {
        client_id: String,
        problem: &'static str,
    },
}

/// What the client binds the session to besides the PAKE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Nothing (`"none"`): browsers cannot see the server's certificate.
    None,
    /// `"tls-server-end-point"`: the SHA-256 of the DER of the gateway's onboarding leaf
    /// certificate, as the client saw it; a TLS-terminating relay makes it differ.
    TlsServerEndPoint([u8; 32]),
}

impl Binding {
    /// The binding to the certificate `der` (always SHA-256, unlike RFC 5929's, which follows
    /// the certificate's signature hash).
    pub fn tls_server_end_point(certificate_der: &[u8]) -> Self {
        Binding::TlsServerEndPoint(sha2::Sha256::digest(certificate_der).into())
    }

    /// The `binding` field's value in `/v1/pair/params`.
    pub fn name(&self) -> &'static str {
        match self {
            Binding::None => "none",
            Binding::TlsServerEndPoint(_) => "tls-server-end-point",
        }
    }

    /// What goes into the context: empty, or `"tls-server-end-point"` and the hash.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Binding::None => Vec::new(),
            Binding::TlsServerEndPoint(hash) => [self.name().as_bytes(), hash].concat(),
        }
    }
}

/// What the context hash binds: everything `/v1/pair/params` exchanged.
#[derive(Debug, Clone, Copy)]
pub struct ContextParams<'a> {
    pub client_random: &'a [u8; RANDOM_LEN],
    pub gateway_random: &'a [u8; RANDOM_LEN],
    pub session_id: &'a [u8; SESSION_ID_LEN],
    pub salt: &'a [u8],
    pub iterations: u32,
    pub binding: &'a Binding,
}

/// The profile's SPAKE2+ Context.
pub fn context(params: &ContextParams<'_>) -> [u8; 32] {
    let binding = params.binding.bytes();
    let iterations = params.iterations.to_be_bytes();
    let mut input = Vec::new();
    for part in [
        PROFILE.as_bytes(),
        SUITE.as_bytes(),
        params.client_random,
        params.gateway_random,
        params.session_id,
        params.salt,
        &iterations,
        &binding,
    ] {
        push_length_prefixed(&mut input, part);
    }
    sha2::Sha256::digest(&input).into()
}

/// Checks a client id (`idProver`): 1 to 64 printable ASCII characters.
pub fn check_client_id(client_id: &str) -> Result<(), SessionError> {
    let problem = if client_id.is_empty() {
        Some("it is empty")
    } else if client_id.len() > MAX_CLIENT_ID_LEN {
        Some("it is longer than 64 characters")
    } else if !client_id.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        Some("it has characters other than printable ASCII")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SessionError::ClientId {
            client_id: client_id.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// The SPAKE2+ session inputs of the profile: its context, `idProver = client_id` and
/// `idVerifier = serial`.
pub fn session_info(
    params: &ContextParams<'_>,
    client_id: &str,
    serial: &str,
) -> Result<SessionInfo, SessionError> {
    check_client_id(client_id)?;
    Ok(SessionInfo {
        context: context(params).to_vec(),
        id_prover: client_id.as_bytes().to_vec(),
        id_verifier: serial.as_bytes().to_vec(),
    })
}

/// Which end of the session this is: the client sends c2s, the gateway s2c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Gateway,
}

/// The kinds of sealed message, bound by the AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Client to gateway: the claim bundle.
    Claim,
    /// Gateway to client: its answer.
    ClaimAck,
}

impl MessageType {
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageType::Claim => "claim",
            MessageType::ClaimAck => "claim-ack",
        }
    }
}

/// A sealed message: its sequence number and `ciphertext ‖ tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub ciphertext: Vec<u8>,
}

/// The confirmed session's two directions, each with its key and next sequence number.
pub struct Channel {
    session_id: [u8; SESSION_ID_LEN],
    send_key: Key,
    receive_key: Key,
    next_send: u64,
    next_receive: u64,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("session_id", &hex::encode(self.session_id))
            .field("next_send", &self.next_send)
            .field("next_receive", &self.next_receive)
            .finish_non_exhaustive()
    }
}

/// `k_c2s` and `k_s2c` from `K_shared`.
fn app_keys(
    shared: &SharedKey,
    session_id: &[u8; SESSION_ID_LEN],
) -> Result<(Key, Key), SessionError> {
    let mut c2s = Zeroizing::new([0; KEY_LEN]);
    let mut s2c = Zeroizing::new([0; KEY_LEN]);
    hkdf_sha256(
        session_id,
        shared.as_bytes(),
        format!("{PROFILE} c2s").as_bytes(),
        &mut *c2s,
    )
    .map_err(|()| SessionError::Kdf("c2s"))?;
    hkdf_sha256(
        session_id,
        shared.as_bytes(),
        format!("{PROFILE} s2c").as_bytes(),
        &mut *s2c,
    )
    .map_err(|()| SessionError::Kdf("s2c"))?;
    Ok((c2s, s2c))
}

/// `00000000 ‖ be64(seq)`.
fn nonce(seq: u64) -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    nonce[4..].copy_from_slice(&seq.to_be_bytes());
    nonce
}

/// `lp(PROFILE) ‖ lp(session_id) ‖ lp(msg_type) ‖ be64(seq)`.
fn aad(session_id: &[u8; SESSION_ID_LEN], msg_type: MessageType, seq: u64) -> Vec<u8> {
    let mut aad = Vec::new();
    push_length_prefixed(&mut aad, PROFILE.as_bytes());
    push_length_prefixed(&mut aad, session_id);
    push_length_prefixed(&mut aad, msg_type.as_str().as_bytes());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

/// An AES-256-GCM key for one operation. Made per message from our wiped copy of the key,
/// so ring's expanded key (which it cannot wipe) lives only as long as the operation.
fn aead_key(key: &[u8; KEY_LEN]) -> Result<aead::LessSafeKey, SessionError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| SessionError::SealFailed)
}

impl Channel {
    /// Derives the session's keys from `K_shared` (consumed: nothing else may use it) and the
    /// session id; both directions start at sequence number 0.
    pub fn new(
        role: Role,
        shared: SharedKey,
        session_id: &[u8; SESSION_ID_LEN],
    ) -> Result<Self, SessionError> {
        let (c2s, s2c) = app_keys(&shared, session_id)?;
        let (send_key, receive_key) = match role {
            Role::Client => (c2s, s2c),
            Role::Gateway => (s2c, c2s),
        };
        Ok(Self {
            session_id: *session_id,
            send_key,
            receive_key,
            next_send: 0,
            next_receive: 0,
        })
    }

    /// Seals `plaintext` as the next message of our direction.
    pub fn seal(
        &mut self,
        msg_type: MessageType,
        plaintext: &[u8],
    ) -> Result<Sealed, SessionError> {
        let seq = self.next_send;
        let next = seq.checked_add(1).ok_or(SessionError::SequenceExhausted)?;
        let mut ciphertext = Vec::with_capacity(plaintext.len() + TAG_LEN);
        ciphertext.extend_from_slice(plaintext);
        aead_key(&self.send_key)?
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce(seq)),
                aead::Aad::from(aad(&self.session_id, msg_type, seq)),
                &mut ciphertext,
            )
            .map_err(|_| SessionError::SealFailed)?;
        self.next_send = next;
        Ok(Sealed { seq, ciphertext })
    }

    /// Opens the peer's message `seq` of type `msg_type`. Only the exact next sequence number
    /// is taken; a refused message does not advance it (the server ends the session on any
    /// refusal anyway).
    pub fn open(
        &mut self,
        msg_type: MessageType,
        seq: u64,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SessionError> {
        if seq != self.next_receive {
            return Err(SessionError::BadSequence {
                expected: self.next_receive,
                got: seq,
            });
        }
        let next = seq.checked_add(1).ok_or(SessionError::SequenceExhausted)?;
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = aead_key(&self.receive_key)?
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce(seq)),
                aead::Aad::from(aad(&self.session_id, msg_type, seq)),
                &mut buffer,
            )
            .map_err(|_| SessionError::DecryptFailed)?
            .len();
        buffer.truncate(plaintext_len);
        self.next_receive = next;
        Ok(buffer)
    }

    /// The sequence number the next message from the peer must carry.
    pub fn next_receive_seq(&self) -> u64 {
        self.next_receive
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::Value;

    use super::*;
    use crate::onboard::code::SetupCode;
    use crate::onboard::register::derive_secret;
    use crate::onboard::spake2plus::{Prover, Spake2PlusError, Verifier};
    use crate::onboard::vectors::{array, bytes, draft, number, text};

    fn binding_of(v: &Value) -> Binding {
        let binding = bytes(v, "binding");
        if binding.is_empty() {
            return Binding::None;
        }
        let hash = binding.strip_prefix(b"tls-server-end-point").unwrap();
        Binding::TlsServerEndPoint(<[u8; 32]>::try_from(hash).unwrap())
    }

    /// The session inputs of a draft case, built the way the server and client build them.
    fn info_of(v: &Value) -> SessionInfo {
        let binding = binding_of(v);
        let salt = bytes(v, "pbkdf.salt");
        let params = ContextParams {
            client_random: &array(v, "client_random"),
            gateway_random: &array(v, "gateway_random"),
            session_id: &array(v, "session_id"),
            salt: &salt,
            iterations: u32::try_from(number(v, "pbkdf.iterations")).unwrap(),
            binding: &binding,
        };
        session_info(
            &params,
            &text(v, "idProver_ascii"),
            &text(v, "idVerifier_ascii"),
        )
        .unwrap()
    }

    /// Both roles of a draft case from the setup code, up to the confirmed channels.
    fn channels_of(v: &Value) -> (Channel, Channel) {
        let info = info_of(v);
        let code = SetupCode::parse(&text(v, "setup_code")).unwrap();
        let secret = derive_secret(
            &code,
            &text(v, "serial_ascii"),
            &bytes(v, "pbkdf.salt"),
            1000,
        )
        .unwrap();
        let prover = Prover::start_with_fixed(info.clone(), &secret, &array(v, "x")).unwrap();
        assert_eq!(prover.share()[..], bytes(v, "shareP")[..]);
        let (confirming, response) = Verifier::new(info, &secret.record())
            .respond_with_fixed(prover.share(), &array(v, "y"))
            .unwrap();
        assert_eq!(response.share_v[..], bytes(v, "shareV")[..]);
        assert_eq!(response.confirm_v[..], bytes(v, "confirmV")[..]);
        let confirmed = prover
            .finish(&response.share_v, &response.confirm_v)
            .unwrap();
        assert_eq!(confirmed.confirm_p[..], bytes(v, "confirmP")[..]);
        let gateway_key = confirming.finish(&confirmed.confirm_p).unwrap();
        assert_eq!(gateway_key.as_bytes()[..], bytes(v, "K_shared")[..]);
        let session_id = array(v, "session_id");
        (
            Channel::new(Role::Client, confirmed.shared, &session_id).unwrap(),
            Channel::new(Role::Gateway, gateway_key, &session_id).unwrap(),
        )
    }

    #[test]
    fn the_context_matches_both_draft_cases() {
        for v in draft() {
            let binding = binding_of(&v);
            assert_eq!(binding.bytes(), bytes(&v, "binding"));
            assert_eq!(
                info_of(&v).context,
                bytes(&v, "context"),
                "{}",
                text(&v, "name")
            );
        }
        assert_eq!(binding_of(&draft()[0]).name(), "tls-server-end-point");
        assert_eq!(binding_of(&draft()[1]).name(), "none");
    }

    #[test]
    fn the_binding_is_the_sha256_of_the_certificate() {
        let Binding::TlsServerEndPoint(hash) = Binding::tls_server_end_point(b"abc") else {
            panic!("not a TLS binding");
        };
        assert_eq!(
            hex::encode(hash),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Binding::None.bytes(), b"");
    }

    #[test]
    fn a_changed_binding_or_parameter_changes_the_context() {
        let v = &draft()[0];
        let salt = bytes(v, "pbkdf.salt");
        let (client, gateway, session) = (
            array(v, "client_random"),
            array(v, "gateway_random"),
            array(v, "session_id"),
        );
        let base = ContextParams {
            client_random: &client,
            gateway_random: &gateway,
            session_id: &session,
            salt: &salt,
            iterations: 1000,
            binding: &binding_of(v),
        };
        let reference = context(&base);
        let other_cert = Binding::tls_server_end_point(b"relay's certificate");
        for changed in [
            ContextParams {
                binding: &Binding::None,
                ..base
            },
            ContextParams {
                binding: &other_cert,
                ..base
            },
            ContextParams {
                iterations: 1001,
                ..base
            },
            ContextParams {
                client_random: &gateway,
                ..base
            },
        ] {
            assert_ne!(context(&changed), reference);
        }
    }

    #[test]
    fn the_full_run_app_keys_and_ciphertexts_match_both_draft_cases() {
        for v in draft() {
            let (mut client, mut gateway) = channels_of(&v);
            assert_eq!(client.send_key[..], bytes(&v, "k_c2s")[..], "k_c2s");
            assert_eq!(client.receive_key[..], bytes(&v, "k_s2c")[..], "k_s2c");
            assert_eq!(gateway.send_key[..], bytes(&v, "k_s2c")[..]);
            assert_eq!(gateway.receive_key[..], bytes(&v, "k_c2s")[..]);
            let session_id = array(&v, "session_id");

            for (key, msg_type) in [
                ("claim", MessageType::Claim),
                ("claim_ack", MessageType::ClaimAck),
            ] {
                let (sender, receiver) = match msg_type {
                    MessageType::Claim => (&mut client, &mut gateway),
                    MessageType::ClaimAck => (&mut gateway, &mut client),
                };
                let seq = number(&v, &format!("{key}.seq"));
                assert_eq!(nonce(seq)[..], bytes(&v, &format!("{key}.nonce"))[..]);
                assert_eq!(
                    aad(&session_id, msg_type, seq),
                    bytes(&v, &format!("{key}.aad"))
                );
                let plaintext = text(&v, &format!("{key}.plaintext_utf8"));
                let sealed = sender.seal(msg_type, plaintext.as_bytes()).unwrap();
                assert_eq!(sealed.seq, seq);
                assert_eq!(
                    sealed.ciphertext,
                    bytes(&v, &format!("{key}.ciphertext_and_tag")),
                    "{key}"
                );
                let opened = receiver
                    .open(msg_type, sealed.seq, &sealed.ciphertext)
                    .unwrap();
                assert_eq!(&opened[..], plaintext.as_bytes());
            }
        }
    }

    #[test]
    fn a_flipped_bit_in_a_confirmation_fails_in_the_profile() {
        let v = &draft()[0];
        let info = info_of(v);
        let code = SetupCode::parse(&text(v, "setup_code")).unwrap();
        let secret = derive_secret(&code, "IOTGW-0001234", &bytes(v, "pbkdf.salt"), 1000).unwrap();
        let prover = Prover::start_with_fixed(info.clone(), &secret, &array(v, "x")).unwrap();
        let mut confirm_v = array::<32>(v, "confirmV");
        confirm_v[31] ^= 0x80;
        assert_eq!(
            prover.finish(&bytes(v, "shareV"), &confirm_v).unwrap_err(),
            Spake2PlusError::ConfirmationMismatch
        );
        let (confirming, _) = Verifier::new(info, &secret.record())
            .respond_with_fixed(&bytes(v, "shareP"), &array(v, "y"))
            .unwrap();
        let mut confirm_p = array::<32>(v, "confirmP");
        confirm_p[0] ^= 1;
        assert_eq!(
            confirming.finish(&confirm_p).unwrap_err(),
            Spake2PlusError::ConfirmationMismatch
        );
    }

    #[test]
    fn a_flipped_bit_in_the_ciphertext_fails_to_open() {
        let v = &draft()[0];
        let claim = bytes(v, "claim.ciphertext_and_tag");
        for bit in [0, 8 * claim.len() - 1, 8 * (claim.len() - TAG_LEN)] {
            let (_, mut gateway) = channels_of(v);
            let mut changed = claim.clone();
            changed[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                gateway.open(MessageType::Claim, 0, &changed).unwrap_err(),
                SessionError::DecryptFailed
            );
            // Not advanced: the untouched message still opens.
            assert_eq!(gateway.next_receive_seq(), 0);
            assert!(gateway.open(MessageType::Claim, 0, &claim).is_ok());
        }
        let (_, mut gateway) = channels_of(v);
        assert_eq!(
            gateway
                .open(MessageType::Claim, 0, &claim[..TAG_LEN - 1])
                .unwrap_err(),
            SessionError::DecryptFailed,
            "shorter than a tag"
        );
    }

    #[test]
    fn only_the_exact_next_sequence_number_is_taken() {
        let v = &draft()[0];
        let claim = bytes(v, "claim.ciphertext_and_tag");
        let (mut client, mut gateway) = channels_of(v);
        assert_eq!(
            gateway.open(MessageType::Claim, 1, &claim).unwrap_err(),
            SessionError::BadSequence {
                expected: 0,
                got: 1
            }
        );
        gateway.open(MessageType::Claim, 0, &claim).unwrap();
        assert_eq!(gateway.next_receive_seq(), 1);
        // A replay inside the session.
        assert_eq!(
            gateway.open(MessageType::Claim, 0, &claim).unwrap_err(),
            SessionError::BadSequence {
                expected: 1,
                got: 0
            }
        );
        // A message sealed with seq 0 presented as seq 1 does not open either.
        assert_eq!(
            gateway.open(MessageType::Claim, 1, &claim).unwrap_err(),
            SessionError::DecryptFailed
        );
        // The client's sequence numbers count up.
        assert_eq!(client.seal(MessageType::Claim, b"a").unwrap().seq, 0);
        assert_eq!(client.seal(MessageType::Claim, b"b").unwrap().seq, 1);
        client.next_send = u64::MAX;
        assert_eq!(
            client.seal(MessageType::Claim, b"c").unwrap_err(),
            SessionError::SequenceExhausted
        );
    }

    #[test]
    fn a_wrong_message_type_or_a_reflected_message_fails_to_open() {
        let v = &draft()[0];
        let (mut client, mut gateway) = channels_of(v);
        // The claim opened as an ack by the gateway: the type is in the AAD.
        let claim = bytes(v, "claim.ciphertext_and_tag");
        assert_eq!(
            gateway.open(MessageType::ClaimAck, 0, &claim).unwrap_err(),
            SessionError::DecryptFailed
        );
        // Reflection: the gateway's own s2c ack sent back to it as c2s, and the client's claim
        // sent back to the client, with either type.
        let ack = gateway.seal(MessageType::ClaimAck, b"{}").unwrap();
        for msg_type in [MessageType::Claim, MessageType::ClaimAck] {
            assert_eq!(
                gateway.open(msg_type, 0, &ack.ciphertext).unwrap_err(),
                SessionError::DecryptFailed
            );
            assert_eq!(
                client.open(msg_type, 0, &claim).unwrap_err(),
                SessionError::DecryptFailed
            );
        }
        // Into another session (another session id, same K_shared): the keys and AAD differ.
        let info = info_of(v);
        let code = SetupCode::parse(&text(v, "setup_code")).unwrap();
        let secret = derive_secret(&code, "IOTGW-0001234", &bytes(v, "pbkdf.salt"), 1000).unwrap();
        let prover = Prover::start_with_fixed(info.clone(), &secret, &array(v, "x")).unwrap();
        let (confirming, response) = Verifier::new(info, &secret.record())
            .respond_with_fixed(prover.share(), &array(v, "y"))
            .unwrap();
        let confirmed = prover
            .finish(&response.share_v, &response.confirm_v)
            .unwrap();
        let key = confirming.finish(&confirmed.confirm_p).unwrap();
        let mut elsewhere = Channel::new(Role::Gateway, key, &[9; SESSION_ID_LEN]).unwrap();
        assert_eq!(
            elsewhere.open(MessageType::Claim, 0, &claim).unwrap_err(),
            SessionError::DecryptFailed
        );
    }

    #[test]
    fn a_channel_can_wait_between_requests_in_a_server() {
        fn movable<T: Send + Sync + 'static>() {}
        movable::<Channel>();
    }

    #[test]
    fn client_ids_are_checked() {
        check_client_id("iotctl/0.1").unwrap();
        check_client_id("web/0.1 (Android 14)").unwrap();
        for id in ["", &"x".repeat(65), "tab\there", "é"] {
            assert!(check_client_id(id).is_err(), "{id:?}");
        }
        assert_eq!(MessageType::Claim.as_str(), "claim");
        assert_eq!(MessageType::ClaimAck.as_str(), "claim-ack");
    }

    #[test]
    fn the_channel_does_not_show_its_keys() {
        let (client, _) = channels_of(&draft()[1]);
        let shown = format!("{client:?}");
        assert_eq!(
            shown,
            "Channel { session_id: \"0f1e2d3c4b5a69788796a5b4c3d2e1f0\", next_send: 0, \
             next_receive: 0, .. }"
        );
    }
}
