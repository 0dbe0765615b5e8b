//! The shapes of the generated schema tables (`schema.rs`).

/// Wire type of a body field, as the schema declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Uint,
    Int,
    Float,
    Bool,
    Str,
    Bin,
    /// Encrypted personal data: a bin on the wire (AES-128-CTR, see docs/protocol.md).
    Secret,
    List,
    Struct,
    Any,
}

/// A field named by a message or a struct, and whether it must be present.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub key: u16,
    pub required: bool,
}

/// One entry of the field dictionary.
#[derive(Debug)]
pub struct FieldDef {
    pub key: u16,
    pub name: &'static str,
    pub ty: Ty,
    /// Element type of a list (`Struct` for a list of structs); `Any` otherwise.
    pub elem: Ty,
    /// Integer bounds (for `Uint`/`Int` fields and list elements).
    pub imin: i64,
    pub imax: u64,
    /// Float bounds (for `Float` fields and list elements).
    pub fmin: f64,
    pub fmax: f64,
    /// Maximum bytes of a str/bin/secret, maximum items of a list.
    pub max_len: u32,
    /// Maximum bytes of each str/bin element of a list.
    pub item_len: u32,
    /// Members of a struct (or of each struct of a list).
    pub members: &'static [Member],
}

/// One message of the catalogue.
#[derive(Debug)]
pub struct MessageDef {
    pub code: u16,
    pub name: &'static str,
    /// `kind::REQUEST` or `kind::EVENT`.
    pub kind: u8,
    pub origin: &'static str,
    pub priority: u8,
    pub timeout_ms: u32,
    pub durable: bool,
    pub fields: &'static [Member],
    pub response: &'static [Member],
    pub usecases: &'static [&'static str],
}
