//! A fixed-size bitset: per-chunk flags at one bit per chunk.

/// A set of small integers (`0..len`), one bit each.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    words: Vec<u64>,
    len: u32,
}

impl Bitfield {
    /// An empty set over `0..len`.
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
        }
    }

    /// The full set over `0..len`.
    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// The set of `members` over `0..len` (members `>= len` are ignored).
    pub fn from_members(len: u32, members: impl IntoIterator<Item = u32>) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in members {
            if i < len {
                b.set(i);
            }
        }
        b
    }

    /// The size of the universe (`len` of [`Bitfield::new`]).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the universe is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `i` is in the set (false when `i >= len`).
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds `i` (`i < len`).
    pub fn set(&mut self, i: u32) {
        assert!(i < self.len, "bit {i} out of {}", self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Removes `i` (`i < len`).
    pub fn clear(&mut self, i: u32) {
        assert!(i < self.len, "bit {i} out of {}", self.len);
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// How many are in the set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// The members, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let bit = word.trailing_zeros();
                word &= word - 1;
                Some(w as u32 * 64 + bit)
            })
        })
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear_count_iter() {
        let mut b = Bitfield::new(130);
        for i in [0, 63, 64, 129] {
            b.set(i);
        }
        assert!(b.get(63) && b.get(64) && !b.get(65) && !b.get(500));
        assert_eq!(b.count(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        b.clear(63);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(Bitfield::full(70).count(), 70);
        assert_eq!(
            Bitfield::from_members(10, [1, 3, 99])
                .iter()
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
    }
}
