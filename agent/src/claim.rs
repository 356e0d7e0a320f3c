//! Where provisioning claims come from: the claim certificate and key files named in the
//! configuration (baked into the image), or a claim handed over in memory (trusted-user
//! onboarding: an installer's phone obtains a 5-minute claim from AWS and gives it to the
//! gateway). A claim in memory takes precedence: it is an installer acting now.
//!
//! Without a usable claim the agent waits and creates nothing, locally or in the cloud; what
//! it waits for is said in words (`Claims::current`'s error), for status and D-Bus.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::config::ClaimPaths;
use crate::keys::DeviceKey;
use crate::store::ClaimOrigin;
use crate::tls;

/// A claim certificate (chain) and its key, ready to connect with.
#[derive(Debug, Clone)]
pub struct Claim {
    pub origin: ClaimOrigin,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<dyn DeviceKey>,
    /// The claim certificate's notAfter (Unix seconds).
    pub not_after: i64,
    /// For messages, after "claim certificate": its file ("/etc/iotd/claim.pem"), or where it
    /// came from ("handed over by the installer").
    pub description: String,
}

impl Claim {
    /// A claim from PEM text (the onboarding endpoint's hand-over).
    pub fn from_pem(
        certificate_pem: &str,
        key_pem: &str,
        description: impl Into<String>,
    ) -> Result<Self, String> {
        let description = description.into();
        let chain =
            tls::parse_chain_pem(certificate_pem, &format!("claim certificate {description}"))
                .map_err(|e| e.to_string())?;
        let key = crate::keys::file::FileKey::from_pem(key_pem, std::path::Path::new("claim key"))
            .map_err(|e| e.to_string())?;
        let key: Arc<dyn DeviceKey> = Arc::new(key);
        Self::assemble(ClaimOrigin::Network, chain, key, description)
    }

    fn assemble(
        origin: ClaimOrigin,
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn DeviceKey>,
        description: String,
    ) -> Result<Self, String> {
        let first = chain
            .first()
            .ok_or_else(|| format!("claim certificate {description} holds no certificate"))?;
        let spki = tls::certificate_spki(first).map_err(|e| e.to_string())?;
        if spki != key.public_key_spki() {
            return Err(format!(
                "the claim key does not belong to claim certificate {description} (their public \
                 keys differ)"
            ));
        }
        let not_after = tls::certificate_not_after(first).map_err(|e| e.to_string())?;
        Ok(Self {
            origin,
            chain,
            key,
            not_after,
            description,
        })
    }
}

/// The claims the agent knows of.
#[derive(Debug, Default)]
pub struct Claims {
    files: Option<ClaimPaths>,
    memory: Option<Claim>,
    /// The files' claim was used up or refused in this run (deleted after provisioning,
    /// expired): don't offer it again until iotd restarts.
    files_spent: Option<String>,
}

impl Claims {
    pub fn new(files: Option<ClaimPaths>) -> Self {
        Self {
            files,
            memory: None,
            files_spent: None,
        }
    }

    /// A claim handed over in memory; it replaces any earlier one.
    pub fn offer(&mut self, claim: Claim) {
        self.memory = Some(claim);
    }

    /// Stops offering the claim of `origin` (used, expired or refused); `why` says so while
    /// the agent waits for another.
    pub fn forget(&mut self, origin: ClaimOrigin, why: impl Into<String>) {
        match origin {
            ClaimOrigin::Network => self.memory = None,
            ClaimOrigin::File => self.files_spent = Some(why.into()),
        }
    }

    /// The claim to use now at wall-clock time `now`, or what the agent waits for.
    pub fn current(&mut self, now: i64) -> Result<Claim, String> {
        if let Some(c) = &self.memory {
            if c.not_after > now {
                return Ok(c.clone());
            }
            self.memory = None;
        }
        let Some(files) = &self.files else {
            return Err(
                "a claim: none is configured (provisioning.claim_certificate and \
                        provisioning.claim_key); onboard the gateway from an installer's phone"
                    .to_owned(),
            );
        };
        if let Some(why) = &self.files_spent {
            return Err(format!(
                "a new claim: {why}; install one and restart iotd, or onboard the gateway"
            ));
        }
        let description = files.certificate.display().to_string();
        for (path, what) in [
            (&files.certificate, "provisioning.claim_certificate"),
            (&files.key, "provisioning.claim_key"),
        ] {
            if !path.exists() {
                return Err(format!(
                    "a claim: {what} {} does not exist; install the claim and restart iotd, or \
                     onboard the gateway",
                    path.display()
                ));
            }
        }
        let chain =
            tls::read_chain(&files.certificate).map_err(|e| format!("a usable claim: {e}"))?;
        let key = crate::keys::file::load_pem_file(&files.key)
            .map_err(|e| format!("a usable claim: {e}"))?;
        let claim = Claim::assemble(ClaimOrigin::File, chain, key, description)
            .map_err(|e| format!("a usable claim: {e}"))?;
        if claim.not_after <= now {
            return Err(format!(
                "a new claim: claim certificate {} expired at {}; install a new one and restart \
                 iotd, or onboard the gateway",
                claim.description,
                crate::cloud::rfc3339(claim.not_after)
            ));
        }
        Ok(claim)
    }
}
