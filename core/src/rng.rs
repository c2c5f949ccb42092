//! Seeded randomness: correlation ids, reply routing keys and jitter.
//!
//! The Engine never draws OS randomness. Runtimes seed it from OS entropy; tests use fixed
//! seeds, which makes every id and every jittered delay reproducible.

/// A small, fast, seedable generator (xoshiro256++ seeded through SplitMix64).
///
/// Not cryptographic: ids it makes are unique in practice (122 random bits per uuid), not
/// secret.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A float uniformly drawn from `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A random version-4 UUID in its hyphenated lowercase form, as Nameko writes
    /// correlation ids and reply routing keys.
    pub fn uuid4(&mut self) -> String {
        let bits = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
        let mut out = String::with_capacity(36);
        push_uuid4(&mut out, bits);
        out
    }
}

/// Appends `bits` (big-endian) as a hyphenated lowercase version-4 uuid, setting the version
/// and variant bits. No `fmt` machinery: this runs once per RPC call and per call id.
pub(crate) fn push_uuid4(out: &mut String, bits: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = bits.to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let mut a = Rng::from_seed(7);
        let mut b = Rng::from_seed(7);
        let mut c = Rng::from_seed(8);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn uuid4_has_the_canonical_shape() {
        let mut rng = Rng::from_seed(1);
        let id = rng.uuid4();
        assert_eq!(id.len(), 36);
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(id, rng.uuid4());
    }

    #[test]
    fn uuid_formatting_matches_the_canonical_form() {
        let mut out = String::new();
        push_uuid4(&mut out, 0x123e4567_e89b_42d3_a456_426614174000);
        assert_eq!(out, "123e4567-e89b-42d3-a456-426614174000");
    }

    #[test]
    fn floats_stay_in_unit_interval() {
        let mut rng = Rng::from_seed(3);
        for _ in 0..10_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
