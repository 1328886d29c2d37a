//! Encryption at rest: the master key, keyed chunk ids and the segmented seal of stored objects.
//!
//! An encrypted repository has one **master key** of 64 random bytes, made by `init` and never changed:
//! the first 32 bytes key the AEAD (XChaCha20-Poly1305) that seals every stored object
//! ([`crate::store::sealed`]), the last 32 key BLAKE3 for chunk ids ([`ChunkHasher`]), so that a digest in
//! a manifest, an index or a pack trailer says nothing about the chunk's content (with plain BLAKE3 anyone
//! could test whether a repository holds a known block). The master key is stored only sealed under
//! passphrases, in `keys/` ([`crate::keys`]). The two halves are independent: knowing chunk ids gives nothing
//! about the AEAD key and the reverse.
//!
//! ## Sealed objects
//! ```text
//! 0     header (32): magic "BFLWSEAL" | version u32 (1) | segment u32 | nonce prefix [16]
//! 32    segment 0: min(segment, rest) bytes of ciphertext | tag [16]
//!       segment 1 …
//! ```
//! The plaintext is cut into segments of `segment` bytes (the config's, 64 KiB by default), the last one
//! shorter and possibly empty (an empty object is one empty segment: a sealed object is never just a
//! header, so cutting segments off is always detected). Segment `i` is sealed with the nonce `prefix ‖ i`
//! (u64, little-endian): the prefix is 128 random bits per object, so nonces never repeat under one key
//! (XChaCha's 192-bit nonce leaves room for both). The associated data of each segment is the header, one
//! byte that is 1 for the last segment and 0 for the others, and the object's *name* (the last part of its
//! key, `3fa2….pack`):
//! - the header is authenticated, so its segment size cannot be altered to shift boundaries;
//! - the last-segment flag makes a truncation at a segment boundary fail (the new last segment was sealed
//!   as "not last"), and an extension too;
//! - the name binds the content to the object: two packs, two manifests or a pack and an index cannot be
//!   swapped without failing. The name, not the whole key, because gc moves damaged packs to `quarantine/`
//!   and `forget` moves manifests to `gc/forgotten/` without changing their names, and a move must not
//!   need the object re-sealed.
//!
//! Since the sealed length fixes the plaintext length ([`plain_len`]), an object's size is known without
//! reading it, and a positioned read decrypts only the segments it covers.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Digest;

/// Length of the master key: 32 bytes for the AEAD, 32 for keyed chunk ids.
pub const MASTER_KEY_LEN: usize = 64;
/// The AEAD's tag, appended to every sealed segment.
pub const TAG_LEN: usize = 16;
/// Random bytes per object that start every segment's nonce.
pub const NONCE_PREFIX_LEN: usize = 16;
/// Size of a sealed object's header.
pub const SEALED_HEADER_LEN: usize = 32;
/// Plaintext bytes per segment of new repositories: a restore's positioned read of a chunk (128 KiB by
/// default) decrypts at most one segment it does not need at each end, and the tags cost 0.02%.
pub const DEFAULT_SEGMENT: u32 = 64 * 1024;
/// Bounds of the segment size a config may name: a segment is decrypted whole, so its size bounds the
/// allocation a read makes from a damaged header's value.
pub const MIN_SEGMENT: u32 = 4 * 1024;
pub const MAX_SEGMENT: u32 = 16 * 1024 * 1024;
/// The only cipher and key derivation so far; the config names them so that others can come.
pub const CIPHER: &str = "xchacha20-poly1305";
pub const KDF: &str = "argon2id";

const SEALED_MAGIC: &[u8; 8] = b"BFLWSEAL";
const SEALED_VERSION: u32 = 1;
const _: () = assert!(8 + 4 + 4 + NONCE_PREFIX_LEN == SEALED_HEADER_LEN);

/// The `encryption` object of an encrypted repository's `config`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Always [`CIPHER`].
    pub cipher: String,
    /// Always [`KDF`] (how the key files wrap the master key).
    pub kdf: String,
    /// Plaintext bytes per sealed segment.
    pub segment: u32,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            cipher: CIPHER.to_owned(),
            kdf: KDF.to_owned(),
            segment: DEFAULT_SEGMENT,
        }
    }
}

impl EncryptionConfig {
    /// What is wrong with it, if anything (for the config's reader, which names the file).
    pub fn problem(&self) -> Option<String> {
        if self.cipher != CIPHER {
            return Some(format!(
                "encryption.cipher is {:?}; this build knows {CIPHER:?}",
                self.cipher
            ));
        }
        if self.kdf != KDF {
            return Some(format!(
                "encryption.kdf is {:?}; this build knows {KDF:?}",
                self.kdf
            ));
        }
        if !(MIN_SEGMENT..=MAX_SEGMENT).contains(&self.segment) {
            return Some(format!(
                "encryption.segment is {}; expected {MIN_SEGMENT}..={MAX_SEGMENT}",
                self.segment
            ));
        }
        None
    }
}

/// The repository's secret: zeroed when dropped, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl MasterKey {
    pub fn generate() -> MasterKey {
        MasterKey(rand::random())
    }

    pub(crate) fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> MasterKey {
        MasterKey(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }

    pub(crate) fn aead(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0[..32]))
    }

    pub fn hasher(&self) -> ChunkHasher {
        let mut key = [0u8; 32];
        key.copy_from_slice(&self.0[32..]);
        ChunkHasher { key: Some(key) }
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// How a repository names chunks: plain BLAKE3, or BLAKE3 keyed with the master key's second half in an
/// encrypted repository. The all-zero digest still means "a chunk of zeros" either way (a keyed hash is as
/// unlikely to be all zeros as a plain one, and writers reject it).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChunkHasher {
    key: Option<[u8; 32]>,
}

impl ChunkHasher {
    /// The hasher of an unencrypted repository.
    pub fn plain() -> ChunkHasher {
        ChunkHasher { key: None }
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    pub fn digest(&self, data: &[u8]) -> Digest {
        match &self.key {
            None => Digest(*blake3::hash(data).as_bytes()),
            Some(k) => Digest(*blake3::keyed_hash(k, data).as_bytes()),
        }
    }

    /// An incremental hasher, for data that arrives in pieces.
    pub fn hasher(&self) -> blake3::Hasher {
        match &self.key {
            None => blake3::Hasher::new(),
            Some(k) => blake3::Hasher::new_keyed(k),
        }
    }
}

impl Drop for ChunkHasher {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_keyed() {
            "ChunkHasher(keyed)"
        } else {
            "ChunkHasher(plain)"
        })
    }
}

/// A sealed object's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SealedHeader {
    pub segment: u32,
    pub prefix: [u8; NONCE_PREFIX_LEN],
}

impl SealedHeader {
    pub fn new(segment: u32) -> SealedHeader {
        SealedHeader {
            segment,
            prefix: rand::random(),
        }
    }

    pub fn encode(&self) -> [u8; SEALED_HEADER_LEN] {
        let mut h = [0u8; SEALED_HEADER_LEN];
        h[..8].copy_from_slice(SEALED_MAGIC);
        h[8..12].copy_from_slice(&SEALED_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.segment.to_le_bytes());
        h[16..].copy_from_slice(&self.prefix);
        h
    }

    /// Parses a header, or says what is wrong with it.
    pub fn decode(h: &[u8]) -> Result<SealedHeader, String> {
        if h.len() < SEALED_HEADER_LEN {
            return Err(format!(
                "{} bytes, shorter than the {SEALED_HEADER_LEN}-byte header of a sealed object",
                h.len()
            ));
        }
        if &h[..8] != SEALED_MAGIC {
            return Err(
                "no sealed-object magic (BFLWSEAL): not written by an encrypted repository"
                    .to_owned(),
            );
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != SEALED_VERSION {
            return Err(format!(
                "sealed-object version {version}; this build reads {SEALED_VERSION}"
            ));
        }
        let segment = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        if !(MIN_SEGMENT..=MAX_SEGMENT).contains(&segment) {
            return Err(format!("segment size {segment} is out of range"));
        }
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        prefix.copy_from_slice(&h[16..SEALED_HEADER_LEN]);
        Ok(SealedHeader { segment, prefix })
    }

    fn nonce(&self, index: u64) -> XNonce {
        let mut n = [0u8; 24];
        n[..NONCE_PREFIX_LEN].copy_from_slice(&self.prefix);
        n[NONCE_PREFIX_LEN..].copy_from_slice(&index.to_le_bytes());
        *XNonce::from_slice(&n)
    }

    fn aad(&self, last: bool, name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(SEALED_HEADER_LEN + 1 + name.len());
        aad.extend_from_slice(&self.encode());
        aad.push(u8::from(last));
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// Seals segment `index` in place (appending its tag).
    pub fn seal(
        &self,
        cipher: &XChaCha20Poly1305,
        name: &str,
        index: u64,
        last: bool,
        buf: &mut Vec<u8>,
    ) {
        let tag = cipher
            .encrypt_in_place_detached(&self.nonce(index), &self.aad(last, name), buf)
            .expect("a segment is far below XChaCha20's length limit");
        buf.extend_from_slice(&tag);
    }

    /// Opens segment `index` in place (dropping its tag); false when it fails authentication.
    pub fn open(
        &self,
        cipher: &XChaCha20Poly1305,
        name: &str,
        index: u64,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> bool {
        let Some(body_len) = buf.len().checked_sub(TAG_LEN) else {
            return false;
        };
        let tag = Tag::clone_from_slice(&buf[body_len..]);
        buf.truncate(body_len);
        cipher
            .decrypt_in_place_detached(&self.nonce(index), &self.aad(last, name), buf, &tag)
            .is_ok()
    }

    /// Where segment `index` lies in the sealed object, and whether it is the last, given the plaintext
    /// length: (offset, sealed length, last).
    pub fn segment_span(&self, index: u64, plain_len: u64) -> (u64, usize, bool) {
        let seg = u64::from(self.segment);
        let count = segment_count(plain_len, self.segment);
        let last = index + 1 == count;
        let plain = if last { plain_len - index * seg } else { seg };
        let offset = SEALED_HEADER_LEN as u64 + index * (seg + TAG_LEN as u64);
        (offset, plain as usize + TAG_LEN, last)
    }
}

/// Segments of a plaintext of `plain_len` bytes (at least one: an empty object has one empty segment).
pub(crate) fn segment_count(plain_len: u64, segment: u32) -> u64 {
    plain_len.div_ceil(u64::from(segment)).max(1)
}

/// The sealed size of `plain_len` bytes of plaintext.
pub fn sealed_len(plain_len: u64, segment: u32) -> u64 {
    SEALED_HEADER_LEN as u64 + plain_len + segment_count(plain_len, segment) * TAG_LEN as u64
}

/// The plaintext size of a sealed object of `sealed` bytes, or `None` when no plaintext seals to that size
/// (the object is truncated or extended).
pub fn plain_len(sealed: u64, segment: u32) -> Option<u64> {
    let body = sealed.checked_sub(SEALED_HEADER_LEN as u64)?;
    let full = u64::from(segment) + TAG_LEN as u64;
    let (count, rest) = (body / full, body % full);
    let plain = match rest {
        0 if count == 0 => return None,
        0 => count * u64::from(segment),
        r if r < TAG_LEN as u64 => return None,
        r => count * u64::from(segment) + (r - TAG_LEN as u64),
    };
    Some(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_and_impossible_lengths_are_refused() {
        let seg = MIN_SEGMENT;
        for plain in [0, 1, 100, 4095, 4096, 4097, 8192, 3 * 4096 + 7] {
            let sealed = sealed_len(plain, seg);
            assert_eq!(plain_len(sealed, seg), Some(plain), "{plain}");
        }
        assert_eq!(sealed_len(0, seg), 48);
        assert_eq!(plain_len(32, seg), None);
        for r in 1..16 {
            assert_eq!(plain_len(32 + r, seg), None, "{r}");
            assert_eq!(plain_len(32 + 4112 + r, seg), None, "{r}");
        }
    }

    #[test]
    fn keyed_digests_differ_from_plain_and_between_keys() {
        let data = b"a chunk";
        let plain = ChunkHasher::plain().digest(data);
        assert_eq!(plain.0, *blake3::hash(data).as_bytes());
        let a = MasterKey::generate().hasher();
        let b = MasterKey::generate().hasher();
        assert_ne!(a.digest(data), plain);
        assert_ne!(a.digest(data), b.digest(data));
        assert_eq!(a.digest(data), a.clone().digest(data));
        let mut h = a.hasher();
        h.update(b"a ");
        h.update(b"chunk");
        assert_eq!(Digest(*h.finalize().as_bytes()), a.digest(data));
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        let h = SealedHeader::new(DEFAULT_SEGMENT);
        assert_eq!(SealedHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(SealedHeader::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[8] = 9;
        assert!(
            SealedHeader::decode(&bad)
                .unwrap_err()
                .contains("version 9")
        );
        let mut bad = h.encode();
        bad[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert!(
            SealedHeader::decode(&bad)
                .unwrap_err()
                .contains("segment size")
        );
        assert!(
            SealedHeader::decode(&bad[..5])
                .unwrap_err()
                .contains("shorter")
        );
    }

    #[test]
    fn segments_open_only_with_their_key_index_flag_and_name() {
        let key = MasterKey::generate();
        let cipher = key.aead();
        let h = SealedHeader::new(MIN_SEGMENT);
        let mut buf = b"secret".to_vec();
        h.seal(&cipher, "a.pack", 3, true, &mut buf);
        assert_eq!(buf.len(), 6 + TAG_LEN);
        assert!(!buf.windows(6).any(|w| w == b"secret"));
        let attempt = |cipher: &XChaCha20Poly1305, name: &str, index: u64, last: bool| {
            let mut b = buf.clone();
            h.open(cipher, name, index, last, &mut b).then_some(b)
        };
        assert_eq!(attempt(&cipher, "a.pack", 3, true).unwrap(), b"secret");
        assert!(attempt(&cipher, "b.pack", 3, true).is_none());
        assert!(attempt(&cipher, "a.pack", 2, true).is_none());
        assert!(attempt(&cipher, "a.pack", 3, false).is_none());
        assert!(attempt(&MasterKey::generate().aead(), "a.pack", 3, true).is_none());
    }
}
