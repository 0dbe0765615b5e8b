//! The hot path: a [`Receiver`] holds one direction's precomputed tag key and replay
//! window and takes frames through every check in the protocol's error precedence; a
//! [`Sender`] numbers and seals frames.

use crate::error::{Code, Error, Result};
use crate::frame::{self, Envelope, Header};
use crate::msgpack::{self, Reader, Token, Value};
use crate::queue::PriorityQueue;
use crate::schema::{MAX_FRAME, PROTOCOL_VERSION, TAG_LEN};
use crate::schema_types::MessageDef;
use crate::tag::{ReplayWindow, TagKey, TAG_SUFFIX};
use crate::validate;

/// A frame that passed every check.
#[derive(Clone, Copy, Debug)]
pub struct Accepted<'a> {
    pub envelope: Envelope<'a>,
    pub message: &'static MessageDef,
}

/// The fast path: every check but the tag and the window in one pass over the frame,
/// failing without detail. Only frames that pass everything take it; any problem sends
/// the frame to [`checked_slow`], which finds the error the precedence names.
fn one_pass(frame: &[u8], max_frame: usize) -> Result<Accepted<'_>> {
    let fail = || Error::new(Code::Internal, String::new());
    if frame.len() > max_frame || frame.len() < TAG_SUFFIX + 10 {
        return Err(fail());
    }
    let mut r = Reader::with_budget(frame, msgpack::objects_for(max_frame));
    let envelope = r.next_token()?;
    if envelope != Token::Array(9) {
        return Err(fail());
    }
    r.enter(0, 1, &envelope)?;
    let mut ints = [0u64; 7];
    for slot in &mut ints {
        match r.next_token()? {
            Token::UInt(v) => *slot = v,
            _ => return Err(fail()),
        }
    }
    let [ver, kind, seq, id, prio, ts, action] = ints;
    let header = Header {
        ver,
        kind,
        seq,
        id,
        prio,
        ts,
        action,
    };
    if ver != PROTOCOL_VERSION {
        return Err(fail());
    }
    let (message, members) = validate::check_header(&header)?;
    let body_start = r.pos();
    validate::check_body_at(&mut r, members)?;
    let body = r.since(body_start);
    let signed_len = frame.len() - TAG_SUFFIX;
    if r.pos() != signed_len || frame[signed_len..signed_len + 2] != [0xc4, TAG_LEN as u8] {
        return Err(fail());
    }
    let envelope = Envelope {
        header,
        body,
        tag: frame[signed_len + 2..].try_into().map_err(|_| fail())?,
        signed: &frame[..signed_len],
    };
    Ok(Accepted { envelope, message })
}

/// Every check in the precedence order, one step after the other.
fn checked_slow<'a>(
    frame: &'a [u8],
    key: Option<&TagKey>,
    window: Option<&ReplayWindow>,
    max_frame: usize,
) -> Result<Accepted<'a>> {
    let envelope = frame::parse_limited(frame, max_frame)?;
    if let Some(k) = key {
        k.verify(envelope.signed, envelope.tag)?;
    }
    if let Some(w) = window {
        w.check(envelope.header.seq)?;
    }
    let (message, members) = validate::check_header(&envelope.header)?;
    // The body's values were counted with the frame's (parse): no second budget here.
    validate::check_body_at(&mut Reader::with_budget(envelope.body, usize::MAX), members)?;
    Ok(Accepted { envelope, message })
}

/// All checks (tag and window when given); the window is not changed.
#[inline]
fn checked<'a>(
    frame: &'a [u8],
    key: Option<&TagKey>,
    window: Option<&ReplayWindow>,
) -> Result<Accepted<'a>> {
    checked_limited(frame, key, window, MAX_FRAME)
}

/// [`checked`] with another size limit (upstream envelopes).
#[inline]
fn checked_limited<'a>(
    frame: &'a [u8],
    key: Option<&TagKey>,
    window: Option<&ReplayWindow>,
    max_frame: usize,
) -> Result<Accepted<'a>> {
    match one_pass(frame, max_frame) {
        Ok(acc) => {
            if let Some(k) = key {
                k.verify(acc.envelope.signed, acc.envelope.tag)?;
            }
            if let Some(w) = window {
                w.check(acc.envelope.header.seq)?;
            }
            Ok(acc)
        }
        Err(_) => checked_slow(frame, key, window, max_frame),
    }
}

/// Steps 1–4, 7 and 8 of the precedence (no tag, no window): what `decode` checks.
pub fn check_untagged(frame: &[u8]) -> Result<Accepted<'_>> {
    checked(frame, None, None)
}

/// [`check_untagged`] and [`check_tagged`] for envelopes up to `max_frame` bytes.
pub fn check_limited<'a>(
    frame: &'a [u8],
    key: Option<&TagKey>,
    max_frame: usize,
) -> Result<Accepted<'a>> {
    checked_limited(frame, key, None, max_frame)
}

/// Steps 1–5, 7 and 8: every check but the replay window.
pub fn check_tagged<'a>(frame: &'a [u8], key: &TagKey) -> Result<Accepted<'a>> {
    checked(frame, Some(key), None)
}

/// The slow path alone (for tests: it must agree with the fast one).
#[doc(hidden)]
pub fn check_tagged_slow<'a>(frame: &'a [u8], key: &TagKey) -> Result<Accepted<'a>> {
    checked_slow(frame, Some(key), None, MAX_FRAME)
}

/// One direction of a link, receiving side.
#[derive(Clone, Debug)]
pub struct Receiver {
    key: TagKey,
    window: ReplayWindow,
}

impl Receiver {
    /// A receiver with the protocol's 64-counter window.
    pub fn new(key: &[u8]) -> Self {
        Self::with_window(key, 64)
    }

    /// A receiver with a window of `size` counters (1‥=64).
    pub fn with_window(key: &[u8], size: u32) -> Self {
        Self {
            key: TagKey::new(key),
            window: ReplayWindow::with_size(size),
        }
    }

    pub fn window(&self) -> &ReplayWindow {
        &self.window
    }

    /// Every check in precedence order; the window is not changed.
    fn check<'a>(&self, frame: &'a [u8]) -> Result<Accepted<'a>> {
        checked(frame, Some(&self.key), Some(&self.window))
    }

    /// Parses, verifies and validates one frame and, when it passes, marks its `seq`
    /// seen. A rejected frame changes nothing.
    pub fn ingest<'a>(&mut self, frame: &'a [u8]) -> Result<Accepted<'a>> {
        let acc = self.check(frame)?;
        self.window.accept(acc.envelope.header.seq);
        Ok(acc)
    }

    /// Takes a batch of frames from device `device` into `queue`. Pushes one status per
    /// frame to `statuses`: 0 when accepted and queued, else the error code (`QUEUE_FULL`
    /// when the frame's class is full — its `seq` is then not marked, so a retransmit
    /// can still get in). `on_error(index, error)` sees each failure. Returns the number
    /// of frames queued. Allocates nothing per frame beyond the queued copy.
    pub fn ingest_batch<'a, I, F>(
        &mut self,
        frames: I,
        queue: &mut PriorityQueue,
        device: u64,
        statuses: &mut Vec<u8>,
        mut on_error: F,
    ) -> usize
    where
        I: IntoIterator<Item = &'a [u8]>,
        F: FnMut(usize, Error),
    {
        let mut queued = 0;
        for (i, f) in frames.into_iter().enumerate() {
            let result = self.check(f).and_then(|acc| {
                let h = &acc.envelope.header;
                queue.push(h.prio as u8, device, h.id, h.action as u16, f)?;
                Ok(h.seq)
            });
            match result {
                Ok(seq) => {
                    self.window.accept(seq);
                    statuses.push(0);
                    queued += 1;
                }
                Err(e) => {
                    statuses.push(e.wire_code() as u8);
                    on_error(i, e);
                }
            }
        }
        queued
    }
}

/// One direction of a link, sending side: numbers frames 1, 2, … and seals them.
#[derive(Clone, Debug)]
pub struct Sender {
    key: TagKey,
    next_seq: u64,
}

impl Sender {
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: TagKey::new(key),
            next_seq: 1,
        }
    }

    /// The `seq` the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Encodes and seals a frame with the next `seq`. The body is written as given
    /// (canonical form, map order kept); it is not validated.
    pub fn seal(
        &mut self,
        kind: u8,
        id: u64,
        prio: u8,
        ts: u64,
        action: u16,
        body: &Value,
    ) -> Vec<u8> {
        let h = Header {
            ver: PROTOCOL_VERSION,
            kind: kind.into(),
            seq: self.next_seq,
            id,
            prio: prio.into(),
            ts,
            action: action.into(),
        };
        self.next_seq += 1;
        frame::encode(&h, body, &self.key)
    }
}

/// A status byte's error name (`"OK"` for 0).
pub fn status_name(status: u8) -> &'static str {
    if status == 0 {
        "OK"
    } else {
        Code::from_code(status.into()).map_or("?", Code::name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueConfig;
    use crate::schema::{action, kind};

    fn meter_body() -> Value {
        Value::Map(vec![
            (Value::UInt(1), Value::UInt(1)),
            (Value::UInt(7), Value::UInt(12345)),
        ])
    }

    #[test]
    fn sender_to_receiver() {
        let mut s = Sender::new(&[5; 32]);
        let mut r = Receiver::new(&[5; 32]);
        let f1 = s.seal(kind::EVENT, 10, 2, 99, action::METER_VALUES, &meter_body());
        let f2 = s.seal(kind::EVENT, 11, 2, 99, action::METER_VALUES, &meter_body());
        assert_eq!(r.ingest(&f2).unwrap().envelope.header.seq, 2);
        assert_eq!(r.ingest(&f1).unwrap().envelope.header.id, 10);
        assert_eq!(r.ingest(&f1).unwrap_err().code, Code::Replay);
        let mut bad = f2.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(r.ingest(&bad).unwrap_err().code, Code::BadTag);
    }

    #[test]
    fn rejected_frames_leave_the_window_alone() {
        let mut s = Sender::new(&[5; 32]);
        let mut r = Receiver::new(&[5; 32]);
        let bad_body = Value::Map(vec![(Value::UInt(7), Value::UInt(1))]);
        let f = s.seal(kind::EVENT, 10, 2, 99, action::METER_VALUES, &bad_body);
        assert_eq!(r.ingest(&f).unwrap_err().code, Code::MissingField);
        assert_eq!(r.window().highest(), 0);
    }

    #[test]
    fn batch_statuses_and_backpressure() {
        let mut s = Sender::new(&[5; 32]);
        let mut r = Receiver::new(&[5; 32]);
        let mut q = PriorityQueue::new(QueueConfig {
            max_items: 2,
            ..QueueConfig::default()
        });
        let frames: Vec<Vec<u8>> = (0..4)
            .map(|i| s.seal(kind::EVENT, i, 2, 0, action::METER_VALUES, &meter_body()))
            .collect();
        let mut frames_ref: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        frames_ref.insert(1, b"\xc1");
        let mut st = Vec::new();
        let mut errs = Vec::new();
        let n = r.ingest_batch(frames_ref, &mut q, 77, &mut st, |i, e| {
            errs.push((i, e.code));
        });
        assert_eq!(n, 2);
        assert_eq!(st, [0, 16, 0, 19, 19]);
        assert_eq!(
            errs,
            [
                (1, Code::InvalidMsgpack),
                (3, Code::QueueFull),
                (4, Code::QueueFull)
            ]
        );
        assert_eq!(r.window().highest(), 2);
        assert_eq!(status_name(19), "QUEUE_FULL");
    }
}
