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
use crate::error::ErrorCode;
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
    /// What the installer chose with the claim (trusted-user onboarding): the template to
    /// register with instead of the configured one, and template parameters the configuration
    /// lets an installer supply. They travel with the claim, which lives in memory only.
    pub template: Option<String>,
    pub installer_parameters: std::collections::BTreeMap<String, String>,
    /// The endpoint the claim is for, when the installer named one of
    /// `onboarding.allowed_endpoints` other than `cloud.endpoint` (`None`: `cloud.endpoint`).
    /// The identity made with it belongs there.
    pub endpoint: Option<String>,
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
            template: None,
            installer_parameters: std::collections::BTreeMap::new(),
            endpoint: None,
        })
    }
}

/// What the agent waits for when no claim can be used, and why (the code of the claim problem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub code: ErrorCode,
    /// "a claim: …", "a new claim: …": what to provide, in words.
    pub what: String,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

fn waiting(code: ErrorCode, what: String) -> Waiting {
    Waiting { code, what }
}

/// How to give the agent a claim, the end of every "waiting for" text.
const PROVIDE: &str = "then run iotctl reprovision (or restart iotd), or onboard the gateway";

/// The claims the agent knows of.
#[derive(Debug, Default)]
pub struct Claims {
    files: Option<ClaimPaths>,
    memory: Option<Claim>,
    /// The files' claim that was used up or refused in this run (its certificate, and why):
    /// not offered again; other files installed at the same paths are.
    files_spent: Option<(Vec<u8>, String)>,
    /// Why the last installer's claim was given up (expired, refused): said while the gateway
    /// waits for the next one, instead of "none is configured".
    network_spent: Option<String>,
}

impl Claims {
    pub fn new(files: Option<ClaimPaths>) -> Self {
        Self {
            files,
            memory: None,
            files_spent: None,
            network_spent: None,
        }
    }

    /// A claim handed over in memory; it replaces any earlier one.
    pub fn offer(&mut self, claim: Claim) {
        self.memory = Some(claim);
        self.network_spent = None;
    }

    /// Stops offering `claim` (expired, refused, or deleted after use); `why` says so while the
    /// agent waits for another.
    pub fn forget(&mut self, claim: &Claim, why: impl Into<String>) {
        match claim.origin {
            ClaimOrigin::Network => {
                self.memory = None;
                self.network_spent = Some(why.into());
            }
            ClaimOrigin::File => {
                let der = claim.chain.first().map(|c| c.to_vec()).unwrap_or_default();
                self.files_spent = Some((der, why.into()));
            }
        }
    }

    /// The claim to use now at wall-clock time `now`, or what the agent waits for.
    pub fn current(&mut self, now: i64) -> Result<Claim, Waiting> {
        if let Some(c) = &self.memory {
            // An installer's claim is used at once whatever the gateway's clock says (before
            // NTP it may be far off): AWS's answer says whether it expired.
            if c.origin == ClaimOrigin::Network || c.not_after > now {
                return Ok(c.clone());
            }
            self.memory = None;
        }
        let Some(files) = &self.files else {
            if let Some(why) = &self.network_spent {
                return Err(waiting(
                    ErrorCode::ClaimMissing,
                    format!(
                        "a new claim from an installer (the last one: {why}); hand over a new \
                         one with iotctl onboard or the installer's app"
                    ),
                ));
            }
            return Err(waiting(
                ErrorCode::ClaimMissing,
                "a claim: none is configured (provisioning.claim_certificate and \
                 provisioning.claim_key); onboard the gateway from an installer's phone"
                    .to_owned(),
            ));
        };
        let description = files.certificate.display().to_string();
        for (path, what) in [
            (&files.certificate, "provisioning.claim_certificate"),
            (&files.key, "provisioning.claim_key"),
        ] {
            if !path.exists() {
                return Err(waiting(
                    ErrorCode::ClaimMissing,
                    format!(
                        "a claim: {what} {} does not exist; install the claim, {PROVIDE}",
                        path.display()
                    ),
                ));
            }
        }
        let unusable = |e: String| {
            waiting(
                ErrorCode::ClaimMissing,
                format!("a usable claim: {e}; install a good one, {PROVIDE}"),
            )
        };
        let chain = tls::read_chain(&files.certificate).map_err(|e| unusable(e.to_string()))?;
        if let Some((spent, why)) = &self.files_spent
            && chain
                .first()
                .is_some_and(|c| c.as_ref() == spent.as_slice())
        {
            return Err(waiting(
                ErrorCode::ClaimMissing,
                format!("a new claim: {why}; install another, {PROVIDE}"),
            ));
        }
        let key =
            crate::keys::file::load_pem_file(&files.key).map_err(|e| unusable(e.to_string()))?;
        let claim =
            Claim::assemble(ClaimOrigin::File, chain, key, description).map_err(unusable)?;
        if claim.not_after <= now {
            return Err(waiting(
                ErrorCode::ClaimExpired,
                format!(
                    "a new claim: claim certificate {} expired at {}; install a new one, {PROVIDE}",
                    claim.description,
                    crate::cloud::rfc3339(claim.not_after)
                ),
            ));
        }
        Ok(claim)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// An installer's claim: the file backend's test key, certified by the test CA.
    fn installer_claim() -> Claim {
        let key_pem = crate::keys::file::testdata::EC_SEC1_PEM;
        let key = crate::keys::file::FileKey::from_pem(key_pem, std::path::Path::new("k")).unwrap();
        let der = iotd_testkit::pki::Pki::new().client_cert(&key.public_key_spki());
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let cert_pem = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
        Claim::from_pem(&cert_pem, key_pem, "handed over by the installer").unwrap()
    }

    #[test]
    fn an_installers_claim_is_used_whatever_the_clock_and_its_end_is_said() {
        let mut claims = Claims::new(None);
        let claim = installer_claim();
        claims.offer(claim.clone());
        // Long after its notAfter by this clock: still offered (AWS judges it).
        let far = claim.not_after + 10 * 365 * 86_400;
        assert!(claims.current(far).is_ok());
        claims.forget(&claim, "expired (AWS IoT refused it)");
        let waiting = claims.current(0).unwrap_err();
        assert_eq!(waiting.code, ErrorCode::ClaimMissing);
        assert_eq!(
            waiting.what,
            "a new claim from an installer (the last one: expired (AWS IoT refused it)); hand \
             over a new one with iotctl onboard or the installer's app"
        );
        // A new claim replaces the story.
        claims.offer(claim);
        claims.current(0).unwrap();
    }

    #[test]
    fn without_files_or_an_installers_claim_none_is_configured() {
        let waiting = Claims::new(None).current(0).unwrap_err();
        assert!(
            waiting.what.starts_with("a claim: none is configured"),
            "{waiting}"
        );
    }
}
