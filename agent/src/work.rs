//! The units of work the core runs, one at a time, each in its own task so that the core keeps
//! answering commands and pinging the watchdog meanwhile: create a key, request a certificate,
//! register the thing, prepare the credentials of a connection. Each reads what it needs,
//! does its I/O (TPM, files, the claim connection), and returns an `fsm::Input` (or an error
//! that says what went wrong); the core, the only writer of state.json, applies it.
//!
//! Every unit is safe to repeat: a key is created for a generation no state refers to yet, a
//! certificate is stored in its generation's directory before the step that names it is
//! written, and a request to the cloud is made again only after its step failed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::claim::Claim;
use crate::cloud::{self, ConnectPacer, Session, Target};
use crate::config::Settings;
use crate::connection::Credentials;
use crate::error::{AgentError, ErrorCode, Retry};
use crate::fsm::{Input, Work};
use crate::keys::{DeviceKey, KeyBackend};
use crate::store::Store;
use crate::tls::{self, ServerTrust, TlsIdentity};

/// An ownership token is valid for an hour; past 55 minutes a RegisterThing would race its
/// expiry, so the agent asks for a new certificate instead.
pub const TOKEN_MAX_AGE_SECS: i64 = 55 * 60;

/// What the units of work share: read-only, cheap to clone into each task.
#[derive(Debug)]
pub struct Resources {
    pub settings: Settings,
    pub store: Store,
    pub backend: Arc<dyn KeyBackend>,
    pub trust: ServerTrust,
    pub pacer: Arc<ConnectPacer>,
    pub claim_client_id: String,
    /// `cloud.endpoint`'s target; see `target`.
    pub target: Target,
}

/// What a unit of work produced.
#[derive(Debug)]
pub enum Produced {
    /// The input for the state machine, and where the key it concerns is (for status).
    Input { input: Input, key: Option<String> },
    /// A connection's credentials are ready (for `Serve` and `VerifyIdentity`).
    Credentials(Credentials),
}

/// Template parameter values, resolved once per provisioning (before its first request to the
/// cloud) and kept by the core for the steps after it.
pub type Parameters = Arc<BTreeMap<String, String>>;

/// A finished unit of work; the claim connection and the parameter values come back to the
/// core for the next step.
#[derive(Debug)]
pub struct Done {
    pub result: Result<Produced, AgentError>,
    pub session: Option<Session>,
    pub parameters: Option<Parameters>,
}

pub fn store_error(e: crate::store::StoreError) -> AgentError {
    AgentError::permanent(ErrorCode::Store, e.to_string())
}

fn key_error(e: crate::keys::KeyError) -> AgentError {
    match e {
        // The state machine decides whether a new identity may be made.
        crate::keys::KeyError::Lost { .. } => {
            AgentError::new(ErrorCode::KeyLost, Retry::NewIdentity, e.to_string())
        }
        other => AgentError::permanent(ErrorCode::Key, other.to_string()),
    }
}

fn tls_error(code: ErrorCode, e: tls::TlsError) -> AgentError {
    AgentError::permanent(code, e.to_string())
}

/// Runs blocking key-backend work (the TPM) off the async threads.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        AgentError::permanent(ErrorCode::Key, format!("{what}: the worker stopped: {e}"))
    })?
}

impl Resources {
    /// Where to connect for an identity or a claim of `endpoint` (`None`: `cloud.endpoint`):
    /// the same port, keep-alive and trust, another host.
    pub fn target(&self, endpoint: Option<&str>) -> Target {
        let mut target = self.target.clone();
        if let Some(host) = endpoint {
            host.clone_into(&mut target.host);
        }
        target
    }

    fn client_tls(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: Arc<dyn DeviceKey>,
        code: ErrorCode,
    ) -> Result<Arc<rustls::ClientConfig>, AgentError> {
        tls::client_config(
            &self.trust,
            TlsIdentity { chain, key },
            self.settings.cloud.alpn,
        )
        .map_err(|e| tls_error(code, e))
    }

    /// Connects with the claim unless a claim connection is open.
    async fn claim_session<'a>(
        &self,
        slot: &'a mut Option<Session>,
        claim: Option<&Claim>,
    ) -> Result<&'a mut Session, AgentError> {
        let target = self.target(claim.and_then(|c| c.endpoint.as_deref()));
        // A connection left open for a claim of another endpoint is of no use for this one.
        if slot.as_ref().is_some_and(|s| s.host() != target.host) {
            *slot = None;
        }
        if slot.is_none() {
            let claim = claim.ok_or_else(|| {
                AgentError::permanent(ErrorCode::ClaimMissing, "no claim is at hand")
            })?;
            let config = self.client_tls(
                claim.chain.clone(),
                claim.key.clone(),
                ErrorCode::ClaimMissing,
            )?;
            let identity = cloud::Identity::Claim {
                not_after: claim.not_after,
                path: claim.description.clone(),
                by_clock: claim.origin != crate::store::ClaimOrigin::Network,
            };
            let session = Session::connect(
                &target,
                config,
                &self.claim_client_id,
                identity,
                &self.pacer,
            )
            .await?;
            tracing::info!(client_id = %self.claim_client_id, endpoint = %target.host, "connected with the claim");
            *slot = Some(session);
        }
        slot.as_mut()
            .ok_or_else(|| AgentError::permanent(ErrorCode::Network, "claim connection vanished"))
    }

    /// Checks that the certificate AWS issued certifies our key, then writes it beside the key
    /// and makes the generation's entries durable (the key's too): the step that names them is
    /// persisted next.
    fn accept_certificate(
        &self,
        generation: u32,
        key: &dyn DeviceKey,
        pem: &str,
    ) -> Result<(), AgentError> {
        certifies(key, pem)?;
        self.store
            .write_certificate(generation, pem)
            .map_err(store_error)?;
        self.store.sync_generation(generation).map_err(store_error)
    }

    fn load_key(&self, generation: u32) -> Result<Option<Arc<dyn DeviceKey>>, AgentError> {
        self.backend.load(generation).map_err(key_error)
    }
}

/// Checks that the certificate in `pem` certifies `key`: registering or using one that does
/// not would activate a certificate this gateway can never use.
fn certifies(key: &dyn DeviceKey, pem: &str) -> Result<(), AgentError> {
    let chain = tls::parse_chain_pem(pem, "the issued certificate")
        .map_err(|e| tls_error(ErrorCode::CertificateMismatch, e))?;
    let cert = chain.first().ok_or_else(|| {
        AgentError::permanent(
            ErrorCode::CertificateMismatch,
            "the issued certificate PEM holds no certificate",
        )
    })?;
    let spki =
        tls::certificate_spki(cert).map_err(|e| tls_error(ErrorCode::CertificateMismatch, e))?;
    if spki != key.public_key_spki() {
        return Err(AgentError::new(
            ErrorCode::CertificateMismatch,
            Retry::RestartFromCsr,
            format!(
                "the certificate AWS issued does not certify this gateway's key ({}); not registering it",
                key.location()
            ),
        ));
    }
    Ok(())
}

/// The key of `generation`, which must be there; when it is gone the error (a lost key: the
/// state machine decides about a new identity) says so and `then` what happens. A key that
/// can't be loaded right now (the TPM did not answer, a read failed) is tried again with
/// backoff: a hiccup must not take a working identity offline.
async fn existing_key(
    res: &Arc<Resources>,
    generation: u32,
    then: &str,
) -> Result<Arc<dyn DeviceKey>, AgentError> {
    let r = res.clone();
    blocking("loading the device key", move || r.load_key(generation))
        .await
        .map_err(|e| match e.retry {
            Retry::Permanent => AgentError::new(e.code, Retry::Reconnect, e.message),
            _ => e,
        })?
        .ok_or_else(|| {
            AgentError::new(
                ErrorCode::KeyLost,
                Retry::NewIdentity,
                format!("the device key of generation {generation} is gone; {then}"),
            )
        })
}

/// What a unit of work starts with besides the work itself.
#[derive(Debug, Default)]
pub struct Carried {
    /// The claim at hand (for the steps that talk to the cloud with it).
    pub claim: Option<Claim>,
    /// The claim connection, if one is open.
    pub session: Option<Session>,
    /// The parameter values, once resolved.
    pub parameters: Option<Parameters>,
    /// Key removals the unit waits for first.
    pub cleanup: Option<tokio::task::JoinHandle<()>>,
    /// A rotation's requests go over the production connection, not a claim's.
    pub production: Option<crate::connection::Exchanger>,
}

/// Runs one unit of work.
pub async fn run(res: Arc<Resources>, work: Work, carried: Carried) -> Done {
    let Carried {
        claim,
        mut session,
        mut parameters,
        cleanup,
        production,
    } = carried;
    // Key removals first: a new key never races the removal of an old one.
    if let Some(cleanup) = cleanup {
        let _ = cleanup.await;
    }
    let via = match &production {
        Some(exchanger) => Via::Production(exchanger),
        None => Via::Claim(claim.as_ref()),
    };
    let result = step(&res, work, via, &mut session, &mut parameters).await;
    Done {
        result,
        session,
        parameters,
    }
}

/// Resolves the template parameters (files read, commands run) unless they are: before the
/// first request of a provisioning to the cloud, so that a parameter that can't be read costs
/// no certificate. A failure that may pass (a command that failed, a file not there yet at
/// boot) is retried with backoff; a missing executable or a configuration mistake is not.
async fn parameters<'a>(
    res: &Arc<Resources>,
    slot: &'a mut Option<Parameters>,
) -> Result<&'a Parameters, AgentError> {
    if slot.is_none() {
        let provisioning = res.settings.provisioning.clone();
        let resolved = tokio::task::spawn_blocking(move || provisioning.resolve_parameters())
            .await
            .map_err(|e| {
                AgentError::new(
                    ErrorCode::Parameter,
                    Retry::SameConnection,
                    format!("resolving template parameters: the worker stopped: {e}"),
                )
            })?
            .map_err(|e| {
                let code = if e.parameter().is_some() {
                    ErrorCode::Parameter
                } else {
                    ErrorCode::Config
                };
                let retry = if e.is_transient() {
                    Retry::SameConnection
                } else {
                    Retry::Permanent
                };
                AgentError::new(code, retry, e.to_string())
            })?;
        if !resolved.is_empty() {
            tracing::info!(count = resolved.len(), "resolved the template parameters");
        }
        *slot = Some(Arc::new(resolved));
    }
    slot.as_ref()
        .ok_or_else(|| AgentError::permanent(ErrorCode::Parameter, "template parameters vanished"))
}

/// How a unit talks to the fleet provisioning API: with the claim (provisioning), or over the
/// production connection as the device (rotation).
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    Claim(Option<&'a Claim>),
    Production(&'a crate::connection::Exchanger),
}

/// How long a rotation's request waits for the production connection and the answer.
fn production_wait(reply_timeout: std::time::Duration) -> std::time::Duration {
    reply_timeout * 3
}

async fn step(
    res: &Arc<Resources>,
    work: Work,
    via: Via<'_>,
    session: &mut Option<Session>,
    resolved: &mut Option<Parameters>,
) -> Result<Produced, AgentError> {
    let p = &res.settings.provisioning;
    let (format, timeout) = (p.format, res.settings.cloud.reply_timeout);
    let claim = match via {
        Via::Claim(claim) => claim,
        Via::Production(_) => None,
    };
    let key_location;
    let input = match work {
        Work::CreateKey { generation } => {
            let r = res.clone();
            let key = blocking("creating the device key", move || {
                r.backend.create(generation).map_err(key_error)
            })
            .await?;
            tracing::info!(generation, key = %key.location(), "created the device key");
            key_location = Some(key.location());
            Input::KeyCreated { generation }
        }
        Work::CreateKeysAndCertificate { generation } => {
            parameters(res, resolved).await?;
            let s = res.claim_session(session, claim).await?;
            let issued = crate::fleet::create_keys_and_certificate(s, format, timeout).await?;
            let pem = issued.private_key.clone().unwrap_or_default();
            let r = res.clone();
            let key = blocking("storing the issued key", move || {
                r.backend.import_pem(generation, &pem).map_err(key_error)
            })
            .await?;
            res.accept_certificate(generation, key.as_ref(), &issued.certificate_pem)?;
            key_location = Some(key.location());
            tracing::info!(certificate_id = %issued.certificate_id, "AWS issued a certificate and key");
            Input::CertificateIssued {
                generation,
                certificate_id: issued.certificate_id,
                certificate_pem: issued.certificate_pem,
                ownership_token: issued.certificate_ownership_token,
                endpoint: claim.and_then(|c| c.endpoint.clone()),
            }
        }
        Work::RequestCertificate { generation } => {
            let key = existing_key(res, generation, "making a new one").await?;
            let k = key.clone();
            let csr = blocking("signing the certificate request", move || {
                crate::csr::build_csr(k.as_ref()).map_err(key_error)
            })
            .await?;
            parameters(res, resolved).await?;
            let issued = match via {
                Via::Claim(_) => {
                    let s = res.claim_session(session, claim).await?;
                    crate::fleet::create_certificate_from_csr(s, format, timeout, &csr).await?
                }
                Via::Production(exchanger) => {
                    let what = "requesting the rotation's certificate";
                    exchanger
                        .run(what, production_wait(timeout), move |s| {
                            Box::pin(async move {
                                crate::fleet::create_certificate_from_csr(s, format, timeout, &csr)
                                    .await
                            })
                        })
                        .await?
                }
            };
            res.accept_certificate(generation, key.as_ref(), &issued.certificate_pem)?;
            key_location = Some(key.location());
            tracing::info!(certificate_id = %issued.certificate_id, "AWS issued a certificate for our key");
            Input::CertificateIssued {
                generation,
                certificate_id: issued.certificate_id,
                certificate_pem: issued.certificate_pem,
                ownership_token: issued.certificate_ownership_token,
                endpoint: claim.and_then(|c| c.endpoint.clone()),
            }
        }
        Work::RegisterThing {
            generation,
            certificate_id,
            certificate_pem,
            ownership_token,
            endpoint,
            installer_parameters,
            ..
        } => {
            let claimed = claim.and_then(|c| c.endpoint.as_deref());
            if matches!(via, Via::Claim(_)) && claimed != endpoint.as_deref() {
                // The certificate and its token exist in the account and region of the
                // endpoint that issued them; the claim at hand (a new installer's) is for
                // another. A new certificate from this claim's endpoint is what can work.
                let name = |e: Option<&str>| e.unwrap_or(&res.settings.cloud.endpoint).to_owned();
                return Err(AgentError::new(
                    ErrorCode::Rejected,
                    Retry::RestartFromCsr,
                    format!(
                        "certificate {certificate_id} was issued by {}, and the claim at hand is for {}; \
                         requesting a new certificate with it",
                        name(endpoint.as_deref()),
                        name(claimed)
                    ),
                ));
            }
            let mut parameters = parameters(res, resolved).await?.as_ref().clone();
            // What the installer supplied: with the claim when provisioning, kept with the
            // identity when rotating. Never a device-sourced value (the bundle's validation
            // refuses those names).
            let installer_parameters = match (via, claim) {
                (Via::Claim(_), Some(c)) => c.installer_parameters.clone(),
                _ => installer_parameters,
            };
            for (name, value) in &installer_parameters {
                parameters
                    .entry(name.clone())
                    .or_insert_with(|| value.clone());
            }
            let template = match via {
                Via::Claim(_) => claim
                    .and_then(|c| c.template.as_ref())
                    .unwrap_or(&res.settings.provisioning.template),
                Via::Production(_) => res
                    .settings
                    .rotation
                    .template
                    .as_ref()
                    .unwrap_or(&res.settings.provisioning.template),
            }
            .clone();
            if let Via::Claim(_) = via {
                res.claim_session(session, claim).await?;
            }
            // RegisterThing activates the certificate: only while its key is here to use it,
            // checked last thing before the request (parameters and the connection can take
            // seconds).
            let unregistered =
                format!("not registering certificate {certificate_id}; making a new key");
            let key = existing_key(res, generation, &unregistered).await?;
            // A state migrated from schema 1 may lack the PEM: the file has it.
            let certificate_pem = if certificate_pem.is_empty() {
                res.store
                    .read_certificate(generation)
                    .map_err(store_error)?
            } else {
                certificate_pem
            };
            certifies(key.as_ref(), &certificate_pem)?;
            key_location = Some(key.location());
            let registered = match (via, session.as_mut()) {
                (Via::Claim(_), Some(s)) => {
                    crate::fleet::register_thing(
                        s,
                        format,
                        timeout,
                        &template,
                        &ownership_token,
                        &parameters,
                    )
                    .await?
                }
                (Via::Claim(_), None) => {
                    return Err(AgentError::permanent(
                        ErrorCode::Network,
                        "claim connection vanished",
                    ));
                }
                (Via::Production(exchanger), _) => {
                    let what = "registering the rotation's certificate";
                    let template = template.clone();
                    exchanger
                        .run(what, production_wait(timeout), move |s| {
                            Box::pin(async move {
                                crate::fleet::register_thing(
                                    s,
                                    format,
                                    timeout,
                                    &template,
                                    &ownership_token,
                                    &parameters,
                                )
                                .await
                            })
                        })
                        .await?
                }
            };
            let thing_name = registered.thing_name.ok_or_else(|| {
                AgentError::permanent(
                    ErrorCode::TemplateRejected,
                    format!("template {template} registered no thing (no AWS::IoT::Thing resource); iotd needs a thing name to connect as"),
                )
            })?;
            tracing::info!(thing = %thing_name, certificate_id = %certificate_id, "thing registered");
            Input::ThingRegistered {
                thing_name,
                device_configuration: registered.device_configuration,
                installer_parameters,
            }
        }
        Work::VerifyIdentity {
            generation,
            certificate_id,
            certificate_pem,
            thing_name,
            endpoint,
        } => {
            let signed = Signed {
                generation,
                certificate_id,
                certificate_pem,
                thing_name,
                endpoint,
            };
            return credentials(res, signed).await.map(Produced::Credentials);
        }
        Work::Idle | Work::Serve | Work::WaitForClaim => {
            return Err(AgentError::permanent(
                ErrorCode::Store,
                format!("{work:?} is not a unit of work"),
            ));
        }
    };
    Ok(Produced::Input {
        input,
        key: key_location,
    })
}

/// A registered certificate and where it connects: what `credentials` makes a connection's
/// credentials of.
#[derive(Debug, Clone)]
pub struct Signed {
    pub generation: u32,
    pub certificate_id: String,
    /// State.json's copy; empty for a state migrated without it: then the file.
    pub certificate_pem: String,
    pub thing_name: String,
    /// `None`: `cloud.endpoint`.
    pub endpoint: Option<String>,
}

/// The credentials to connect as the device with `generation`'s key and certificate.
pub async fn credentials(res: &Arc<Resources>, signed: Signed) -> Result<Credentials, AgentError> {
    let Signed {
        generation,
        certificate_id,
        certificate_pem,
        thing_name,
        endpoint,
    } = signed;
    let key = existing_key(
        res,
        generation,
        "this identity cannot be used again (iotctl reprovision makes a new one)",
    )
    .await?;
    let pem = if certificate_pem.is_empty() {
        res.store
            .read_certificate(generation)
            .map_err(store_error)?
    } else {
        certificate_pem
    };
    let chain = tls::parse_chain_pem(&pem, "the device certificate")
        .map_err(|e| tls_error(ErrorCode::Store, e))?;
    let (not_before, not_after) = chain
        .first()
        .map(tls::certificate_validity)
        .transpose()
        .map_err(|e| tls_error(ErrorCode::Store, e))?
        .unwrap_or((0, i64::MAX));
    let key_location = key.location();
    let tls = res.client_tls(chain, key, ErrorCode::Store)?;
    Ok(Credentials {
        generation,
        certificate_id,
        thing_name,
        tls,
        not_before,
        not_after,
        key_location,
        endpoint,
    })
}
