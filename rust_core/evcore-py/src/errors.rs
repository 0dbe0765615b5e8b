//! The one place where `evcore::Error` becomes a Python exception.

use evcore::{Code, Error};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

pyo3::create_exception!(
    gateway._core,
    CoreError,
    PyException,
    "Base class of every error raised by gateway._core."
);
pyo3::create_exception!(
    gateway._core,
    FrameError,
    CoreError,
    "A frame (or stream) was rejected; `name` is the wire error."
);
pyo3::create_exception!(
    gateway._core,
    SignatureError,
    CoreError,
    "An Ed25519 key or signature is malformed."
);
pyo3::create_exception!(
    gateway._core,
    QueueFull,
    CoreError,
    "The priority class is full (backpressure); nothing was queued."
);

/// Registers the exceptions, with class-level defaults of the attributes every instance
/// carries (`code`, `name`, `reason`, `field`).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<CoreError>();
    base.setattr("code", 0)?;
    base.setattr("name", "")?;
    base.setattr("reason", "")?;
    base.setattr("field", py.None())?;
    m.add("CoreError", base)?;
    m.add("FrameError", py.get_type::<FrameError>())?;
    m.add("SignatureError", py.get_type::<SignatureError>())?;
    m.add("QueueFull", py.get_type::<QueueFull>())?;
    Ok(())
}

/// Maps a core error to `QueueFull`, `SignatureError` or `FrameError`.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    let err = match e.code {
        Code::QueueFull => QueueFull::new_err(msg),
        Code::BadSignature => SignatureError::new_err(msg),
        _ => FrameError::new_err(msg),
    };
    let v = err.value(py);
    // Setting plain attributes on a fresh exception instance cannot fail.
    let _ = v.setattr("code", e.code.code());
    let _ = v.setattr("name", e.code.name());
    let _ = v.setattr("field", e.field);
    let _ = v.setattr("reason", e.reason);
    err
}

/// `Result<T, evcore::Error>` → `PyResult<T>`.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for evcore::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
