//! The state file's format, generic over what it holds: a header that names the format and its
//! version, the serde-encoded body (bincode) and a CRC-64 over all of it.
//!
//! ```text
//! "EMBERSNP" | format version u32 | ember version (u16 length, bytes) | body length u64 |
//! body (bincode) | CRC-64/ECMA-182 of everything before it (u64)
//! ```

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{SnapshotError, MAX_STATE_LEN};

pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// Bumped whenever the body's shape changes: a snapshot of another version is refused with one line.
pub const FORMAT_VERSION: u32 = 7;
/// CRC-64/ECMA-182, sixteen bytes a step (its 32 KiB of tables: ~4x the bytewise speed; a state
/// file's check was ~30 of a load's ~40 us of decoding).
pub(super) const CRC: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_ECMA_182);

/// Encodes `state` as a state file's bytes.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let body = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a state file's bytes (header, version, checksum, then the body); `path` names the
/// file in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotError> {
    let truncated = || SnapshotError::Truncated(path.to_path_buf());
    let mut r = Reader { bytes, at: 0 };
    if r.take(8).ok_or_else(|| SnapshotError::BadMagic(path.to_path_buf()))? != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    let version = r.u32().ok_or_else(truncated)?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version(path.to_path_buf(), version));
    }
    let vlen = r.u16().ok_or_else(truncated)?;
    r.take(usize::from(vlen)).ok_or_else(truncated)?;
    let len = r.u64().ok_or_else(truncated)?;
    if len > MAX_STATE_LEN {
        return Err(SnapshotError::Decode(path.to_path_buf(), format!("state of {len} bytes is too large")));
    }
    let body = r.take(len as usize).ok_or_else(truncated)?;
    let covered = r.at;
    let crc = r.u64().ok_or_else(truncated)?;
    if CRC.checksum(&bytes[..covered]) != crc {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    if r.at != bytes.len() {
        return Err(SnapshotError::Decode(path.to_path_buf(), "trailing bytes after the checksum".into()));
    }
    let (state, used): (T, usize) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| SnapshotError::Decode(path.to_path_buf(), e.to_string()))?;
    if used != body.len() {
        return Err(SnapshotError::Decode(path.to_path_buf(), "state has trailing bytes".into()));
    }
    Ok(state)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        rip: u64,
        regs: Vec<u32>,
    }

    fn sample() -> Sample {
        Sample { rip: 0x1234, regs: (0..64).collect() }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(&bytes, Path::new("s")).unwrap(), sample());
    }

    #[test]
    fn random_and_mutated_files_are_refused_without_a_panic() {
        let good = encode(&sample()).unwrap();
        let mut rng = crate::sys::TestRng::new(7);
        for _ in 0..20_000 {
            let input = if rng.below(4) == 0 { rng.bytes(256) } else { rng.mutate(&good) };
            if let Ok(s) = decode::<Sample>(&input, Path::new("s")) {
                // Only a change the checksum cannot see could pass: the same state.
                assert_eq!(s, sample());
            }
        }
    }

    #[test]
    fn rejects_bad_files() {
        let good = encode(&sample()).unwrap();
        let p = Path::new("s");
        let e = |b: &[u8]| decode::<Sample>(b, p).unwrap_err().to_string();
        assert!(e(b"").contains("bad magic"));
        assert!(e(b"NOTASNAPSHOT-----").contains("bad magic"));
        let mut v = good.clone();
        v[8] = 9;
        assert!(e(&v).contains("format version 9 is not supported"), "{}", e(&v));
        for cut in [9, 20, good.len() / 2, good.len() - 1] {
            assert!(e(&good[..cut]).contains("truncated"), "cut at {cut}: {}", e(&good[..cut]));
        }
        let mut flipped = good.clone();
        let mid = good.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(e(&flipped).contains("checksum mismatch"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(e(&longer).contains("trailing"));
        // A huge length field is refused before anything is allocated.
        let mut huge = good.clone();
        let at = 8 + 4 + 2 + env!("CARGO_PKG_VERSION").len();
        huge[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(e(&huge).contains("too large"));
    }
}
