//! One view of MQTT 3.1.1 and MQTT 5 packets for the broker, over rumqttc's own codecs
//! (`mqttbytes::v4` and `v5::mqttbytes::v5`): the broker logic is written once, and only this
//! module knows which version a connection speaks.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// Largest packet accepted: AWS IoT's 128 KB payload limit plus headers.
pub const MAX_PACKET: usize = 128 * 1024 + 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean: bool,
    pub username: Option<String>,
    pub has_password: bool,
}

#[derive(Debug, Clone)]
pub enum Incoming {
    Connect(ConnectInfo),
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
    },
    PubAck,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// Packets a client may send that the broker ignores (PUBREC etc. never occur with QoS <= 1).
    Ignored(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    Accepted,
    BadClientId,
    NotAuthorized,
    ServerUnavailable,
    RateExceeded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SessionTakenOver,
    NotAuthorized,
    KeepAliveTimeout,
    AdministrativeAction,
    QosNotSupported,
    ProtocolError,
}

#[derive(Debug, Clone)]
pub enum Outgoing {
    ConnAck {
        code: ConnAckCode,
        server_keep_alive: Option<u16>,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    PubAck {
        pkid: u16,
        not_authorized: bool,
    },
    /// `None` in `codes` is a refused filter.
    SubAck {
        pkid: u16,
        codes: Vec<Option<u8>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Disconnect(DisconnectReason),
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed MQTT 3.1.1 packet: {0}")]
    V4(rumqttc::mqttbytes::Error),
    #[error("malformed MQTT 5 packet: {0}")]
    V5(rumqttc::v5::mqttbytes::Error),
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0}")]
    Level(u8),
    #[error("encoding a packet: {0}")]
    Encode(String),
}

/// Reads the protocol level of a CONNECT at the start of `buf`, if enough bytes are there.
fn connect_level(buf: &[u8]) -> Result<Option<u8>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect);
    }
    // Skip the variable-length "remaining length".
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(CodecError::NotConnect);
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    Ok(buf.get(i + 2 + name_len).copied())
}

fn qos_u8(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos_u8_v5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

/// Decodes the next packet from `buf`. `version` is `None` until CONNECT has been read; the
/// returned version is the one to use from then on. `Ok(None)` asks for more bytes.
pub fn decode(
    version: Option<Version>,
    buf: &mut BytesMut,
) -> Result<Option<(Version, Incoming)>, CodecError> {
    let version = match version {
        Some(v) => v,
        None => match connect_level(buf)? {
            None => return Ok(None),
            Some(5) => Version::V5,
            Some(4) => Version::V311,
            Some(other) => return Err(CodecError::Level(other)),
        },
    };
    match version {
        Version::V311 => match v4::Packet::read(buf, MAX_PACKET) {
            Ok(p) => Ok(Some((version, from_v4(p)))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(CodecError::V4(e)),
        },
        Version::V5 => match v5::Packet::read(buf, Some(MAX_PACKET as u32)) {
            Ok(p) => Ok(Some((version, from_v5(p)))),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(CodecError::V5(e)),
        },
    }
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::Connect(c) => Incoming::Connect(ConnectInfo {
            version: Version::V311,
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_session,
            has_password: c.login.as_ref().is_some_and(|l| !l.password.is_empty()),
            username: c.login.map(|l| l.username),
        }),
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: qos_u8(p.qos),
            pkid: p.pkid,
            retain: p.retain,
        },
        v4::Packet::PubAck(_) => Incoming::PubAck,
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_u8(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect,
        v4::Packet::ConnAck(_) => Incoming::Ignored("CONNACK"),
        v4::Packet::PubRec(_) => Incoming::Ignored("PUBREC"),
        v4::Packet::PubRel(_) => Incoming::Ignored("PUBREL"),
        v4::Packet::PubComp(_) => Incoming::Ignored("PUBCOMP"),
        v4::Packet::SubAck(_) => Incoming::Ignored("SUBACK"),
        v4::Packet::UnsubAck(_) => Incoming::Ignored("UNSUBACK"),
        v4::Packet::PingResp => Incoming::Ignored("PINGRESP"),
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::Connect(c, _will, login) => Incoming::Connect(ConnectInfo {
            version: Version::V5,
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_start,
            has_password: login.as_ref().is_some_and(|l| !l.password.is_empty()),
            username: login.map(|l| l.username),
        }),
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: qos_u8_v5(p.qos),
            pkid: p.pkid,
            retain: p.retain,
        },
        v5::Packet::PubAck(_) => Incoming::PubAck,
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_u8_v5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(_) => Incoming::Disconnect,
        v5::Packet::Auth(_) => Incoming::Ignored("AUTH"),
        v5::Packet::ConnAck(_) => Incoming::Ignored("CONNACK"),
        v5::Packet::PingResp(_) => Incoming::Ignored("PINGRESP"),
        v5::Packet::SubAck(_) => Incoming::Ignored("SUBACK"),
        v5::Packet::PubRec(_) => Incoming::Ignored("PUBREC"),
        v5::Packet::PubRel(_) => Incoming::Ignored("PUBREL"),
        v5::Packet::PubComp(_) => Incoming::Ignored("PUBCOMP"),
        v5::Packet::UnsubAck(_) => Incoming::Ignored("UNSUBACK"),
    }
}

fn v4_qos(q: u8) -> rumqttc::mqttbytes::QoS {
    if q == 0 {
        rumqttc::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::mqttbytes::QoS::AtLeastOnce
    }
}

fn v5_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// Encodes `out` for a connection of `version`. Returns `false` when the packet has no
/// MQTT 3.1.1 form (a server DISCONNECT): the caller then just closes the connection.
pub fn encode(version: Version, out: &Outgoing, buf: &mut BytesMut) -> Result<bool, CodecError> {
    match version {
        Version::V311 => encode_v4(out, buf),
        Version::V5 => encode_v5(out, buf).map(|()| true),
    }
}

fn encode_v4(out: &Outgoing, buf: &mut BytesMut) -> Result<bool, CodecError> {
    let packet = match out {
        Outgoing::ConnAck { code, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                ConnAckCode::Accepted => v4::ConnectReturnCode::Success,
                ConnAckCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnAckCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                ConnAckCode::ServerUnavailable | ConnAckCode::RateExceeded => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
            },
            false,
        )),
        Outgoing::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let mut p = v4::Publish::from_bytes(topic.clone(), v4_qos(*qos), payload.clone());
            p.pkid = *pkid;
            v4::Packet::Publish(p)
        }
        // MQTT 3.1.1 has no negative PUBACK: a denied publish is handled by the caller.
        Outgoing::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Outgoing::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    Some(q) => v4::SubscribeReasonCode::Success(v4_qos(*q)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outgoing::PingResp => v4::Packet::PingResp,
        Outgoing::Disconnect(_) => return Ok(false),
    };
    packet
        .write(buf, MAX_PACKET)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(true)
}

fn encode_v5(out: &Outgoing, buf: &mut BytesMut) -> Result<(), CodecError> {
    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, PubAck,
        PubAckReason, Publish, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
    };
    let packet = match out {
        Outgoing::ConnAck {
            code,
            server_keep_alive,
        } => {
            let code = match code {
                ConnAckCode::Accepted => ConnectReturnCode::Success,
                ConnAckCode::BadClientId => ConnectReturnCode::ClientIdentifierNotValid,
                ConnAckCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
                ConnAckCode::ServerUnavailable => ConnectReturnCode::ServerUnavailable,
                ConnAckCode::RateExceeded => ConnectReturnCode::ConnectionRateExceeded,
            };
            let properties = (code == ConnectReturnCode::Success).then(|| ConnAckProperties {
                // AWS IoT supports QoS 0 and 1 only and no subscription identifiers.
                session_expiry_interval: None,
                receive_max: Some(100),
                max_qos: Some(1),
                retain_available: Some(1),
                max_packet_size: Some(MAX_PACKET as u32),
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(1),
                server_keep_alive: *server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                properties,
            })
        }
        Outgoing::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let mut p = Publish::new(topic.clone(), v5_qos(*qos), payload.clone(), None);
            p.pkid = *pkid;
            v5::Packet::Publish(p)
        }
        Outgoing::PubAck {
            pkid,
            not_authorized,
        } => {
            let mut ack = PubAck::new(*pkid, None);
            if *not_authorized {
                ack.reason = PubAckReason::NotAuthorized;
            }
            v5::Packet::PubAck(ack)
        }
        Outgoing::SubAck { pkid, codes } => v5::Packet::SubAck(SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    Some(q) => SubscribeReasonCode::Success(v5_qos(*q)),
                    None => SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Outgoing::UnsubAck { pkid, count } => v5::Packet::UnsubAck(UnsubAck {
            pkid: *pkid,
            reasons: vec![UnsubAckReason::Success; *count],
            properties: None,
        }),
        Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outgoing::Disconnect(reason) => v5::Packet::Disconnect(Disconnect::new(match reason {
            DisconnectReason::SessionTakenOver => DisconnectReasonCode::SessionTakenOver,
            DisconnectReason::NotAuthorized => DisconnectReasonCode::NotAuthorized,
            DisconnectReason::KeepAliveTimeout => DisconnectReasonCode::KeepAliveTimeout,
            DisconnectReason::AdministrativeAction => DisconnectReasonCode::AdministrativeAction,
            DisconnectReason::QosNotSupported => DisconnectReasonCode::QoSNotSupported,
            DisconnectReason::ProtocolError => DisconnectReasonCode::ProtocolError,
        })),
    };
    packet
        .write(buf, Some(MAX_PACKET as u32))
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// MQTT topic matching where `+` and `#` never match a topic starting with `$` at the first
/// level (MQTT 3.1.1 §4.7.2), but explicit `$aws/...` filters do.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    let mut topics = topic.split('/');
    let mut filters = filter.split('/');
    let mut first = true;
    loop {
        match (filters.next(), topics.next()) {
            (Some("#"), t) => return !(first && t.is_some_and(|t| t.starts_with('$'))),
            (Some("+"), Some(t)) => {
                if first && t.starts_with('$') {
                    return false;
                }
            }
            (Some(f), Some(t)) => {
                if f != t {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// A topic a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may subscribe to: `#` only last, wildcards only as whole levels.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_never_match_dollar_topics_but_explicit_filters_do() {
        let cases = [
            ("a/b", "a/+", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b", "a", false),
            ("$aws/things/x/jobs/notify", "#", false),
            ("$aws/things/x/jobs/notify", "+/things/#", false),
            (
                "$aws/things/x/jobs/notify",
                "$aws/things/+/jobs/notify",
                true,
            ),
            (
                "$aws/certificates/create/json/accepted",
                "$aws/certificates/create/json/accepted",
                true,
            ),
            (
                "$aws/certificates/create/json/accepted",
                "$aws/certificates/#",
                true,
            ),
            ("a/b/c", "a/+/d", false),
        ];
        for (topic, filter, want) in cases {
            assert_eq!(topic_matches(topic, filter), want, "{topic} ~ {filter}");
        }
    }

    #[test]
    fn filter_validation() {
        assert!(valid_filter("a/+/c/#"));
        assert!(!valid_filter("a/#/c"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
    }

    #[test]
    fn connect_level_is_read_from_partial_buffers() {
        let mut buf = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("c1"))
            .write(&mut buf, MAX_PACKET)
            .map(|_| ())
            .ok();
        assert_eq!(connect_level(&buf[..3]).ok().flatten(), None);
        assert_eq!(connect_level(&buf).ok().flatten(), Some(4));
        let decoded = decode(None, &mut buf).ok().flatten();
        assert!(
            matches!(decoded, Some((Version::V311, Incoming::Connect(c))) if c.client_id == "c1")
        );
    }
}
