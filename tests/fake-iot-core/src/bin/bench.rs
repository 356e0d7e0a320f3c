//! `fake-iot-core-bench`: how many fleet provisioning flows per second fake-iot-core completes,
//! and how many concurrent TLS MQTT connections it holds, on this machine. It starts the
//! release binary next to itself on random ports in a temp dir, runs the clients in this
//! process, and prints a table. A flow is what a device does: TLS connect with the claim,
//! subscribe, CreateCertificateFromCsr, RegisterThing, disconnect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, clap::Parser)]
struct Args {
    /// Provisioning flows to run.
    #[arg(long, default_value_t = 2000)]
    flows: usize,
    /// Devices provisioning at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
}

const TEMPLATE: &str = r#"{
  "Parameters": {"SerialNumber": {"Type": "String"}, "AWS::IoT::Certificate::Id": {"Type": "String"}},
  "Resources": {
    "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Join": ["", ["bench-", {"Ref": "SerialNumber"}]]}}},
    "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
    "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {"Version": "2012-10-17", "Statement": [
      {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"}]}}}
  }
}"#;

fn tls(root: &str, cert: &str, key: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root.as_bytes()) {
        roots.add(c?)?;
    }
    let chain = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key.as_bytes())?
        .context("no key in the claim key file")?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

struct Fake {
    child: tokio::process::Child,
    ready: Value,
    _dir: tempfile::TempDir,
}

async fn start_fake() -> Result<Fake> {
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("bench.json");
    std::fs::write(&template, TEMPLATE)?;
    let exe = std::env::current_exe()?.with_file_name("fake-iot-core");
    let mut child = tokio::process::Command::new(&exe)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--template")
        .arg(format!("bench={}", template.display()))
        .args(["--claim", "bench=bench", "--no-connect-throttle"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = child.stdout.take().context("fake stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .context("waiting for the fake's ready line")??
    .context("the fake exited before it was ready")?;
    Ok(Fake {
        child,
        ready: serde_json::from_str(&line)?,
        _dir: dir,
    })
}

struct Client {
    client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn connect(port: u16, config: Arc<rustls::ClientConfig>, id: &str) -> Result<Client> {
        let mut options = MqttOptions::new(id, "localhost", port);
        options.set_keep_alive(Duration::from_secs(300));
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await.map_err(|e| e.to_string());
                let stop = ev.is_err();
                if tx.send(ev).is_err() || stop {
                    return;
                }
            }
        });
        let mut c = Client {
            client,
            events,
            task,
        };
        match c.next().await? {
            Event::Incoming(Packet::ConnAck(a))
                if a.code == rumqttc::ConnectReturnCode::Success =>
            {
                Ok(c)
            }
            other => bail!("connect {id}: {other:?}"),
        }
    }

    async fn next(&mut self) -> Result<Event> {
        match tokio::time::timeout(Duration::from_secs(30), self.events.recv()).await {
            Ok(Some(Ok(e))) => Ok(e),
            Ok(Some(Err(e))) => bail!("connection failed: {e}"),
            Ok(None) => bail!("event loop ended"),
            Err(_) => bail!("no event in 30 s"),
        }
    }

    async fn call(&mut self, topic: &str, body: Value) -> Result<Value> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await?;
        loop {
            if let Event::Incoming(Packet::Publish(p)) = self.next().await? {
                let v: Value = serde_json::from_slice(&p.payload)?;
                if p.topic.ends_with("/accepted") {
                    return Ok(v);
                }
                bail!("{topic} rejected: {v}");
            }
        }
    }
}

async fn flow(port: u16, config: Arc<rustls::ClientConfig>, n: usize) -> Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let mut c = Client::connect(port, config, &format!("claim-{n}")).await?;
    // One SUBSCRIBE with the four reply filters, as AWS's SDK does per API.
    let filters = [
        "$aws/certificates/create-from-csr/json/accepted",
        "$aws/certificates/create-from-csr/json/rejected",
        "$aws/provisioning-templates/bench/provision/json/accepted",
        "$aws/provisioning-templates/bench/provision/json/rejected",
    ];
    c.client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce)),
        )
        .await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = c.next().await? {
            break;
        }
    }
    let created = c
        .call(
            "$aws/certificates/create-from-csr/json",
            json!({"certificateSigningRequest": csr}),
        )
        .await?;
    c.call(
        "$aws/provisioning-templates/bench/provision/json",
        json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": n.to_string()}}),
    )
    .await?;
    c.client.disconnect().await?;
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> Result<()> {
    use clap::Parser;
    let args = Args::parse();
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let fake = start_fake().await?;
    let port: u16 = fake.ready["mqtt"]
        .as_str()
        .context("mqtt address")?
        .rsplit(':')
        .next()
        .context("port")?
        .parse()?;
    let claim = &fake.ready["claims"]["bench"];
    let read = |k: &str| {
        std::fs::read_to_string(claim[k].as_str().unwrap_or_default())
            .with_context(|| format!("reading claim {k}"))
    };
    let root = std::fs::read_to_string(fake.ready["rootCa"].as_str().unwrap_or_default())?;
    let config = tls(&root, &read("cert")?, &read("key")?)?;
    let pid = fake.child.id().context("fake pid")?;

    // Provisioning flows, `concurrency` at a time.
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.flows {
        let permit = sem.clone().acquire_owned().await?;
        let config = config.clone();
        tasks.spawn(async move {
            let r = flow(port, config, n).await;
            drop(permit);
            r
        });
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) | Ok(Err(e)) = r.map_err(anyhow::Error::from) {
            failed += 1;
            if failed <= 3 {
                eprintln!("flow failed: {e:#}");
            }
        }
    }
    let elapsed = start.elapsed();
    let flows_per_s = (args.flows - failed) as f64 / elapsed.as_secs_f64();

    // Concurrent connections held (claim identity, distinct client ids).
    let rss_before = rss_kib(pid).unwrap_or(0);
    let start = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    let mut joins = tokio::task::JoinSet::new();
    for n in 0..args.connections {
        let config = config.clone();
        joins.spawn(async move { Client::connect(port, config, &format!("hold-{n}")).await });
        // At most 64 handshakes in flight, like a fleet coming back rather than a SYN flood.
        if joins.len() >= 64
            && let Some(Ok(Ok(c))) = joins.join_next().await
        {
            held.push(c);
        }
    }
    while let Some(r) = joins.join_next().await {
        if let Ok(Ok(c)) = r {
            held.push(c);
        }
    }
    let connect_time = start.elapsed();
    let rss_after = rss_kib(pid).unwrap_or(0);

    println!(
        "fake-iot-core benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| provisioning flows (connect, CSR, RegisterThing, disconnect) | {} in {:.2} s, {failed} failed |",
        args.flows,
        elapsed.as_secs_f64()
    );
    println!(
        "| flows per second (concurrency {}) | {flows_per_s:.0} |",
        args.concurrency
    );
    println!(
        "| concurrent TLS MQTT connections held | {} of {} (opened in {:.2} s) |",
        held.len(),
        args.connections,
        connect_time.as_secs_f64()
    );
    println!(
        "| fake RSS before / while holding them | {} / {} MiB |",
        rss_before / 1024,
        rss_after / 1024
    );
    if failed > 0 || held.len() < args.connections {
        bail!(
            "{failed} flows failed and {} connections were not held",
            args.connections - held.len()
        );
    }
    Ok(())
}
