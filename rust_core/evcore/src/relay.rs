//! A Relay — a site gateway's upstream envelope of board frames (docs/upstream.md) — read
//! for storing its rows: the envelope is checked as every upstream envelope is (size,
//! schema, tag when a key is given), then each relayed item becomes a [`Row`] with its
//! inner frame's header read structurally (size, envelope shape; its tag is not checked:
//! TLS protects the uplink). No map is kept per item.

use std::fmt;

use crate::error::Error;
use crate::frame::{self, Header};
use crate::msgpack::{self, Value};
use crate::schema::{action, key};
use crate::session;
use crate::tag::TagKey;

/// One relayed board frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub device_id: String,
    /// The inner frame's header, read structurally.
    pub header: Header,
    /// The inner frame, as relayed.
    pub frame: Vec<u8>,
    /// The gateway's plaintext of the frame's encrypted `id_token`, when it sent one.
    pub token_uid: Option<String>,
}

/// A Relay read by [`read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    /// The Relay envelope's header.
    pub header: Header,
    pub site_id: String,
    /// One per item of `frames`, in order.
    pub rows: Vec<Row>,
}

/// Why a frame was not read as a Relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayError {
    /// The envelope failed a check, or a relayed item's frame is no envelope.
    Frame(Error),
    /// A valid envelope of another action (the action).
    NotRelay(u64),
    /// A body the schema check let through that is not shaped as a Relay's.
    Shape(String),
}

impl From<Error> for RelayError {
    fn from(e: Error) -> Self {
        RelayError::Frame(e)
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Frame(e) => e.fmt(f),
            RelayError::NotRelay(a) => write!(f, "action {a} is not a Relay"),
            RelayError::Shape(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for RelayError {}

/// Moves out the value of the first `k` entry of a map's pairs.
fn take(pairs: &mut [(Value, Value)], k: u16) -> Option<Value> {
    pairs
        .iter_mut()
        .find(|(pk, _)| matches!(pk, Value::UInt(x) if *x == u64::from(k)))
        .map(|(_, v)| std::mem::replace(v, Value::Nil))
}

/// Checks `frame` as an upstream envelope of at most `max_frame` bytes (its tag under `key`
/// when given) and, when it is a Relay, reads its rows.
pub fn read(frame: &[u8], key: Option<&TagKey>, max_frame: usize) -> Result<Relay, RelayError> {
    let acc = session::check_limited(frame, key, max_frame)?;
    let header = acc.envelope.header;
    if header.action != u64::from(action::RELAY) {
        return Err(RelayError::NotRelay(header.action));
    }
    let shape = |s: String| Err(RelayError::Shape(s));
    // Its values were counted with the frame's: no second budget for the body.
    let Value::Map(mut pairs) = msgpack::decode_with(acc.envelope.body, usize::MAX)? else {
        return shape("body is not a map".into());
    };
    // The schema check above guarantees both fields and their types.
    let Some(Value::Str(site_id)) = take(&mut pairs, key::SITE_ID) else {
        return shape("Relay without site_id".into());
    };
    let mut rows = Vec::new();
    if let Some(Value::Array(items)) = take(&mut pairs, key::FRAMES) {
        rows.reserve(items.len());
        for (n, item) in items.into_iter().enumerate() {
            let Value::Map(mut kv) = item else {
                return shape(format!("frames[{n}] is not a map"));
            };
            let Some(Value::Str(device_id)) = take(&mut kv, key::DEVICE_ID) else {
                return shape(format!("frames[{n}] without device_id"));
            };
            let Some(Value::Bin(inner)) = take(&mut kv, key::FRAME) else {
                return shape(format!("frames[{n}] without frame"));
            };
            let token_uid = match take(&mut kv, key::TOKEN_UID) {
                Some(Value::Str(s)) => Some(s),
                _ => None,
            };
            let header = frame::parse(&inner)?.header;
            rows.push(Row {
                device_id,
                header,
                frame: inner,
                token_uid,
            });
        }
    }
    Ok(Relay {
        header,
        site_id,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use crate::schema::{kind, MAX_UP_FRAME};
    use crate::session::Sender;

    const KEY: [u8; 32] = [7; 32];

    fn meter_body(energy: u64) -> Value {
        Value::Map(vec![
            (Value::UInt(1), Value::UInt(1)),
            (Value::UInt(7), Value::UInt(energy)),
        ])
    }

    fn item(device: &str, frame: &[u8], uid: Option<&str>) -> Value {
        let mut kv = vec![
            (Value::UInt(key::DEVICE_ID.into()), Value::from(device)),
            (Value::UInt(key::FRAME.into()), Value::from(frame)),
        ];
        if let Some(u) = uid {
            kv.push((Value::UInt(key::TOKEN_UID.into()), Value::from(u)));
        }
        Value::Map(kv)
    }

    fn envelope(kind: u8, action: u16, body: &Value) -> Vec<u8> {
        let h = Header {
            ver: 1,
            kind: kind.into(),
            seq: 9,
            id: 77,
            prio: 2,
            ts: 5,
            action: action.into(),
        };
        frame::encode(&h, body, &TagKey::new(&KEY))
    }

    fn relay_of(items: Vec<Value>) -> Vec<u8> {
        let body = Value::Map(vec![
            (
                Value::UInt(key::SITE_ID.into()),
                Value::from("DE*EVE*LSITE1"),
            ),
            (Value::UInt(key::FRAMES.into()), Value::Array(items)),
        ]);
        envelope(kind::EVENT, action::RELAY, &body)
    }

    #[test]
    fn rows_carry_each_items_device_header_frame_and_token() {
        let mut s = Sender::new(&KEY);
        let inner: Vec<Vec<u8>> = [3, 4]
            .iter()
            .map(|&id| s.seal(kind::EVENT, id, 2, 0, action::METER_VALUES, &meter_body(id)))
            .collect();
        let raw = relay_of(vec![
            item("ev-1", &inner[0], None),
            item("ev-2", &inner[1], Some("DE*ABC*1")),
        ]);
        let relay = read(&raw, Some(&TagKey::new(&KEY)), MAX_UP_FRAME).unwrap();
        assert_eq!((relay.header.id, relay.header.action), (77, 101));
        assert_eq!(relay.site_id, "DE*EVE*LSITE1");
        assert_eq!(relay.rows.len(), 2);
        let r = &relay.rows[1];
        assert_eq!(r.device_id, "ev-2");
        assert_eq!((r.header.id, r.header.prio), (4, 2));
        assert_eq!(r.header.action, u64::from(action::METER_VALUES));
        assert_eq!(r.frame, inner[1]);
        assert_eq!(r.token_uid.as_deref(), Some("DE*ABC*1"));
        assert_eq!(relay.rows[0].token_uid, None);
        // no key: the tag is not checked; an empty Relay has no rows
        assert_eq!(read(&raw, None, MAX_UP_FRAME).unwrap(), relay);
        assert!(read(&relay_of(vec![]), None, MAX_UP_FRAME)
            .unwrap()
            .rows
            .is_empty());
    }

    #[test]
    fn refuses_what_the_checks_refuse_bad_inner_frames_and_other_actions() {
        let raw = relay_of(vec![item("ev-1", b"\x99", None)]);
        let code = |r: Result<Relay, RelayError>| match r {
            Err(RelayError::Frame(e)) => e.code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(read(&raw, Some(&TagKey::new(&[8; 32])), MAX_UP_FRAME)),
            Code::BadTag
        );
        let key = TagKey::new(&KEY);
        assert_eq!(code(read(&raw, Some(&key), MAX_UP_FRAME)), Code::Truncated); // the inner frame
        assert_eq!(code(read(&raw, Some(&key), 8)), Code::Oversize);
        let hb = envelope(kind::REQUEST, action::HEARTBEAT, &Value::Map(vec![]));
        let err = read(&hb, Some(&key), MAX_UP_FRAME).unwrap_err();
        assert_eq!(err, RelayError::NotRelay(action::HEARTBEAT.into()));
        assert_eq!(err.to_string(), "action 3 is not a Relay");
    }
}
