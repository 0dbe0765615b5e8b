//! The shared golden vectors (tests/vectors/frames.json, written by
//! `python -m tools.make_vectors`): every case, sequence, stream, secret, key and value.

mod common;

use common::same;
use std::path::PathBuf;

use evcore::frame::{self, Header};
use evcore::msgpack::{self, Value};
use evcore::session::{self, Receiver};
use evcore::tag::{self, TagKey};
use evcore::{secret, sign, Error};
use serde_json::Value as Json;

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The vectors file: a missing, unreadable or empty one fails the test (never a silent pass).
fn load() -> Json {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/frames.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (run `python -m tools.make_vectors`)",
            path.display()
        )
    });
    let doc: Json = serde_json::from_str(&text).expect("frames.json is JSON");
    for section in [
        "cases",
        "sequences",
        "streams",
        "secrets",
        "ed25519",
        "values",
    ] {
        assert!(
            doc[section].as_array().is_some_and(|a| !a.is_empty()),
            "{}: section {section} missing or empty",
            path.display()
        );
    }
    doc
}

fn float_of(j: &Json) -> f64 {
    match j {
        Json::String(s) => match s.as_str() {
            "nan" | "NaN" => f64::NAN,
            "inf" | "Infinity" => f64::INFINITY,
            "-inf" | "-Infinity" => f64::NEG_INFINITY,
            other => panic!("bad $float {other}"),
        },
        other => other.as_f64().expect("$float holds a number"),
    }
}

/// TYPED JSON → the value it describes.
fn typed(j: &Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else if let Some(i) = n.as_i64() {
                Value::int(i)
            } else {
                panic!("plain JSON float {n} in a TYPED value")
            }
        }
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(typed).collect()),
        Json::Object(o) => {
            if let Some(f) = o.get("$float") {
                Value::F64(float_of(f))
            } else if let Some(b) = o.get("$bin") {
                Value::Bin(hex(b.as_str().unwrap()))
            } else if let Some(Json::Array(pairs)) = o.get("$map") {
                Value::Map(
                    pairs
                        .iter()
                        .map(|p| {
                            let p = p.as_array().unwrap();
                            (typed(&p[0]), typed(&p[1]))
                        })
                        .collect(),
                )
            } else {
                panic!("unknown TYPED object {o:?}")
            }
        }
    }
}

fn keys(doc: &Json, section: &str) -> impl Fn(&Json) -> Option<Vec<u8>> {
    let table = doc[section].clone();
    move |name: &Json| {
        name.as_str()
            .map(|n| hex(table[n].as_str().unwrap_or_else(|| panic!("no key {n}"))))
    }
}

fn name_of(r: &Result<impl Sized, Error>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.code.name().to_owned(),
    }
}

#[test]
fn frame_cases() {
    let doc = load();
    let key_of = keys(&doc, "keys");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let bytes = hex(case["frame"].as_str().unwrap());
        let key = key_of(&case["key"]);
        let result = match &key {
            Some(k) => session::check_tagged(&bytes, &TagKey::new(k)),
            None => session::check_untagged(&bytes),
        };
        let expect = &case["expect"];
        if let Some(err) = expect.get("error") {
            let got = name_of(&result);
            if got != err.as_str().unwrap() {
                failures.push(format!(
                    "{name}: want {err}, got {got} ({:?})",
                    result.err()
                ));
            }
            continue;
        }
        let ok = &expect["ok"];
        let acc = match result {
            Ok(acc) => acc,
            Err(e) => {
                failures.push(format!("{name}: want ok, got {e}"));
                continue;
            }
        };
        let h = acc.envelope.header;
        let want = Header {
            ver: ok["ver"].as_u64().unwrap(),
            kind: ok["kind"].as_u64().unwrap(),
            seq: ok["seq"].as_u64().unwrap(),
            id: ok["id"].as_u64().unwrap(),
            prio: ok["prio"].as_u64().unwrap(),
            ts: ok["ts"].as_u64().unwrap(),
            action: ok["action"].as_u64().unwrap(),
        };
        if h != want {
            failures.push(format!("{name}: header {h:?} != {want:?}"));
        }
        let body = msgpack::decode(acc.envelope.body).unwrap();
        if !same(&body, &typed(&ok["body"])) {
            failures.push(format!("{name}: body {body:?} != {:?}", typed(&ok["body"])));
        }
        if acc.envelope.tag[..] != hex(ok["tag"].as_str().unwrap())[..] {
            failures.push(format!("{name}: tag differs"));
        }
        if case["canonical"].as_bool() == Some(true) {
            let k = key.as_deref().expect("canonical cases name a key");
            let again = frame::encode(&h, &body, &TagKey::new(k));
            if again != bytes {
                failures.push(format!("{name}: re-encoding differs"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn sequences_through_one_receiver() {
    let doc = load();
    let key_of = keys(&doc, "keys");
    for seq in doc["sequences"].as_array().unwrap() {
        let name = seq["name"].as_str().unwrap();
        let mut r = Receiver::new(&key_of(&seq["key"]).unwrap());
        let got: Vec<String> = seq["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| name_of(&r.ingest(&hex(f.as_str().unwrap()))))
            .collect();
        let want: Vec<String> = seq["expect"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, want, "sequence {name}");
    }
}

#[test]
fn streams_split() {
    let doc = load();
    for s in doc["streams"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let bytes = hex(s["bytes"].as_str().unwrap());
        let result = frame::split_frames(&bytes);
        if let Some(err) = s["expect"].get("error") {
            assert_eq!(
                result.map(|_| ()).unwrap_err().code.name(),
                err.as_str().unwrap(),
                "{name}"
            );
        } else {
            let (frames, _) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            let want: Vec<Vec<u8>> = s["expect"]["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| hex(f.as_str().unwrap()))
                .collect();
            assert_eq!(frames, want, "{name}");
        }
    }
}

#[test]
fn secrets_encrypt() {
    let doc = load();
    for s in doc["secrets"].as_array().unwrap() {
        let key: [u8; 16] = hex(s["key"].as_str().unwrap()).try_into().unwrap();
        let plain = hex(s["plain"].as_str().unwrap());
        let cipher = hex(s["cipher"].as_str().unwrap());
        let (seq, field) = (
            s["seq"].as_u64().unwrap(),
            s["field"].as_u64().unwrap() as u32,
        );
        assert_eq!(secret::aes_ctr(&key, seq, field, &plain), cipher, "{s}");
        assert_eq!(secret::aes_ctr(&key, seq, field, &cipher), plain);
    }
}

#[test]
fn key_derivation() {
    let doc = load();
    for section in ["keys", "kdf"] {
        let k = &doc[section];
        let h = |n: &str| hex(k[n].as_str().unwrap());
        let derived = tag::derive(&h("k_dev"), &h("nonce_board"), &h("nonce_gateway"));
        assert_eq!(
            tag::hello_key(&h("k_dev")).to_vec(),
            h("k_hello"),
            "{section}"
        );
        assert_eq!(derived.k_up.to_vec(), h("k_up"), "{section}");
        assert_eq!(derived.k_dn.to_vec(), h("k_dn"), "{section}");
        assert_eq!(derived.e_up.to_vec(), h("e_up"), "{section}");
        assert_eq!(derived.e_dn.to_vec(), h("e_dn"), "{section}");
    }
}

/// (public, message, signature, valid)
type SigCase = (Vec<u8>, Vec<u8>, Vec<u8>, bool);

#[test]
fn ed25519_single_and_batch() {
    let doc = load();
    let items: Vec<SigCase> = doc["ed25519"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let h = |n: &str| hex(e[n].as_str().unwrap());
            (
                h("public"),
                h("message"),
                h("signature"),
                e["valid"].as_bool().unwrap(),
            )
        })
        .collect();
    for (p, m, s, valid) in &items {
        assert_eq!(sign::verify(p, m, s).is_ok(), *valid, "{}", hex_str(s));
    }
    let batch = sign::verify_batch(items.iter().map(|(p, m, s, _)| (&p[..], &m[..], &s[..])));
    assert_eq!(batch, items.iter().map(|i| i.3).collect::<Vec<_>>());
    let good: Vec<_> = items
        .iter()
        .filter(|i| i.3)
        .map(|(p, m, s, _)| (&p[..], &m[..], &s[..]))
        .collect();
    assert!(sign::verify_batch(good).iter().all(|&v| v));
}

fn hex_str(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

#[test]
fn bare_values_of_every_width() {
    let doc = load();
    for v in doc["values"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let bytes = hex(v["msgpack"].as_str().unwrap());
        let got = msgpack::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(same(&got, &typed(&v["value"])), "{name}: {got:?}");
        // The canonical re-encoding decodes to the same value.
        assert!(
            same(&msgpack::decode(&got.to_bytes()).unwrap(), &got),
            "{name}"
        );
    }
}
