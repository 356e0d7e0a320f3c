//! Rebuilding `state.json` from `gen/` when it is missing or damaged.
//!
//! A field technician may delete a `state.json` that iotd reports as damaged, a disk may tear it,
//! and an SD card image may be restored without it. The identity itself is in `gen/<n>/`: the
//! key (or the TPM's reference to it), `cert.pem`, and `identity.json` (thing name and
//! certificate id, written when the identity was committed). When one generation holds all
//! three and they agree (the certificate certifies the key; the record names this
//! certificate), that is the gateway's identity again; the agent then connects with it, which
//! is the proof. Every other generation that holds a certificate (one issued, maybe registered,
//! but never committed) is recorded as abandoned, so that it is reported for deactivation
//! rather than left ACTIVE and recorded nowhere. A new key always goes into a generation no
//! directory uses, so nothing in `gen/` is ever overwritten.

use crate::keys::KeyBackend;
use crate::store::{Identity, State};
use crate::store::{Store, StoreError};

/// What was found in `gen/`: the state to start from, and what to tell the person who reads
/// the log.
#[derive(Debug)]
pub struct Rebuilt {
    pub state: State,
    pub report: String,
}

/// A generation's certificate, when it has a readable one.
struct Certificate {
    pem: String,
    id: String,
    spki: Vec<u8>,
    validity: (i64, i64),
}

fn certificate(store: &Store, generation: u32) -> Option<Certificate> {
    let pem = store.read_certificate(generation).ok()?;
    let chain = crate::tls::parse_chain_pem(&pem, "the device certificate").ok()?;
    let first = chain.first()?;
    let id = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(first.as_ref()))
    };
    Some(Certificate {
        spki: crate::tls::certificate_spki(first).ok()?,
        validity: crate::tls::certificate_validity(first).ok()?,
        id,
        pem,
    })
}

/// The identity `generation` holds, if its key, certificate and record agree. Why not, for
/// the log, otherwise.
fn identity(
    store: &Store,
    backend: &dyn KeyBackend,
    generation: u32,
    cert: &Certificate,
) -> Result<Identity, String> {
    let key = match backend.load(generation) {
        Ok(Some(key)) => key,
        Ok(None) => return Err("its key is gone".to_owned()),
        Err(e) => return Err(format!("its key cannot be loaded ({e})")),
    };
    if key.public_key_spki() != cert.spki {
        return Err("its certificate does not certify its key".to_owned());
    }
    let record = store
        .read_identity_record(generation)
        .map_err(|e| format!("it has no identity record ({e}): it was never committed"))?;
    if record.certificate_id != cert.id {
        return Err(format!(
            "its identity record names certificate {}, not the one in cert.pem",
            record.certificate_id
        ));
    }
    Ok(Identity {
        generation,
        certificate_id: cert.id.clone(),
        certificate_pem: cert.pem.clone(),
        thing_name: record.thing_name,
        key: Some(key.location()),
        not_before: cert.validity.0,
        not_after: cert.validity.1,
        device_configuration: record.device_configuration,
        committed_at: record.committed_at,
    })
}

/// Looks through `gen/` (highest generation first) for the identity, as described in the
/// module documentation. `why` says what happened to state.json, for the report.
pub fn rebuild(store: &Store, backend: &dyn KeyBackend, why: &str) -> Result<Rebuilt, StoreError> {
    let generations = store.generations()?;
    let mut state = State {
        last_generation: generations.last().copied().unwrap_or(0),
        ..State::default()
    };
    let mut notes = Vec::new();
    for &generation in generations.iter().rev() {
        let Some(cert) = certificate(store, generation) else {
            continue;
        };
        if state.identity.is_none() {
            match identity(store, backend, generation, &cert) {
                Ok(identity) => {
                    notes.push(format!(
                        "recovered the identity of generation {generation} (thing {}, \
                         certificate {}) from {}",
                        identity.thing_name,
                        identity.certificate_id,
                        store
                            .dir()
                            .join("gen")
                            .join(generation.to_string())
                            .display()
                    ));
                    state.identity = Some(identity);
                    continue;
                }
                Err(why_not) => notes.push(format!(
                    "generation {generation} is not an identity: {why_not}"
                )),
            }
        } else {
            // Below the recovered identity: earlier identities, given up on when they were
            // replaced and reported then.
            continue;
        }
        notes.push(format!(
            "recorded its certificate {} as abandoned (it may be ACTIVE in AWS IoT; deactivate it there)",
            cert.id
        ));
        state.abandoned_certificates.push(cert.id);
    }
    let what = if state.identity.is_some() {
        "connecting with the recovered identity"
    } else {
        "no identity to recover: provisioning a new one in a new generation"
    };
    let report = if notes.is_empty() {
        format!("{why}; {what}")
    } else {
        format!("{why}; {}; {what}", notes.join("; "))
    };
    Ok(Rebuilt { state, report })
}
