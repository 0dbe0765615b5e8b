//! Property tests: the decoder never panics on arbitrary bytes, and valid envelopes and
//! values survive encode → decode unchanged.

mod common;

use common::same;
use evcore::frame::{self, Header};
use evcore::msgpack::{self, Value};
use evcore::schema::{action, kind, MAX_FRAME};
use evcore::session::{self, Receiver};
use evcore::{Code, PriorityQueue, TagKey};
use proptest::prelude::*;

const KEY: [u8; 32] = [0x42; 32];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::UInt),
        any::<i64>().prop_map(Value::int),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        ".{0,40}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bin),
    ]
}

/// The pairs with each key once (its first entry): a valid map.
fn unique(pairs: Vec<(Value, Value)>) -> Vec<(Value, Value)> {
    let mut out: Vec<(Value, Value)> = Vec::new();
    for (k, v) in pairs {
        if !out.iter().any(|(p, _)| msgpack::same_key(p, &k)) {
            out.push((k, v));
        }
    }
    out
}

/// Valid values nested at most 6 deep (within the frame's depth limit under the envelope).
fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8)
                .prop_map(|pairs| Value::Map(unique(pairs))),
        ]
    })
}

/// `v` with one repeated key, in its deepest first non-empty map (the map's first key
/// given again, as its last entry); None when there is no such map.
fn with_repeat(v: &Value) -> Option<Value> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .enumerate()
            .find_map(|(i, (_, x))| {
                let mut p = pairs.clone();
                p[i].1 = with_repeat(x)?;
                Some(Value::Map(p))
            })
            .or_else(|| {
                // a key holding a NaN is never a repeat of itself
                let k = pairs
                    .first()
                    .filter(|(k, _)| msgpack::same_key(k, k))?
                    .0
                    .clone();
                let mut p = pairs.clone();
                p.push((k, Value::Nil));
                Some(Value::Map(p))
            }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, x)| {
            let mut a = items.clone();
            a[i] = with_repeat(x)?;
            Some(Value::Array(a))
        }),
        _ => None,
    }
}

fn meter_body() -> impl Strategy<Value = Value> {
    let sample = (
        0u64..=7,
        -1e12f64..=1e12,
        proptest::option::of(0u64..=4_294_967_295),
    )
        .prop_map(|(m, v, t)| {
            let mut p = vec![
                (Value::UInt(31), Value::UInt(m)),
                (Value::UInt(32), Value::F64(v)),
            ];
            if let Some(t) = t {
                p.push((Value::UInt(20), Value::UInt(t)));
            }
            Value::Map(p)
        });
    (
        0u64..=255,
        proptest::option::of(0u64..=9_007_199_254_740_991),
        proptest::option::of(-10_000_000i64..=10_000_000),
        proptest::option::of(proptest::collection::vec(sample, 0..=16)),
        proptest::option::of((200u64..5000, value())),
        proptest::option::of(value()),
    )
        .prop_map(|(evse, energy, power, samples, unknown, ext)| {
            let mut p = vec![(Value::UInt(1), Value::UInt(evse))];
            if let Some(e) = energy {
                p.push((Value::UInt(7), Value::UInt(e)));
            }
            if let Some(w) = power {
                p.push((Value::UInt(8), Value::int(w)));
            }
            if let Some(s) = samples {
                p.push((Value::UInt(30), Value::Array(s)));
            }
            if let Some((k, v)) = unknown {
                p.push((Value::UInt(k), v));
            }
            if let Some(v) = ext {
                p.push((Value::UInt(0), v));
            }
            Value::Map(p)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = msgpack::decode(&bytes);
        let _ = session::check_untagged(&bytes);
        let mut r = Receiver::new(&KEY);
        if let Err(e) = r.ingest(&bytes) {
            prop_assert!(e.code != Code::Internal);
        }
        let mut q = PriorityQueue::default();
        let mut st = Vec::new();
        r.ingest_batch([&bytes[..]], &mut q, 1, &mut st, |_, _| {});
        prop_assert_eq!(st.len(), 1);
        let _ = frame::split_frames(&bytes);
    }

    #[test]
    fn msgpack_shaped_garbage_never_panics(
        head in proptest::sample::select(vec![
            0x99u8, 0xdc, 0xdd, 0xde, 0xdf, 0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6, 0x91, 0x81, 0xc1, 0xd4,
        ]),
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buf = vec![head];
        buf.extend_from_slice(&bytes);
        let _ = msgpack::decode(&buf);
        let _ = session::check_untagged(&buf);
    }

    #[test]
    fn mutated_frames_are_rejected_not_panicking(
        body in meter_body(),
        at in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let h = Header { ver: 1, kind: kind::EVENT.into(), seq: 1, id: 1, prio: 2, ts: 0, action: action::METER_VALUES.into() };
        let mut f = frame::encode(&h, &body, &TagKey::new(&KEY));
        prop_assume!(f.len() <= MAX_FRAME);
        let i = at.index(f.len());
        f[i] ^= flip;
        prop_assert!(session::check_tagged(&f, &TagKey::new(&KEY)).is_err());
        f.truncate(i);
        prop_assert!(session::check_untagged(&f).is_err());
    }

    #[test]
    fn fast_and_slow_paths_agree(
        body in meter_body(),
        kind_ in 0u64..=5,
        prio in 0u64..=4,
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let h = Header { ver: 1, kind: kind_, seq: 1, id: 1, prio, ts: 0, action: action::METER_VALUES.into() };
        let key = TagKey::new(&KEY);
        let mut f = frame::encode(&h, &body, &key);
        for (at, b) in edits {
            let i = at.index(f.len());
            f[i] = b;
        }
        let fast = session::check_tagged(&f, &key).map(|a| a.envelope.header);
        let slow = session::check_tagged_slow(&f, &key).map(|a| a.envelope.header);
        prop_assert_eq!(fast.map_err(|e| e.code), slow.map_err(|e| e.code));
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth(v in value()) {
        if let Some(bad) = with_repeat(&v) {
            prop_assert_eq!(msgpack::decode(&bad.to_bytes()).unwrap_err().code, Code::DuplicateKey);
            // in a frame: the body key holding it is named, on both paths
            let body = Value::Map(vec![(Value::UInt(1), Value::UInt(1)), (Value::UInt(0), bad)]);
            let h = Header { ver: 1, kind: kind::EVENT.into(), seq: 1, id: 1, prio: 2, ts: 0, action: action::METER_VALUES.into() };
            let f = frame::encode(&h, &body, &TagKey::new(&KEY));
            prop_assume!(f.len() <= MAX_FRAME);
            for e in [
                session::check_tagged(&f, &TagKey::new(&KEY)).unwrap_err(),
                session::check_tagged_slow(&f, &TagKey::new(&KEY)).unwrap_err(),
            ] {
                prop_assert_eq!((e.code, e.field), (Code::DuplicateKey, Some(0)));
            }
        }
    }

    #[test]
    fn values_round_trip_canonically(v in value()) {
        let bytes = v.to_bytes();
        let back = msgpack::decode(&bytes).unwrap();
        prop_assert!(same(&back, &v), "{:?} != {:?}", back, v);
        prop_assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn valid_envelopes_round_trip(
        body in meter_body(),
        seq in 1u64..=4_294_967_295,
        id in 0u64..=9_007_199_254_740_991,
        prio in 0u64..=2,
        ts in 0u64..=4_294_967_295,
    ) {
        let h = Header { ver: 1, kind: kind::EVENT.into(), seq, id, prio, ts, action: action::METER_VALUES.into() };
        let f = frame::encode(&h, &body, &TagKey::new(&KEY));
        prop_assume!(f.len() <= MAX_FRAME);
        let mut r = Receiver::new(&KEY);
        let acc = r.ingest(&f).unwrap();
        prop_assert_eq!(acc.envelope.header, h);
        let back = msgpack::decode(acc.envelope.body).unwrap();
        prop_assert!(same(&back, &body));
        prop_assert_eq!(frame::encode(&h, &back, &TagKey::new(&KEY)), f.clone());
        prop_assert_eq!(r.ingest(&f).unwrap_err().code, Code::Replay);
    }
}
