//! Frame tags, the key schedule and the replay window (docs/protocol.md, B10).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Code, Error, Result};
use crate::schema::TAG_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Bytes a tag adds at the end of a frame: `c4 10` and the 16 tag bytes.
pub const TAG_SUFFIX: usize = TAG_LEN + 2;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// `K_hello = HMAC-SHA256(K_dev, "evlink/1 hello")`.
pub fn hello_key(k_dev: &[u8]) -> [u8; 32] {
    hmac(k_dev, &[b"evlink/1 hello"])
}

/// Per-connection keys derived from the two nonces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKeys {
    /// Board → gateway tag key.
    pub k_up: [u8; 32],
    /// Gateway → board tag key.
    pub k_dn: [u8; 32],
    /// Board → gateway AES-128 key for `secret` fields.
    pub e_up: [u8; 16],
    /// Gateway → board AES-128 key.
    pub e_dn: [u8; 16],
}

/// `K_up`, `K_dn`, `E_up`, `E_dn` from `K_dev` and the Hello nonces.
pub fn derive(k_dev: &[u8], nonce_board: &[u8], nonce_gateway: &[u8]) -> SessionKeys {
    let d = |label: &[u8]| hmac(k_dev, &[label, nonce_board, nonce_gateway]);
    let half = |full: [u8; 32]| {
        let mut h = [0u8; 16];
        h.copy_from_slice(&full[..16]);
        h
    };
    SessionKeys {
        k_up: d(b"evlink/1 up"),
        k_dn: d(b"evlink/1 dn"),
        e_up: half(d(b"evlink/1 eu")),
        e_dn: half(d(b"evlink/1 ed")),
    }
}

/// A tag key with its HMAC state precomputed once (cloned per frame, never re-keyed).
#[derive(Clone)]
pub struct TagKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

impl TagKey {
    pub fn new(key: &[u8]) -> Self {
        Self {
            mac: HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length"),
        }
    }

    /// `HMAC-SHA256(K, data)[:16]`.
    #[inline]
    pub fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(data);
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    /// Checks `tag` against the tag of `signed`, in constant time.
    #[inline]
    pub fn verify(&self, signed: &[u8], tag: &[u8]) -> Result<()> {
        if bool::from(self.tag(signed).ct_eq(tag)) {
            Ok(())
        } else {
            Err(Error::new(
                Code::BadTag,
                "tag does not verify under the connection key",
            ))
        }
    }

    /// Appends the tag element (`c4 10` + tag over everything before it) to `frame`.
    pub fn seal(&self, frame: &mut Vec<u8>) {
        let t = self.tag(frame);
        frame.extend_from_slice(&[0xc4, TAG_LEN as u8]);
        frame.extend_from_slice(&t);
    }
}

/// The receiver's replay window: the highest `seq` seen and a bitmap of the 64 below it
/// (bit `i` = `highest - i` seen). Starts with `seq` 0 seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: u64,
    bitmap: u64,
    size: u32,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// The protocol's window: 64 counters.
    pub fn new() -> Self {
        Self::with_size(64)
    }

    /// A narrower window (1‥=64 counters; clamped).
    pub fn with_size(size: u32) -> Self {
        Self {
            highest: 0,
            bitmap: 1,
            size: size.clamp(1, 64),
        }
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether `seq` would be accepted; never changes the window.
    #[inline]
    pub fn check(&self, seq: u64) -> Result<()> {
        if seq > self.highest {
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= u64::from(self.size) {
            return Err(Error::new(
                Code::Replay,
                format!("seq {seq} below the window (highest {})", self.highest),
            ));
        }
        if self.bitmap & (1u64 << back) != 0 {
            return Err(Error::new(Code::Replay, format!("seq {seq} already seen")));
        }
        Ok(())
    }

    /// Marks `seq` as seen (call after [`ReplayWindow::check`] passed).
    #[inline]
    pub fn accept(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.bitmap = if shift >= 64 { 0 } else { self.bitmap << shift };
            self.bitmap |= 1;
            self.highest = seq;
        } else {
            let back = self.highest - seq;
            if back < 64 {
                self.bitmap |= 1u64 << back;
            }
        }
    }

    /// [`check`](ReplayWindow::check) then [`accept`](ReplayWindow::accept).
    pub fn check_and_accept(&mut self, seq: u64) -> Result<()> {
        self.check(seq)?;
        self.accept(seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_the_protocol() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(0).unwrap_err().code, Code::Replay);
        w.check_and_accept(1).unwrap();
        assert_eq!(w.check_and_accept(1).unwrap_err().code, Code::Replay);
        w.check_and_accept(5).unwrap();
        w.check_and_accept(3).unwrap();
        assert!(w.check(3).is_err());
        w.check_and_accept(100).unwrap();
        assert!(w.check(36).is_err()); // 100 - 36 = 64: below the window
        w.check_and_accept(37).unwrap(); // 63 back: inside
        assert!(w.check(37).is_err());
        w.check_and_accept(1000).unwrap();
        assert!(w.check(999).is_ok());
    }

    #[test]
    fn tag_is_truncated_hmac() {
        let k = TagKey::new(b"key");
        let t = k.tag(b"data");
        assert_eq!(t.len(), 16);
        let mut frame = b"data".to_vec();
        k.seal(&mut frame);
        assert_eq!(&frame[4..6], &[0xc4, 0x10]);
        k.verify(b"data", &frame[6..]).unwrap();
        assert_eq!(
            k.verify(b"datb", &frame[6..]).unwrap_err().code,
            Code::BadTag
        );
    }

    #[test]
    fn derived_keys_differ_per_direction() {
        let s = derive(&[7; 32], &[1; 16], &[2; 16]);
        assert_ne!(s.k_up, s.k_dn);
        assert_ne!(s.e_up, s.e_dn);
        assert_ne!(hello_key(&[7; 32]), s.k_up);
    }
}
