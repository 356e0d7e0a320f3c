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

/// Why a generation is not the identity: it lacks something for good (logged, and the
/// generation passed over), or something could not be read right now (the start fails, to be
/// tried again: a TPM not ready at boot must not cost the gateway its identity).
enum NotIdentity {
    Lacks(String),
    Unreadable(StoreError),
}

fn not_found(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// The generation's certificate: `Ok(None)` when it has none (no file), `Lacks` when the file
/// is damaged, `Unreadable` when it could not be read.
fn certificate(store: &Store, generation: u32) -> Result<Option<Certificate>, NotIdentity> {
    let pem = match store.read_certificate(generation) {
        Ok(pem) => pem,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(NotIdentity::Unreadable(e)),
    };
    let damaged = |e: String| NotIdentity::Lacks(format!("its cert.pem is damaged ({e})"));
    let chain = crate::tls::parse_chain_pem(&pem, "the device certificate")
        .map_err(|e| damaged(e.to_string()))?;
    let first = chain
        .first()
        .ok_or_else(|| damaged("no certificate in it".to_owned()))?;
    let id = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(first.as_ref()))
    };
    Ok(Some(Certificate {
        spki: crate::tls::certificate_spki(first).map_err(|e| damaged(e.to_string()))?,
        validity: crate::tls::certificate_validity(first).map_err(|e| damaged(e.to_string()))?,
        id,
        pem,
    }))
}

/// The identity `generation` holds, if its key, certificate and record agree.
fn identity(
    store: &Store,
    backend: &dyn KeyBackend,
    generation: u32,
    cert: &Certificate,
) -> Result<Identity, NotIdentity> {
    let key = match backend.load(generation) {
        Ok(Some(key)) => key,
        Ok(None) => return Err(NotIdentity::Lacks("its key is gone".to_owned())),
        Err(e @ crate::keys::KeyError::Lost { .. }) => {
            return Err(NotIdentity::Lacks(format!("its key is lost ({e})")));
        }
        Err(e) => {
            return Err(NotIdentity::Unreadable(StoreError::Io {
                action: "loading the key of",
                path: store.dir().join("gen").join(generation.to_string()),
                source: std::io::Error::other(e.to_string()),
            }));
        }
    };
    if key.public_key_spki() != cert.spki {
        return Err(NotIdentity::Lacks(
            "its certificate does not certify its key".to_owned(),
        ));
    }
    let record = match store.read_identity_record(generation) {
        Ok(record) => record,
        Err(e) if not_found(&e) => {
            return Err(NotIdentity::Lacks(
                "it has no identity.json: it was never committed (or committed by an older iotd, which did not write one)"
                    .to_owned(),
            ));
        }
        Err(e @ StoreError::Corrupt { .. }) => {
            return Err(NotIdentity::Lacks(format!(
                "its identity.json is damaged ({e})"
            )));
        }
        Err(e) => return Err(NotIdentity::Unreadable(e)),
    };
    if record.certificate_id != cert.id {
        return Err(NotIdentity::Lacks(format!(
            "its identity record names certificate {}, not the one in cert.pem",
            record.certificate_id
        )));
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
        endpoint: record.endpoint,
        installer_parameters: record.installer_parameters,
    })
}

/// Looks through `gen/` (highest generation first) for the identity, as described in the
/// module documentation. `why` says what happened to state.json, for the report. Fails,
/// changing nothing, when something could not be read (a restart tries again).
pub fn rebuild(store: &Store, backend: &dyn KeyBackend, why: &str) -> Result<Rebuilt, StoreError> {
    let generations = store.generations()?;
    let mut state = State {
        last_generation: generations.last().copied().unwrap_or(0),
        ..State::default()
    };
    let mut notes = Vec::new();
    for &generation in generations.iter().rev() {
        let cert = match certificate(store, generation) {
            Ok(Some(cert)) => cert,
            Ok(None) => continue,
            Err(NotIdentity::Unreadable(e)) => return Err(e),
            Err(NotIdentity::Lacks(why_not)) => {
                notes.push(format!("generation {generation}: {why_not}"));
                continue;
            }
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
                Err(NotIdentity::Unreadable(e)) => return Err(e),
                Err(NotIdentity::Lacks(why_not)) => notes.push(format!(
                    "generation {generation} is not an identity: {why_not}"
                )),
            }
        }
        // Any other certificate may be ACTIVE in AWS IoT (an earlier identity, one registered
        // but never committed): the fleet's backend is told again; deactivating twice is
        // harmless, an ACTIVE certificate recorded nowhere is not.
        notes.push(format!(
            "recorded certificate {} of generation {generation} as abandoned",
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
