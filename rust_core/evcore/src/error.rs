//! The one error type of the crate: a wire error code from the schema's error table,
//! a human-readable reason and, when known, the body key at fault.

use std::fmt;

use crate::schema::err;

/// Error codes of the schema's `[[error]]` table (the discriminant is the wire code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Code {
    Truncated = err::TRUNCATED,
    Oversize = err::OVERSIZE,
    BadEnvelope = err::BAD_ENVELOPE,
    BadType = err::BAD_TYPE,
    TooDeep = err::TOO_DEEP,
    BadTag = err::BAD_TAG,
    Replay = err::REPLAY,
    UnknownAction = err::UNKNOWN_ACTION,
    MissingField = err::MISSING_FIELD,
    OutOfRange = err::OUT_OF_RANGE,
    BadVersion = err::BAD_VERSION,
    BadKind = err::BAD_KIND,
    BadPriority = err::BAD_PRIORITY,
    TrailingBytes = err::TRAILING_BYTES,
    BadUtf8 = err::BAD_UTF8,
    InvalidMsgpack = err::INVALID_MSGPACK,
    TooManyItems = err::TOO_MANY_ITEMS,
    BadSignature = err::BAD_SIGNATURE,
    QueueFull = err::QUEUE_FULL,
    RateLimited = err::RATE_LIMITED,
    UnknownDevice = err::UNKNOWN_DEVICE,
    NotSupported = err::NOT_SUPPORTED,
    Rejected = err::REJECTED,
    Timeout = err::TIMEOUT,
    DuplicateKey = err::DUPLICATE_KEY,
    BadKey = err::BAD_KEY,
    Expired = err::EXPIRED,
    Internal = err::INTERNAL,
    TooManyObjects = err::TOO_MANY_OBJECTS,
}

const ALL: [Code; 29] = [
    Code::Truncated,
    Code::Oversize,
    Code::BadEnvelope,
    Code::BadType,
    Code::TooDeep,
    Code::BadTag,
    Code::Replay,
    Code::UnknownAction,
    Code::MissingField,
    Code::OutOfRange,
    Code::BadVersion,
    Code::BadKind,
    Code::BadPriority,
    Code::TrailingBytes,
    Code::BadUtf8,
    Code::InvalidMsgpack,
    Code::TooManyItems,
    Code::BadSignature,
    Code::QueueFull,
    Code::RateLimited,
    Code::UnknownDevice,
    Code::NotSupported,
    Code::Rejected,
    Code::Timeout,
    Code::DuplicateKey,
    Code::BadKey,
    Code::Expired,
    Code::Internal,
    Code::TooManyObjects,
];

impl Code {
    /// The wire code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The code for a wire number, if the schema knows it.
    pub fn from_code(code: u16) -> Option<Self> {
        ALL.iter().copied().find(|c| c.code() == code)
    }

    /// The code for its schema name (`"BAD_TAG"`).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|c| c.name() == name)
    }

    /// The schema name (`"BAD_TAG"`).
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// The schema's one-line description.
    pub fn text(self) -> &'static str {
        self.entry().2
    }

    fn entry(self) -> &'static (u16, &'static str, &'static str) {
        crate::schema::ERRORS
            .iter()
            .find(|e| e.0 == self.code())
            .expect("every Code is in the schema's error table")
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error: its code, a reason naming the cause, the body key at fault if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub reason: String,
    pub field: Option<u16>,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            field: None,
        }
    }

    pub fn at_field(code: Code, field: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            field: Some(field),
        }
    }

    /// The wire code (`err::*`).
    pub fn wire_code(&self) -> u16 {
        self.code.code()
    }

    /// The error re-attributed to an enclosing body key (nested struct or list item).
    #[must_use]
    pub(crate) fn within(mut self, key: u16, what: &str) -> Self {
        self.reason = format!("{what}: {}", self.reason);
        self.field = Some(key);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.reason)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_matches_the_schema_table() {
        assert_eq!(ALL.len(), crate::schema::ERRORS.len());
        for &(code, name, _) in crate::schema::ERRORS {
            let c = Code::from_code(code).unwrap();
            assert_eq!(c.name(), name);
            assert_eq!(Code::from_name(name), Some(c));
        }
    }

    #[test]
    fn display_names_the_code() {
        let e = Error::at_field(Code::OutOfRange, 7, "too big");
        assert_eq!(e.to_string(), "OUT_OF_RANGE: too big");
        assert_eq!(e.wire_code(), 10);
    }
}
