//! Python objects ↔ `evcore::Value`.

use evcore::Value;
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PyString, PyTuple,
};

/// Deepest Python structure `encode` converts (the wire allows 8 levels; deeper ones
/// can be encoded on purpose, to test receivers).
const MAX_CONVERT_DEPTH: usize = 64;

/// Converts a body value: None, bool, int (−2⁶³‥2⁶⁴−1), float, str, bytes/bytearray,
/// list/tuple, dict.
pub fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_CONVERT_DEPTH {
        return Err(PyValueError::new_err("value nested too deeply to encode"));
    }
    if obj.is_none() {
        return Ok(Value::Nil);
    }
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::UInt(u));
        }
        return obj.extract::<i64>().map(Value::Int).map_err(|_| {
            PyOverflowError::new_err("int outside the msgpack range -2**63 .. 2**64-1")
        });
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        return Ok(Value::F64(f.value()));
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(Value::Str(s.to_str()?.to_owned()));
    }
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(Value::Bin(b.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.downcast::<PyByteArray>() {
        return Ok(Value::Bin(b.to_vec()));
    }
    if let Ok(l) = obj.downcast::<PyList>() {
        return l
            .iter()
            .map(|i| to_value(&i, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    if let Ok(t) = obj.downcast::<PyTuple>() {
        return t
            .iter()
            .map(|i| to_value(&i, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        let mut pairs = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            pairs.push((to_value(&k, depth + 1)?, to_value(&v, depth + 1)?));
        }
        return Ok(Value::Map(pairs));
    }
    Err(PyTypeError::new_err(format!(
        "cannot encode a value of type {}",
        obj.get_type().name()?
    )))
}

/// Converts a decoded value: bin → bytes, array → list, map → dict (a key that Python
/// cannot hash becomes a tuple / frozenset of pairs).
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Nil => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::UInt(u) => u.into_pyobject(py)?.into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::F32(f) => f64::from(*f).into_pyobject(py)?.into_any(),
        Value::F64(f) => f.into_pyobject(py)?.into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Bin(b) => PyBytes::new(py, b).into_any(),
        Value::Array(items) => PyList::new(
            py,
            items
                .iter()
                .map(|i| to_py(py, i))
                .collect::<PyResult<Vec<_>>>()?,
        )?
        .into_any(),
        Value::Map(pairs) => map_to_py(py, pairs)?.into_any(),
    })
}

/// A map as a dict, in wire order.
pub fn map_to_py<'py>(py: Python<'py>, pairs: &[(Value, Value)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in pairs {
        d.set_item(key_to_py(py, k)?, to_py(py, v)?)?;
    }
    Ok(d)
}

fn key_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Array(items) => PyTuple::new(
            py,
            items
                .iter()
                .map(|i| key_to_py(py, i))
                .collect::<PyResult<Vec<_>>>()?,
        )?
        .into_any(),
        Value::Map(pairs) => {
            let items = pairs
                .iter()
                .map(|(k, v)| {
                    Ok(PyTuple::new(py, [key_to_py(py, k)?, key_to_py(py, v)?])?.into_any())
                })
                .collect::<PyResult<Vec<_>>>()?;
            PyFrozenSet::new(py, &items)?.into_any()
        }
        other => to_py(py, other)?,
    })
}
