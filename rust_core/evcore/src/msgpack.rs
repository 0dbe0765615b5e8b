//! A hardened msgpack reader and a canonical writer.
//!
//! The reader accepts every width of every type the protocol uses (nil, bool, fixint,
//! int8…int64, uint8…uint64, float32/64, str8/16/32, bin8/16/32, array16/32, map16/32)
//! and rejects ext types and the reserved marker `0xc1` (`INVALID_MSGPACK`). It never
//! trusts a declared length: a length beyond the bytes that remain is `TRUNCATED`, and
//! nothing is reserved before the bytes exist. Containers nest at most [`MAX_DEPTH`]
//! deep (`TOO_DEEP`) and hold at most [`MAX_ITEMS`] items (`TOO_MANY_ITEMS`); every str
//! must be UTF-8 (`BAD_UTF8`). A reader has a budget of values ([`MAX_OBJECTS`] for a
//! frame, [`objects_for`]): each container's declared items (a map's keys and values) are
//! charged when its header is read, before any of them is read or built, and a container
//! that does not fit what is left is `TOO_MANY_OBJECTS`. A map never holds the same key
//! twice ([`same_key`]): [`Reader::read_value`] and [`Reader::skip_unique`] refuse a repeat
//! with `DUPLICATE_KEY`; [`Reader::skip_value`] checks the structure only.
//!
//! Two views: [`Reader`] pulls borrowed [`Token`]s (zero-copy, the hot path), and
//! [`Value`] is an owned tree for everything else. The writer emits the canonical
//! (shortest) form, the same bytes Python's `msgpack.packb` writes for ints.

use crate::error::{Code, Error, Result};
pub use crate::schema::{MAX_DEPTH, MAX_FRAME, MAX_ITEMS, MAX_OBJECTS, MAX_UP_OBJECTS};

/// The budget of values of a frame (or bare value) of at most `max_frame` bytes:
/// [`MAX_OBJECTS`] up to `MAX_FRAME`, [`MAX_UP_OBJECTS`] for a larger upstream envelope.
pub fn objects_for(max_frame: usize) -> usize {
    if max_frame > MAX_FRAME {
        MAX_UP_OBJECTS
    } else {
        MAX_OBJECTS
    }
}

/// Whether two map keys are the same key (docs/protocol.md, "Limits"): the same type and
/// equal — ints whatever their width (they are normalised), floats by value whatever their
/// width (so NaN never repeats, and -0.0 is 0.0), str and bin byte for byte, arrays and
/// maps item by item in order.
#[allow(clippy::float_cmp)] // exact equality of values is the rule, not a tolerance
pub fn same_key(a: &Value, b: &Value) -> bool {
    let float = |v: &Value| match v {
        Value::F32(f) => Some(f64::from(*f)),
        Value::F64(f) => Some(*f),
        _ => None,
    };
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_key(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((k1, v1), (k2, v2))| same_key(k1, k2) && same_key(v1, v2))
        }
        _ => match (float(a), float(b)) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a == b,
            _ => false,
        },
    }
}

#[cold]
#[inline(never)]
fn duplicate(at: usize) -> Error {
    Error::new(
        Code::DuplicateKey,
        format!("at byte {at}: a map holds this key twice"),
    )
}

/// One msgpack item as read: scalars with their value, containers with their count.
///
/// Ints are normalised: every non-negative int (of any width) is `UInt`, negative ones
/// are `Int`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Token<'a> {
    Nil,
    Bool(bool),
    UInt(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
}

impl Token<'_> {
    /// The msgpack type name, for error reasons.
    pub fn type_name(&self) -> &'static str {
        match self {
            Token::Nil => "nil",
            Token::Bool(_) => "bool",
            Token::UInt(_) => "uint",
            Token::Int(_) => "negative int",
            Token::F32(_) => "float32",
            Token::F64(_) => "float64",
            Token::Str(_) => "str",
            Token::Bin(_) => "bin",
            Token::Array(_) => "array",
            Token::Map(_) => "map",
        }
    }
}

#[cold]
#[inline(never)]
fn truncated(pos: usize, what: &str) -> Error {
    Error::new(
        Code::Truncated,
        format!("at byte {pos}: {what} runs past the end"),
    )
}

/// A cursor over msgpack bytes that yields [`Token`]s without copying.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Values left in the budget (see [`Reader::enter`]).
    left: usize,
}

impl<'a> Reader<'a> {
    /// A reader with the budget of a frame of `buf`'s size ([`objects_for`]).
    pub fn new(buf: &'a [u8]) -> Self {
        Self::with_budget(buf, objects_for(buf.len()))
    }

    /// A reader whose containers may declare `objects` values in all.
    pub fn with_budget(buf: &'a [u8], objects: usize) -> Self {
        Self {
            buf,
            pos: 0,
            left: objects,
        }
    }

    /// Offset of the next unread byte.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The bytes from `start` to the current position.
    pub fn since(&self, start: usize) -> &'a [u8] {
        &self.buf[start..self.pos]
    }

    #[inline]
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let start = self.pos;
        if self.buf.len() - start < n {
            return Err(truncated(start, what));
        }
        self.pos = start + n;
        Ok(&self.buf[start..start + n])
    }

    #[inline]
    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline]
    fn len_u8(&mut self) -> Result<usize> {
        Ok(self.fixed::<1>("length")?[0] as usize)
    }

    #[inline]
    fn len_u16(&mut self) -> Result<usize> {
        Ok(u16::from_be_bytes(self.fixed("length")?) as usize)
    }

    #[inline]
    fn len_u32(&mut self) -> Result<usize> {
        Ok(u32::from_be_bytes(self.fixed("length")?) as usize)
    }

    #[inline]
    fn str_body(&mut self, len: usize, at: usize) -> Result<Token<'a>> {
        let bytes = self.take(len, "str")?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Token::Str(s)),
            Err(e) => Err(Error::new(
                Code::BadUtf8,
                format!(
                    "at byte {at}: str is not UTF-8 (byte {} of the string)",
                    e.valid_up_to()
                ),
            )),
        }
    }

    #[inline]
    fn int(v: i64) -> Token<'a> {
        if v < 0 {
            Token::Int(v)
        } else {
            Token::UInt(v as u64)
        }
    }

    /// Reads the next token. Lengths are checked against the bytes that remain; container
    /// counts are returned as declared (see [`Reader::enter`]).
    #[inline]
    pub fn next_token(&mut self) -> Result<Token<'a>> {
        let at = self.pos;
        let Some(&m) = self.buf.get(at) else {
            return Err(truncated(at, "value"));
        };
        self.pos += 1;
        Ok(match m {
            0x00..=0x7f => Token::UInt(u64::from(m)),
            0x80..=0x8f => Token::Map(u32::from(m & 0x0f)),
            0x90..=0x9f => Token::Array(u32::from(m & 0x0f)),
            0xa0..=0xbf => return self.str_body((m & 0x1f) as usize, at),
            0xc0 => Token::Nil,
            0xc2 => Token::Bool(false),
            0xc3 => Token::Bool(true),
            0xc4 => {
                let n = self.len_u8()?;
                Token::Bin(self.take(n, "bin")?)
            }
            0xc5 => {
                let n = self.len_u16()?;
                Token::Bin(self.take(n, "bin")?)
            }
            0xc6 => {
                let n = self.len_u32()?;
                Token::Bin(self.take(n, "bin")?)
            }
            0xca => Token::F32(f32::from_be_bytes(self.fixed("float32")?)),
            0xcb => Token::F64(f64::from_be_bytes(self.fixed("float64")?)),
            0xcc => Token::UInt(u64::from(self.fixed::<1>("uint8")?[0])),
            0xcd => Token::UInt(u64::from(u16::from_be_bytes(self.fixed("uint16")?))),
            0xce => Token::UInt(u64::from(u32::from_be_bytes(self.fixed("uint32")?))),
            0xcf => Token::UInt(u64::from_be_bytes(self.fixed("uint64")?)),
            0xd0 => Self::int(i64::from(i8::from_be_bytes(self.fixed("int8")?))),
            0xd1 => Self::int(i64::from(i16::from_be_bytes(self.fixed("int16")?))),
            0xd2 => Self::int(i64::from(i32::from_be_bytes(self.fixed("int32")?))),
            0xd3 => Self::int(i64::from_be_bytes(self.fixed("int64")?)),
            0xd9 => {
                let n = self.len_u8()?;
                return self.str_body(n, at);
            }
            0xda => {
                let n = self.len_u16()?;
                return self.str_body(n, at);
            }
            0xdb => {
                let n = self.len_u32()?;
                return self.str_body(n, at);
            }
            0xdc => Token::Array(u16::from_be_bytes(self.fixed("array16 length")?).into()),
            0xdd => Token::Array(u32::from_be_bytes(self.fixed("array32 length")?)),
            0xde => Token::Map(u16::from_be_bytes(self.fixed("map16 length")?).into()),
            0xdf => Token::Map(u32::from_be_bytes(self.fixed("map32 length")?)),
            0xe0..=0xff => Token::Int(i64::from(m as i8)),
            0xc1 => {
                return Err(Error::new(
                    Code::InvalidMsgpack,
                    format!("at byte {at}: reserved marker 0xc1"),
                ))
            }
            // 0xc7..=0xc9 ext8/16/32, 0xd4..=0xd8 fixext
            _ => {
                return Err(Error::new(
                    Code::InvalidMsgpack,
                    format!("at byte {at}: ext type (marker {m:#04x}) not accepted"),
                ))
            }
        })
    }

    /// Checks a container header read at `depth` (1 = outermost) against the limits:
    /// `TOO_DEEP` first, then `TOO_MANY_ITEMS`, then `TOO_MANY_OBJECTS` (its values do not
    /// fit the budget left), and charges its values to the budget. Returns the number of
    /// values it holds (a map's keys and values).
    #[inline]
    pub fn enter(&mut self, at: usize, depth: usize, tok: &Token<'_>) -> Result<usize> {
        let (n, per) = match *tok {
            Token::Array(n) => (n as usize, 1),
            Token::Map(n) => (n as usize, 2),
            _ => return Ok(0),
        };
        if depth > MAX_DEPTH {
            return Err(Error::new(
                Code::TooDeep,
                format!("at byte {at}: container at depth {depth}, max {MAX_DEPTH}"),
            ));
        }
        if n > MAX_ITEMS {
            return Err(Error::new(
                Code::TooManyItems,
                format!(
                    "at byte {at}: {} of {n} items, max {MAX_ITEMS}",
                    tok.type_name()
                ),
            ));
        }
        let values = n * per;
        if values > self.left {
            return Err(Error::new(
                Code::TooManyObjects,
                format!(
                    "at byte {at}: {} of {values} values, {} left of the frame's budget",
                    tok.type_name(),
                    self.left
                ),
            ));
        }
        self.left -= values;
        Ok(values)
    }

    /// Reads and checks one complete value whose container (if any) sits at `depth`
    /// (1 = top level). The first problem in byte order wins.
    pub fn skip_value(&mut self, depth: usize) -> Result<()> {
        let at = self.pos;
        let tok = self.next_token()?;
        let n = self.enter(at, depth, &tok)?;
        for _ in 0..n {
            self.skip_value(depth + 1)?;
        }
        Ok(())
    }

    /// [`Reader::skip_value`] that also refuses a map holding a key twice, at any depth
    /// (`DUPLICATE_KEY`, in byte order with the other errors): the check of values kept
    /// without interpretation (ext, unknown keys). Only the keys of maps are built.
    pub fn skip_unique(&mut self, depth: usize) -> Result<()> {
        let at = self.pos;
        let tok = self.next_token()?;
        self.enter(at, depth, &tok)?;
        self.unique_items(&tok, depth)
    }

    /// The items of the container whose header `tok` (at `depth`) was just entered, as
    /// [`Reader::skip_unique`] checks them.
    pub fn unique_items(&mut self, tok: &Token<'_>, depth: usize) -> Result<()> {
        match *tok {
            Token::Array(n) => {
                for _ in 0..n {
                    self.skip_unique(depth + 1)?;
                }
            }
            Token::Map(n) => {
                let mut keys: Vec<Value> = Vec::new();
                for _ in 0..n {
                    let at = self.pos;
                    let k = self.read_value(depth + 1)?;
                    if keys.iter().any(|p| same_key(p, &k)) {
                        return Err(duplicate(at));
                    }
                    keys.push(k);
                    self.skip_unique(depth + 1)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Skips one value of bytes already checked by [`Reader::skip_value`]: lengths only,
    /// no UTF-8 or limit checks (they passed). Still bounds-checked, never panics.
    pub(crate) fn skip_checked(&mut self) -> Result<()> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let at = self.pos;
            let Some(&m) = self.buf.get(at) else {
                return Err(truncated(at, "value"));
            };
            self.pos += 1;
            let skip = match m {
                0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => 0,
                0x80..=0x8f => {
                    pending += 2 * (m & 0x0f) as usize;
                    0
                }
                0x90..=0x9f => {
                    pending += (m & 0x0f) as usize;
                    0
                }
                0xa0..=0xbf => (m & 0x1f) as usize,
                0xc4 | 0xd9 => self.len_u8()?,
                0xc5 | 0xda => self.len_u16()?,
                0xc6 | 0xdb => self.len_u32()?,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xca | 0xce | 0xd2 => 4,
                0xcb | 0xcf | 0xd3 => 8,
                0xdc => {
                    pending += self.len_u16()?;
                    0
                }
                0xdd => {
                    pending += self.len_u32()?;
                    0
                }
                0xde => {
                    pending += 2 * self.len_u16()?;
                    0
                }
                0xdf => {
                    pending += 2 * self.len_u32()?;
                    0
                }
                _ => {
                    self.pos = at;
                    return self.next_token().map(|_| ());
                }
            };
            self.take(skip, "value")?;
        }
        Ok(())
    }

    /// Reads one complete value into an owned [`Value`], container at `depth`; a map
    /// holding a key twice is `DUPLICATE_KEY`.
    pub fn read_value(&mut self, depth: usize) -> Result<Value> {
        let at = self.pos;
        let tok = self.next_token()?;
        let n = self.enter(at, depth, &tok)?;
        Ok(match tok {
            Token::Nil => Value::Nil,
            Token::Bool(b) => Value::Bool(b),
            Token::UInt(v) => Value::UInt(v),
            Token::Int(v) => Value::Int(v),
            Token::F32(v) => Value::F32(v),
            Token::F64(v) => Value::F64(v),
            Token::Str(s) => Value::Str(s.to_owned()),
            Token::Bin(b) => Value::Bin(b.to_vec()),
            Token::Array(_) => {
                // Each item takes at least one byte: never reserve more than remains.
                let mut items = Vec::with_capacity(n.min(self.buf.len() - self.pos));
                for _ in 0..n {
                    items.push(self.read_value(depth + 1)?);
                }
                Value::Array(items)
            }
            Token::Map(_) => {
                let mut pairs = Vec::with_capacity((n / 2).min((self.buf.len() - self.pos) / 2));
                for _ in 0..n / 2 {
                    let key_at = self.pos;
                    let k = self.read_value(depth + 1)?;
                    if pairs.iter().any(|(p, _)| same_key(p, &k)) {
                        return Err(duplicate(key_at));
                    }
                    let v = self.read_value(depth + 1)?;
                    pairs.push((k, v));
                }
                Value::Map(pairs)
            }
        })
    }
}

/// Checks that `buf` holds exactly one well-formed msgpack value (structure and limits,
/// the budget of [`objects_for`] its size; repeated keys are not looked for).
pub fn check(buf: &[u8]) -> Result<()> {
    check_with(buf, objects_for(buf.len()))
}

/// [`check`] with a budget of `objects` values.
pub fn check_with(buf: &[u8], objects: usize) -> Result<()> {
    let mut r = Reader::with_budget(buf, objects);
    r.skip_value(1)?;
    trailing(&r, buf)
}

fn trailing(r: &Reader<'_>, buf: &[u8]) -> Result<()> {
    if r.pos() == buf.len() {
        Ok(())
    } else {
        Err(Error::new(
            Code::TrailingBytes,
            format!(
                "{} bytes after the value ending at byte {}",
                buf.len() - r.pos(),
                r.pos()
            ),
        ))
    }
}

/// Decodes exactly one msgpack value (trailing bytes are an error), with the budget of
/// [`objects_for`] its size; a map holding a key twice is `DUPLICATE_KEY`.
pub fn decode(buf: &[u8]) -> Result<Value> {
    decode_with(buf, objects_for(buf.len()))
}

/// [`decode`] with a budget of `objects` values (a frame's body: the frame's budget).
pub fn decode_with(buf: &[u8], objects: usize) -> Result<Value> {
    let mut r = Reader::with_budget(buf, objects);
    let v = r.read_value(1)?;
    trailing(&r, buf)?;
    Ok(v)
}

/// An owned msgpack value. Ints are normalised like [`Token`]: `UInt` for every value
/// ≥ 0, `Int` for negative ones. Floats keep their wire width; maps keep their order.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    UInt(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// An int value, normalised (`UInt` when ≥ 0).
    pub fn int(v: i64) -> Self {
        if v < 0 {
            Value::Int(v)
        } else {
            Value::UInt(v as u64)
        }
    }

    /// The canonical encoding of this value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(&mut out, self);
        out
    }

    /// The value of an unsigned-int map key, if this is a map holding it.
    pub fn get(&self, key: u64) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| *k == Value::UInt(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::UInt(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bin(v.to_vec())
    }
}

// ------------------------------------------------------------------ writer

/// Writes `nil`.
pub fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

/// Writes a bool.
pub fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { 0xc3 } else { 0xc2 });
}

/// Writes a non-negative int in its shortest form.
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= 0xffff {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Writes an int in its shortest form (non-negative values as unsigned, like Python).
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as u8);
    } else if v >= i64::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Writes a float: float32 when the value survives the round trip through f32 bit for
/// bit, float64 otherwise.
pub fn write_float(out: &mut Vec<u8>, v: f64) {
    let narrow = v as f32;
    if f64::from(narrow).to_bits() == v.to_bits() {
        out.push(0xca);
        out.extend_from_slice(&narrow.to_be_bytes());
    } else {
        out.push(0xcb);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn write_len(out: &mut Vec<u8>, len: usize, m8: u8, m16: u8, m32: u8) {
    if len <= 0xff && m8 != 0 {
        out.extend_from_slice(&[m8, len as u8]);
    } else if len <= 0xffff {
        out.push(m16);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Writes a str with its shortest header.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.len() < 32 {
        out.push(0xa0 | s.len() as u8);
    } else {
        write_len(out, s.len(), 0xd9, 0xda, 0xdb);
    }
    out.extend_from_slice(s.as_bytes());
}

/// Writes a bin with its shortest header.
pub fn write_bin(out: &mut Vec<u8>, b: &[u8]) {
    write_len(out, b.len(), 0xc4, 0xc5, 0xc6);
    out.extend_from_slice(b);
}

/// Writes an array header for `len` items.
pub fn write_array_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x90 | len as u8);
    } else {
        write_len(out, len, 0, 0xdc, 0xdd);
    }
}

/// Writes a map header for `len` pairs.
pub fn write_map_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x80 | len as u8);
    } else {
        write_len(out, len, 0, 0xde, 0xdf);
    }
}

/// Writes a value in canonical form; maps in their given order.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Nil => write_nil(out),
        Value::Bool(b) => write_bool(out, *b),
        Value::UInt(u) => write_uint(out, *u),
        Value::Int(i) => write_int(out, *i),
        Value::F32(f) => write_float(out, f64::from(*f)),
        Value::F64(f) => write_float(out, *f),
        Value::Str(s) => write_str(out, s),
        Value::Bin(b) => write_bin(out, b),
        Value::Array(items) => {
            write_array_len(out, items.len());
            for item in items {
                write_value(out, item);
            }
        }
        Value::Map(pairs) => {
            write_map_len(out, pairs.len());
            for (k, v) in pairs {
                write_value(out, k);
                write_value(out, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value) -> Vec<u8> {
        v.to_bytes()
    }

    fn code(buf: &[u8]) -> Code {
        decode(buf).unwrap_err().code
    }

    #[test]
    fn ints_take_the_shortest_form() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (255, &[0xcc, 0xff]),
            (256, &[0xcd, 0x01, 0x00]),
            (65536, &[0xce, 0, 1, 0, 0]),
            (-1, &[0xff]),
            (-32, &[0xe0]),
            (-33, &[0xd0, 0xdf]),
            (-128, &[0xd0, 0x80]),
            (-129, &[0xd1, 0xff, 0x7f]),
            (-32769, &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
            (i64::MIN, &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (v, bytes) in cases {
            assert_eq!(enc(&Value::int(*v)), *bytes, "{v}");
            assert_eq!(decode(bytes).unwrap(), Value::int(*v));
        }
        assert_eq!(
            enc(&Value::UInt(u64::MAX)),
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(enc(&Value::UInt(1 << 32)), [0xcf, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn every_int_width_decodes() {
        assert_eq!(decode(&[0xd0, 0x05]).unwrap(), Value::UInt(5));
        assert_eq!(decode(&[0xd1, 0xff, 0xfe]).unwrap(), Value::Int(-2));
        assert_eq!(
            decode(&[0xd3, 0, 0, 0, 0, 0, 0, 0, 7]).unwrap(),
            Value::UInt(7)
        );
        assert_eq!(
            decode(&[0xcf, 0, 0, 0, 0, 0, 0, 0, 7]).unwrap(),
            Value::UInt(7)
        );
        assert_eq!(decode(&[0xce, 0, 0, 0, 9]).unwrap(), Value::UInt(9));
    }

    #[test]
    fn floats_narrow_only_when_exact() {
        assert_eq!(enc(&Value::F64(1.5)), [0xca, 0x3f, 0xc0, 0, 0]);
        assert_eq!(enc(&Value::F64(0.1))[0], 0xcb);
        assert_eq!(decode(&[0xca, 0x3f, 0xc0, 0, 0]).unwrap(), Value::F32(1.5));
        assert_eq!(decode(&enc(&Value::F64(0.1))).unwrap(), Value::F64(0.1));
    }

    #[test]
    fn strings_bins_and_containers_take_short_headers() {
        assert_eq!(enc(&Value::from("abc")), b"\xa3abc");
        let s31 = "x".repeat(31);
        assert_eq!(enc(&Value::Str(s31))[0], 0xbf);
        let s32 = "x".repeat(32);
        assert_eq!(enc(&Value::Str(s32))[..2], [0xd9, 32]);
        assert_eq!(enc(&Value::Str("x".repeat(256)))[..3], [0xda, 1, 0]);
        assert_eq!(enc(&Value::Bin(vec![1; 3])), [0xc4, 3, 1, 1, 1]);
        assert_eq!(enc(&Value::Bin(vec![0; 256]))[..3], [0xc5, 1, 0]);
        assert_eq!(enc(&Value::Array(vec![Value::Nil; 16]))[..3], [0xdc, 0, 16]);
        let m: Vec<_> = (0..16).map(|i| (Value::UInt(i), Value::Nil)).collect();
        assert_eq!(enc(&Value::Map(m))[..3], [0xde, 0, 16]);
    }

    #[test]
    fn wide_headers_decode() {
        assert_eq!(decode(&[0xda, 0, 1, b'a']).unwrap(), Value::from("a"));
        assert_eq!(decode(&[0xdb, 0, 0, 0, 1, b'a']).unwrap(), Value::from("a"));
        assert_eq!(decode(&[0xc6, 0, 0, 0, 1, 9]).unwrap(), Value::Bin(vec![9]));
        assert_eq!(
            decode(&[0xdd, 0, 0, 0, 1, 0xc0]).unwrap(),
            Value::Array(vec![Value::Nil])
        );
        assert_eq!(
            decode(&[0xdf, 0, 0, 0, 1, 1, 2]).unwrap(),
            Value::Map(vec![(Value::UInt(1), Value::UInt(2))])
        );
    }

    #[test]
    fn malformed_input_is_typed() {
        assert_eq!(code(&[]), Code::Truncated);
        assert_eq!(code(&[0xc1]), Code::InvalidMsgpack);
        assert_eq!(code(&[0xd4, 1, 2]), Code::InvalidMsgpack);
        assert_eq!(code(&[0xc7, 1, 1, 0]), Code::InvalidMsgpack);
        assert_eq!(code(&[0xdb, 0xff, 0xff, 0xff, 0xff]), Code::Truncated);
        assert_eq!(code(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0]), Code::Truncated);
        assert_eq!(code(&[0xdd, 0xff, 0xff, 0xff, 0xff]), Code::TooManyItems);
        assert_eq!(code(&[0xdc, 0x00, 0x05, 0xc0]), Code::Truncated);
        assert_eq!(code(&[0xa2, 0xff, 0xfe]), Code::BadUtf8);
        assert_eq!(code(&[0xc0, 0xc0]), Code::TrailingBytes);
        let mut deep = vec![0x91; 8];
        deep.push(0xc0);
        assert!(decode(&deep).is_ok());
        let mut deeper = vec![0x91; 9];
        deeper.push(0xc0);
        assert_eq!(code(&deeper), Code::TooDeep);
        let mut many = vec![0xdc, 0x01, 0x00];
        many.extend(std::iter::repeat_n(0xc0, 256));
        assert!(decode(&many).is_ok());
        let mut over = vec![0xdc, 0x01, 0x01];
        over.extend(std::iter::repeat_n(0xc0, 257));
        assert_eq!(code(&over), Code::TooManyItems);
    }

    #[test]
    fn the_budget_counts_declared_values_before_reading_them() {
        // [[nil × 255], [nil × 255]]: 2 + 510 = 512 values, the budget
        let mut ok = vec![0x92];
        for _ in 0..2 {
            ok.extend([0xdc, 0x00, 0xff]);
            ok.extend(std::iter::repeat_n(0xc0, 255));
        }
        assert!(decode(&ok).is_ok());
        // one more declared value: refused at that header, though its items are missing
        let mut over = ok[..ok.len() - 258].to_vec(); // without the second array
        over.extend([0xdc, 0x01, 0x00]);
        assert_eq!(code(&over), Code::TooManyObjects);
        assert_eq!(
            check(&over).unwrap_err().code,
            Code::TooManyObjects,
            "the structure pass too"
        );
        // a map's entry is two values: 256 entries are 512, plus the outer array's one
        let mut map = vec![0x91, 0xde, 0x01, 0x00];
        map.extend(std::iter::repeat_n(0xc0, 512));
        assert_eq!(code(&map), Code::TooManyObjects);
        assert!(Reader::with_budget(&map, 513).skip_value(1).is_ok());
        // a larger value (an upstream envelope) has the upstream budget
        assert_eq!(objects_for(MAX_FRAME), MAX_OBJECTS);
        assert_eq!(objects_for(MAX_FRAME + 1), MAX_UP_OBJECTS);
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for bad in [
            &[0x82, 0x01, 0x02, 0x01, 0x03][..],               // {1: 2, 1: 3}
            &[0x82, 0x05, 0xc0, 0xd0, 0x05, 0xc0],             // 5 in two widths
            &[0x82, 0x91, 0x01, 0xc0, 0x91, 0x01, 0xc0],       // [1] twice
            &[0x91, 0x81, 0xa1, b'k', 0x82, 0xc0, 1, 0xc0, 2], // nil twice, deep
        ] {
            assert_eq!(code(bad), Code::DuplicateKey, "{bad:02x?}");
            let mut r = Reader::new(bad);
            assert_eq!(r.skip_unique(1).unwrap_err().code, Code::DuplicateKey);
            assert!(
                check(bad).is_ok(),
                "the structure pass does not look for repeats"
            );
        }
        let mut floats = vec![0x82, 0xca];
        floats.extend(1.5f32.to_be_bytes());
        floats.extend([0xc0, 0xcb]);
        floats.extend(1.5f64.to_be_bytes());
        floats.push(0xc0);
        assert_eq!(code(&floats), Code::DuplicateKey);
        // different types are different keys; NaN never repeats
        let kinds = [
            0x84, 0x01, 0xc0, 0xc3, 0xc0, 0xca, 0x3f, 0x80, 0, 0, 0xc0, 0xa1, b'1', 0xc0,
        ];
        assert!(decode(&kinds).is_ok());
        let nan = Value::F64(f64::NAN);
        assert!(!same_key(&nan, &nan));
        assert!(same_key(&Value::F32(-0.0), &Value::F64(0.0)));
        assert!(!same_key(&Value::UInt(1), &Value::Bool(true)));
    }

    #[test]
    fn first_problem_in_byte_order_wins() {
        // array of [bad utf8, 0xc1]: the utf8 error comes first
        assert_eq!(code(&[0x92, 0xa1, 0xff, 0xc1]), Code::BadUtf8);
        assert_eq!(code(&[0x92, 0xc1, 0xa1, 0xff]), Code::InvalidMsgpack);
    }
}
