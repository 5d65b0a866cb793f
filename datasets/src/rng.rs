//! A small deterministic random generator (SplitMix64), so that shuffles are identical on every platform and
//! every version of tramontane, independent of external crates.

/// SplitMix64: fast, well mixed, and fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Mixes several values into one seed (order matters).
pub fn mix(values: &[u64]) -> u64 {
    let mut r = Rng::new(0x5EED_0F7A_A0B7_A11E);
    let mut acc = r.next_u64();
    for &v in values {
        r = Rng::new(acc ^ v);
        acc = r.next_u64();
    }
    acc
}

/// A Fisher-Yates permutation of `0..n` determined by `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_deterministic_bijection() {
        let a = permutation(1000, 7);
        assert_eq!(a, permutation(1000, 7));
        assert_ne!(a, permutation(1000, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        // Pinned values: shuffles must never change between versions (resume depends on it).
        assert_eq!(&permutation(10, 42), &[0, 9, 5, 8, 6, 4, 7, 2, 1, 3]);
    }
}
