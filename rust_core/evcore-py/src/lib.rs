//! `gateway._core`: the Python face of `evcore`. Thin: every function converts its
//! arguments, calls the pure crate, and maps errors in one place (`errors.rs`).

mod convert;
mod errors;

use evcore::frame::{self, Header};
use evcore::msgpack::{self, Value};
use evcore::queue::{Batch, QueueConfig};
use evcore::relay::{self, RelayError};
use evcore::schema::{MAX_FRAME, MAX_UP_FRAME, PROTOCOL_VERSION, SCHEMA_REV};
use evcore::{session, Code, TagKey};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyTuple};

use errors::IntoPyResult;

/// A decoded, validated frame.
#[pyclass(frozen, get_all, module = "gateway._core")]
struct Frame {
    ver: u64,
    kind: u64,
    seq: u64,
    msg_id: u64,
    prio: u64,
    ts: u64,
    action: u64,
    body: Py<PyDict>,
    tag: Py<PyBytes>,
}

#[pymethods]
impl Frame {
    fn __repr__(&self) -> String {
        format!(
            "Frame(ver={}, kind={}, seq={}, msg_id={}, prio={}, ts={}, action={}, body=<{} keys>)",
            self.ver,
            self.kind,
            self.seq,
            self.msg_id,
            self.prio,
            self.ts,
            self.action,
            Python::with_gil(|py| self.body.bind(py).len())
        )
    }
}

fn frame_to_py(py: Python<'_>, acc: &session::Accepted<'_>) -> PyResult<Frame> {
    let env = &acc.envelope;
    // An accepted frame's body: its values were counted with the frame's.
    let body = match msgpack::decode_with(env.body, usize::MAX).py_err(py)? {
        Value::Map(pairs) => convert::map_to_py(py, &pairs)?,
        _ => return Err(PyValueError::new_err("body is not a map")),
    };
    let h = &env.header;
    Ok(Frame {
        ver: h.ver,
        kind: h.kind,
        seq: h.seq,
        msg_id: h.id,
        prio: h.prio,
        ts: h.ts,
        action: h.action,
        body: body.unbind(),
        tag: PyBytes::new(py, env.tag).unbind(),
    })
}

type HeaderTuple = (u64, u64, u64, u64, u64, u64);

fn header_tuple(h: &Header) -> HeaderTuple {
    (h.kind, h.seq, h.id, h.prio, h.ts, h.action)
}

/// Runs `f` on the bytes of a `bytes` or `bytearray` object.
fn with_buffer<T>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> T) -> PyResult<T> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        Ok(f(b.as_bytes()))
    } else if let Ok(b) = obj.downcast::<PyByteArray>() {
        Ok(f(&b.to_vec()))
    } else {
        Err(PyTypeError::new_err("expected bytes or bytearray"))
    }
}

fn as_key16(key: &[u8]) -> PyResult<&[u8; 16]> {
    key.try_into()
        .map_err(|_| PyValueError::new_err("AES-128 key must be 16 bytes"))
}

fn body_value(body: &Bound<'_, PyDict>) -> PyResult<Value> {
    convert::to_value(body.as_any(), 1)
}

fn narrow<T: TryFrom<u64>>(v: u64, what: &str) -> PyResult<T> {
    T::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} {v} out of range")))
}

// ------------------------------------------------------------------ keys and codec

/// `K_hello = HMAC-SHA256(K_dev, "evlink/1 hello")`.
#[pyfunction]
fn hello_key<'py>(py: Python<'py>, k_dev: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &evcore::tag::hello_key(k_dev))
}

/// `(K_up, K_dn, E_up, E_dn)` from `K_dev` and the Hello nonces.
#[pyfunction]
fn derive_keys<'py>(
    py: Python<'py>,
    k_dev: &[u8],
    nonce_board: &[u8],
    nonce_gateway: &[u8],
) -> PyResult<Bound<'py, PyTuple>> {
    let k = evcore::tag::derive(k_dev, nonce_board, nonce_gateway);
    PyTuple::new(
        py,
        [
            PyBytes::new(py, &k.k_up),
            PyBytes::new(py, &k.k_dn),
            PyBytes::new(py, &k.e_up),
            PyBytes::new(py, &k.e_dn),
        ],
    )
}

/// Encodes a canonical envelope and seals it with `key` (no schema check).
#[pyfunction]
#[pyo3(signature = (kind, seq, msg_id, prio, ts, action, body, key, *, ver = 1))]
#[allow(clippy::too_many_arguments)]
fn encode<'py>(
    py: Python<'py>,
    kind: u64,
    seq: u64,
    msg_id: u64,
    prio: u64,
    ts: u64,
    action: u64,
    body: &Bound<'py, PyDict>,
    key: &[u8],
    ver: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let h = Header {
        ver,
        kind,
        seq,
        id: msg_id,
        prio,
        ts,
        action,
    };
    let body = body_value(body)?;
    Ok(PyBytes::new(
        py,
        &frame::encode(&h, &body, &TagKey::new(key)),
    ))
}

/// Parses and validates a frame; checks the tag when `key` is given (no replay window).
#[pyfunction]
#[pyo3(signature = (frame, key = None, *, max_frame = None))]
fn decode(
    py: Python<'_>,
    frame: &[u8],
    key: Option<&[u8]>,
    max_frame: Option<usize>,
) -> PyResult<Frame> {
    let max_frame = max_frame.unwrap_or(MAX_FRAME);
    if !(1..=MAX_UP_FRAME).contains(&max_frame) {
        return Err(PyValueError::new_err(format!(
            "max_frame {max_frame}: want 1..={MAX_UP_FRAME}"
        )));
    }
    let tag_key = key.map(TagKey::new);
    let acc = session::check_limited(frame, tag_key.as_ref(), max_frame).py_err(py)?;
    frame_to_py(py, &acc)
}

/// One `relayed` item of a Relay: `(device_id, msg_id, prio, action, frame, token_uid)`.
type RelayRow<'py> = (String, u64, u64, u64, Bound<'py, PyBytes>, Option<String>);

/// A Relay read for storing its rows (`evcore::relay::read`): the frame is checked as
/// [`decode`] does (schema, tag when `key` is given), then `(header, site_id, rows)`, each
/// row with its inner frame's header read structurally. No Python dict is made per item.
#[pyfunction]
#[pyo3(signature = (frame, key = None, *, max_frame = None))]
fn relay_rows<'py>(
    py: Python<'py>,
    frame: &[u8],
    key: Option<&[u8]>,
    max_frame: Option<usize>,
) -> PyResult<(HeaderTuple, String, Vec<RelayRow<'py>>)> {
    let max_frame = max_frame.unwrap_or(MAX_UP_FRAME);
    if !(1..=MAX_UP_FRAME).contains(&max_frame) {
        return Err(PyValueError::new_err(format!(
            "max_frame {max_frame}: want 1..={MAX_UP_FRAME}"
        )));
    }
    let tag_key = key.map(TagKey::new);
    let relay = match relay::read(frame, tag_key.as_ref(), max_frame) {
        Ok(r) => r,
        Err(RelayError::Frame(e)) => return Err(errors::to_py(py, e)),
        Err(e) => return Err(PyValueError::new_err(e.to_string())),
    };
    let rows = relay
        .rows
        .into_iter()
        .map(|r| {
            let h = r.header;
            let frame = PyBytes::new(py, &r.frame);
            (r.device_id, h.id, h.prio, h.action, frame, r.token_uid)
        })
        .collect();
    Ok((header_tuple(&relay.header), relay.site_id, rows))
}

/// Decodes one bare msgpack value (hardened: limits, budget, no repeated key, every
/// width); no schema. `max_objects`: the budget of values when not the one of a frame of
/// `data`'s size (a blob that came inside a larger, already bounded frame).
#[pyfunction]
#[pyo3(signature = (data, max_objects=None))]
fn unpack<'py>(
    py: Python<'py>,
    data: &[u8],
    max_objects: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let v = match max_objects {
        Some(n) => msgpack::decode_with(data, n),
        None => msgpack::decode(data),
    }
    .py_err(py)?;
    convert::to_py(py, &v)
}

/// Encodes one value in canonical msgpack.
#[pyfunction]
fn pack<'py>(py: Python<'py>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, &convert::to_value(value, 1)?.to_bytes()))
}

/// Cuts the complete length-prefixed frames off `buf`: `(frames, bytes consumed)`.
#[pyfunction]
fn split_frames<'py>(
    py: Python<'py>,
    buf: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, usize)> {
    with_buffer(buf, |b| {
        let (frames, used) = frame::split_frames(b).py_err(py)?;
        Ok((
            PyList::new(py, frames.into_iter().map(|f| PyBytes::new(py, f)))?,
            used,
        ))
    })?
}

/// AES-128-CTR of a `secret` field (encrypts and decrypts).
#[pyfunction]
fn aes_ctr<'py>(
    py: Python<'py>,
    key16: &[u8],
    seq: u64,
    field_key: u32,
    data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(
        py,
        &evcore::secret::aes_ctr(as_key16(key16)?, seq, field_key, data),
    ))
}

/// Verifies one Ed25519 signature.
#[pyfunction]
fn ed25519_verify(
    py: Python<'_>,
    public: &[u8],
    message: &[u8],
    signature: &[u8],
) -> PyResult<bool> {
    if public.len() != 32 || signature.len() != 64 {
        return Err(errors::to_py(
            py,
            evcore::Error::new(
                Code::BadSignature,
                "public key must be 32 bytes, signature 64",
            ),
        ));
    }
    Ok(evcore::sign::verify(public, message, signature).is_ok())
}

/// Verifies many `(public, message, signature)` items, GIL released.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // owned: the GIL is released while reading them
fn ed25519_verify_batch(py: Python<'_>, items: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>) -> Vec<bool> {
    py.allow_threads(|| {
        evcore::sign::verify_batch(
            items
                .iter()
                .map(|(p, m, s)| (p.as_slice(), m.as_slice(), s.as_slice())),
        )
    })
}

/// The schema revision the core was generated from.
#[pyfunction]
fn schema_rev() -> u64 {
    SCHEMA_REV
}

/// The name of an error code (`"OK"` for 0).
#[pyfunction]
fn error_name(code: u16) -> PyResult<&'static str> {
    if code == 0 {
        return Ok("OK");
    }
    Code::from_code(code)
        .map(Code::name)
        .ok_or_else(|| PyValueError::new_err(format!("no error code {code}")))
}

// ------------------------------------------------------------------ queue

/// The four-class priority queue (bounds apply per class).
#[pyclass(module = "gateway._core")]
struct PriorityQueue {
    inner: evcore::PriorityQueue,
    batch: Batch,
}

#[pymethods]
impl PriorityQueue {
    #[new]
    #[pyo3(signature = (max_items = 65536, max_bytes = 67_108_864, quantum = 4096))]
    fn new(max_items: usize, max_bytes: usize, quantum: usize) -> PyResult<Self> {
        if quantum == 0 {
            return Err(PyValueError::new_err("quantum must be at least 1"));
        }
        let cfg = QueueConfig {
            max_items,
            max_bytes,
            quantum,
            ..QueueConfig::default()
        };
        Ok(Self {
            inner: evcore::PriorityQueue::new(cfg),
            batch: Batch::default(),
        })
    }

    fn push(
        &mut self,
        py: Python<'_>,
        prio: u8,
        device: u64,
        msg_id: u64,
        action: u16,
        frame: &[u8],
    ) -> PyResult<()> {
        if prio > 3 {
            return Err(PyValueError::new_err(format!(
                "priority class {prio} above 3"
            )));
        }
        self.inner
            .push(prio, device, msg_id, action, frame)
            .py_err(py)
    }

    #[pyo3(signature = (max_items, max_bytes = None))]
    fn pop_batch<'py>(
        &mut self,
        py: Python<'py>,
        max_items: usize,
        max_bytes: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.batch.clear();
        self.inner
            .pop_batch(max_items, max_bytes.unwrap_or(usize::MAX), &mut self.batch);
        let out = PyList::empty(py);
        for (m, f) in self.batch.iter() {
            out.append((m.prio, m.device, m.msg_id, m.action, PyBytes::new(py, f)))?;
        }
        Ok(out)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn len_class(&self, prio: usize) -> usize {
        self.inner.len_class(prio)
    }

    fn bytes_class(&self, prio: usize) -> usize {
        self.inner.bytes_class(prio)
    }
}

// ------------------------------------------------------------------ receiver / sender

/// One direction of a link, receiving side.
#[pyclass(module = "gateway._core")]
struct Receiver {
    inner: session::Receiver,
    scratch: Vec<u8>,
    lens: Vec<usize>,
    errors: Vec<Rejection>,
}

/// `(index, code, reason, field)` of a frame `Receiver.ingest` rejected.
type Rejection = (usize, u16, String, Option<u16>);

#[pymethods]
impl Receiver {
    #[new]
    #[pyo3(signature = (key, window = 64))]
    fn new(key: &[u8], window: u32) -> PyResult<Self> {
        if !(1..=64).contains(&window) {
            return Err(PyValueError::new_err("window must be 1..=64"));
        }
        Ok(Self {
            inner: session::Receiver::with_window(key, window),
            scratch: Vec::new(),
            lens: Vec::new(),
            errors: Vec::new(),
        })
    }

    /// Highest `seq` accepted so far.
    #[getter]
    fn highest(&self) -> u64 {
        self.inner.window().highest()
    }

    fn verify(&mut self, py: Python<'_>, frame: &[u8]) -> PyResult<HeaderTuple> {
        let acc = self.inner.ingest(frame).py_err(py)?;
        Ok(header_tuple(&acc.envelope.header))
    }

    fn receive(&mut self, py: Python<'_>, frame: &[u8]) -> PyResult<Frame> {
        let acc = self.inner.ingest(frame).py_err(py)?;
        frame_to_py(py, &acc)
    }

    fn ingest<'py>(
        &mut self,
        py: Python<'py>,
        frames: &Bound<'py, PyAny>,
        mut queue: PyRefMut<'py, PriorityQueue>,
        device: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.scratch.clear();
        self.lens.clear();
        self.errors.clear();
        let mut add = |item: &Bound<'py, PyAny>| -> PyResult<()> {
            let b = item
                .downcast::<PyBytes>()
                .map_err(|_| PyTypeError::new_err("frames must be bytes"))?;
            let s = b.as_bytes();
            self.scratch.extend_from_slice(s);
            self.lens.push(s.len());
            Ok(())
        };
        if let Ok(list) = frames.downcast::<PyList>() {
            for item in list.iter() {
                add(&item)?;
            }
        } else {
            for item in frames.try_iter()? {
                add(&item?)?;
            }
        }
        let Self {
            inner,
            scratch,
            lens,
            errors,
        } = self;
        let q = &mut queue.inner;
        let statuses = py.allow_threads(|| {
            let mut statuses = Vec::with_capacity(lens.len());
            let mut at = 0;
            let spans = lens.iter().map(|&n| {
                let f = &scratch[at..at + n];
                at += n;
                f
            });
            inner.ingest_batch(spans, q, device, &mut statuses, |i, e| {
                errors.push((i, e.wire_code(), e.reason, e.field));
            });
            statuses
        });
        Ok(PyBytes::new(py, &statuses))
    }

    /// `(index, code, reason)` of each frame the last `ingest` rejected.
    fn last_errors(&self) -> Vec<(usize, u16, String)> {
        self.errors
            .iter()
            .map(|(i, code, reason, _)| (*i, *code, reason.clone()))
            .collect()
    }

    /// `(index, code, reason, field)` of each frame the last `ingest` rejected: `field`
    /// is the body key at fault (`None` when the error is not about one field).
    fn last_rejections(&self) -> Vec<Rejection> {
        self.errors.clone()
    }
}

/// One direction of a link, sending side: numbers frames 1, 2, … and seals them.
#[pyclass(module = "gateway._core")]
struct Sender {
    inner: session::Sender,
}

#[pymethods]
impl Sender {
    #[new]
    fn new(key: &[u8]) -> Self {
        Self {
            inner: session::Sender::new(key),
        }
    }

    /// The `seq` the next sealed frame carries.
    #[getter]
    fn seq(&self) -> u64 {
        self.inner.next_seq()
    }

    #[allow(clippy::too_many_arguments)]
    fn seal<'py>(
        &mut self,
        py: Python<'py>,
        kind: u64,
        msg_id: u64,
        prio: u64,
        ts: u64,
        action: u64,
        body: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let body = body_value(body)?;
        let f = self.inner.seal(
            narrow(kind, "kind")?,
            msg_id,
            narrow(prio, "prio")?,
            ts,
            narrow(action, "action")?,
            &body,
        );
        Ok(PyBytes::new(py, &f))
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", evcore::VERSION)?;
    m.add("MAX_FRAME", MAX_FRAME)?;
    m.add("MAX_UP_FRAME", MAX_UP_FRAME)?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add("SCHEMA_REV", SCHEMA_REV)?;
    errors::register(m)?;
    m.add_class::<Frame>()?;
    m.add_class::<PriorityQueue>()?;
    m.add_class::<Receiver>()?;
    m.add_class::<Sender>()?;
    m.add_function(wrap_pyfunction!(hello_key, m)?)?;
    m.add_function(wrap_pyfunction!(derive_keys, m)?)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(relay_rows, m)?)?;
    m.add_function(wrap_pyfunction!(split_frames, m)?)?;
    m.add_function(wrap_pyfunction!(aes_ctr, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_verify, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_verify_batch, m)?)?;
    m.add_function(wrap_pyfunction!(schema_rev, m)?)?;
    m.add_function(wrap_pyfunction!(error_name, m)?)?;
    Ok(())
}
