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

/// A name a user gives to a new snapshot or launch (the file name, before unescaping).
pub fn check_new_name(file_name: &str) -> Result<()> {
    if file_name.len() > NAME_MAX {
        return Err(Error::NameTooLong(file_name.len()));
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
