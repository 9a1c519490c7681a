//! Cutting text into segments that tokenize independently, so counting stays linear.
//!
//! tiktoken first splits text with a regex into "pieces", then byte-pair-merges each piece.
//! Both steps are superlinear in the length of one piece, and a long run with no natural
//! break (a megabyte of `a`, of digits, of spaces) is a single piece: in tiktoken-rs 0.12 one
//! megabyte of one character takes about half a second, and a megabyte of spaces under
//! o200k overflows the regex engine's backtracking stack, which tiktoken turns into a panic.
//! Counting a segment of bounded length at a time makes the whole count linear and keeps every
//! regex run far below the engine's limits.
//!
//! Segments end, whenever possible, at a point where the tokenizer's regex always ends a piece
//! anyway (see [`is_piece_boundary`]), so the sum of the segments' counts equals the count of
//! the whole text. Only a run with no such point for [`MAX_SEGMENT_BYTES`] is cut mid-piece,
//! at a char boundary; that may change the count by about one token per cut, almost always
//! upwards.

/// Longest segment handed to the tokenizer, in bytes.
///
/// Large enough that natural text (which has a piece boundary every few bytes) always ends
/// segments at a boundary and that a forced cut costs at most about one token per 512 bytes
/// (well under 1% for the densest runs); small enough that the regex's backtracking on one
/// segment stays tiny (its stack limit is a million entries) and the merge stays cheap.
pub(super) const MAX_SEGMENT_BYTES: usize = 512;

/// The smallest bound [`Segments`] accepts: every char fits in a segment.
const MIN_SEGMENT_BYTES: usize = 4;

/// Consecutive, non-empty segments of a text, each at most `max_len` bytes, whose
/// concatenation is the text.
///
/// Each segment ends at the last piece boundary ([`is_piece_boundary`]) within `max_len`
/// bytes, or at the last char boundary when there is none. Every byte is scanned at most
/// twice, so iterating is linear in the length of the text.
#[derive(Clone, Debug)]
pub(super) struct Segments<'a> {
    rest: &'a str,
    max_len: usize,
}

impl<'a> Segments<'a> {
    /// Segments of `text` of at most `max_len` bytes (raised to 4, so any char fits).
    pub(super) fn new(text: &'a str, max_len: usize) -> Self {
        Self {
            rest: text,
            max_len: max_len.max(MIN_SEGMENT_BYTES),
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let cut = if self.rest.len() <= self.max_len {
            self.rest.len()
        } else {
            cut_point(self.rest, self.max_len)
        };
        let (segment, rest) = self.rest.split_at(cut);
        self.rest = rest;
        Some(segment)
    }
}

/// Where to end the first segment of `text`, which is longer than `max_len` (>= 4) bytes: a
/// char boundary in `1..=max_len`, the last piece boundary there if any.
///
/// Scans backwards from `max_len`, so natural text costs a few bytes per segment, and a run
/// with no boundary costs its `max_len` bytes once.
fn cut_point(text: &str, max_len: usize) -> usize {
    let mut end = max_len;
    // Terminates at 1 at the latest: a char is at most 4 bytes and max_len >= 4.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut next = text[end..].chars().next();
    for (i, c) in text[..end].char_indices().rev() {
        if next.is_some_and(|n| is_piece_boundary(c, n)) {
            return i + c.len_utf8();
        }
        next = Some(c);
    }
    end
}

/// Whether the o200k_base and cl100k_base regexes end a piece between `prev` and `next`, in
/// every text, *and* the pieces before that point come out the same when the text ends there.
/// Counting the two sides separately then gives exactly the count of the whole.
///
/// The patterns only look ahead past a piece in their whitespace alternatives
/// (`\s+(?!\S)`, cl100k's `\s++$`), so any point after a non-whitespace char is safe to end
/// the text at, provided a piece never spans it. A piece never spans:
/// - a non-whitespace char followed by whitespace other than `\r`/`\n`: whitespace only
///   appears as a piece's first char or in all-whitespace pieces, except that a run of
///   punctuation takes trailing `\r`/`\n` (and `/`) with it;
/// - a number char next to a non-number: numbers (`\p{N}{1,3}`) are pieces of their own
///   (`char::is_numeric` is exactly `\p{N}`);
/// - an ASCII letter followed by ASCII punctuation other than `'`: a letter piece ends in
///   letters, marks or a contraction (`'s`, `'ll`, ...), and a punctuation piece starts with
///   punctuation or a space. (Kept to ASCII because `\p{M}` marks, which do continue letter
///   pieces, have no test in `std`.)
///
/// The unit tests check this against the real tokenizers on random text.
pub(super) fn is_piece_boundary(prev: char, next: char) -> bool {
    if prev.is_whitespace() {
        return false;
    }
    if next.is_whitespace() {
        return next != '\r' && next != '\n';
    }
    if prev.is_numeric() != next.is_numeric() {
        return true;
    }
    prev.is_ascii_alphabetic() && next.is_ascii_punctuation() && next != '\''
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(text: &str, max_len: usize) -> Vec<&str> {
        Segments::new(text, max_len).collect()
    }

    #[test]
    fn short_text_is_one_segment() {
        assert_eq!(segments("hello world", 512), ["hello world"]);
        assert!(segments("", 512).is_empty());
    }

    #[test]
    fn cuts_at_the_last_boundary_that_fits() {
        assert_eq!(
            segments("one two three four", 10),
            ["one two", " three", " four"]
        );
        assert_eq!(segments("{\"ab\":12}", 6), ["{\"ab\":", "12}"]);
    }

    #[test]
    fn runs_without_boundaries_are_cut_at_char_boundaries() {
        assert_eq!(segments("aaaaaaaaaa", 4), ["aaaa", "aaaa", "aa"]);
        // 4-byte chars never split, even when the bound is not a multiple of 4.
        assert_eq!(segments(&"😀".repeat(5), 10), ["😀😀", "😀😀", "😀"]);
        // A bound below one char is raised so that every char fits.
        assert_eq!(segments("😀😀", 1), ["😀", "😀"]);
    }

    #[test]
    fn spaces_after_words_are_boundaries_but_newlines_are_not() {
        assert!(is_piece_boundary('a', ' '));
        assert!(is_piece_boundary('.', '\t'));
        assert!(is_piece_boundary('a', '\u{3000}'));
        assert!(!is_piece_boundary(' ', ' '));
        assert!(!is_piece_boundary(' ', 'a'));
        // ".\n" is one piece: punctuation takes the newlines that follow it.
        assert!(!is_piece_boundary('.', '\n'));
    }

    #[test]
    fn numbers_and_ascii_punctuation_after_letters_are_boundaries() {
        assert!(is_piece_boundary('a', '1'));
        assert!(is_piece_boundary('1', 'a'));
        assert!(is_piece_boundary('"', '1'));
        assert!(is_piece_boundary('a', '"'));
        assert!(!is_piece_boundary('1', '2'));
        assert!(!is_piece_boundary('a', '\''));
        assert!(!is_piece_boundary('"', 'a'));
        assert!(!is_piece_boundary('é', '"'));
    }

    /// The plain statement of [`cut_point`]'s contract: the last piece boundary at a char
    /// start within `max_len`, else the last char start within it.
    fn cut_point_forward(text: &str, max_len: usize) -> usize {
        let mut last_boundary = 0;
        let mut prev = None;
        for (i, c) in text.char_indices() {
            if prev.is_some_and(|p| is_piece_boundary(p, c)) {
                last_boundary = i;
            }
            if i + c.len_utf8() > max_len {
                return if last_boundary > 0 { last_boundary } else { i };
            }
            prev = Some(c);
        }
        text.len()
    }

    proptest::proptest! {
        #[test]
        fn cuts_at_the_last_boundary_within_the_bound(
            text in "[a-c1 \\n.'😀é\u{301}]{0,100}",
            max_len in 4usize..40,
        ) {
            proptest::prop_assume!(text.len() > max_len);
            proptest::prop_assert_eq!(
                cut_point(&text, max_len),
                cut_point_forward(&text, max_len)
            );
        }

        #[test]
        fn segments_partition_the_text(
            text in "[a-c1 \\n.'😀é\u{301}]{0,200}",
            max_len in 0usize..40,
        ) {
            let parts = segments(&text, max_len);
            proptest::prop_assert_eq!(parts.concat(), text.clone());
            for part in parts {
                proptest::prop_assert!(!part.is_empty());
                proptest::prop_assert!(part.len() <= max_len.max(MIN_SEGMENT_BYTES));
            }
        }
    }
}
