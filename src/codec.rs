//! The canonical binary encoding every persisted structure uses.
//!
//! Integers are big-endian and fixed-width; byte strings and UTF-8 strings carry a
//! `u32` big-endian length prefix; optional values carry a one-byte presence tag
//! (0 absent, 1 present). The decoder is strict: lengths are bounded by the input,
//! strings must be UTF-8, tags must be 0 or 1, and [`Reader::finish`] rejects trailing
//! bytes. The same bytes therefore always decode to the same value and a value has
//! exactly one encoding, which is what lets the AAD cover the encoded header verbatim.
//! docs/FORMAT.md specifies each structure built from these pieces.

use std::fmt;

/// Decoding failed: the input is truncated, over-long, or not canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed encoding")
    }
}

/// Appends canonical encodings to a buffer.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with `cap` bytes reserved.
    pub fn with_capacity(cap: usize) -> Self {
        Writer { buf: Vec::with_capacity(cap) }
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Four bytes, big-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Eight bytes, big-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Fixed-width bytes, no length prefix (the reader must know the width).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// An item count as a `u32`. Every structure counted here is bounded far below
    /// 2^32 (secrets ≤ 64 KiB, identifiers ≤ 128 bytes); a larger count saturates
    /// rather than wrapping, and the strict reader then rejects the encoding.
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// A `u32` length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(&v[..len as usize]);
        self
    }

    /// A UTF-8 string, as [`Writer::bytes`].
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// 0 for `None`; 1 then the value for `Some`.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => self.u8(1).u64(x),
        }
    }

    /// 0 for `None`; 1 then the string for `Some`.
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => self.u8(1).str(x),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The encoding.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads canonical encodings from a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let s = self.raw(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.array::<1>()?[0])
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Four bytes, big-endian.
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Eight bytes, big-endian.
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u32()? as usize;
        self.raw(n)
    }

    /// Length-prefixed UTF-8.
    pub fn str(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Malformed)
    }

    /// A presence tag, then a `u64`.
    pub fn opt_u64(&mut self) -> Result<Option<u64>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(Malformed),
        }
    }

    /// A presence tag, then a string.
    pub fn opt_str(&mut self) -> Result<Option<&'a str>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(Malformed),
        }
    }

    /// A count that must be plausible for the remaining input (each item at least
    /// `min_item` bytes), so a forged count cannot make the decoder allocate.
    pub fn count(&mut self, min_item: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(Malformed);
        }
        Ok(n)
    }

    /// Succeeds only when every byte was consumed.
    pub fn finish(self) -> Result<(), Malformed> {
        if self.buf.is_empty() { Ok(()) } else { Err(Malformed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let mut w = Writer::default();
        w.u8(7).u16(0x0102).u32(3).u64(u64::MAX).str("héllo").opt_u64(None).opt_str(Some("x"));
        let b = w.finish();
        let mut r = Reader::new(&b);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.u64(), Ok(u64::MAX));
        assert_eq!(r.str(), Ok("héllo"));
        assert_eq!(r.opt_u64(), Ok(None));
        assert_eq!(r.opt_str(), Ok(Some("x")));
        assert!(r.finish().is_ok());

        // Truncation anywhere is an error, never a panic.
        for cut in 0..b.len() {
            let mut r = Reader::new(&b[..cut]);
            let res = (|| -> Result<(), Malformed> {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.str()?;
                r.opt_u64()?;
                r.opt_str()?;
                Ok(())
            })();
            assert_eq!(res, Err(Malformed), "cut at {cut}");
        }
        // A bad presence tag is rejected.
        assert_eq!(Reader::new(&[2]).opt_u64(), Err(Malformed));
        // A count larger than the input could hold is rejected before allocation.
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff]).count(1), Err(Malformed));
    }
}
