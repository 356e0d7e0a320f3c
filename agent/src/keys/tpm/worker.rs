//! The one thread that owns the TPM context, and the TPM operations it runs.
//!
//! tss-esapi calls are blocking FFI, and swtpm (like a TPM without resource manager) serves one
//! connection at a time, so a single `Context` lives on a dedicated thread and everything else
//! sends it jobs. Callers wait for the answer; inside a multi-thread tokio runtime the wait is
//! wrapped in `block_in_place`, so the worker's other tasks move to another thread meanwhile
//! (the rustls signer is synchronous, so there is no way to await).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::CapabilityType;
use tss_esapi::constants::property_tag::PropertyTag;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::SRK_HANDLE;
use super::rc::{
    self, TPM_RC_BINDING, TPM_RC_HANDLE, TPM_RC_INTEGRITY, TPM_RC_LOCKOUT, TPM_RC_NV_DEFINED,
};

/// How long a caller waits for one TPM job. ECC operations take milliseconds on swtpm and well
/// under a second on discrete TPMs; a job that takes this long is stuck (typically: another
/// client holds swtpm's only connection).
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// How a `TpmError::Lost` reason for blobs ends before the TPM's own words: the key in question
/// is normally an identity generation's; the backend says otherwise for the onboarding key.
pub(crate) const IDENTITY_LOST: &str = "this identity cannot be used again";

/// Why a TPM job failed.
#[derive(Debug, Clone)]
pub(crate) enum TpmError {
    /// A TPM command (or the TSS under it) failed; `message` is in plain words, with the code.
    Command {
        command: &'static str,
        rc: Option<u32>,
        message: String,
    },
    /// The key can never be used again (its parent or its persistent object is gone).
    Lost { reason: String },
    /// Anything else: an unsuitable object, the thread gone or stuck.
    Other(String),
}

impl fmt::Display for TpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TpmError::Command {
                command, message, ..
            } => write!(f, "{command}: {message}"),
            TpmError::Lost { reason } => f.write_str(reason),
            TpmError::Other(message) => f.write_str(message),
        }
    }
}

impl TpmError {
    /// The TPM's response code without layer and parameter number, if the TPM sent one.
    fn tpm_base(&self) -> Option<u32> {
        match self {
            TpmError::Command { rc: Some(rc), .. } => rc::tpm_base(*rc),
            _ => None,
        }
    }

    /// The TSS layer's own errors (no TPM involved): bad parameters caught by tss-esapi.
    fn local(command: &'static str, error: tss_esapi::Error) -> Self {
        TpmError::Command {
            command,
            rc: None,
            message: format!("tss-esapi refused it: {error}"),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Tpm) + Send>;

/// The handle on the TPM thread: shared by the backend and every key it made. The thread (and
/// with it the TPM connection) ends when the last of them is dropped.
pub(crate) struct TpmThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    commands: Arc<AtomicU64>,
    /// Set when a job timed out: the thread may never come back, so Drop must not join it.
    stuck: AtomicBool,
}

impl fmt::Debug for TpmThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmThread")
            .field("commands", &self.commands.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl TpmThread {
    /// Starts the thread and opens the TPM context on it through `tcti`.
    pub(crate) fn start(tcti: &str) -> Result<Self, TpmError> {
        let conf: TctiNameConf = tcti
            .parse()
            .map_err(|e| TpmError::Other(format!("the TCTI {tcti:?} is not valid: {e}")))?;
        let commands = Arc::new(AtomicU64::new(0));
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), TpmError>>(1);
        let counter = commands.clone();
        let thread = thread::Builder::new()
            .name("iotd-tpm".into())
            .spawn(move || {
                let ctx = match Context::new(conf) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let message = match rc::raw_code(&e) {
                            Some(code) => rc::describe(code),
                            None => e.to_string(),
                        };
                        let _ = ready_tx.send(Err(TpmError::Command {
                            command: "connecting to the TPM",
                            rc: rc::raw_code(&e),
                            message,
                        }));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut tpm = Tpm {
                    ctx,
                    commands: counter,
                    srk: None,
                    srk_created: false,
                };
                while let Ok(job) = inbox.recv() {
                    job(&mut tpm);
                }
                // The Context drops here: ESYS finalises and the TCTI closes the connection,
                // which lets the next client of a swtpm in.
            })
            .map_err(|e| TpmError::Other(format!("starting the TPM thread: {e}")))?;
        let this = Self {
            jobs: Some(jobs),
            thread: Some(thread),
            commands,
            stuck: AtomicBool::new(false),
        };
        match blocking_wait(|| ready_rx.recv_timeout(JOB_TIMEOUT)) {
            Ok(Ok(())) => Ok(this),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                this.stuck.store(true, Ordering::Relaxed);
                Err(timeout_error())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TpmError::Other(
                "the TPM thread stopped while connecting".into(),
            )),
        }
    }

    /// Runs `job` on the TPM thread and waits (at most `JOB_TIMEOUT`) for its result.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
    ) -> Result<T, TpmError> {
        let stopped = || TpmError::Other("the TPM thread has stopped".into());
        let (reply, answer) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(Box::new(move |tpm: &mut Tpm| {
            let _ = reply.send(job(tpm));
        }))
        .map_err(|_| stopped())?;
        match blocking_wait(|| answer.recv_timeout(JOB_TIMEOUT)) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stuck.store(true, Ordering::Relaxed);
                Err(timeout_error())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
        }
    }

    /// TPM commands sent so far (every command, including failed ones).
    pub(crate) fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
}

impl Drop for TpmThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; joining makes sure the TPM connection is
        // closed when the last handle is gone, so the next client of a swtpm (tpm2-tools, a
        // new backend) is served at once rather than queued behind a closing context.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && !self.stuck.load(Ordering::Relaxed)
        {
            let _ = blocking_wait(|| thread.join());
        }
    }
}

fn timeout_error() -> TpmError {
    TpmError::Other(format!(
        "the TPM did not answer within {} s (a swtpm serves one client at a time: is another \
         program connected to it?)",
        JOB_TIMEOUT.as_secs()
    ))
}

/// Runs a blocking wait. On a multi-thread tokio runtime's worker the wait goes through
/// `block_in_place`, so the worker's other tasks are moved to another thread instead of
/// stalling; elsewhere (plain threads, spawn_blocking, a current-thread runtime, where
/// block_in_place would panic) it simply blocks.
fn blocking_wait<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// The TCG storage root key template (TCG TPM v2.0 Provisioning Guidance, 7.5.1): ECC NIST
/// P-256 restricted decryption key, AES-128-CFB, name algorithm SHA-256, fixedTPM,
/// fixedParent, sensitiveDataOrigin, userWithAuth, noDA, and a unique field of two 32-byte
/// zero coordinates. noDA: the SRK has an empty password, so dictionary-attack protection buys
/// nothing and would only let another program's failed guesses lock iotd out.
pub(crate) fn srk_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let zeros = EccParameter::try_from(vec![0u8; 32])?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zeros.clone(), zeros))
        .build()
}

/// The device key: ECC NIST P-256, ECDSA with SHA-256 only, unrestricted signing, fixedTPM and
/// fixedParent (it can never be duplicated out), sensitiveDataOrigin (the TPM made the private
/// key), userWithAuth with an empty password, noDA (as for the SRK: a lockout caused by other
/// programs must not take the gateway's identity offline).
pub(crate) fn key_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Whether `public` is a key iotd could have made at a persistent handle (so replacing it is
/// replacing an older iotd key, not another program's object).
fn is_iotd_signing_key(public: &Public) -> bool {
    let attributes = public.object_attributes();
    matches!(public, Public::Ecc { parameters, .. } if parameters.ecc_curve() == EccCurve::NistP256)
        && attributes.sign_encrypt()
        && !attributes.decrypt()
        && !attributes.restricted()
        && attributes.fixed_tpm()
}

/// Whether `public` can be a parent: a restricted decryption (storage) key.
fn is_storage_key(public: &Public) -> bool {
    let attributes = public.object_attributes();
    matches!(public, Public::Ecc { .. } | Public::Rsa { .. })
        && attributes.restricted()
        && attributes.decrypt()
        && !attributes.sign_encrypt()
}

/// The TPM context and what the thread knows about it. Lives on the TPM thread only.
pub(crate) struct Tpm {
    ctx: Context,
    commands: Arc<AtomicU64>,
    /// The SRK at `SRK_HANDLE`, once `ensure_srk` found or made it.
    srk: Option<KeyHandle>,
    /// Whether this process made the SRK (there was none): then any older blob is orphaned.
    srk_created: bool,
}

impl Tpm {
    /// Sends one TPM command: counted, with a password session (empty password) when it
    /// needs authorization, and failures decoded. A lockout failure is completed with the time
    /// the TPM needs to leave lockout, read from the TPM.
    fn exec<T>(
        &mut self,
        command: &'static str,
        authorized: bool,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Result<T, TpmError> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let session = authorized.then_some(AuthSession::Password);
        match self.ctx.execute_with_session(session, f) {
            Ok(value) => Ok(value),
            Err(e) => Err(self.failure(command, e)),
        }
    }

    fn failure(&mut self, command: &'static str, error: tss_esapi::Error) -> TpmError {
        let Some(code) = rc::raw_code(&error) else {
            return TpmError::local(command, error);
        };
        let mut message = rc::describe(code);
        if rc::tpm_base(code) == Some(TPM_RC_LOCKOUT) {
            match self.lockout_properties() {
                Ok((counter, max, interval)) => {
                    message = format!(
                        "the TPM is in dictionary-attack lockout; {} (TPM_RC_LOCKOUT, {code:#x}; \
                         {counter} failed authorizations, lockout at {max})",
                        rc::lockout_wait(counter, max, interval)
                    );
                }
                Err(e) => {
                    message = format!(
                        "the TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT, {code:#x}); how \
                         long it lasts could not be read: {e}"
                    );
                }
            }
        }
        TpmError::Command {
            command,
            rc: Some(code),
            message,
        }
    }

    /// TPM_PT_LOCKOUT_COUNTER, TPM_PT_MAX_AUTH_FAIL and TPM_PT_LOCKOUT_INTERVAL: consecutive
    /// property tags, read fresh with one TPM2_GetCapability (tss-esapi's get_tpm_property
    /// caches values, and these change).
    fn lockout_properties(&mut self) -> Result<(u32, u32, u32), String> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let (data, _) = self
            .ctx
            .execute_without_session(|c| {
                c.get_capability(
                    CapabilityType::TpmProperties,
                    PropertyTag::LockoutCounter.into(),
                    3,
                )
            })
            .map_err(|e| e.to_string())?;
        let CapabilityData::TpmProperties(properties) = data else {
            return Err("the TPM answered with other data".into());
        };
        let get = |tag: PropertyTag| {
            properties
                .find(tag)
                .map(|p| p.value())
                .ok_or_else(|| format!("the TPM did not report {tag:?}"))
        };
        Ok((
            get(PropertyTag::LockoutCounter)?,
            get(PropertyTag::MaxAuthFail)?,
            get(PropertyTag::LockoutInterval)?,
        ))
    }

    /// Whether a persistent object exists at `handle`: TPM2_GetCapability rather than a failing
    /// TPM2_ReadPublic, so an absent object is not logged as an ESAPI error on stderr.
    fn persistent_exists(&mut self, handle: u32) -> Result<bool, TpmError> {
        let (data, _) = self.exec("TPM2_GetCapability(handles)", false, |c| {
            c.get_capability(CapabilityType::Handles, handle, 1)
        })?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::Other(
                "TPM2_GetCapability answered with other data".into(),
            ));
        };
        Ok(list.iter().any(|h| u32::from(*h) == handle))
    }

    fn persistent(handle: u32) -> Result<(TpmHandle, Persistent), TpmError> {
        let tpm_handle = PersistentTpmHandle::new(handle)
            .map_err(|e| TpmError::local("naming the persistent handle", e))?;
        Ok((
            TpmHandle::Persistent(tpm_handle),
            Persistent::Persistent(tpm_handle),
        ))
    }

    /// Flushes every transient object loaded in the TPM. Without a resource manager (swtpm,
    /// /dev/tpm0) objects outlive the connection that loaded them: a crashed iotd or a
    /// tpm2-tools command leaves them behind and swtpm has only three slots. With /dev/tpmrm0
    /// the kernel shows each connection only its own objects, so there is nothing to flush.
    /// Returns the handles flushed; a failure to flush one is logged, not fatal.
    pub(crate) fn flush_stale_transients(&mut self) -> Result<Vec<u32>, TpmError> {
        let (data, _) = self.exec("TPM2_GetCapability(handles)", false, |c| {
            c.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 254)
        })?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::Other(
                "TPM2_GetCapability answered with other data".into(),
            ));
        };
        let mut flushed = Vec::new();
        for handle in list.into_inner() {
            let TpmHandle::Transient(transient) = handle else {
                continue;
            };
            let value = u32::from(transient);
            let result = self
                .exec("TPM2_ReadPublic", false, |c| c.tr_from_tpm_public(handle))
                .and_then(|object| {
                    self.exec("TPM2_FlushContext", false, |c| c.flush_context(object))
                });
            match result {
                Ok(()) => flushed.push(value),
                Err(e) => tracing::warn!("flushing the stale transient object {value:#x}: {e}"),
            }
        }
        Ok(flushed)
    }

    /// Finds the SRK at `SRK_HANDLE`, or makes one from the TCG template and persists it there
    /// (so other programs find the same parent). Returns whether it was made now.
    pub(crate) fn ensure_srk(&mut self) -> Result<bool, TpmError> {
        self.find_or_make_srk(true)
    }

    fn find_or_make_srk(&mut self, retry: bool) -> Result<bool, TpmError> {
        let (tpm_handle, persistent) = Self::persistent(SRK_HANDLE)?;
        if self.persistent_exists(SRK_HANDLE)? {
            let object = self.exec("TPM2_ReadPublic", false, |c| {
                c.tr_from_tpm_public(tpm_handle)
            })?;
            let (public, _, _) =
                self.exec("TPM2_ReadPublic", false, |c| c.read_public(object.into()))?;
            if !is_storage_key(&public) {
                return Err(TpmError::Other(format!(
                    "the object at {SRK_HANDLE:#x} is not a storage key (a restricted decryption \
                     key), so no key can be made under it; the TCG reserves {SRK_HANDLE:#x} for \
                     the storage root key: evict it (tpm2_evictcontrol -C o -c {SRK_HANDLE:#x}) \
                     if nothing else needs it"
                )));
            }
            self.srk = Some(object.into());
            return Ok(false);
        }

        let template =
            srk_template().map_err(|e| TpmError::local("building the SRK template", e))?;
        let primary = self.exec("TPM2_CreatePrimary", true, |c| {
            c.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })?;
        let transient: ObjectHandle = primary.key_handle.into();
        let persisted = self.exec("TPM2_EvictControl", true, |c| {
            c.evict_control(Provision::Owner, transient, persistent)
        });
        let flushed = self.exec("TPM2_FlushContext", false, |c| c.flush_context(transient));
        match persisted {
            Ok(object) => {
                flushed?;
                self.srk = Some(object.into());
                self.srk_created = true;
                tracing::info!(
                    "made the storage root key (TCG template, ECC P-256) and persisted it at \
                     {SRK_HANDLE:#x}"
                );
                Ok(true)
            }
            // Another program persisted one between our check and now: use it.
            Err(e) if retry && e.tpm_base() == Some(TPM_RC_NV_DEFINED) => {
                self.find_or_make_srk(false)
            }
            Err(e) => Err(e),
        }
    }

    fn srk(&self) -> Result<KeyHandle, TpmError> {
        self.srk
            .ok_or_else(|| TpmError::Other("the storage root key was not opened".into()))
    }

    /// Creates a device key under the SRK; returns its public and (wrapped) private parts.
    pub(crate) fn create_key(&mut self) -> Result<(Public, Private), TpmError> {
        let template =
            key_template().map_err(|e| TpmError::local("building the key template", e))?;
        let srk = self.srk()?;
        let created = self.exec("TPM2_Create", true, |c| {
            c.create(srk, template.clone(), None, None, None, None)
        });
        let created = match created {
            // The SRK went away while we ran (the TPM was cleared): the new identity needs a
            // new SRK, as a restart would make.
            Err(e) if e.tpm_base() == Some(TPM_RC_HANDLE) => {
                self.ensure_srk()?;
                let srk = self.srk()?;
                self.exec("TPM2_Create", true, |c| {
                    c.create(srk, template, None, None, None, None)
                })?
            }
            other => other?,
        };
        Ok((created.out_public, created.out_private))
    }

    /// Loads blobs under the SRK; a TPM that cannot (cleared, new owner, other SRK) makes the
    /// key lost.
    fn load(&mut self, public: Public, private: Private) -> Result<KeyHandle, TpmError> {
        let srk = self.srk()?;
        let loaded = self.exec("TPM2_Load", true, |c| c.load(srk, private, public));
        loaded.map_err(|e| match e.tpm_base() {
            Some(TPM_RC_INTEGRITY | TPM_RC_HANDLE | 0x155) => TpmError::Lost {
                reason: format!(
                    "the TPM no longer holds the parent key {SRK_HANDLE:#x} this key was made \
                     under (it was cleared or its owner changed){}; {IDENTITY_LOST} ({e})",
                    if self.srk_created {
                        "; iotd found no key there when it started and made a new one"
                    } else {
                        ""
                    }
                ),
            },
            Some(TPM_RC_BINDING) => TpmError::Lost {
                reason: format!(
                    "the key's public and private blobs do not belong together (one of them was \
                     replaced or damaged); {IDENTITY_LOST} ({e})"
                ),
            },
            _ => e,
        })
    }

    fn flush(&mut self, key: KeyHandle) -> Result<(), TpmError> {
        self.exec("TPM2_FlushContext", false, |c| c.flush_context(key.into()))
    }

    /// Checks that the TPM can load the blobs (and flushes them again).
    pub(crate) fn check_blobs(&mut self, public: Public, private: Private) -> Result<(), TpmError> {
        let key = self.load(public, private)?;
        self.flush(key)
    }

    /// Loads the blobs, signs the SHA-256 `digest`, flushes: the key holds a TPM object slot
    /// only for the duration of one signature.
    pub(crate) fn sign_blobs(
        &mut self,
        public: Public,
        private: Private,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, TpmError> {
        let key = self.load(public, private)?;
        let signature = self.sign(key, digest);
        let flushed = self.flush(key);
        let signature = signature?;
        flushed?;
        Ok(signature)
    }

    /// ECDSA-SHA256 over `digest` with a loaded key; the DER ECDSA-Sig-Value.
    fn sign(&mut self, key: KeyHandle, digest: [u8; 32]) -> Result<Vec<u8>, TpmError> {
        let digest = Digest::try_from(digest.to_vec())
            .map_err(|e| TpmError::local("preparing the digest", e))?;
        // An unrestricted key needs no proof that the TPM hashed the message: a NULL ticket.
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| TpmError::local("preparing the hashcheck ticket", e))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let signature = self.exec("TPM2_Sign", true, |c| c.sign(key, digest, scheme, ticket))?;
        let Signature::EcDsa(ecc) = signature else {
            return Err(TpmError::Other(
                "the TPM answered with a non-ECDSA signature".into(),
            ));
        };
        ecdsa_der(ecc.signature_r().value(), ecc.signature_s().value())
            .ok_or_else(|| TpmError::Other("the TPM's ECDSA signature is malformed".into()))
    }

    /// Puts a new key at the persistent `handle`. An iotd key there is evicted first (the
    /// caller chose a handle no other generation's key is at: the key there is this
    /// generation's, made before, or one an interrupted create left); any other object (an
    /// EK, an SRK, another program's key) is left alone and refused.
    pub(crate) fn persist_key(
        &mut self,
        public: Public,
        private: Private,
        handle: u32,
    ) -> Result<(), TpmError> {
        let (tpm_handle, persistent) = Self::persistent(handle)?;
        if self.persistent_exists(handle)? {
            let mut object = self.exec("TPM2_ReadPublic", false, |c| {
                c.tr_from_tpm_public(tpm_handle)
            })?;
            let (existing, _, _) =
                self.exec("TPM2_ReadPublic", false, |c| c.read_public(object.into()))?;
            if !is_iotd_signing_key(&existing) {
                let _ = self.ctx.tr_close(&mut object);
                return Err(TpmError::Other(format!(
                    "the persistent handle {handle:#x} holds an object iotd did not make (not an \
                     ECC P-256 signing key); iotd replaces only its own keys: choose another \
                     key.persistent_handle (iotd uses it and the handle after it), or free \
                     {handle:#x} with tpm2_evictcontrol -C o -c {handle:#x}"
                )));
            }
            self.exec("TPM2_EvictControl", true, |c| {
                c.evict_control(Provision::Owner, object, persistent)
            })?;
            forget_evicted(&mut self.ctx, object);
        }
        let key = self.load(public, private)?;
        let persisted = self.exec("TPM2_EvictControl", true, |c| {
            c.evict_control(Provision::Owner, key.into(), persistent)
        });
        let flushed = self.flush(key);
        let mut object = persisted?;
        flushed?;
        // Only ESAPI's bookkeeping: the object stays in the TPM.
        let _ = self.ctx.tr_close(&mut object);
        Ok(())
    }

    /// The object at persistent `handle`, if it is the key named `name`; `Lost` when it is gone
    /// or another key took its place. The caller closes the returned handle.
    fn open_persistent(&mut self, handle: u32, name: &[u8]) -> Result<ObjectHandle, TpmError> {
        let (tpm_handle, _) = Self::persistent(handle)?;
        let mut object = match self.exec("TPM2_ReadPublic", false, |c| {
            c.tr_from_tpm_public(tpm_handle)
        }) {
            Ok(object) => object,
            Err(e) if e.tpm_base() == Some(TPM_RC_HANDLE) => {
                return Err(TpmError::Lost {
                    reason: format!(
                        "the TPM no longer holds the key at the persistent handle {handle:#x} (it \
                         was cleared, its owner changed, or the key was evicted); this identity \
                         cannot be used again"
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        // ESAPI has the object's name from the TPM's ReadPublic answer: no further command.
        let current = self.ctx.tr_get_name(object);
        match current {
            Ok(current) if current.value() == name => Ok(object),
            Ok(_) => {
                let _ = self.ctx.tr_close(&mut object);
                Err(TpmError::Lost {
                    reason: format!(
                        "the persistent handle {handle:#x} holds another key now (the key of \
                         this generation was made again, or another program put one there); \
                         this identity cannot be used again"
                    ),
                })
            }
            Err(e) => {
                let _ = self.ctx.tr_close(&mut object);
                Err(TpmError::local("reading the object's name", e))
            }
        }
    }

    /// Checks that the key named `name` is at `handle`.
    pub(crate) fn check_persistent(&mut self, handle: u32, name: Vec<u8>) -> Result<(), TpmError> {
        let mut object = self.open_persistent(handle, &name)?;
        let _ = self.ctx.tr_close(&mut object);
        Ok(())
    }

    pub(crate) fn sign_persistent(
        &mut self,
        handle: u32,
        name: Vec<u8>,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, TpmError> {
        let mut object = self.open_persistent(handle, &name)?;
        let signature = self.sign(object.into(), digest);
        let _ = self.ctx.tr_close(&mut object);
        signature
    }

    /// Evicts the key named `name` from `handle`; returns false (and leaves the TPM alone) if it
    /// is not there any more or another key is.
    pub(crate) fn evict_persistent(
        &mut self,
        handle: u32,
        name: Vec<u8>,
    ) -> Result<bool, TpmError> {
        let object = match self.open_persistent(handle, &name) {
            Ok(object) => object,
            Err(TpmError::Lost { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let (_, persistent) = Self::persistent(handle)?;
        self.exec("TPM2_EvictControl", true, |c| {
            c.evict_control(Provision::Owner, object, persistent)
        })?;
        forget_evicted(&mut self.ctx, object);
        Ok(true)
    }
}

/// Drops ESAPI's record of a persistent object just evicted. ESAPI keeps it (and would refuse
/// the next TPM2_ReadPublic of the handle with "Name mismatch" once another key is there);
/// tss-esapi's own bookkeeping already forgot the handle, so its complaint about closing an
/// unknown handle is expected and ignored. No TPM command.
fn forget_evicted(ctx: &mut Context, mut object: ObjectHandle) {
    let _ = ctx.tr_close(&mut object);
}

/// DER ECDSA-Sig-Value { r INTEGER, s INTEGER } from the TPM's big-endian r and s (which may
/// come with or without leading zeros); `None` if either is zero or longer than 32 bytes.
pub(crate) fn ecdsa_der(r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    fn integer(value: &[u8]) -> Option<Vec<u8>> {
        let first = value.iter().position(|b| *b != 0)?;
        let digits = &value[first..];
        if digits.len() > 32 {
            return None;
        }
        let mut out = vec![0x02, 0];
        // A set top bit would read as negative: prefix a zero byte.
        if digits[0] & 0x80 != 0 {
            out.push(0);
        }
        out.extend_from_slice(digits);
        out[1] = u8::try_from(out.len() - 2).ok()?;
        Some(out)
    }
    let mut body = integer(r)?;
    body.extend(integer(s)?);
    // At most 2 * 35 bytes: the short length form always fits.
    let mut out = vec![0x30, u8::try_from(body.len()).ok()?];
    out.extend(body);
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_encodes_minimal_positive_integers() {
        let mut r = [0u8; 32];
        r[31] = 1;
        let s = [0xffu8; 32];
        let der = ecdsa_der(&r, &s).unwrap();
        let mut expected = vec![0x30, 3 + 35, 0x02, 0x01, 0x01, 0x02, 0x21, 0x00];
        expected.extend_from_slice(&s);
        assert_eq!(der, expected);
        // Shorter inputs (leading zeros already stripped by the TPM) encode the same.
        assert_eq!(ecdsa_der(&[1], &s).unwrap(), der);
        assert!(ecdsa_der(&[0; 32], &s).is_none());
        assert!(ecdsa_der(&[1; 33], &s).is_none());
    }

    #[test]
    fn templates_build_and_are_recognised() {
        let srk = srk_template().unwrap();
        assert!(is_storage_key(&srk));
        assert!(!is_iotd_signing_key(&srk));
        assert!(srk.object_attributes().no_da());
        let key = key_template().unwrap();
        assert!(is_iotd_signing_key(&key));
        assert!(!is_storage_key(&key));
        assert!(key.object_attributes().no_da());
        assert!(key.object_attributes().fixed_parent());
    }
}
