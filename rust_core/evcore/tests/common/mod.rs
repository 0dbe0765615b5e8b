//! Helpers shared by the integration tests.

use evcore::msgpack::Value;

/// Equality where a float compares by value whatever its width (NaN equals NaN, and
/// -0.0 differs from 0.0).
pub fn same(a: &Value, b: &Value) -> bool {
    let float = |v: &Value| match v {
        Value::F32(f) => Some(f64::from(*f)),
        Value::F64(f) => Some(*f),
        _ => None,
    };
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((k1, v1), (k2, v2))| same(k1, k2) && same(v1, v2))
        }
        _ => match (float(a), float(b)) {
            (Some(x), Some(y)) => (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits(),
            _ => a == b,
        },
    }
}
