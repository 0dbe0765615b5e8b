//! The 9-element envelope `[ver, kind, seq, id, prio, ts, action, body, tag]` and the
//! u16-length-prefixed stream framing (docs/protocol.md).

use crate::error::{Code, Error, Result};
use crate::msgpack::{self, Reader, Token, Value};
use crate::schema::{MAX_FRAME, PROTOCOL_VERSION, TAG_LEN};
use crate::tag::{TagKey, TAG_SUFFIX};

/// Envelope elements 0–6, as read (range checks come with validation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Header {
    pub ver: u64,
    pub kind: u64,
    pub seq: u64,
    pub id: u64,
    pub prio: u64,
    pub ts: u64,
    pub action: u64,
}

/// A structurally valid envelope, borrowed from the frame bytes.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    pub header: Header,
    /// The body map's bytes (element 7).
    pub body: &'a [u8],
    /// The tag (element 8).
    pub tag: &'a [u8; TAG_LEN],
    /// The bytes the tag covers: the frame without its last 18 bytes.
    pub signed: &'a [u8],
}

fn envelope_err(reason: impl Into<String>) -> Error {
    Error::new(Code::BadEnvelope, reason)
}

const NAMES: [&str; 7] = ["ver", "kind", "seq", "id", "prio", "ts", "action"];

/// Parses a frame (no length prefix) through steps 1–4 of the error precedence:
/// size, msgpack structure, envelope shape, version. No tag or schema check.
pub fn parse(frame: &[u8]) -> Result<Envelope<'_>> {
    parse_limited(frame, MAX_FRAME)
}

/// [`parse`] with another size limit: upstream envelopes (docs/upstream.md) may be larger
/// than a LAN frame.
pub fn parse_limited(frame: &[u8], max_frame: usize) -> Result<Envelope<'_>> {
    if frame.len() > max_frame {
        return Err(Error::new(
            Code::Oversize,
            format!("frame of {} bytes, max {max_frame}", frame.len()),
        ));
    }
    msgpack::check_with(frame, msgpack::objects_for(max_frame))?;

    let mut r = Reader::new(frame);
    match r.next_token()? {
        Token::Array(9) => {}
        Token::Array(n) => {
            return Err(envelope_err(format!(
                "envelope array of {n} elements, want 9"
            )))
        }
        t => {
            return Err(envelope_err(format!(
                "envelope is a {}, want an array of 9",
                t.type_name()
            )))
        }
    }
    let mut ints = [0u64; 7];
    for (i, slot) in ints.iter_mut().enumerate() {
        match r.next_token()? {
            Token::UInt(v) => *slot = v,
            t => {
                r.skip_rest_of(&t)?;
                return Err(envelope_err(format!(
                    "element {i} ({}) is a {}, want an unsigned int",
                    NAMES[i],
                    t.type_name()
                )));
            }
        }
    }
    let body_start = r.pos();
    match r.next_token()? {
        Token::Map(n) => {
            for _ in 0..2 * n {
                r.skip_checked()?;
            }
        }
        t => {
            return Err(envelope_err(format!(
                "body is a {}, want a map",
                t.type_name()
            )))
        }
    }
    let body = r.since(body_start);
    let tag_at = r.pos();
    let signed_len = frame.len().saturating_sub(TAG_SUFFIX);
    if tag_at != signed_len || frame[tag_at..tag_at + 2] != [0xc4, TAG_LEN as u8] {
        return Err(envelope_err(
            "tag is not a bin8 of 16 bytes ending the frame",
        ));
    }
    let header = Header {
        ver: ints[0],
        kind: ints[1],
        seq: ints[2],
        id: ints[3],
        prio: ints[4],
        ts: ints[5],
        action: ints[6],
    };
    if header.ver != PROTOCOL_VERSION {
        return Err(Error::new(
            Code::BadVersion,
            format!(
                "version {}, this receiver speaks {PROTOCOL_VERSION}",
                header.ver
            ),
        ));
    }
    Ok(Envelope {
        header,
        body,
        tag: frame[tag_at + 2..].try_into().expect("16 tag bytes"),
        signed: &frame[..signed_len],
    })
}

impl Reader<'_> {
    /// After reading a container header `tok`, skips its content (checked bytes only).
    fn skip_rest_of(&mut self, tok: &Token<'_>) -> Result<()> {
        let n = match *tok {
            Token::Array(n) => n as usize,
            Token::Map(n) => 2 * n as usize,
            _ => 0,
        };
        for _ in 0..n {
            self.skip_checked()?;
        }
        Ok(())
    }
}

/// Writes `[ver, kind, seq, id, prio, ts, action, body,` (everything but the tag).
pub fn encode_unsealed(out: &mut Vec<u8>, h: &Header, body: &Value) {
    out.push(0x99);
    for v in [h.ver, h.kind, h.seq, h.id, h.prio, h.ts, h.action] {
        msgpack::write_uint(out, v);
    }
    msgpack::write_value(out, body);
}

/// The canonical frame for `h` and `body`, sealed with `key`.
pub fn encode(h: &Header, body: &Value, key: &TagKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_unsealed(&mut out, h, body);
    key.seal(&mut out);
    out
}

// ------------------------------------------------------------------ stream framing

/// Cuts the next length-prefixed frame off `buf`: `Ok(None)` when more bytes are
/// needed, `Ok(Some((frame, consumed)))` otherwise; a prefix of 0 or above `MAX_FRAME`
/// is `OVERSIZE` (the stream cannot be re-synchronised).
pub fn next_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>> {
    let Some(prefix) = buf.get(..2) else {
        return Ok(None);
    };
    let n = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(Error::new(
            Code::Oversize,
            format!("length prefix {n}, want 1..={MAX_FRAME}"),
        ));
    }
    Ok(buf.get(2..2 + n).map(|f| (f, 2 + n)))
}

/// Iterates over the complete frames of a byte buffer; [`Splitter::consumed`] says how
/// many bytes they took (keep the rest for the next read).
#[derive(Clone, Debug)]
pub struct Splitter<'a> {
    buf: &'a [u8],
    consumed: usize,
    failed: bool,
}

impl<'a> Splitter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            consumed: 0,
            failed: false,
        }
    }

    /// Bytes of the buffer taken by the frames yielded so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }
}

impl<'a> Iterator for Splitter<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match next_frame(&self.buf[self.consumed..]) {
            Ok(Some((f, n))) => {
                self.consumed += n;
                Some(Ok(f))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Splits `buf` into its complete frames and the number of bytes they took.
pub fn split_frames(buf: &[u8]) -> Result<(Vec<&[u8]>, usize)> {
    let mut s = Splitter::new(buf);
    let frames = s.by_ref().collect::<Result<Vec<_>>>()?;
    Ok((frames, s.consumed()))
}

/// Appends `frame` to `out` with its u16 big-endian length prefix.
pub fn write_prefixed(out: &mut Vec<u8>, frame: &[u8]) -> Result<()> {
    if frame.is_empty() || frame.len() > MAX_FRAME {
        return Err(Error::new(
            Code::Oversize,
            format!("frame of {} bytes", frame.len()),
        ));
    }
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{action, kind};

    fn hb() -> (Header, Value) {
        let h = Header {
            ver: 1,
            kind: u64::from(kind::REQUEST),
            seq: 1,
            id: 7,
            prio: 2,
            ts: 100,
            action: u64::from(action::HEARTBEAT),
        };
        (h, Value::Map(vec![]))
    }

    #[test]
    fn encode_then_parse() {
        let key = TagKey::new(&[1; 32]);
        let (h, body) = hb();
        let frame = encode(&h, &body, &key);
        let env = parse(&frame).unwrap();
        assert_eq!(env.header, h);
        assert_eq!(env.body, &[0x80]);
        key.verify(env.signed, env.tag).unwrap();
    }

    #[test]
    fn envelope_shape_is_checked() {
        let k = TagKey::new(&[1; 32]);
        let (mut h, b) = hb();
        let mut f = Vec::new();
        encode_unsealed(&mut f, &h, &b);
        f.extend_from_slice(&[0xc5, 0, 16]);
        f.extend_from_slice(&[0; 16]);
        assert_eq!(parse(&f).unwrap_err().code, Code::BadEnvelope);
        h.ver = 2;
        assert_eq!(
            parse(&encode(&h, &b, &k)).unwrap_err().code,
            Code::BadVersion
        );
        assert_eq!(parse(&[0x92, 1, 2]).unwrap_err().code, Code::BadEnvelope);
        let mut big = vec![0u8; MAX_FRAME + 1];
        big[0] = 0xc0;
        assert_eq!(parse(&big).unwrap_err().code, Code::Oversize);
    }

    #[test]
    fn splitter_cuts_prefixed_frames() {
        let mut s = Vec::new();
        write_prefixed(&mut s, b"abc").unwrap();
        write_prefixed(&mut s, b"de").unwrap();
        s.extend_from_slice(&[0, 5, 1]);
        let (frames, used) = split_frames(&s).unwrap();
        assert_eq!(frames, vec![&b"abc"[..], &b"de"[..]]);
        assert_eq!(used, 9);
        assert_eq!(split_frames(&[0, 0]).unwrap_err().code, Code::Oversize);
        assert_eq!(
            split_frames(&[0x10, 0x01]).unwrap_err().code,
            Code::Oversize
        );
        assert_eq!(split_frames(&[0x10]).unwrap(), (vec![], 0));
    }
}
