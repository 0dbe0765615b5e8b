//! `secret` fields: AES-128-CTR with the counter block
//! `seq (8 BE) || field key (4 BE) || block counter (4 BE, from 0)` (docs/protocol.md, B3).

use aes::cipher::{KeyIvInit, StreamCipher};

type Aes128Ctr32 = ctr::Ctr32BE<aes::Aes128>;

/// Encrypts or decrypts (CTR is its own inverse) `data` in place.
pub fn apply(key: &[u8; 16], seq: u64, field: u32, data: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&seq.to_be_bytes());
    iv[8..12].copy_from_slice(&field.to_be_bytes());
    let mut c = Aes128Ctr32::new(key.into(), &iv.into());
    c.apply_keystream(data);
}

/// Encrypts or decrypts `data` into a new buffer.
pub fn aes_ctr(key: &[u8; 16], seq: u64, field: u32, data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    apply(key, seq, field, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctr_round_trips_and_depends_on_the_counter_block() {
        let k = [3u8; 16];
        let plain = b"a personal id token that spans several AES blocks";
        let c = aes_ctr(&k, 5, 16, plain);
        assert_ne!(&c[..], &plain[..]);
        assert_eq!(aes_ctr(&k, 5, 16, &c), plain);
        assert_ne!(aes_ctr(&k, 6, 16, plain), c);
        assert_ne!(aes_ctr(&k, 5, 17, plain), c);
    }

    #[test]
    fn first_block_is_aes_of_the_counter_block() {
        use aes::cipher::{BlockEncrypt, KeyInit};
        let k = [9u8; 16];
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&7u64.to_be_bytes());
        block[8..12].copy_from_slice(&57u32.to_be_bytes());
        let mut b = block.into();
        aes::Aes128::new(&k.into()).encrypt_block(&mut b);
        assert_eq!(aes_ctr(&k, 7, 57, &[0u8; 16]), b.as_slice());
    }
}
