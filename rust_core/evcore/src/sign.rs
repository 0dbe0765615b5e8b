//! Ed25519 signature checks (firmware images, signed commands).

use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use crate::error::{Code, Error, Result};

fn bad(reason: &str) -> Error {
    Error::new(Code::BadSignature, reason)
}

fn parse(public: &[u8], signature: &[u8]) -> Result<(VerifyingKey, Signature)> {
    let pk: &[u8; 32] = public
        .try_into()
        .map_err(|_| bad("public key must be 32 bytes"))?;
    let sig = Signature::from_slice(signature).map_err(|_| bad("signature must be 64 bytes"))?;
    let key = VerifyingKey::from_bytes(pk).map_err(|_| bad("public key is not a curve point"))?;
    Ok((key, sig))
}

/// Verifies one signature (RFC 8032; non-canonical `s` rejected).
pub fn verify(public: &[u8], message: &[u8], signature: &[u8]) -> Result<()> {
    let (key, sig) = parse(public, signature)?;
    key.verify(message, &sig)
        .map_err(|_| bad("signature does not verify"))
}

/// Verifies many `(public, message, signature)` items; `true` where an item verifies.
///
/// One batch equation first; if it fails (or an item is malformed), each item is checked
/// alone so the caller learns which ones failed.
pub fn verify_batch<'a, I>(items: I) -> Vec<bool>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8], &'a [u8])>,
{
    let items: Vec<_> = items.into_iter().collect();
    let parsed: Vec<_> = items.iter().map(|(p, _, s)| parse(p, s).ok()).collect();
    if !items.is_empty() && parsed.iter().all(Option::is_some) {
        let msgs: Vec<&[u8]> = items.iter().map(|i| i.1).collect();
        let (keys, sigs): (Vec<_>, Vec<_>) = parsed.iter().flatten().map(|(k, s)| (*k, *s)).unzip();
        if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
            return vec![true; items.len()];
        }
    }
    items
        .iter()
        .zip(&parsed)
        .map(|((_, m, _), p)| p.as_ref().is_some_and(|(k, s)| k.verify(m, s).is_ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 test 2.
    const PK: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    const SIG: &str = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                       085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc8032_vector_verifies() {
        let (pk, sig) = (hex(PK), hex(SIG));
        verify(&pk, &[0x72], &sig).unwrap();
        assert_eq!(
            verify(&pk, &[0x73], &sig).unwrap_err().code,
            Code::BadSignature
        );
        assert!(verify(&pk[..31], &[0x72], &sig).is_err());
    }

    #[test]
    fn batch_reports_each_failure() {
        let (pk, sig) = (hex(PK), hex(SIG));
        let good: (&[u8], &[u8], &[u8]) = (&pk, &[0x72], &sig);
        let bad: (&[u8], &[u8], &[u8]) = (&pk, &[0x74], &sig);
        let short: (&[u8], &[u8], &[u8]) = (&pk[..3], &[0x72], &sig);
        assert_eq!(verify_batch([good, good]), [true, true]);
        assert_eq!(
            verify_batch([good, bad, good, short]),
            [true, false, true, false]
        );
        assert!(verify_batch(std::iter::empty()).is_empty());
    }
}
