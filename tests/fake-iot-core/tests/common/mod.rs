//! Test harness: runs the real `fake-iot-core` binary on random ports in a temp dir, talks to
//! its HTTP API, and drives MQTT clients (rumqttc) against it. Waits on events, never sleeps.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(15);

/// A running fake-iot-core.
pub struct Fake {
    // Dropped first (fields drop in order): the process is killed before its directory goes.
    child: Child,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub ready: Value,
    pub args: Vec<String>,
}

impl Fake {
    /// Starts the fake with `extra` arguments; template files are written from `templates`.
    pub async fn start(templates: &[(&str, Value)], extra: &[&str]) -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let mut args = vec![];
        for (name, body) in templates {
            let path = tmp.path().join(format!("{name}.json"));
            std::fs::write(&path, body.to_string()).unwrap();
            args.push("--template".to_owned());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut fake = Self::spawn(&dir, &args).await;
        fake._tmp = Some(tmp);
        fake
    }

    async fn spawn(dir: &Path, args: &[String]) -> Fake {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-iot-core"))
            .arg("--state-dir")
            .arg(dir)
            .args([
                "--mqtt",
                "127.0.0.1:0",
                "--mqtt-alpn",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting fake-iot-core");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("fake-iot-core ready line in time")
            .expect("reading the ready line")
            .expect("fake-iot-core exited before it was ready");
        let ready: Value = serde_json::from_str(&line).expect("ready line is JSON");
        Fake {
            dir: dir.to_owned(),
            _tmp: None,
            child,
            ready,
            args: args.to_vec(),
        }
    }

    /// Stops with SIGTERM (clean shutdown, registry written) and starts again on new ports.
    pub async fn restart(mut self) -> Fake {
        self.terminate().await;
        let tmp = self._tmp.take();
        let mut next = Self::spawn(&self.dir, &self.args).await;
        next._tmp = tmp;
        next
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("fake still running");
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("fake exits after SIGTERM")
            .unwrap()
    }

    pub fn mqtt_port(&self) -> u16 {
        port(&self.ready["mqtt"])
    }
    pub fn alpn_port(&self) -> u16 {
        port(&self.ready["mqttAlpn"])
    }
    pub fn http_url(&self) -> String {
        self.ready["http"].as_str().unwrap().to_owned()
    }
    pub fn root_ca(&self) -> String {
        std::fs::read_to_string(self.ready["rootCa"].as_str().unwrap()).unwrap()
    }
    pub fn claim(&self, name: &str) -> Identity {
        let c = &self.ready["claims"][name];
        Identity {
            cert_pem: std::fs::read_to_string(c["cert"].as_str().unwrap()).unwrap(),
            key_pem: std::fs::read_to_string(c["key"].as_str().unwrap()).unwrap(),
        }
    }

    /// An HTTP request to the fake; returns status, the x-amzn-ErrorType header and the JSON body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        http_call(&self.http_url(), method, path, body, &[]).await
    }

    pub async fn messages(&self, query: &str) -> Vec<Value> {
        let (_, _, v) = self
            .http("GET", &format!("/_fake/messages?{query}"), None)
            .await;
        v["messages"].as_array().cloned().unwrap_or_default()
    }

    pub async fn registry(&self) -> Value {
        self.http("GET", "/_fake/registry", None).await.2
    }

    /// Waits (long poll on the fake's message log) for the first entry matching `query`;
    /// panics with the whole log when none comes in time.
    pub async fn wait_message(&self, query: &str) -> Value {
        let ms = WAIT.as_millis();
        let found = self
            .messages(&format!("{query}&waitMs={ms}"))
            .await
            .into_iter()
            .next();
        match found {
            Some(entry) => entry,
            None => panic!(
                "no message log entry for {query}: {:#?}",
                self.messages("").await
            ),
        }
    }

    /// The fault rules, as `GET /_fake/faults` lists them.
    pub async fn fault_rules(&self) -> Vec<Value> {
        let (_, _, faults) = self.http("GET", "/_fake/faults", None).await;
        faults["rules"].as_array().cloned().unwrap_or_default()
    }
}

/// The gateway template shipped with the fake (`templates/gateway.json`), as iotd's tests and
/// `make demo` use it.
pub fn gateway_template() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/gateway.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn port(v: &Value) -> u16 {
    v.as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

pub async fn http_call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("HTTP answer in time")
        .expect("HTTP request");
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, kind, value)
}

/// A certificate and key in PEM.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    pub fn certificate_id(&self) -> String {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).unwrap();
        fake_iot_core::ca::certificate_id(&pem.contents)
    }
}

/// TLS client configuration with a client certificate, trusting the fake's root.
pub fn tls_config(root_pem: &str, id: &Identity, alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    if alpn {
        config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    }
    Arc::new(config)
}

/// An MQTT 3.1.1 test client (rumqttc) whose event loop runs in a task; events arrive on a channel.
pub struct Mqtt {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a connection attempt ended.
pub enum Connected {
    Ok(Mqtt),
    Refused(String),
}

impl Connected {
    pub fn unwrap(self) -> Mqtt {
        match self {
            Connected::Ok(m) => m,
            Connected::Refused(why) => panic!("connection refused: {why}"),
        }
    }
    pub fn refusal(self) -> String {
        match self {
            Connected::Ok(_) => panic!("connection unexpectedly accepted"),
            Connected::Refused(why) => why,
        }
    }
}

impl Mqtt {
    pub async fn connect(fake: &Fake, id: &Identity, client_id: &str) -> Connected {
        Self::connect_with(
            fake.mqtt_port(),
            tls_config(&fake.root_ca(), id, false),
            client_id,
        )
        .await
    }

    pub async fn connect_with(
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
    ) -> Connected {
        let mut options = MqttOptions::new(client_id, "localhost", port);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, eventloop) = AsyncClient::new(options, 16);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, tx));
        let first = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("CONNACK or error in time");
        match first {
            Some(Ok(Event::Incoming(Packet::ConnAck(ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success =>
            {
                Connected::Ok(Mqtt {
                    client,
                    events,
                    task,
                })
            }
            Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                task.abort();
                Connected::Refused(format!("CONNACK {:?}", ack.code))
            }
            Some(Ok(other)) => panic!("unexpected first event {other:?}"),
            Some(Err(e)) => {
                task.abort();
                Connected::Refused(e)
            }
            None => Connected::Refused("event loop ended".to_owned()),
        }
    }

    /// Subscribes and waits for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => return ack.return_codes,
                Ok(_) => {}
                Err(e) => panic!("waiting for SUBACK of {filter}: {e}"),
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish_acked(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish(topic, payload).await;
        loop {
            match self.next().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("waiting for the PUBACK of {topic}: {e}"),
            }
        }
    }

    /// Sends DISCONNECT and waits until the server has closed the connection.
    pub async fn disconnect(&mut self) {
        self.client.disconnect().await.unwrap();
        loop {
            match self.next().await {
                Err(e) if e == "no event in time" => {
                    panic!("connection still open after DISCONNECT")
                }
                Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The next event, or an error string when the connection failed.
    pub async fn next(&mut self) -> Result<Event, String> {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => Err("event loop ended".to_owned()),
            Err(_) => Err("no event in time".to_owned()),
        }
    }

    /// Waits for a PUBLISH on a topic matching `filter`.
    pub async fn expect_message(&mut self, filter: &str) -> (String, bytes::Bytes) {
        loop {
            match self.next().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if fake_iot_core::mqtt::topic_matches(&p.topic, filter) =>
                {
                    return (p.topic, p.payload);
                }
                Ok(_) => {}
                Err(e) => panic!("waiting for a message on {filter}: {e}"),
            }
        }
    }

    /// Waits until the connection is closed by the server; returns the error seen.
    pub async fn expect_closed(&mut self) -> String {
        loop {
            match self.next().await {
                Err(e) if e == "no event in time" => panic!("connection still open"),
                Err(e) => return e,
                Ok(_) => {}
            }
        }
    }

    /// Waits for the next message on `filter` or for `within` to pass; `None` means nothing
    /// arrived. Used to show that something is *not* delivered, after a positive control.
    pub async fn message_within(&mut self, filter: &str, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv()).await;
            match ev {
                Err(_) => return None,
                Ok(Some(Ok(Event::Incoming(Packet::Publish(p)))))
                    if fake_iot_core::mqtt::topic_matches(&p.topic, filter) =>
                {
                    return Some(p.topic);
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("connection failed: {e}"),
                Ok(None) => return None,
            }
        }
    }
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<Event, String>>) {
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        }
    }
}

/// A new EC P-256 key and a CSR for it.
pub fn new_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (key.serialize_pem(), csr.pem().unwrap())
}

/// Calls one request/response API: subscribes to accepted and rejected, publishes, waits.
/// Returns `Ok(accepted body)` or `Err(rejected body)`.
pub async fn call(mqtt: &mut Mqtt, topic: &str, body: &Value) -> Result<Value, Value> {
    mqtt.subscribe(&format!("{topic}/accepted")).await;
    mqtt.subscribe(&format!("{topic}/rejected")).await;
    mqtt.publish(topic, body.to_string()).await;
    let (t, payload) = mqtt.expect_message(&format!("{topic}/+")).await;
    let v: Value = serde_json::from_slice(&payload).unwrap();
    if t.ends_with("/accepted") {
        Ok(v)
    } else {
        Err(v)
    }
}

/// A device provisioned through the CSR flow.
#[derive(Debug, Clone)]
pub struct Device {
    pub thing_name: String,
    pub identity: Identity,
    pub certificate_id: String,
    pub device_configuration: Value,
}

pub async fn provision_csr(
    fake: &Fake,
    claim: &Identity,
    template: &str,
    params: &BTreeMap<&str, &str>,
    client_id: &str,
) -> Result<Device, Value> {
    let mut mqtt = Mqtt::connect(fake, claim, client_id).await.unwrap();
    let (key_pem, csr) = new_csr();
    let created = call(
        &mut mqtt,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await?;
    let registered = call(
        &mut mqtt,
        &format!("$aws/provisioning-templates/{template}/provision/json"),
        &json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": params}),
    )
    .await?;
    Ok(Device {
        thing_name: registered["thingName"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        identity: Identity {
            cert_pem: created["certificatePem"].as_str().unwrap().to_owned(),
            key_pem,
        },
        certificate_id: created["certificateId"].as_str().unwrap().to_owned(),
        device_configuration: registered["deviceConfiguration"].clone(),
    })
}

/// A template in the style of AWS's docs: thing named from a serial number, a production
/// policy scoped with `${iot:Connection.Thing.ThingName}`, device configuration.
pub fn device_template() -> Value {
    json!({
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Site": {"Type": "String", "Default": "lab"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Fn::Join": ["", ["gw-", {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {"serial": {"Ref": "SerialNumber"}, "site": {"Ref": "Site"}}
                },
                "OverrideSettings": {"AttributePayload": "MERGE"}
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {"PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
                        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
                            "arn:aws:iot:us-east-1:123456789012:topic/$aws/things/${iot:Connection.Thing.ThingName}/*",
                            "arn:aws:iot:us-east-1:123456789012:topic/dt/${iot:Connection.Thing.ThingName}/*",
                            "arn:aws:iot:us-east-1:123456789012:topic/cmd/all"
                        ]},
                        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
                            "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/*",
                            "arn:aws:iot:us-east-1:123456789012:topicfilter/dt/${iot:Connection.Thing.ThingName}/*",
                            "arn:aws:iot:us-east-1:123456789012:topicfilter/cmd/all"
                        ]}
                    ]
                }}
            }
        },
        "DeviceConfiguration": {"Site": {"Ref": "Site"}, "Fallback": "https://example.com"}
    })
}
