//! Backend names as file names, reversibly.
//!
//! A backend name may hold bytes a file name cannot (`/`, NUL) or be `.`/`..`. Those, and
//! `%` itself so the mapping stays reversible, are written as `%XX` (upper-case hex).
//! Everything else, including spaces and non-ASCII UTF-8, is kept as it is.

use crate::error::{Error, Result};

/// The longest file name the kernel passes us (NAME_MAX).
pub const NAME_MAX: usize = 255;

pub fn escape(name: &str) -> String {
    match name {
        "" => return "%".to_string(),
        "." => return "%2E".to_string(),
        ".." => return "%2E%2E".to_string(),
        _ => {}
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '\0' => out.push_str("%00"),
            c => out.push(c),
        }
    }
    out
}

/// The backend name behind a file name. A `%` not followed by two hex digits stands for itself.
pub fn unescape(file_name: &str) -> String {
    if file_name == "%" {
        return String::new();
    }
    let bytes = file_name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Decoding only ever replaces ASCII escapes with ASCII bytes, so UTF-8 survives.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// First of the 256 characters that stand for raw bytes in [`from_bytes`] (Supplementary
/// Private Use Area B, U+10FF00..=U+10FFFF).
const RAW_BASE: u32 = 0x10_FF00;

/// A file name as the kernel or a guest filesystem gives it (any bytes but `/` and NUL) as the
/// tree's internal string, reversibly: valid UTF-8 stays as it is; every byte of an invalid
/// sequence, and of a character in U+10FF00..=U+10FFFF (so the mapping is a bijection), becomes
/// the character U+10FF00 + byte. [`to_bytes`] undoes it. Guest names that are not UTF-8
/// (Latin-1 from old systems, say) are thus listed, looked up and copied byte for byte.
pub fn from_bytes(name: &[u8]) -> std::borrow::Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(name) {
        if !s.chars().any(is_raw) {
            return std::borrow::Cow::Borrowed(s);
        }
    }
    let mut out = String::with_capacity(name.len() + 8);
    let mut rest = name;
    let raw = |out: &mut String, bytes: &[u8]| {
        for &b in bytes {
            out.push(
                char::from_u32(RAW_BASE + u32::from(b)).unwrap_or(char::REPLACEMENT_CHARACTER),
            );
        }
    };
    while !rest.is_empty() {
        let (good, bad_len) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                let (g, _) = rest.split_at(e.valid_up_to());
                // The first valid_up_to bytes are valid UTF-8 by definition.
                let g = std::str::from_utf8(g).unwrap_or_default();
                (g, e.error_len().unwrap_or(rest.len() - e.valid_up_to()))
            }
        };
        for c in good.chars() {
            if is_raw(c) {
                let mut b = [0u8; 4];
                raw(&mut out, c.encode_utf8(&mut b).as_bytes());
            } else {
                out.push(c);
            }
        }
        let bad_start = good.len();
        raw(&mut out, &rest[bad_start..bad_start + bad_len]);
        rest = &rest[bad_start + bad_len..];
    }
    std::borrow::Cow::Owned(out)
}

fn is_raw(c: char) -> bool {
    (RAW_BASE..=RAW_BASE + 0xFF).contains(&u32::from(c))
}

/// The bytes behind an internal name made by [`from_bytes`].
pub fn to_bytes(name: &str) -> std::borrow::Cow<'_, [u8]> {
    if !name.chars().any(is_raw) {
        return std::borrow::Cow::Borrowed(name.as_bytes());
    }
    let mut out = Vec::with_capacity(name.len());
    for c in name.chars() {
        if is_raw(c) {
            out.push((u32::from(c) - RAW_BASE) as u8);
        } else {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A name a user gives to a new snapshot or launch (the file name, before unescaping).
pub fn check_new_name(file_name: &str) -> Result<()> {
    let len = to_bytes(file_name).len();
    if len > NAME_MAX {
        return Err(Error::NameTooLong(len));
    }
    if file_name.is_empty() {
        return Err(Error::Invalid("empty name".into()));
    }
    if file_name.starts_with('.') {
        return Err(Error::Invalid(format!(
            "{file_name:?}: names starting with '.' are reserved"
        )));
    }
    if file_name.contains('/') || file_name.contains('\0') {
        return Err(Error::Invalid(format!("{file_name:?} contains '/' or NUL")));
    }
    if file_name.chars().any(is_raw) {
        return Err(Error::Invalid(format!(
            "{:?} is not UTF-8: backends take UTF-8 names",
            String::from_utf8_lossy(&to_bytes(file_name))
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_round_trip() {
        let cases: [&[u8]; 7] = [
            b"plain",
            "caf\u{e9} \u{1F600}".as_bytes(),
            b"caf\xe9",
            b"\xff\xfe\x80",
            b"a\xc3",
            // A genuine U+10FF41 is escaped too, so the mapping stays a bijection.
            "x\u{10FF41}y".as_bytes(),
            b"\xf4\x8f\xbd",
        ];
        for c in cases {
            let s = from_bytes(c);
            assert_eq!(&*to_bytes(&s), c, "{s:?}");
        }
        assert!(matches!(
            from_bytes(b"plain"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(from_bytes(b"caf\xe9").chars().count(), 4);
        assert_eq!(
            check_new_name(&from_bytes(b"s\xe9")).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn round_trip() {
        for n in [
            "plain",
            "a/b",
            "50%",
            "%2F",
            ".",
            "..",
            "",
            "nul\0in",
            "ünï cödé",
            ".hidden",
            "a%",
            "%%",
        ] {
            let e = escape(n);
            assert!(!e.contains('/') && !e.contains('\0'), "{e:?}");
            assert_ne!(e, ".");
            assert_ne!(e, "..");
            assert_eq!(unescape(&e), n, "via {e:?}");
        }
    }

    #[test]
    fn lone_percent_is_literal() {
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz"), "%zz");
        assert_eq!(unescape("%2"), "%2");
    }

    #[test]
    fn new_names() {
        assert_eq!(check_new_name("").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(check_new_name(".x").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            check_new_name(&"a".repeat(256)).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        assert!(check_new_name(&"a".repeat(255)).is_ok());
        assert!(check_new_name("before upgrade").is_ok());
    }
}
