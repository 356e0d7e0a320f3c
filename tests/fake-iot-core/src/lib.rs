//! `fake-iot-core`: a local stand-in for AWS IoT Core, faithful on every point a device relies
//! on: MQTT 3.1.1 and 5 over mutual TLS (ports like 8883, and 443 with ALPN
//! `x-amzn-mqtt-ca`), certificate registry and IoT policies, the fleet provisioning MQTT API
//! with its template language and pre-provisioning hook, a Jobs subset, AWS IoT's REST control
//! plane, and a `/_fake/` API for inspection and fault injection.
//!
//! State lives in one directory: `root-ca.pem`/`root-ca.key` (the CA that issues device
//! certificates and the server certificate), `registry.json`, and `claims/` (claim
//! certificates made with `--claim`).

pub mod ca;
pub mod clock;
pub mod control;
pub mod faults;
pub mod hook;
pub mod http;
pub mod jobs;
pub mod mqtt;
pub mod policy;
pub mod provisioning;
pub mod registry;
pub mod run;
pub mod server;
pub mod template;
pub mod tls;

pub use server::{Settings, Shared};
