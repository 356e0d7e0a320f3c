//! The `tpm` key backend: the device key is made inside the TPM and never leaves it.
//!
//! # The key and its parent
//!
//! Each generation's key is an ECC NIST P-256 key, ECDSA with SHA-256 only, created by
//! TPM2_Create as a child of the storage root key (SRK) at the persistent handle `0x81000001`.
//! Its attributes are fixedTPM and fixedParent (it cannot be duplicated out of this TPM),
//! sensitiveDataOrigin (the TPM generated the private key), userWithAuth with an empty
//! password, and noDA (see below).
//!
//! The parent is the SRK at 0x81000001, the conventional SRK handle (TCG provisioning
//! guidance), and the choice is deliberate:
//! - when an object is there, iotd uses it, whatever made it (`tpm2_createprimary`, the OS
//!   image, another agent), as long as it is a storage key (a restricted decryption key);
//! - when nothing is there, iotd creates one from the TCG SRK template (ECC P-256, AES-128-CFB,
//!   SHA-256, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA, restricted,
//!   decrypt, zero unique) and persists it at 0x81000001 with TPM2_EvictControl.
//!
//! A persisted SRK rather than a primary re-derived from the template at every start: other
//! programs on the gateway find the same parent at the same handle (`tpm2_load -C 0x81000001`)
//! without having to reproduce iotd's exact template, and start-up skips a TPM2_CreatePrimary,
//! which takes tens to hundreds of milliseconds on a discrete TPM. The cost is one NV slot
//! and owner authorization (empty here) the first time.
//!
//! The SRK and the key are noDA: both have empty passwords, so dictionary-attack protection
//! buys nothing and would only let another program's failed guesses lock the gateway's
//! identity out. An SRK made by `tpm2_createprimary` with its defaults is DA-protected; then a
//! lockout does stop iotd, and it says for how long (see errors).
//!
//! # Files
//!
//! `<state>/gen/<n>/key.pub` (TPM2B_PUBLIC) and `<state>/gen/<n>/key.priv` (TPM2B_PRIVATE),
//! byte for byte what `tpm2_create -u key.pub -r key.priv` writes (a 2-byte big-endian size,
//! then the structure), mode 0644: the private blob is encrypted and integrity-protected by the
//! SRK and is useless outside this TPM. No private key material is ever on disk.
//!
//! With `key.persistent_handle` set, keys are made persistent instead (TPM2_EvictControl) and
//! a generation's directory holds `key.pub` (to recognise its key) and `key.handle` (the
//! handle the key is at, "0x81010001"). iotd uses two handles, A/B: the configured one (slot
//! A) and the one right after it (slot B, A+1), both owner persistent handles and neither the
//! SRK's (`open` refuses a configuration where one is not). So a new generation's key is made
//! beside the one in use, which stays usable until the new one has proven itself and the old
//! generation is removed (a rotation can roll back):
//! - `create` puts a generation's key at the slot its own `key.handle` already names (the key
//!   of the same generation made again) unless another generation's names it too, else at
//!   the slot that no other generation's `key.handle` (`<state>/gen/*/key.handle`) names, A
//!   first. When other generations name both slots it refuses, naming them: iotd never
//!   evicts another generation's key, so an older generation's key must be removed first. An
//!   iotd key at the chosen slot that no other generation names (a key made again, or one left
//!   by an interrupted `create`) is replaced; any other object there is refused.
//! - `load` uses the handle its generation's `key.handle` names, and checks that the key there
//!   is still the one in `key.pub` (by its TPM name).
//! - `remove` evicts the generation's own handle only, and only while the key there is still
//!   that generation's.
//!
//! # The onboarding key
//!
//! The onboarding server's TLS key (`KeyBackend::onboarding_key`) is made like a generation's
//! key in blob mode, from the same template, under the same SRK: `<state>/onboarding/key.pub`
//! and `<state>/onboarding/key.priv` (0644, in a 0700 directory), loaded for each signature. It
//! is a blob pair in persistent-handle mode too: it never takes slot A or B, which belong to
//! the identity generations, and `<state>/onboarding/` is not under `gen/`, so no generation's
//! `key.handle` scan sees it. A TPM that can no longer load it (cleared, new owner) makes it
//! `KeyError::Lost`; removing it (`remove_onboarding_key`, files only: the TPM holds nothing
//! of it between signatures) lets the next `onboarding_key` make a new one.
//!
//! # Using the identity from other programs
//!
//! With the kernel resource manager (the default TCTI, `device:/dev/tpmrm0`), other programs can
//! use the TPM while iotd runs. With swtpm or `/dev/tpm0` (one client at a time, no resource
//! manager) stop iotd first. The key signs with tpm2-tools like this (generation 1):
//!
//! ```text
//! export TPM2TOOLS_TCTI=device:/dev/tpmrm0        # or swtpm:host=127.0.0.1,port=2321
//! tpm2_load -C 0x81000001 -u /var/lib/iotd/gen/1/key.pub -r /var/lib/iotd/gen/1/key.priv -c key.ctx
//! tpm2_sign -c key.ctx -g sha256 -f plain -o sig.der message.bin   # DER ECDSA-Sig-Value
//! tpm2_readpublic -c key.ctx -f pem -o key.pem                      # the public key
//! openssl dgst -sha256 -verify key.pem -signature sig.der message.bin
//! tpm2_flushcontext -t       # only without a resource manager (swtpm, /dev/tpm0): each
//!                            # command above leaves the key it loads in a TPM slot
//! ```
//!
//! In persistent-handle mode there is nothing to load: with the handle the generation's
//! `key.handle` names (A or B), `tpm2_sign -c 0x81010001 -g sha256 -f plain -o sig.der
//! message.bin`.
//!
//! # Threading
//!
//! One TPM context, owned by one thread (`worker`); keys and the backend send it jobs and
//! wait. Inside a multi-thread tokio runtime the wait goes through `block_in_place`; the
//! rustls signer is synchronous, so it cannot await. At start the thread flushes stale
//! transient objects (without a resource manager they outlive a crashed process, and swtpm
//! has three object slots).
//!
//! A key is loaded for each signature and flushed right after (TPM2_Load, TPM2_Sign,
//! TPM2_FlushContext): it never holds a TPM object slot between signatures, so a TPM without
//! resource manager keeps its few slots for other programs, and there is no loaded object to
//! go stale. The cost is a TPM2_Load and a TPM2_FlushContext per signature (3 commands instead
//! of 1; on swtpm the whole signature takes about 1 ms, on a discrete TPM the load adds tens of
//! ms), paid once per TLS connection and once per CSR, which is noise next to the network
//! round trips. Keeping the key loaded would save that, at the price of a slot held for the
//! whole life of the agent.
//!
//! # Errors
//!
//! TPM response codes are said in words with their name and value. A dictionary-attack
//! lockout says how long it lasts ("the TPM is in dictionary-attack lockout; it will accept
//! commands again in N s", from TPM_PT_LOCKOUT_COUNTER, TPM_PT_MAX_AUTH_FAIL and
//! TPM_PT_LOCKOUT_INTERVAL). A key the TPM can no longer load because its parent is gone (the
//! TPM was cleared, its owner changed) or its persistent object is gone is `KeyError::Lost`:
//! the identity cannot be used again, and the agent must provision a new key.
//!
//! Every TPM command the thread sends is counted (`commands_issued`).
//!
//! # TCTI
//!
//! `device:/dev/tpmrm0` (the default), `device:/dev/tpm0`, `tabrmd:…`, or a simulator as
//! `swtpm:host=…,port=…` / `mssim:host=…,port=…`. tss-esapi 7.7 re-encodes simulator TCTI
//! strings from host and port alone, so `swtpm:path=<unix socket>` would silently connect to
//! localhost:2321 instead: such options are refused rather than risk talking to another TPM.
//! Run swtpm with `--server type=tcp,port=N --ctrl type=tcp,port=N+1`.

mod blobs;
mod rc;
mod worker;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::SignatureScheme;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{Private, Public};

use self::blobs::{HANDLE_FILE, PRIVATE_FILE, PUBLIC_FILE};
use self::worker::IDENTITY_LOST;
use self::worker::{TpmError, TpmThread};
use super::file::p256_spki;
use super::{
    DAMAGED_ONBOARDING_KEY, DeviceKey, KeyBackend, KeyError, ensure_onboarding_dir, onboarding_dir,
    remove_generation_dir, remove_onboarding_dir,
};

/// The persistent handle of the storage root key every device key is made under.
pub const SRK_HANDLE: u32 = 0x8100_0001;

/// The first platform persistent handle: those need platform authorization, which the OS has
/// not got (TPM2_EvictControl with owner authorization refuses them).
const PLATFORM_PERSISTENT_FIRST: u32 = 0x8180_0000;

/// Device keys inside the TPM (see the module documentation).
pub struct TpmBackend {
    tpm: Arc<TpmThread>,
    tcti: String,
    /// The state directory; keys go to `gen/<n>/` below it.
    dir: PathBuf,
    /// Slot A of persistent-handle mode (slot B is the handle after it).
    persistent_handle: Option<u32>,
    /// Held by `create` in persistent-handle mode from choosing a slot until the generation's
    /// `key.handle` names it, so that two generations made at once cannot choose the same.
    slot_choice: Mutex<()>,
    /// Held by `onboarding_key` and `remove_onboarding_key`: two first uses at once make one
    /// key, not two racing for the files.
    onboarding: Mutex<()>,
    /// Whether `open` found no SRK and made (and persisted) one.
    created_srk: bool,
    /// The stale transient objects `open` flushed.
    flushed: Vec<u32>,
}

impl fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmBackend")
            .field("tcti", &self.tcti)
            .field("dir", &self.dir)
            .field("persistent_handle", &self.persistent_handle)
            .field("commands_issued", &self.commands_issued())
            .finish()
    }
}

impl TpmBackend {
    /// Opens the TPM through `tcti` ("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=2321"),
    /// flushes stale transient objects, and makes sure the SRK exists at 0x81000001 (creating
    /// and persisting it from the TCG template if not). With `persistent_handle` (slot A), new
    /// keys are put at that handle or the one after it (slot B) instead of being kept as
    /// blobs; both must be owner persistent handles other than the SRK's.
    pub fn open(
        tcti: &str,
        state_dir: &Path,
        persistent_handle: Option<u32>,
    ) -> Result<Self, KeyError> {
        const ACTION: &str = "opening the TPM";
        check_tcti(tcti).map_err(|message| KeyError::Unsupported {
            action: ACTION,
            message,
        })?;
        if let Some(handle) = persistent_handle {
            check_slots(handle).map_err(|message| KeyError::Unsupported {
                action: ACTION,
                message,
            })?;
        }
        let tpm_error = |e: TpmError| KeyError::Crypto {
            action: ACTION,
            key: tcti.to_string(),
            message: e.to_string(),
        };
        let tpm = TpmThread::start(tcti).map_err(tpm_error)?;
        let (flushed, created_srk) = tpm
            .call(|t| {
                let flushed = t.flush_stale_transients()?;
                let created = t.ensure_srk()?;
                Ok((flushed, created))
            })
            .map_err(tpm_error)?;
        if !flushed.is_empty() {
            let handles: Vec<String> = flushed.iter().map(|h| format!("{h:#x}")).collect();
            tracing::warn!(
                tcti,
                "flushed {} stale transient TPM object(s) left by an earlier process: {}",
                flushed.len(),
                handles.join(", ")
            );
        }
        Ok(Self {
            tpm: Arc::new(tpm),
            tcti: tcti.to_string(),
            dir: state_dir.to_path_buf(),
            persistent_handle,
            slot_choice: Mutex::new(()),
            onboarding: Mutex::new(()),
            created_srk,
            flushed,
        })
    }

    /// TPM commands sent so far, by the backend and every key from it.
    pub fn commands_issued(&self) -> u64 {
        self.tpm.commands()
    }

    /// Whether `open` found no SRK at 0x81000001 and made one.
    pub fn created_srk(&self) -> bool {
        self.created_srk
    }

    /// The stale transient objects `open` flushed.
    pub fn flushed_at_open(&self) -> &[u32] {
        &self.flushed
    }

    /// `<state_dir>/gen/<generation>`.
    pub fn generation_dir(&self, generation: u32) -> PathBuf {
        self.dir.join("gen").join(generation.to_string())
    }

    /// `<state_dir>/onboarding`: the onboarding key's `key.pub` and `key.priv`.
    pub fn onboarding_dir(&self) -> PathBuf {
        onboarding_dir(&self.dir)
    }

    fn blob_location(&self, gen_dir: &Path) -> String {
        format!(
            "tpm {} parent {SRK_HANDLE:#010x}, blobs {}/{PUBLIC_FILE}+{PRIVATE_FILE}",
            self.tcti,
            gen_dir.display()
        )
    }

    fn persistent_location(&self, handle: u32) -> String {
        format!("tpm {} persistent {handle:#010x}", self.tcti)
    }

    /// The handle each generation's `key.handle` names (`<state>/gen/*/key.handle`), as
    /// (generation, handle). Directories that are not a generation number or hold no
    /// `key.handle` name none. A file that cannot be read or decoded is an error, since the
    /// handle it names could be a live key, except `generation`'s own, which is about to be
    /// replaced.
    fn named_handles(
        &self,
        generation: u32,
        action: &'static str,
    ) -> Result<Vec<(u32, u32)>, KeyError> {
        let gen_root = self.dir.join("gen");
        let io_error = |path: &Path, source| KeyError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        let entries = match std::fs::read_dir(&gen_root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&gen_root, e)),
        };
        let mut named = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&gen_root, e))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(other) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path().join(HANDLE_FILE);
            let handle = match blobs::read_optional(&path) {
                Ok(None) => continue,
                Ok(Some(bytes)) => blobs::decode_handle(&bytes),
                Err(_) if other == generation => continue,
                Err(e) => return Err(io_error(&path, e)),
            };
            match handle {
                Ok(handle) => named.push((other, handle)),
                Err(_) if other == generation => {}
                Err(message) => {
                    return Err(KeyError::Crypto {
                        action,
                        key: path.display().to_string(),
                        message: format!(
                            "{message}; the persistent handle for a new key cannot be chosen \
                             while it is unknown which handle generation {other}'s key is at"
                        ),
                    });
                }
            }
        }
        named.sort_unstable();
        Ok(named)
    }

    /// Removes every file this backend may have written for a generation, commit markers
    /// first (`key.handle`, then `key.pub`), so that no crash leaves an old and a new file
    /// paired; then makes the removals durable.
    fn remove_files(&self, gen_dir: &Path, action: &'static str) -> Result<(), KeyError> {
        let mut removed = false;
        for name in blobs::ALL_FILES {
            let path = gen_dir.join(name);
            removed |= path.exists();
            blobs::remove_if_exists(&path).map_err(|source| KeyError::Io {
                action,
                path,
                source,
            })?;
        }
        if !removed {
            // Nothing was there (a new generation): nothing to make durable.
            return Ok(());
        }
        match blobs::sync_dir(gen_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyError::Io {
                action,
                path: gen_dir.to_path_buf(),
                source,
            }),
        }
    }

    fn key(&self, material: Material, spki: Vec<u8>, location: String) -> Arc<dyn DeviceKey> {
        Arc::new(TpmKey::new(KeyInner {
            tpm: self.tpm.clone(),
            material,
            spki,
            location,
            onboarding: false,
        }))
    }

    fn onboarding_key_of(
        &self,
        public: Public,
        private: Private,
        spki: Vec<u8>,
        location: String,
    ) -> Arc<dyn DeviceKey> {
        Arc::new(TpmKey::new(KeyInner {
            tpm: self.tpm.clone(),
            material: Material::Blobs { public, private },
            spki,
            location,
            onboarding: true,
        }))
    }
}

impl KeyBackend for TpmBackend {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    fn commands_issued(&self) -> Option<u64> {
        Some(TpmBackend::commands_issued(self))
    }

    fn load(&self, generation: u32) -> Result<Option<Arc<dyn DeviceKey>>, KeyError> {
        const ACTION: &str = "loading TPM key";
        const BLOB_ACTION: &str = "loading TPM key blob";
        let gen_dir = self.generation_dir(generation);
        let read = |name: &str| {
            let path = gen_dir.join(name);
            blobs::read_optional(&path).map_err(|source| KeyError::Io {
                action: BLOB_ACTION,
                path,
                source,
            })
        };
        let blob_error = |name: &str, message: String| KeyError::Crypto {
            action: BLOB_ACTION,
            key: gen_dir.join(name).display().to_string(),
            message,
        };

        if let Some(handle) = read(HANDLE_FILE)? {
            let handle = blobs::decode_handle(&handle).map_err(|m| blob_error(HANDLE_FILE, m))?;
            let location = self.persistent_location(handle);
            let Some(public) = read(PUBLIC_FILE)? else {
                return Err(blob_error(
                    PUBLIC_FILE,
                    format!(
                        "missing: {HANDLE_FILE} names {handle:#x} but the key's public part is gone, so the key there cannot be recognised"
                    ),
                ));
            };
            let public = blobs::decode_public(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
            let spki = spki_of(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
            let name = blobs::name_of(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
            let check = name.clone();
            self.tpm
                .call(move |t| t.check_persistent(handle, check))
                .map_err(|e| key_error(ACTION, &location, e))?;
            return Ok(Some(self.key(
                Material::Persistent { handle, name },
                spki,
                location,
            )));
        }

        // key.pub is written last: without it the generation has no (complete) key.
        let (Some(public), Some(private)) = (read(PUBLIC_FILE)?, read(PRIVATE_FILE)?) else {
            return Ok(None);
        };
        let public = blobs::decode_public(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
        let private = blobs::decode_private(&private).map_err(|m| blob_error(PRIVATE_FILE, m))?;
        let spki = spki_of(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
        let location = self.blob_location(&gen_dir);
        // Load once now, so that a key the TPM cannot use any more is found at start-up and
        // not at the first TLS handshake.
        let (p, q) = (public.clone(), private.clone());
        self.tpm
            .call(move |t| t.check_blobs(p, q))
            .map_err(|e| key_error(ACTION, &location, e))?;
        Ok(Some(self.key(
            Material::Blobs { public, private },
            spki,
            location,
        )))
    }

    fn create(&self, generation: u32) -> Result<Arc<dyn DeviceKey>, KeyError> {
        const ACTION: &str = "creating TPM key";
        let gen_dir = self.generation_dir(generation);
        let io_error = |(path, source): (PathBuf, io::Error)| KeyError::Io {
            action: ACTION,
            path,
            source,
        };
        let encode_error = |name: &str, message: String| KeyError::Crypto {
            action: ACTION,
            key: gen_dir.join(name).display().to_string(),
            message,
        };
        // Persistent-handle mode: the slot is chosen from the generations' key.handle files
        // before this generation's are removed (its own names the slot to reuse), and held
        // until its key.handle names the new key's.
        let (slot, _choosing) = match self.persistent_handle {
            None => (None, None),
            Some(slot_a) => {
                let choosing = self
                    .slot_choice
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let named = self.named_handles(generation, ACTION)?;
                let slot = choose_slot(slots(slot_a), generation, &named).map_err(|message| {
                    KeyError::Unsupported {
                        action: ACTION,
                        message: format!("generation {generation}: {message}"),
                    }
                })?;
                (Some(slot), Some(choosing))
            }
        };
        blobs::ensure_generation_dir(&self.dir, &gen_dir).map_err(io_error)?;
        self.remove_files(&gen_dir, ACTION)?;

        let location = match slot {
            Some(handle) => self.persistent_location(handle),
            None => self.blob_location(&gen_dir),
        };
        let (public, private) = self
            .tpm
            .call(|t| t.create_key())
            .map_err(|e| key_error(ACTION, &location, e))?;
        let spki = spki_of(&public).map_err(|m| encode_error(PUBLIC_FILE, m))?;
        let public_file =
            blobs::encode_public(&public).map_err(|m| encode_error(PUBLIC_FILE, m))?;

        let material = match slot {
            None => {
                let private_file =
                    blobs::encode_private(&private).map_err(|m| encode_error(PRIVATE_FILE, m))?;
                // key.pub last: it completes the pair.
                blobs::write_atomic(&gen_dir, PRIVATE_FILE, &private_file).map_err(io_error)?;
                blobs::write_atomic(&gen_dir, PUBLIC_FILE, &public_file).map_err(io_error)?;
                Material::Blobs { public, private }
            }
            Some(handle) => {
                let name = blobs::name_of(&public).map_err(|m| encode_error(PUBLIC_FILE, m))?;
                let p = public.clone();
                self.tpm
                    .call(move |t| t.persist_key(p, private, handle))
                    .map_err(|e| key_error(ACTION, &location, e))?;
                // key.handle last: it says the key is at the handle.
                blobs::write_atomic(&gen_dir, PUBLIC_FILE, &public_file).map_err(io_error)?;
                blobs::write_atomic(&gen_dir, HANDLE_FILE, &blobs::encode_handle(handle))
                    .map_err(io_error)?;
                Material::Persistent { handle, name }
            }
        };
        // The files' data is synced; their entries become durable with the generation's
        // other files (`Store::sync_generation`), before any state refers to the key.
        tracing::info!(key = %location, "created ECDSA P-256 device key in the TPM");
        Ok(self.key(material, spki, location))
    }

    fn import_pem(&self, _generation: u32, _pem: &str) -> Result<Arc<dyn DeviceKey>, KeyError> {
        Err(KeyError::Unsupported {
            action: "importing device key",
            message: "a key that came over the network cannot be put into the TPM: use \
                      certificate_source = \"csr\""
                .into(),
        })
    }

    fn remove(&self, generation: u32) -> Result<(), KeyError> {
        const ACTION: &str = "removing TPM key";
        let gen_dir = self.generation_dir(generation);
        let read = |name: &str| {
            let path = gen_dir.join(name);
            blobs::read_optional(&path).map_err(|source| KeyError::Io {
                action: ACTION,
                path,
                source,
            })
        };
        if let Some(handle) = read(HANDLE_FILE)? {
            let blob_error = |name: &str, message: String| KeyError::Crypto {
                action: ACTION,
                key: gen_dir.join(name).display().to_string(),
                message,
            };
            let handle = blobs::decode_handle(&handle).map_err(|m| blob_error(HANDLE_FILE, m))?;
            let location = self.persistent_location(handle);
            match read(PUBLIC_FILE)? {
                Some(public) => {
                    let public =
                        blobs::decode_public(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
                    let name = blobs::name_of(&public).map_err(|m| blob_error(PUBLIC_FILE, m))?;
                    let evicted = self
                        .tpm
                        .call(move |t| t.evict_persistent(handle, name))
                        .map_err(|e| key_error(ACTION, &location, e))?;
                    if !evicted {
                        tracing::info!(
                            key = %location,
                            generation,
                            "the key of this generation is no longer at its handle; nothing to evict"
                        );
                    }
                }
                // Without the public part the key at the handle cannot be told from another:
                // leave the TPM alone.
                None => tracing::warn!(
                    key = %location,
                    "not evicting: {PUBLIC_FILE} of generation {generation} is missing"
                ),
            }
        }

        self.remove_files(&gen_dir, ACTION)?;
        remove_generation_dir(&self.dir, &gen_dir, ACTION)
    }

    fn onboarding_key(&self) -> Result<Arc<dyn DeviceKey>, KeyError> {
        const LOADING: &str = "loading the onboarding key";
        const CREATING: &str = "creating the onboarding key";
        let _making = self
            .onboarding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = self.onboarding_dir();
        let location = self.blob_location(&dir);
        let read = |name: &str| {
            let path = dir.join(name);
            blobs::read_optional(&path).map_err(|source| KeyError::Io {
                action: LOADING,
                path,
                source,
            })
        };
        // A file that is there but unusable is the operator's to remove: replacing it here
        // would hide whatever damaged it.
        let damaged = |name: &str, message: String| KeyError::Crypto {
            action: LOADING,
            key: dir.join(name).display().to_string(),
            message: format!("{message}; {DAMAGED_ONBOARDING_KEY}"),
        };

        // key.pub is written last: without both there is no (complete) key, and one is made.
        if let (Some(public), Some(private)) = (read(PUBLIC_FILE)?, read(PRIVATE_FILE)?) {
            let public = blobs::decode_public(&public).map_err(|m| damaged(PUBLIC_FILE, m))?;
            let private = blobs::decode_private(&private).map_err(|m| damaged(PRIVATE_FILE, m))?;
            let spki = spki_of(&public).map_err(|m| damaged(PUBLIC_FILE, m))?;
            // Loaded once now, so that a key the TPM cannot use any more is found here and not
            // at the first handshake.
            let (p, q) = (public.clone(), private.clone());
            self.tpm
                .call(move |t| t.check_blobs(p, q))
                .map_err(|e| onboarding_lost(key_error(LOADING, &location, e)))?;
            return Ok(self.onboarding_key_of(public, private, spki, location));
        }

        let io_error = |(path, source): (PathBuf, io::Error)| KeyError::Io {
            action: CREATING,
            path,
            source,
        };
        let encode_error = |name: &str, message: String| KeyError::Crypto {
            action: CREATING,
            key: dir.join(name).display().to_string(),
            message,
        };
        ensure_onboarding_dir(&self.dir).map_err(io_error)?;
        // What a create interrupted before key.pub left.
        self.remove_files(&dir, CREATING)?;
        let (public, private) = self
            .tpm
            .call(|t| t.create_key())
            .map_err(|e| key_error(CREATING, &location, e))?;
        let spki = spki_of(&public).map_err(|m| encode_error(PUBLIC_FILE, m))?;
        let public_file =
            blobs::encode_public(&public).map_err(|m| encode_error(PUBLIC_FILE, m))?;
        let private_file =
            blobs::encode_private(&private).map_err(|m| encode_error(PRIVATE_FILE, m))?;
        // key.pub last: it completes the pair.
        blobs::write_atomic(&dir, PRIVATE_FILE, &private_file).map_err(io_error)?;
        blobs::write_atomic(&dir, PUBLIC_FILE, &public_file).map_err(io_error)?;
        blobs::sync_dir(&dir).map_err(|e| io_error((dir.clone(), e)))?;
        tracing::info!(key = %location, "created the onboarding server's ECDSA P-256 key in the TPM");
        Ok(self.onboarding_key_of(public, private, spki, location))
    }

    fn remove_onboarding_key(&self) -> Result<(), KeyError> {
        const ACTION: &str = "removing the onboarding key";
        let _making = self
            .onboarding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Blobs only: the TPM holds nothing of the key between signatures.
        let dir = self.onboarding_dir();
        self.remove_files(&dir, ACTION)?;
        remove_onboarding_dir(&self.dir, ACTION)
    }
}

/// A lost onboarding key's error, said for what it is (the reason is written for identity
/// keys): the caller makes a new one, and the setup code stays valid.
fn onboarding_lost(error: KeyError) -> KeyError {
    match error {
        KeyError::Lost {
            action,
            key,
            reason,
        } => KeyError::Lost {
            action,
            key,
            reason: reason.replace(
                IDENTITY_LOST,
                "this onboarding key cannot be used again and must be made anew (the setup code \
                 on the gateway's label stays valid)",
            ),
        },
        other => other,
    }
}

/// Slots A and B of persistent-handle mode: the configured handle and the one after it.
fn slots(slot_a: u32) -> [u32; 2] {
    [slot_a, slot_a.wrapping_add(1)]
}

/// Whether `slot_a` and the handle after it can both hold iotd keys: owner persistent handles
/// (platform ones need platform authorization), and not the SRK's. The message names the
/// setting and both handles.
fn check_slots(slot_a: u32) -> Result<(), String> {
    let problem = |handle: u32| {
        if handle == SRK_HANDLE {
            Some("is the storage root key's handle, the parent of every iotd key")
        } else if !(0x8100_0000..PLATFORM_PERSISTENT_FIRST).contains(&handle) {
            Some("is not an owner persistent handle (0x81000000 to 0x817fffff)")
        } else {
            None
        }
    };
    let [a, b] = slots(slot_a);
    let found = problem(a)
        .map(|p| (a, p))
        .or_else(|| problem(b).map(|p| (b, p)));
    match found {
        None => Ok(()),
        Some((handle, problem)) => Err(format!(
            "key.persistent_handle {a:#010x} cannot be used: iotd keeps its keys at two handles, \
             {a:#010x} (A, the configured one) and {b:#010x} (B, the one after it), and \
             {handle:#010x} {problem}"
        )),
    }
}

/// The slot (of `slots`, A then B) for generation `generation`'s key in persistent-handle
/// mode, given which handle each generation's `key.handle` names (`named`: (generation,
/// handle), `generation`'s own included). A slot another generation names is never chosen
/// (that generation's key may be there); of the others, the one `generation`'s own
/// `key.handle` names is reused (its key made again), else the first. With both named by
/// other generations there is none: the message names them.
pub(crate) fn choose_slot(
    slots: [u32; 2],
    generation: u32,
    named: &[(u32, u32)],
) -> Result<u32, String> {
    let users = |slot: u32| -> Vec<u32> {
        named
            .iter()
            .filter(|&&(g, h)| h == slot && g != generation)
            .map(|&(g, _)| g)
            .collect()
    };
    let free: Vec<u32> = slots
        .into_iter()
        .filter(|&slot| users(slot).is_empty())
        .collect();
    let own = named
        .iter()
        .find(|&&(g, h)| g == generation && free.contains(&h))
        .map(|&(_, h)| h);
    if let Some(slot) = own.or_else(|| free.first().copied()) {
        return Ok(slot);
    }
    let describe = |slot: u32| {
        let users = users(slot);
        let list: Vec<String> = users.iter().map(u32::to_string).collect();
        let noun = if users.len() == 1 {
            "generation"
        } else {
            "generations"
        };
        format!("{slot:#010x} by {noun} {}", list.join(", "))
    };
    Err(format!(
        "both persistent handles are in use, {} and {}; iotd never evicts another generation's \
         key, so an older generation's key must be removed first",
        describe(slots[0]),
        describe(slots[1])
    ))
}

/// Refuses TCTI strings tss-esapi 7.7 would not pass on as written: it rebuilds `swtpm:` and
/// `mssim:` configurations from `host=` and `port=` alone, so anything else (`path=` for a unix
/// socket) would be dropped and the connection go to localhost:2321, possibly another TPM.
fn check_tcti(tcti: &str) -> Result<(), String> {
    let (name, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match name {
        "device" | "tabrmd" => Ok(()),
        "swtpm" | "mssim" => {
            for option in conf.split(',').filter(|o| !o.is_empty()) {
                let key = option.split_once('=').map_or(option, |(key, _)| key);
                if key != "host" && key != "port" {
                    return Err(format!(
                        "the TCTI {tcti:?} cannot be used: tss-esapi passes only host= and port= \
                         to the {name} TCTI, so {key}= would be ignored and the connection go to \
                         localhost:2321; run swtpm with --server type=tcp,port=N --ctrl \
                         type=tcp,port=N+1 and use {name}:host=127.0.0.1,port=N"
                    ));
                }
            }
            Ok(())
        }
        _ => Err(format!(
            "the TCTI {tcti:?} is not one of device:…, tabrmd:…, swtpm:… or mssim:…"
        )),
    }
}

/// A TPM failure as a key error: a key that is gone for good is `Lost`, anything else names
/// the command and what the TPM said.
fn key_error(action: &'static str, location: &str, error: TpmError) -> KeyError {
    match error {
        TpmError::Lost { reason } => KeyError::Lost {
            action,
            key: location.to_string(),
            reason,
        },
        other => KeyError::Crypto {
            action,
            key: location.to_string(),
            message: other.to_string(),
        },
    }
}

/// The SubjectPublicKeyInfo of an ECC P-256 public area (its unique field is the point).
fn spki_of(public: &Public) -> Result<Vec<u8>, String> {
    let Public::Ecc {
        parameters, unique, ..
    } = public
    else {
        return Err("not an ECC key".into());
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(format!("not a P-256 key ({:?})", parameters.ecc_curve()));
    }
    let mut point = vec![0x04];
    for coordinate in [unique.x().value(), unique.y().value()] {
        // The TPM may drop leading zero bytes; the uncompressed point has 32-byte coordinates.
        let padding = 32usize
            .checked_sub(coordinate.len())
            .ok_or("a coordinate is longer than 32 bytes")?;
        point.extend(std::iter::repeat_n(0, padding));
        point.extend_from_slice(coordinate);
    }
    p256_spki(&point).ok_or_else(|| "not a P-256 point".into())
}

/// Where a key's private part is: blobs loaded for each signature, or a persistent object.
enum Material {
    Blobs { public: Public, private: Private },
    Persistent { handle: u32, name: Vec<u8> },
}

struct KeyInner {
    tpm: Arc<TpmThread>,
    material: Material,
    spki: Vec<u8>,
    location: String,
    /// The onboarding server's key, not an identity generation's (for what errors say).
    onboarding: bool,
}

impl KeyInner {
    /// ECDSA P-256 / SHA-256 over `message`: hashed here, signed by the TPM; DER signature.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        const ACTION: &str = "signing with TPM key";
        let digest: [u8; 32] = Sha256::digest(message).into();
        let result = match &self.material {
            Material::Blobs { public, private } => {
                let (public, private) = (public.clone(), private.clone());
                self.tpm
                    .call(move |t| t.sign_blobs(public, private, digest))
            }
            Material::Persistent { handle, name } => {
                let (handle, name) = (*handle, name.clone());
                self.tpm
                    .call(move |t| t.sign_persistent(handle, name, digest))
            }
        };
        let error = |e| key_error(ACTION, &self.location, e);
        if self.onboarding {
            result.map_err(|e| onboarding_lost(error(e)))
        } else {
            result.map_err(error)
        }
    }
}

/// A device key in the TPM. Holds the TPM thread: the TPM connection stays open while any key
/// from the backend is alive.
pub struct TpmKey {
    inner: Arc<KeyInner>,
    tls: Arc<dyn SigningKey>,
}

impl TpmKey {
    fn new(inner: KeyInner) -> Self {
        let inner = Arc::new(inner);
        Self {
            tls: Arc::new(TpmSigningKey(inner.clone())),
            inner,
        }
    }
}

impl fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmKey")
            .field("location", &self.inner.location)
            .finish()
    }
}

impl DeviceKey for TpmKey {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn public_key_spki(&self) -> Vec<u8> {
        self.inner.spki.clone()
    }

    fn sign_ecdsa_p256_sha256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.inner.sign(message)
    }

    fn tls_signing_key(&self) -> Arc<dyn SigningKey> {
        self.tls.clone()
    }
}

/// The key as rustls sees it: ECDSA_NISTP256_SHA256 only (the key's scheme is fixed to
/// ECDSA/SHA-256 in the TPM), for TLS 1.2 and 1.3 alike.
struct TpmSigningKey(Arc<KeyInner>);

impl fmt::Debug for TpmSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TpmSigningKey")
            .field(&self.0.location)
            .finish()
    }
}

impl SigningKey for TpmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TpmSigner(self.0.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

struct TpmSigner(Arc<KeyInner>);

impl fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TpmSigner").field(&self.0.location).finish()
    }
}

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0.sign(message).map_err(|e| {
            // rustls reports only "handshake failure" to the peer and a string to the caller;
            // the log keeps the TPM's own words.
            let role = if self.0.onboarding {
                "TLS server authentication (onboarding)"
            } else {
                "TLS client authentication"
            };
            tracing::error!("{role}: {e}");
            rustls::Error::General(e.to_string())
        })
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
