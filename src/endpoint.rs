//! Which OpenAI endpoint a request path names, after the path is put in its one canonical
//! spelling.
//!
//! The endpoint decides whether sluice reads the body whole (to estimate its tokens) or
//! streams it through, and it is the bounded `endpoint` label of every metric. Servers
//! upstream (and the load balancers before them) accept many spellings of one path
//! (`/v1/chat//completions`, `/v1/./chat/completions`, `/v1/chat/completion%73`), so a path is
//! normalized before it is classified, and the normalized path is what goes upstream: no
//! spelling can reach a metered endpoint without being metered, or climb out of the upstream
//! URL's path prefix.

use std::borrow::Cow;

/// Why a request path has no canonical form sluice will forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("a `%` not followed by two hex digits")]
    BadEscape,
    #[error("an encoded `/`, `\\` or control character (%2F, %5C, %00-%1F)")]
    EncodedSeparator,
    #[error("a `..` segment that climbs above the root")]
    AboveRoot,
    #[error("a `;` (path parameters are not part of the OpenAI API)")]
    Parameters,
    #[error("a `\\` (URLs separate segments with `/`)")]
    Backslash,
}

/// The canonical spelling of a request path (RFC 3986 §6.2.2): percent-encoded unreserved
/// characters decoded, empty segments (`//`) and `.` segments removed, `..` segments applied,
/// a trailing `/` dropped. Borrowed when the path is already canonical (the common case costs
/// one scan). A spelling with no safe canonical form is an error: an encoded separator, a
/// `..` above the root, path parameters (`;`), a backslash, a malformed escape.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    let suspicious = bytes.iter().any(|byte| matches!(byte, b'%' | b';' | b'\\'))
        || bytes
            .windows(2)
            .any(|pair| matches!(pair, [b'/', b'/' | b'.']))
        || (bytes.len() > 1 && bytes.ends_with(b"/"));
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    if decoded.contains(';') {
        return Err(PathError::Parameters);
    }
    if decoded.contains('\\') {
        return Err(PathError::Backslash);
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            _ => segments.push(segment),
        }
    }
    let mut canonical = String::with_capacity(decoded.len());
    for segment in &segments {
        canonical.push('/');
        canonical.push_str(segment);
    }
    if canonical.is_empty() {
        canonical.push('/');
    }
    Ok(Cow::Owned(canonical))
}

/// Decodes `%XX` escapes of unreserved characters (letters, digits, `-._~`); keeps every
/// other escape as it is, with upper-case hex. Encoded separators and control characters are
/// refused: decoding them would change the path's structure, keeping them would let one
/// server read a segment boundary where another reads none.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        let (Some(high), Some(low)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err(PathError::BadEscape);
        };
        let value = (high * 16 + low) as u8;
        match value {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(value),
            b'/' | b'\\' | 0x00..=0x1f | 0x7f => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::Parameters),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(value >> 4)],
                    HEX[usize::from(value & 15)],
                ]);
            }
        }
        i += 3;
    }
    // Only ASCII was decoded into ASCII, and every other byte copied whole: still UTF-8.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// An OpenAI API endpoint, as far as sluice treats endpoints differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    Files,
    Batches,
    Audio,
    Images,
    Moderations,
    Other,
}

impl Endpoint {
    /// Classifies a canonical request path (see [`normalize`]). `None` when the path is not
    /// under `/v1/`. Letter case is ignored: an upstream that matched paths without it would
    /// otherwise run a metered endpoint unmetered.
    pub fn from_path(path: &str) -> Option<Self> {
        let lower;
        let path = if path.bytes().any(|byte| byte.is_ascii_uppercase()) {
            lower = path.to_ascii_lowercase();
            lower.as_str()
        } else {
            path
        };
        let rest = path.strip_prefix("/v1/")?;
        let first = rest.split('/').next().unwrap_or_default();
        Some(match first {
            "chat" if rest == "chat/completions" => Self::ChatCompletions,
            "completions" if rest == "completions" => Self::Completions,
            "embeddings" if rest == "embeddings" => Self::Embeddings,
            "responses" if rest == "responses" => Self::Responses,
            "models" => Self::Models,
            "files" | "uploads" => Self::Files,
            "batches" => Self::Batches,
            "audio" => Self::Audio,
            "images" => Self::Images,
            "moderations" => Self::Moderations,
            _ => Self::Other,
        })
    }

    /// Endpoints whose JSON body sluice reads whole, under the configured size limit, because
    /// their cost is estimated from it. Every other body streams through unbuffered.
    pub fn reads_body(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Completions | Self::Embeddings | Self::Responses
        )
    }

    /// The metric label: a fixed set, whatever paths clients send.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Models => "models",
            Self::Files => "files",
            Self::Batches => "batches",
            Self::Audio => "audio",
            Self::Images => "images",
            Self::Moderations => "moderations",
            Self::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        let cases = [
            ("/v1/chat/completions", Some(Endpoint::ChatCompletions)),
            ("/v1/completions", Some(Endpoint::Completions)),
            ("/v1/embeddings", Some(Endpoint::Embeddings)),
            ("/v1/responses", Some(Endpoint::Responses)),
            // Sub-resources of responses are reads, not generations.
            ("/v1/responses/resp_123", Some(Endpoint::Other)),
            ("/v1/models", Some(Endpoint::Models)),
            ("/v1/models/gpt-4o", Some(Endpoint::Models)),
            ("/v1/files/file-1/content", Some(Endpoint::Files)),
            ("/v1/batches", Some(Endpoint::Batches)),
            ("/v1/audio/transcriptions", Some(Endpoint::Audio)),
            ("/v1/chat/completions/abc", Some(Endpoint::Other)),
            ("/v1/", Some(Endpoint::Other)),
            ("/v2/chat/completions", None),
            ("/chat/completions", None),
            ("/v1", None),
        ];
        for (path, want) in cases {
            assert_eq!(Endpoint::from_path(path), want, "{path}");
        }
    }

    #[test]
    fn every_spelling_of_a_metered_path_normalizes_to_it() {
        for spelling in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/chat//completions",
            "//v1/chat/completions",
            "/v1/./chat/completions",
            "/v1/chat/../chat/completions",
            "/v1/chat/completion%73",
            "/v1/chat/%63ompletions",
            "/v1/chat/%2e/completions",
            "/v1/chat/%2E%2E/chat/completions",
            "/v1/x/y/../../chat/completions",
        ] {
            let canonical = normalize(spelling).expect(spelling);
            assert_eq!(canonical, "/v1/chat/completions", "{spelling}");
            assert_eq!(
                Endpoint::from_path(&canonical),
                Some(Endpoint::ChatCompletions),
                "{spelling}"
            );
        }
        assert_eq!(
            Endpoint::from_path("/V1/Chat/Completions"),
            Some(Endpoint::ChatCompletions)
        );
    }

    #[test]
    fn canonical_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/v1/models",
            "/v1/files/file-abc/content",
            "/v1/responses/resp_1",
            "/v1/models/ft:gpt-4o:org:x:1",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        // Other escapes are kept (with upper-case hex), not decoded.
        assert_eq!(
            normalize("/v1/files/a%20b").expect("valid"),
            "/v1/files/a%20b"
        );
        assert_eq!(
            normalize("/v1/files/a%3ab").expect("valid"),
            "/v1/files/a%3Ab"
        );
        assert_eq!(normalize("/v1/").expect("valid"), "/v1");
    }

    #[test]
    fn spellings_without_a_safe_canonical_form_are_refused() {
        let cases = [
            ("/v1/chat/completions;x", PathError::Parameters),
            ("/v1/chat;v=1/completions", PathError::Parameters),
            ("/v1/chat/completions%3b", PathError::Parameters),
            ("/v1/../../x", PathError::AboveRoot),
            ("/../v1/chat/completions", PathError::AboveRoot),
            ("/v1/%2e%2e/%2e%2e/x", PathError::AboveRoot),
            ("/v1/chat%2fcompletions", PathError::EncodedSeparator),
            ("/v1/chat%5Ccompletions", PathError::EncodedSeparator),
            ("/v1/chat%00/completions", PathError::EncodedSeparator),
            ("/v1/chat/completions%", PathError::BadEscape),
            ("/v1/chat/completions%7", PathError::BadEscape),
            ("/v1/chat/completions%zz", PathError::BadEscape),
            ("/v1/chat\\completions", PathError::Backslash),
        ];
        for (path, want) in cases {
            assert_eq!(normalize(path), Err(want), "{path}");
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Whatever path a client sends, normalizing never panics, its result is canonical
        /// (normalizing it again changes nothing, it has no empty, `.` or `..` segment and no
        /// trailing `/`), and it names the same endpoint however it was spelled.
        #[test]
        fn normalizing_is_total_and_idempotent(
            segments in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        "", ".", "..", "v1", "V1", "chat", "completions", "completion%73",
                        "%2e", "%2E%2e", "%2f", "%5c", "%00", "%", "%4", "%zz", "a;b", "a\\b",
                        "%41", "%7e", "%20", "responses", "models", "embeddings",
                    ])
                    .prop_map(str::to_owned),
                    "[ -~]{0,6}",
                ],
                0..10,
            ),
        ) {
            let path = format!("/{}", segments.join("/"));
            if let Ok(canonical) = normalize(&path) {
                let again = normalize(&canonical).expect("a canonical path normalizes");
                proptest::prop_assert_eq!(again.as_ref(), canonical.as_ref());
                proptest::prop_assert!(canonical.starts_with('/'));
                proptest::prop_assert!(!canonical.contains("//"), "{}", canonical);
                proptest::prop_assert!(
                    !canonical.split('/').any(|s| s == "." || s == ".."),
                    "{}", canonical
                );
                proptest::prop_assert!(canonical.len() == 1 || !canonical.ends_with('/'));
                proptest::prop_assert_eq!(
                    Endpoint::from_path(&canonical),
                    Endpoint::from_path(&again)
                );
            }
        }
    }

    #[test]
    fn only_estimated_endpoints_read_the_body() {
        assert!(Endpoint::ChatCompletions.reads_body());
        assert!(Endpoint::Responses.reads_body());
        assert!(!Endpoint::Files.reads_body());
        assert!(!Endpoint::Audio.reads_body());
        assert!(!Endpoint::Other.reads_body());
    }
}
