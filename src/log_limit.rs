//! Warnings caused by input (image metadata, guest filesystems, backend names) that the input
//! cannot turn into a flood: every such warning goes through [`input_warn!`], which
//!
//! - escapes and truncates the strings that come from input ([`esc`], 256 bytes of input),
//! - caps the whole message (1 KiB),
//! - logs an identical message of one scope (a volume, an image file) once per hour,
//! - rate-limits each scope: a burst of [`BURST`] lines, then one per [`REFILL`]; what is
//!   suppressed is counted and the count is carried by the scope's next line (`suppressed=N`).
//!
//! Memory is bounded too: at most [`MAX_SCOPES`] scopes and [`MAX_SEEN`] remembered messages
//! per scope (the oldest are forgotten first). The log file itself is capped and rotated by
//! [`crate::logfile`].

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of an input string kept in a log line; the rest is counted, not shown.
pub const MAX_INPUT_BYTES: usize = 256;
/// Longest message one warning may have, whatever its caller formats.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Lines a scope may log back to back.
pub const BURST: u32 = 10;
/// After the burst, one more line per this long.
pub const REFILL: Duration = Duration::from_secs(60);
/// An identical message of one scope is logged again only after this long.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(3600);
/// Scopes remembered at once (then the least recently used is forgotten).
pub const MAX_SCOPES: usize = 1024;
/// Distinct messages remembered per scope.
pub const MAX_SEEN: usize = 256;

/// `bytes` as printable text: at most [`MAX_INPUT_BYTES`] of input, valid UTF-8 printable
/// characters kept, everything else (controls, invalid bytes, `\`) written `\xNN`; a longer input
/// ends with `…(+N bytes)`.
pub fn esc(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_INPUT_BYTES)];
    let mut out = String::with_capacity(shown.len() + 16);
    let mut rest = shown;
    while !rest.is_empty() {
        let (good, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                let g = std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default();
                // A sequence cut by the truncation counts as invalid: shown as bytes.
                (
                    g,
                    e.error_len().unwrap_or(rest.len() - e.valid_up_to()).max(1),
                )
            }
        };
        for c in good.chars() {
            if c.is_control() || c == '\\' {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("\\x{byte:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        let start = good.len();
        let end = (start + bad).min(rest.len());
        for byte in &rest[start..end] {
            out.push_str(&format!("\\x{byte:02x}"));
        }
        rest = &rest[end..];
    }
    if bytes.len() > shown.len() {
        out.push_str(&format!("…(+{} bytes)", bytes.len() - shown.len()));
    }
    out
}

/// [`esc`] of a string.
pub fn esc_str(s: &str) -> String {
    esc(s.as_bytes())
}

/// What the limiter decided for one warning.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Log it; `suppressed` warnings of this scope were dropped since its last line.
    Log { suppressed: u64 },
    /// Drop it (counted).
    Drop,
}

struct Scope {
    tokens: u32,
    refilled: Instant,
    used: Instant,
    seen: HashMap<u64, Instant>,
    suppressed: u64,
}

/// The per-scope dedup and rate limit, separate from logging so it can be tested with a clock.
#[derive(Default)]
pub struct Limiter {
    scopes: HashMap<String, Scope>,
}

impl Limiter {
    pub fn check(&mut self, scope: &str, message: &str, now: Instant) -> Decision {
        if !self.scopes.contains_key(scope) && self.scopes.len() >= MAX_SCOPES {
            if let Some(oldest) = self
                .scopes
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            {
                self.scopes.remove(&oldest);
            }
        }
        let s = self
            .scopes
            .entry(scope.to_string())
            .or_insert_with(|| Scope {
                tokens: BURST,
                refilled: now,
                used: now,
                seen: HashMap::new(),
                suppressed: 0,
            });
        s.used = now;
        // Refill: one token per REFILL elapsed, up to the burst.
        let elapsed = now.saturating_duration_since(s.refilled);
        let add = (elapsed.as_secs() / REFILL.as_secs().max(1)).min(u64::from(BURST)) as u32;
        if add > 0 {
            s.tokens = (s.tokens + add).min(BURST);
            s.refilled = now;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        message.hash(&mut h);
        let key = h.finish();
        if let Some(at) = s.seen.get(&key) {
            if now.saturating_duration_since(*at) < DEDUP_WINDOW {
                s.suppressed += 1;
                return Decision::Drop;
            }
        }
        if s.tokens == 0 {
            s.suppressed += 1;
            return Decision::Drop;
        }
        s.tokens -= 1;
        if s.seen.len() >= MAX_SEEN {
            if let Some(oldest) = s.seen.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                s.seen.remove(&oldest);
            }
        }
        s.seen.insert(key, now);
        let suppressed = std::mem::take(&mut s.suppressed);
        Decision::Log { suppressed }
    }
}

static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

/// Cut `s` to at most `max` bytes on a character boundary.
fn cap(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("…(message cut)");
    }
}

/// Log `msg` as a warning of `scope` unless the limiter drops it; returns whether it was logged.
/// Use through [`input_warn!`].
pub fn warn(scope: &str, msg: std::fmt::Arguments<'_>) -> bool {
    let mut scope = esc_str(scope);
    cap(&mut scope, MAX_INPUT_BYTES * 2);
    let mut text = msg.to_string();
    cap(&mut text, MAX_MESSAGE_BYTES);
    let decision = {
        let mut g = LIMITER.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(Limiter::default)
            .check(&scope, &text, Instant::now())
    };
    match decision {
        Decision::Log { suppressed: 0 } => {
            tracing::warn!(scope = %scope, "{text}");
            true
        }
        Decision::Log { suppressed } => {
            tracing::warn!(scope = %scope, suppressed, "{text}");
            true
        }
        Decision::Drop => false,
    }
}

/// A failed operation: an error about an image's content (`Corrupt`) is input-caused and goes
/// through the limiter under its file's scope; other failures (a backend down) are logged as
/// they are.
pub fn warn_error(op: &str, e: &crate::error::Error) -> bool {
    match e {
        crate::error::Error::Corrupt { path, .. } => warn(path, format_args!("{op} failed: {e}")),
        _ => {
            tracing::warn!(op, error = %e, "failed");
            true
        }
    }
}

/// A warning caused by input: `input_warn!(scope, "format", args…)`. Strings from input must be
/// passed through [`esc`] / [`esc_str`]; the message is capped regardless.
#[macro_export]
macro_rules! input_warn {
    ($scope:expr, $($arg:tt)+) => {
        $crate::log_limit::warn($scope, format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_truncates() {
        assert_eq!(esc(b"plain name"), "plain name");
        assert_eq!(esc(b"a\nb\\c"), "a\\x0ab\\x5cc");
        assert_eq!(esc(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(esc("café".as_bytes()), "café");
        let long = vec![0xffu8; 65535];
        let e = esc(&long);
        assert!(e.len() < 4 * MAX_INPUT_BYTES + 32, "{}", e.len());
        assert!(e.ends_with(&format!("…(+{} bytes)", 65535 - MAX_INPUT_BYTES)));
        // A multi-byte character cut by the truncation is shown as bytes.
        let mut cut = vec![b'a'; MAX_INPUT_BYTES - 1];
        cut.extend_from_slice("é".as_bytes());
        assert!(esc(&cut).contains("\\xc3…(+1 bytes)"));
    }

    #[test]
    fn dedups_and_rate_limits_per_scope() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert_eq!(l.check("a", "same", t0), Decision::Log { suppressed: 0 });
        for _ in 0..1000 {
            assert_eq!(l.check("a", "same", t0), Decision::Drop);
        }
        // The first new message carries the 1000 identical ones dropped before it.
        assert_eq!(l.check("a", "m", t0), Decision::Log { suppressed: 1000 });
        let mut logged = 2;
        for i in 0..1000 {
            if l.check("a", &format!("m{i}"), t0) != Decision::Drop {
                logged += 1;
            }
        }
        assert_eq!(logged, BURST);
        // Another scope is not starved by the first.
        assert_eq!(l.check("b", "same", t0), Decision::Log { suppressed: 0 });
        // One more line per REFILL, carrying the count of what was dropped.
        assert_eq!(
            l.check("a", "later", t0 + REFILL),
            Decision::Log {
                suppressed: 1000 - (BURST as u64 - 2)
            }
        );
        assert_eq!(l.check("a", "later2", t0 + REFILL), Decision::Drop);
        // The identical message is logged again after the dedup window.
        assert!(matches!(
            l.check("a", "same", t0 + DEDUP_WINDOW),
            Decision::Log { .. }
        ));
    }

    #[test]
    fn scopes_are_bounded() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SCOPES * 3) {
            l.check(&format!("s{i}"), "m", t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(l.scopes.len(), MAX_SCOPES);
        for i in 0..(MAX_SEEN * 3) {
            l.check(
                "one",
                &format!("m{i}"),
                t0 + Duration::from_secs(3600 * i as u64),
            );
        }
        assert!(l.scopes["one"].seen.len() <= MAX_SEEN);
    }
}
