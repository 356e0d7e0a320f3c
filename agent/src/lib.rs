//! `iotd`: owns a Linux gateway's AWS IoT identity.
//!
//! The daemon creates the device key (in a file, or inside the TPM with the `tpm` backend),
//! provisions the gateway with AWS IoT fleet provisioning from a claim (files baked into the
//! image, or one handed over by an installer), and from then on keeps an MQTT session with its
//! own identity. State lives in the state directory (`/var/lib/iotd`): `state.json` holds the
//! identity and the operation in progress, each step written atomically before the next one
//! starts, so a gateway that loses power at any instant resumes where it was.
//!
//! Where things are:
//! - `fsm`: the state machine, pure: `(state, input, now) -> (state, actions)`.
//! - `core`: the one task that owns the state: runs units of work, answers commands, feeds
//!   the state machine, publishes the snapshot and events, pings the watchdog.
//! - `work`: the units of work (create a key, request a certificate, register the thing,
//!   prepare a connection's credentials), each in its own task.
//! - `connection`: the production MQTT connection, a task of its own that commands never
//!   cancel; it reconnects by itself and routes what arrives.
//! - `claim`: where claims come from (files, or memory); `snapshot`: what readers see.
//! - adapters: `dbus` (io.iotd.Agent1), `notify` (systemd). Leaves: `store` (state.json and
//!   generations), `keys` (file and TPM backends), `cloud` (one MQTT connection), `fleet` (the
//!   fleet provisioning API), `csr`, `tls`, `config`, `error`.
//!
//! Files: `/etc/iotd/config.toml` and the `config.d/` drop-ins (see `config`), the state
//! directory (`state.json`, `gen/<n>/` with the key and `cert.pem`), the claim certificate and
//! key named in the config (read, never written, deleted only when the config says so).

pub mod bus;
pub mod claim;
pub mod cloud;
pub mod config;
pub mod connection;
pub mod core;
pub mod csr;
pub mod dbus;
pub mod der;
pub mod error;
pub mod exit;
pub mod fleet;
pub mod fsm;
pub mod jobs;
pub mod keys;
pub mod notify;
pub mod onboard;
pub mod recover;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod work;
