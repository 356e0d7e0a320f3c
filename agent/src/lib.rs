//! `iotd`: owns a Linux gateway's AWS IoT identity.
//!
//! The daemon creates the device key (a file now; inside the TPM with the `tpm` backend),
//! provisions itself with AWS IoT fleet provisioning from a claim certificate, and from then on
//! keeps an MQTT session with its own identity. Provisioning is a persisted state machine in
//! the state directory (`/var/lib/iotd`): every step is written atomically before the next one
//! starts, so a gateway that loses power at any instant resumes where it was.
//!
//! Files: `/etc/iotd/config.toml` and the `config.d/` drop-ins (see `config`), the state
//! directory (`state.json`, `gen/<n>/key.pem`, `gen/<n>/cert.pem`), the claim certificate and
//! key named in the config (read, never written, deleted only when the config says so).

pub mod agent;
pub mod cloud;
pub mod config;
pub mod csr;
pub mod dbus;
pub mod error;
pub mod fleet;
pub mod keys;
pub mod notify;
pub mod store;
pub mod tls;
