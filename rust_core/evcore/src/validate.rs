//! Checks of a parsed envelope against the schema tables: kind/action/priority
//! (precedence step 7) and the body (step 8), without building a tree.

use crate::error::{Code, Error, Result};
use crate::frame::Header;
use crate::msgpack::{Reader, Token};
use crate::schema::{
    key, kind, ACK_BODY, ERROR_BODY, FIELDS, FIELD_INDEX, MESSAGES, MESSAGE_INDEX,
};
use crate::schema_types::{FieldDef, Member, MessageDef, Ty};

/// The message of an action code.
pub fn message(action: u64) -> Option<&'static MessageDef> {
    let i = *MESSAGE_INDEX.get(usize::try_from(action).ok()?)?;
    MESSAGES.get(usize::from(i))
}

/// The field dictionary entry of a body key.
pub fn field(key: u64) -> Option<&'static FieldDef> {
    let i = *FIELD_INDEX.get(usize::try_from(key).ok()?)?;
    FIELDS.get(usize::from(i))
}

fn kind_name(k: u64) -> &'static str {
    ["request", "response", "error", "event", "ack"]
        .get(k as usize)
        .copied()
        .unwrap_or("?")
}

/// Step 7: `BAD_KIND` (kind > 4), `UNKNOWN_ACTION`, `BAD_KIND` (kind not valid for the
/// action), `BAD_PRIORITY`. Returns the message and the members its body must follow.
pub fn check_header(h: &Header) -> Result<(&'static MessageDef, &'static [Member])> {
    if h.kind > u64::from(kind::ACK) {
        return Err(Error::new(
            Code::BadKind,
            format!("kind {} above 4", h.kind),
        ));
    }
    let Some(msg) = message(h.action) else {
        return Err(Error::new(
            Code::UnknownAction,
            format!("action {} not in the schema", h.action),
        ));
    };
    let k = h.kind as u8;
    let is_event = msg.kind == kind::EVENT;
    let members = match k {
        kind::REQUEST | kind::EVENT if k != msg.kind => None,
        kind::REQUEST | kind::EVENT => Some(msg.fields),
        kind::RESPONSE if !is_event => Some(msg.response),
        kind::ERROR => Some(ERROR_BODY),
        kind::ACK if is_event => Some(ACK_BODY),
        _ => None,
    };
    let Some(members) = members else {
        return Err(Error::new(
            Code::BadKind,
            format!(
                "{} frame for {} ({}), which is {}",
                kind_name(h.kind),
                msg.name,
                msg.code,
                kind_name(u64::from(msg.kind))
            ),
        ));
    };
    if h.prio > 3 {
        return Err(Error::new(
            Code::BadPriority,
            format!("priority {} above 3", h.prio),
        ));
    }
    if (k == kind::REQUEST || k == kind::EVENT) && h.prio > u64::from(msg.priority) {
        return Err(Error::new(
            Code::BadPriority,
            format!(
                "priority {} lower than {}'s class {}",
                h.prio, msg.name, msg.priority
            ),
        ));
    }
    Ok((msg, members))
}

/// The keys seen in one map: a bitmap for keys < 256 (every key of the schema), a list
/// for the others, which only allocates when a map holds such keys.
struct Seen {
    low: [u64; 4],
    high: Vec<u64>,
}

impl Seen {
    fn new() -> Self {
        Self {
            low: [0; 4],
            high: Vec::new(),
        }
    }

    fn contains(&self, k: u64) -> bool {
        if k < 256 {
            self.low[(k >> 6) as usize] & (1 << (k & 63)) != 0
        } else {
            self.high.contains(&k)
        }
    }

    /// False when `k` was there already.
    fn insert(&mut self, k: u64) -> bool {
        if self.contains(k) {
            return false;
        }
        if k < 256 {
            self.low[(k >> 6) as usize] |= 1 << (k & 63);
        } else {
            self.high.push(k);
        }
        true
    }
}

fn label(def: &FieldDef) -> String {
    format!("field {} ({})", def.key, def.name)
}

/// Step 8: checks a body map against `members`.
pub fn check_body(body: &[u8], members: &[Member]) -> Result<()> {
    let mut r = Reader::new(body);
    check_body_at(&mut r, members)
}

/// Checks the body map at the reader's position (the envelope's element 7, depth 2).
/// Structure limits are enforced on the way, so this also serves the one-pass fast
/// path; on bytes already checked by `msgpack::check` they never fail.
pub fn check_body_at(r: &mut Reader<'_>, members: &[Member]) -> Result<()> {
    let at = r.pos();
    match r.next_token()? {
        t @ Token::Map(n) => {
            r.enter(at, 2, &t)?;
            check_map(r, n, members, 2)
        }
        t => Err(Error::new(
            Code::BadEnvelope,
            format!("body is a {}, want a map", t.type_name()),
        )),
    }
}

/// The entries of a map at `depth`.
fn check_map(r: &mut Reader<'_>, n: u32, members: &[Member], depth: usize) -> Result<()> {
    let mut seen = Seen::new();
    for _ in 0..n {
        let k = match r.next_token()? {
            Token::UInt(k) => k,
            t => {
                return Err(Error::new(
                    Code::BadKey,
                    format!("map key is a {}, want an unsigned int", t.type_name()),
                ))
            }
        };
        if !seen.insert(k) {
            let mut e = Error::new(Code::DuplicateKey, format!("key {k} appears twice"));
            e.field = u16::try_from(k).ok();
            return Err(e);
        }
        let def = if k == u64::from(key::EXT) {
            None
        } else {
            members
                .iter()
                .find(|m| u64::from(m.key) == k)
                .and_then(|m| field(u64::from(m.key)))
        };
        match def {
            Some(def) => check_value(r, def, def.ty, depth + 1)?,
            // ext and keys this message does not know: kept, not interpreted, but a map
            // inside may not repeat a key either (the error names the body key holding it).
            None => r.skip_unique(depth + 1).map_err(|mut e| {
                if e.code == Code::DuplicateKey {
                    e.field = u16::try_from(k).ok();
                }
                e
            })?,
        }
    }
    for m in members {
        if m.required && !seen.contains(u64::from(m.key)) {
            let name = field(u64::from(m.key)).map_or("?", |d| d.name);
            return Err(Error::at_field(
                Code::MissingField,
                m.key,
                format!("required field {} ({name}) is missing", m.key),
            ));
        }
    }
    Ok(())
}

fn fail(code: Code, def: &FieldDef, msg: std::fmt::Arguments<'_>) -> Error {
    Error::at_field(code, def.key, format!("{}: {msg}", label(def)))
}

fn bad_type(def: &FieldDef, want: &str, got: &Token<'_>) -> Error {
    fail(
        Code::BadType,
        def,
        format_args!("{} where {want} is expected", got.type_name()),
    )
}

fn check_int(def: &FieldDef, ty: Ty, tok: &Token<'_>) -> Result<()> {
    let (above, below) = match *tok {
        Token::UInt(v) => (v > def.imax, def.imin > 0 && v < def.imin as u64),
        Token::Int(v) => (false, v < def.imin),
        _ => {
            return Err(bad_type(
                def,
                if ty == Ty::Uint { "uint" } else { "int" },
                tok,
            ))
        }
    };
    if !(above || below) {
        return Ok(());
    }
    let v = match *tok {
        Token::UInt(v) => v.to_string(),
        Token::Int(v) => v.to_string(),
        _ => String::new(),
    };
    Err(if above {
        fail(
            Code::OutOfRange,
            def,
            format_args!("value {v} above max {}", def.imax),
        )
    } else {
        fail(
            Code::OutOfRange,
            def,
            format_args!("value {v} below min {}", def.imin),
        )
    })
}

fn check_float(def: &FieldDef, tok: &Token<'_>) -> Result<()> {
    let v = match *tok {
        Token::F32(v) => f64::from(v),
        Token::F64(v) => v,
        Token::UInt(v) => v as f64,
        Token::Int(v) => v as f64,
        _ => return Err(bad_type(def, "float", tok)),
    };
    if v.is_nan() || v < def.fmin || v > def.fmax {
        return Err(fail(
            Code::OutOfRange,
            def,
            format_args!("value {v} outside {}..={}", def.fmin, def.fmax),
        ));
    }
    Ok(())
}

/// Checks one value of type `ty` (the field's type, or its list element type) whose
/// container, if it is one, sits at `depth`.
fn check_value(r: &mut Reader<'_>, def: &FieldDef, ty: Ty, depth: usize) -> Result<()> {
    let at_elem = ty != def.ty;
    let at = r.pos();
    let tok = r.next_token()?;
    r.enter(at, depth, &tok)?;
    match ty {
        Ty::Uint | Ty::Int => check_int(def, ty, &tok)?,
        Ty::Float => check_float(def, &tok)?,
        Ty::Bool => {
            if !matches!(tok, Token::Bool(_)) {
                return Err(bad_type(def, "bool", &tok));
            }
        }
        Ty::Str | Ty::Bin | Ty::Secret => {
            let (len, ok) = match (ty, tok) {
                (Ty::Str, Token::Str(s)) => (s.len(), true),
                (Ty::Bin | Ty::Secret, Token::Bin(b)) => (b.len(), true),
                _ => (0, false),
            };
            if !ok {
                return Err(bad_type(
                    def,
                    if ty == Ty::Str { "str" } else { "bin" },
                    &tok,
                ));
            }
            let max = if at_elem { def.item_len } else { def.max_len } as usize;
            if (!at_elem || max > 0) && len > max {
                return Err(fail(
                    Code::OutOfRange,
                    def,
                    format_args!("{len} bytes, max {max}"),
                ));
            }
        }
        Ty::List => {
            let Token::Array(n) = tok else {
                return Err(bad_type(def, "array", &tok));
            };
            if n > def.max_len {
                return Err(fail(
                    Code::OutOfRange,
                    def,
                    format_args!("{n} items, max {}", def.max_len),
                ));
            }
            for i in 0..n {
                check_value(r, def, def.elem, depth + 1).map_err(|e| {
                    if e.field == Some(def.key) {
                        e
                    } else {
                        e.within(def.key, &format!("{} item {i}", label(def)))
                    }
                })?;
            }
            return Ok(());
        }
        Ty::Struct => {
            let Token::Map(n) = tok else {
                return Err(bad_type(def, "map", &tok));
            };
            return check_map(r, n, def.members, depth).map_err(|e| e.within(def.key, &label(def)));
        }
        Ty::Any => {
            // Limits, checked with the frame's structure, and no map repeating a key.
            r.unique_items(&tok, depth).map_err(|mut e| {
                if e.code == Code::DuplicateKey {
                    e.field = Some(def.key);
                }
                e
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msgpack::Value;
    use crate::schema::{action, key};

    fn body(pairs: Vec<(u64, Value)>) -> Vec<u8> {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::UInt(k), v))
                .collect(),
        )
        .to_bytes()
    }

    fn meter(pairs: Vec<(u64, Value)>) -> Result<()> {
        let m = message(u64::from(action::METER_VALUES)).unwrap();
        check_body(&body(pairs), m.fields)
    }

    #[test]
    fn a_good_body_passes_and_unknown_keys_are_kept() {
        meter(vec![
            (1, Value::UInt(1)),
            (7, Value::UInt(5)),
            (999, Value::from("x")),
            (0, Value::Map(vec![])),
        ])
        .unwrap();
    }

    #[test]
    fn field_errors_are_typed() {
        let e = meter(vec![(1, Value::UInt(1)), (7, Value::UInt(1 << 60))]).unwrap_err();
        assert_eq!((e.code, e.field), (Code::OutOfRange, Some(7)));
        assert!(e.reason.contains("energy_wh"), "{}", e.reason);
        assert_eq!(
            meter(vec![(1, Value::from("a"))]).unwrap_err().code,
            Code::BadType
        );
        assert_eq!(
            meter(vec![(1, Value::int(-1))]).unwrap_err().code,
            Code::OutOfRange
        );
        assert_eq!(
            meter(vec![(7, Value::UInt(1))]).unwrap_err().code,
            Code::MissingField
        );
        assert_eq!(
            meter(vec![(1, Value::UInt(1)), (1, Value::UInt(1))])
                .unwrap_err()
                .code,
            Code::DuplicateKey
        );
        let neg_key = Value::Map(vec![(Value::int(-1), Value::Nil)]).to_bytes();
        assert_eq!(check_body(&neg_key, &[]).unwrap_err().code, Code::BadKey);
        assert_eq!(
            meter(vec![(1, Value::UInt(1)), (8, Value::int(-10_000_001))])
                .unwrap_err()
                .code,
            Code::OutOfRange
        );
        meter(vec![(1, Value::UInt(1)), (8, Value::int(-10_000_000))]).unwrap();
    }

    #[test]
    fn nested_structs_and_lists() {
        let sample =
            |m: Value, v: Value| Value::Map(vec![(Value::UInt(31), m), (Value::UInt(32), v)]);
        meter(vec![
            (1, Value::UInt(1)),
            (
                30,
                Value::Array(vec![sample(Value::UInt(0), Value::F64(1.5))]),
            ),
        ])
        .unwrap();
        meter(vec![
            (1, Value::UInt(1)),
            (
                30,
                Value::Array(vec![sample(Value::UInt(0), Value::UInt(3))]),
            ),
        ])
        .unwrap();
        let e = meter(vec![
            (1, Value::UInt(1)),
            (
                30,
                Value::Array(vec![sample(Value::UInt(0), Value::F64(f64::NAN))]),
            ),
        ])
        .unwrap_err();
        assert_eq!((e.code, e.field), (Code::OutOfRange, Some(30)));
        let missing = Value::Map(vec![(Value::UInt(31), Value::UInt(0))]);
        let e = meter(vec![(1, Value::UInt(1)), (30, Value::Array(vec![missing]))]).unwrap_err();
        assert_eq!(e.code, Code::MissingField);
        let long = Value::Array(vec![sample(Value::UInt(0), Value::UInt(0)); 17]);
        assert_eq!(
            meter(vec![(1, Value::UInt(1)), (30, long)])
                .unwrap_err()
                .code,
            Code::OutOfRange
        );
    }

    #[test]
    fn list_items_of_str_are_bounded() {
        let m = message(u64::from(action::SET_LOG_CRITERIA)).unwrap();
        let ok = body(vec![
            (102, Value::UInt(1)),
            (
                u64::from(key::COMPONENTS),
                Value::Array(vec![Value::from("a")]),
            ),
        ]);
        check_body(&ok, m.fields).unwrap();
        let long = Value::Str("x".repeat(33));
        let bad = body(vec![
            (102, Value::UInt(1)),
            (u64::from(key::COMPONENTS), Value::Array(vec![long])),
        ]);
        assert_eq!(
            check_body(&bad, m.fields).unwrap_err().code,
            Code::OutOfRange
        );
    }

    #[test]
    fn kinds_and_priorities() {
        let h = |kind: u64, action: u16, prio: u64| Header {
            ver: 1,
            kind,
            seq: 1,
            id: 1,
            prio,
            ts: 0,
            action: u64::from(action),
        };
        let code = |h: Header| check_header(&h).unwrap_err().code;
        assert_eq!(code(h(5, action::HEARTBEAT, 2)), Code::BadKind);
        assert_eq!(code(h(5, 9999, 2)), Code::BadKind);
        assert_eq!(code(h(0, 9999, 2)), Code::UnknownAction);
        assert_eq!(code(h(3, action::HEARTBEAT, 2)), Code::BadKind);
        assert_eq!(code(h(4, action::HEARTBEAT, 2)), Code::BadKind);
        assert_eq!(code(h(0, action::METER_VALUES, 2)), Code::BadKind);
        assert_eq!(code(h(1, action::METER_VALUES, 2)), Code::BadKind);
        assert_eq!(code(h(0, action::HEARTBEAT, 3)), Code::BadPriority);
        assert_eq!(code(h(1, action::HEARTBEAT, 4)), Code::BadPriority);
        check_header(&h(1, action::HEARTBEAT, 3)).unwrap();
        check_header(&h(4, action::METER_VALUES, 2)).unwrap();
        check_header(&h(2, action::METER_VALUES, 0)).unwrap();
        check_header(&h(0, action::HEARTBEAT, 0)).unwrap();
    }
}
