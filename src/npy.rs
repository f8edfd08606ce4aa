//! NumPy's `.npy` header (format versions 1–3): a preamble (magic, version, the header's length), then a
//! Python dict literal with `descr`, `fortran_order` and `shape`. Its two readers, the activation importer
//! (streaming from a file) and Gemma Scope's archives (in memory), read the data after it themselves, each
//! with the element types it accepts.

/// What a `.npy` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The element type as NumPy writes it: byte order (`<`, `>`, `|` or `=`), kind and size (`<f4`).
    pub descr: String,
    /// Whether the data are stored column-major.
    pub fortran_order: bool,
    pub shape: Vec<usize>,
}

/// A parse error: the byte offset in the file and what is wrong there.
pub type Fault = (u64, String);

/// The longest header accepted (NumPy writes tens of bytes; version 2 allows 4 GiB, which only a corrupt
/// file would claim).
pub const MAX_HEADER: usize = 1 << 20;

/// The bytes of the preamble of a file whose version byte (`b[6]`) is `version`: 12 for versions 2 and 3
/// (their header length has four bytes), else 10 (version 1; any other is refused by [`preamble`] from
/// those 10 bytes, so a short file of an unknown version is reported as such, not as truncated).
pub fn preamble_len(version: u8) -> usize {
    if matches!(version, 2 | 3) { 12 } else { 10 }
}

/// The header's offset and length from the file's first bytes (at least [`preamble_len`] of them).
pub fn preamble(b: &[u8]) -> Result<(usize, usize), Fault> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err((0, "no .npy magic (not a .npy file, or truncated)".into()));
    }
    let (len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        2 | 3 => return Err((10, "truncated preamble".into())),
        v => return Err((6, format!(".npy format version {v} is not 1, 2 or 3"))),
    };
    if len > MAX_HEADER {
        return Err((8, format!("header of {len} bytes: longer than 1 MiB")));
    }
    Ok((start, len))
}

/// Parses the header's text `h`, found at byte `start` of the file (for errors).
pub fn parse_header(h: &[u8], start: usize) -> Result<Header, Fault> {
    let h = std::str::from_utf8(h).map_err(|_| (start as u64, "header is not text".to_string()))?;
    let bad = |what: &str| (start as u64, format!("header {h:?}: {what}"));
    let value_of = |key: &str| {
        let at = h.find(&format!("'{key}'"))? + key.len() + 2;
        Some(h[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = value_of("descr")
        .and_then(|v| v.strip_prefix('\'')?.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    let fortran_order = match value_of("fortran_order") {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => return Err(bad("no fortran_order")),
    };
    let shape = value_of("shape")
        .and_then(|v| v.strip_prefix('(')?.split(')').next())
        .ok_or_else(|| bad("no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("shape is not a tuple of integers"))?;
    Ok(Header {
        descr: descr.to_string(),
        fortran_order,
        shape,
    })
}

/// The header of a `.npy` file held in memory, and the offset of its data.
pub fn read(b: &[u8]) -> Result<(Header, usize), Fault> {
    let (start, len) = preamble(b)?;
    let h = b
        .get(start..start + len)
        .ok_or((start as u64, "truncated header".to_string()))?;
    Ok((parse_header(h, start)?, start + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(version: u8, header: &str) -> Vec<u8> {
        let mut b = b"\x93NUMPY".to_vec();
        b.extend([version, 0]);
        if version == 1 {
            b.extend((header.len() as u16).to_le_bytes());
        } else {
            b.extend((header.len() as u32).to_le_bytes());
        }
        b.extend(header.as_bytes());
        b
    }

    #[test]
    fn reads_what_numpy_writes() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }   \n";
        for v in [1, 2, 3] {
            let (hdr, data) = read(&file(v, h)).unwrap();
            assert_eq!(hdr.descr, "<f4");
            assert!(!hdr.fortran_order);
            assert_eq!(hdr.shape, [3, 4]);
            assert_eq!(data, preamble_len(v) + h.len());
        }
        let scalar = "{'descr': '>f8', 'fortran_order': True, 'shape': (), }";
        let (hdr, _) = read(&file(1, scalar)).unwrap();
        assert_eq!((hdr.descr.as_str(), hdr.fortran_order), (">f8", true));
        assert!(hdr.shape.is_empty());
        let (hdr, _) = read(&file(
            1,
            "{'descr': '|u1', 'fortran_order': False, 'shape': (7,), }",
        ))
        .unwrap();
        assert_eq!(hdr.shape, [7]);
    }

    #[test]
    fn refuses_what_is_not_a_header_naming_where() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        let err = |b: &[u8]| read(b).unwrap_err();
        assert_eq!(err(b"\x93NUMP").0, 0);
        assert_eq!(err(&file(4, ok)).0, 6);
        assert_eq!(err(&file(4, ok)[..preamble_len(4)]).0, 6);
        assert_eq!(err(&file(2, ok)[..11]).0, 10);
        let mut long = file(2, ok);
        long[8..12].copy_from_slice(&(MAX_HEADER as u32 + 1).to_le_bytes());
        assert!(err(&long).1.contains("1 MiB"));
        let cut = file(1, ok);
        assert!(err(&cut[..cut.len() - 1]).1.contains("truncated"));
        for (h, why) in [
            ("{'fortran_order': False, 'shape': (3,), }", "no descr"),
            ("{'descr': '<f4', 'shape': (3,), }", "no fortran_order"),
            ("{'descr': '<f4', 'fortran_order': False, }", "no shape"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3, x), }",
                "tuple of integers",
            ),
        ] {
            let (at, reason) = err(&file(1, h));
            assert_eq!(at, 10);
            assert!(reason.contains(why), "{reason}");
        }
    }
}
