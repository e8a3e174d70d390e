//! A validating JSON scanner for fast paths: it walks objects and arrays, and skips values,
//! without building anything.
//!
//! A reader that needs a few members of a large JSON text (an event's envelope, the records of
//! a Lambda invocation) can find them with these functions in one pass, checking the rest is
//! JSON on the way. They read bytes: a caller that needs text slices a `&str` at the positions
//! they answer, which are always at ASCII punctuation. Strings are skipped eight bytes at a
//! time (a word-at-a-time test for `"`, `\` and control characters, as serde_json's own
//! string reader does); nothing is allocated.
//!
//! Every function answers `None` for anything it does not accept outright: a syntax error,
//! nesting deeper than 128, and, for [`object`], a key with an escape. The scanner is meant as
//! a fast path beside serde_json, which then decides the text and words the error; it accepts
//! only JSON that serde_json accepts (property tests of the envelope and Kinesis readers hold
//! it to that), but for [`unescaped_string`], which leaves control characters to the caller.
//! Positions are byte offsets into the text.

/// Containers nested deeper than this send the text to serde_json.
const MAX_DEPTH: u32 = 128;

/// Walks the object at `i`: for each member, `member(key, start)` is given the key (which
/// has no escapes) and the position of its value, and answers the position after the value
/// (it reads the value itself, or skips it with [`skip_value`]). Answers the position after
/// the object.
pub fn object<'t>(
    b: &'t [u8],
    i: usize,
    mut member: impl FnMut(&'t [u8], usize) -> Option<usize>,
) -> Option<usize> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = plain_string_end(b, i + 1)?;
        let key = &b[i + 1..key_end];
        i = ws(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, member(key, ws(b, i + 1))?);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Walks the array at `i`: `element(start)` is given the position of each element and
/// answers the position after it. Answers the position after the array.
pub fn array(b: &[u8], i: usize, mut element: impl FnMut(usize) -> Option<usize>) -> Option<usize> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut i = ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        i = ws(b, element(i)?);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b']') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The content of the string at `i` when it has no escapes (nor control characters), and the
/// position after it.
pub fn plain_string(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let end = plain_string_end(b, i + 1)?;
    Some((&b[i + 1..end], end + 1))
}

/// The content of the string at `i` when it has no escapes, and the position after it; control
/// characters are not looked for (for text another check refuses them, such as base64), so
/// the end is found with a vectorized search.
pub fn unescaped_string(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let len = memchr::memchr2(b'"', b'\\', b.get(i + 1..)?)?;
    let end = i + 1 + len;
    (b[end] == b'"').then(|| (&b[i + 1..end], end + 1))
}

/// The position of the first byte at or after `i` that is not JSON whitespace.
#[inline(always)]
pub fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The position of the first `"`, `\` or control character at or after `i`, or `b.len()`.
///
/// Eight bytes at a time: a byte equal to `"` or `\` becomes zero after an XOR, and the
/// classic zero-byte test flags it; a byte below 0x20 borrows in the subtraction. A flag can
/// be false only above a true one, so the lowest flag is exact.
#[inline(always)]
fn special(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = v ^ (ONES * u64::from(b'"'));
        let slash = v ^ (ONES * u64::from(b'\\'));
        let found = (quote.wrapping_sub(ONES) & !quote
            | slash.wrapping_sub(ONES) & !slash
            | v.wrapping_sub(ONES * 0x20) & !v)
            & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// The position of the closing quote of a string whose content starts at `i` and has no
/// escape (a key the envelope compares as it is written).
#[inline(always)]
fn plain_string_end(b: &[u8], i: usize) -> Option<usize> {
    let end = special(b, i);
    (b.get(end) == Some(&b'"')).then_some(end)
}

/// The position after a string whose content starts at `i`.
#[inline(always)]
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = special(b, i);
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' if b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => i += 6,
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The position after a number starting at `i` (JSON's grammar: no leading zeros, digits on
/// both sides of a point, an optional signed exponent).
#[inline(always)]
fn skip_number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |b: &[u8], mut i: usize| {
        let start = i;
        while let Some(b'0'..=b'9') = b.get(i) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match *b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(b, i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Some(i)
}

/// The position after the value starting at `i`; containers are walked without recursion,
/// their kinds kept as bits (1: object) of `open`.
pub fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    skip_value_within(b, i, MAX_DEPTH)
}

/// [`skip_value`], refusing containers nested deeper than `max_depth` (at most 128), the
/// value itself counted when it is one.
pub fn skip_value_within(b: &[u8], i: usize, max_depth: u32) -> Option<usize> {
    skip_value_noting(b, i, max_depth, |_, _, _| {})
}

/// How deep [`skip_value_noting`] notes containers.
pub const NOTED_DEPTH: u32 = 8;

/// [`skip_value_within`], calling `note(depth, start, end)` for each container that is not
/// empty, nested at most [`NOTED_DEPTH`] deep (the value itself, when it is one, at depth 1),
/// as it closes: where its opening bracket is and the position after its closing one. A
/// reader of the text can then pass over such a container at once.
#[inline(always)]
pub fn skip_value_noting(
    b: &[u8],
    mut i: usize,
    max_depth: u32,
    mut note: impl FnMut(u32, usize, usize),
) -> Option<usize> {
    let max_depth = max_depth.min(MAX_DEPTH);
    let mut open: u128 = 0;
    let mut depth = 0u32;
    let mut starts = [0usize; NOTED_DEPTH as usize];
    loop {
        // At the start of a value.
        match *b.get(i)? {
            b'"' => i = skip_string(b, i + 1)?,
            c @ (b'{' | b'[') => {
                // Every container counts, an empty one too, as serde_json counts them.
                if depth == max_depth {
                    return None;
                }
                let close = if c == b'{' { b'}' } else { b']' };
                let start = i;
                i = ws(b, i + 1);
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    if let Some(slot) = starts.get_mut(depth as usize) {
                        *slot = start;
                    }
                    open = open << 1 | u128::from(c == b'{');
                    depth += 1;
                    if c == b'{' {
                        i = member_value(b, i)?;
                    }
                    continue;
                }
            }
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            _ => i = skip_number(b, i)?,
        }
        // After a value: close what ends here, then go on to the next value.
        loop {
            if depth == 0 {
                return Some(i);
            }
            i = ws(b, i);
            let object = open & 1 == 1;
            match *b.get(i)? {
                b',' => {
                    i = ws(b, i + 1);
                    if object {
                        i = member_value(b, i)?;
                    }
                    break;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            if let Some(&start) = starts.get(depth as usize - 1) {
                note(depth, start, i);
            }
            open >>= 1;
            depth -= 1;
        }
    }
}

/// The position after the value at `i` of a text the scanner has accepted, found without
/// checking the value again: a string ends at its first unescaped quote, a container where its
/// brackets balance (those in strings skipped), anything else at the next `,`, `}`, `]` or
/// whitespace. On a text the scanner has not accepted it answers some position no further than
/// the text's end (or `i` itself, past the end); it never panics.
pub fn skip_checked(b: &[u8], mut i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => return checked_string_end(b, i + 1),
        Some(b'{' | b'[') => {}
        Some(_) => {
            while let Some(&c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                    break;
                }
                i += 1;
            }
            return i;
        }
        None => return i,
    }
    let mut depth = 0u32;
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => {
                i = checked_string_end(b, i + 1);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The position after a checked string whose content starts at `i`: its escapes are skipped
/// two bytes at a time (a `\u` escape's hex digits cannot hold a quote).
#[inline(always)]
fn checked_string_end(b: &[u8], mut i: usize) -> usize {
    loop {
        i = special(b, i);
        match b.get(i) {
            Some(b'"') => return i + 1,
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
            None => return b.len(),
        }
    }
}

/// From a member's key at `i`, the position of its value.
#[inline(always)]
fn member_value(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = ws(b, skip_string(b, i + 1)?);
    (b.get(i) == Some(&b':')).then(|| ws(b, i + 1))
}

#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// Two damaged copies of `text`, for testing a reader built on the scanner against malformed
/// input: the text cut short at `cut`, and the text with `byte` inserted at `insert`.
/// Positions are taken modulo the text's length plus one and moved back to a character
/// boundary, so any two numbers (a property test's) will do.
///
/// ```
/// let [cut, inserted] = floodway::scan::damaged(r#"{"a":1}"#, 3, 7, b'x');
/// assert_eq!((cut.as_str(), inserted.as_str()), (r#"{"a"#, r#"{"a":1}x"#));
/// ```
pub fn damaged(text: &str, cut: usize, insert: usize, byte: u8) -> [String; 2] {
    let boundary = |at: usize| {
        let mut at = at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let mut inserted = text.to_owned();
    inserted.insert(boundary(insert), char::from(byte));
    [text[..boundary(cut)].to_owned(), inserted]
}
