//! [`DirtySet`]: a compact set of dirty guest pages, one bit per 4 KiB page,
//! kept as `u64` words per memory region.

use crate::{Error, Result, PAGE_SHIFT, PAGE_SIZE};

/// The dirty bits of one guest memory region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBits {
    guest_addr: u64,
    pages: u64,
    words: Vec<u64>,
}

impl RegionBits {
    /// First guest-physical address of the region.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Number of 4 KiB pages in the region.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap: bit `i % 64` of word `i / 64` is page `i` of the region.
    /// Bits past `pages()` are always clear.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The bitmap, writable. Callers must keep bits past `pages()` clear.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// ORs `other` (a bitmap in the same layout, possibly shorter) into this one.
    pub fn or_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= *o;
        }
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }
}

/// A contiguous run of dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub guest_addr: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageRun {
    /// Length of the run in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }
}

/// A set of dirty 4 KiB guest pages: one bit per page, `u64` words per memory
/// region. Marking, testing and merging are word operations; iteration skips
/// clear words and walks set bits with `trailing_zeros`, so walking a sparse
/// set of a large guest costs about one load per 64 pages.
///
/// ```
/// use castor_dirty_tracking::{DirtySet, PageRun};
///
/// // One region of 1 MiB at guest address 0 (256 pages).
/// let mut a = DirtySet::new(&[(0, 1 << 20)]);
/// a.mark(0x3000, 1);            // page 3
/// a.mark(0x4000, 0x2000);       // pages 4 and 5
/// let mut b = DirtySet::new(&[(0, 1 << 20)]);
/// b.mark(0x9_0000, 4096);       // page 0x90
/// a.merge(&b).unwrap();
///
/// assert_eq!(a.count(), 4);
/// assert!(a.contains(0x5fff) && !a.contains(0x6000));
/// assert_eq!(a.iter().collect::<Vec<_>>(), vec![0x3000, 0x4000, 0x5000, 0x9_0000]);
/// assert_eq!(
///     a.runs().collect::<Vec<_>>(),
///     vec![
///         PageRun { guest_addr: 0x3000, pages: 3 },
///         PageRun { guest_addr: 0x9_0000, pages: 1 },
///     ]
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DirtySet {
    regions: Vec<RegionBits>,
}

impl DirtySet {
    /// An empty set over the given regions, each `(guest_addr, bytes)`;
    /// addresses are rounded down and sizes up to whole pages.
    pub fn new(regions: &[(u64, u64)]) -> Self {
        DirtySet {
            regions: regions
                .iter()
                .map(|&(gpa, bytes)| {
                    let pages = bytes.div_ceil(PAGE_SIZE);
                    RegionBits {
                        guest_addr: gpa & !(PAGE_SIZE - 1),
                        pages,
                        words: vec![0; pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    /// The regions, in the order given to [`DirtySet::new`].
    pub fn regions(&self) -> &[RegionBits] {
        &self.regions
    }

    /// The regions, writable.
    pub fn regions_mut(&mut self) -> &mut [RegionBits] {
        &mut self.regions
    }

    /// The `(guest_addr, bytes)` shape of the set.
    pub fn shape(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.guest_addr, r.pages << PAGE_SHIFT))
            .collect()
    }

    fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = gpa.checked_sub(r.guest_addr)?;
            let page = off >> PAGE_SHIFT;
            (page < r.pages).then_some((i, page))
        })
    }

    /// Marks page `page` of region `region`; out-of-range indices are ignored.
    #[inline]
    pub fn mark_page(&mut self, region: usize, page: u64) {
        if let Some(r) = self.regions.get_mut(region) {
            if page < r.pages {
                r.words[(page / 64) as usize] |= 1u64 << (page % 64);
            }
        }
    }

    /// Marks every page that overlaps `[gpa, gpa + len)`. Parts outside every
    /// region are ignored. `len == 0` marks nothing.
    pub fn mark(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for r in &mut self.regions {
            let r_end = r.guest_addr + (r.pages << PAGE_SHIFT);
            let lo = gpa.max(r.guest_addr);
            let hi = end.min(r_end);
            if lo >= hi {
                continue;
            }
            let first = (lo - r.guest_addr) >> PAGE_SHIFT;
            let last = (hi - 1 - r.guest_addr) >> PAGE_SHIFT;
            set_bit_range(&mut r.words, first, last + 1);
        }
    }

    /// Whether the page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        match self.locate(gpa) {
            Some((i, p)) => self.regions[i].words[(p / 64) as usize] & (1u64 << (p % 64)) != 0,
            None => false,
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.words.iter())
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|r| r.words.iter().all(|&w| w == 0))
    }

    /// Removes every page, keeping the shape.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.words.fill(0);
        }
    }

    /// Adds every page of `other`, which must have the same shape.
    pub fn merge(&mut self, other: &DirtySet) -> Result<()> {
        if self.regions.len() != other.regions.len()
            || self
                .regions
                .iter()
                .zip(&other.regions)
                .any(|(a, b)| a.guest_addr != b.guest_addr || a.pages != b.pages)
        {
            return Err(Error::ShapeMismatch {
                ours: self.shape(),
                theirs: other.shape(),
            });
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            a.or_words(&b.words);
        }
        Ok(())
    }

    /// Guest-physical address of every page in the set, ascending within each region.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|r| {
            r.words.iter().enumerate().flat_map(move |(wi, &w)| {
                BitIter(w)
                    .map(move |b| r.guest_addr + (((wi as u64) * 64 + b as u64) << PAGE_SHIFT))
            })
        })
    }

    /// The set as maximal runs of contiguous pages (a run never spans two regions).
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            set: self,
            region: 0,
            word: 0,
            bits: self
                .regions
                .first()
                .and_then(|r| r.words.first().copied())
                .unwrap_or(0),
        }
    }
}

/// Sets bits `[from, to)` of `words`.
fn set_bit_range(words: &mut [u64], from: u64, to: u64) {
    let mut p = from;
    while p < to {
        let wi = (p / 64) as usize;
        let bit = p % 64;
        let n = (64 - bit).min(to - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        if let Some(w) = words.get_mut(wi) {
            *w |= mask;
        }
        p += n;
    }
}

/// Iterates the set bits of one word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Iterator over the runs of a [`DirtySet`]; see [`DirtySet::runs`].
pub struct Runs<'a> {
    set: &'a DirtySet,
    region: usize,
    word: usize,
    /// Bits of `word` not yet consumed.
    bits: u64,
}

impl Iterator for Runs<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        loop {
            let r = self.set.regions.get(self.region)?;
            // Find the next set bit.
            while self.bits == 0 {
                self.word += 1;
                match r.words.get(self.word) {
                    Some(&w) => self.bits = w,
                    None => break,
                }
            }
            if self.bits == 0 {
                self.region += 1;
                self.word = 0;
                self.bits = self
                    .set
                    .regions
                    .get(self.region)
                    .and_then(|r| r.words.first().copied())
                    .unwrap_or(0);
                continue;
            }
            let start_bit = self.bits.trailing_zeros() as u64;
            let start = self.word as u64 * 64 + start_bit;
            // Extend through ones: invert and find the next zero.
            let mut end;
            let ones = (!(self.bits >> start_bit)).trailing_zeros() as u64; // run length in this word
            if start_bit + ones < 64 {
                end = start + ones;
                self.bits &= !(((1u64 << ones) - 1) << start_bit);
            } else {
                end = self.word as u64 * 64 + 64;
                self.bits = 0;
                loop {
                    self.word += 1;
                    match r.words.get(self.word) {
                        Some(&u64::MAX) => end += 64,
                        Some(&w) => {
                            let n = (!w).trailing_zeros() as u64;
                            end += n;
                            self.bits = if n == 0 { w } else { w & !((1u64 << n) - 1) };
                            break;
                        }
                        None => break,
                    }
                }
            }
            return Some(PageRun {
                guest_addr: r.guest_addr + (start << PAGE_SHIFT),
                pages: end - start,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(pages: &[u64]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &p in pages {
            match out.last_mut() {
                Some((s, n)) if *s + *n == p => *n += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }

    #[test]
    fn runs_match_naive() {
        let mut seed = 12345u64;
        for round in 0..200 {
            let pages = 1 + (round * 37) % 700;
            let mut s = DirtySet::new(&[(0, pages * PAGE_SIZE)]);
            let mut want = Vec::new();
            let density = round % 5;
            for p in 0..pages {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let on = match density {
                    0 => (seed >> 60) == 0,
                    1 => (seed >> 63) == 0,
                    2 => (seed >> 62) != 0,
                    3 => true,
                    _ => (p / 70) % 2 == 0,
                };
                if on {
                    s.mark(p * PAGE_SIZE, 1);
                    want.push(p);
                }
            }
            assert_eq!(s.count(), want.len() as u64);
            let got: Vec<u64> = s.iter().map(|g| g / PAGE_SIZE).collect();
            assert_eq!(got, want);
            let runs: Vec<(u64, u64)> = s
                .runs()
                .map(|r| (r.guest_addr / PAGE_SIZE, r.pages))
                .collect();
            assert_eq!(runs, naive_runs(&want), "round {round}");
        }
    }

    #[test]
    fn mark_ranges_and_regions() {
        let mut s = DirtySet::new(&[(0, 100 * PAGE_SIZE), (1 << 30, 130 * PAGE_SIZE)]);
        s.mark(99 * PAGE_SIZE + 5, 10 * PAGE_SIZE); // only page 99 of region 0
        s.mark((1 << 30) + 60 * PAGE_SIZE, 70 * PAGE_SIZE); // pages 60..130 of region 1
        assert_eq!(s.count(), 1 + 70);
        let runs: Vec<PageRun> = s.runs().collect();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    guest_addr: 99 * PAGE_SIZE,
                    pages: 1
                },
                PageRun {
                    guest_addr: (1 << 30) + 60 * PAGE_SIZE,
                    pages: 70
                },
            ]
        );
        assert!(!s.contains(200 * PAGE_SIZE));
        let mut t = DirtySet::new(&[(0, PAGE_SIZE)]);
        assert!(t.merge(&s).is_err());
        t.mark(0, 0);
        assert!(t.is_empty());
        s.clear();
        assert!(s.is_empty());
    }
}
