//! Which BPE encoding a model uses, and counting tokens with it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use bpe_openai::Tokenizer;

use super::{base_model, EstimateError};

/// A tiktoken encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series; also the guess for unknown models.
    O200kBase,
    /// gpt-4, gpt-3.5-turbo and the OpenAI embedding models.
    Cl100kBase,
    /// gpt-oss.
    O200kHarmony,
}

impl Encoding {
    /// The encoding of `model`.
    ///
    /// Strips `ft:` prefixes (`ft:gpt-4o-mini-2024-07-18:org:name:id` -> `gpt-4o-mini-2024-07-18`)
    /// and matches by family prefix, ignoring ASCII case:
    /// - o200k_base: gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4-mini*, chatgpt-4o*;
    /// - cl100k_base: gpt-4 and gpt-4-* (not gpt-4o/4.1/4.5), gpt-3.5-turbo*, gpt-35-turbo*
    ///   (Azure), text-embedding-3-*, text-embedding-ada-002;
    /// - o200k_harmony: gpt-oss*.
    ///
    /// Anything else (a local server's Llama, say) has no exact encoding and gets o200k_base,
    /// whose counts the limiter corrects from the usage that comes back.
    pub fn for_model(model: &str) -> Self {
        let model = base_model(model).to_ascii_lowercase();
        let is = |prefix: &str| model.starts_with(prefix);
        if is("gpt-oss") {
            Self::O200kHarmony
        } else if model == "gpt-4"
            || is("gpt-4-")
            || is("gpt-3.5-turbo")
            || is("gpt-35-turbo")
            || is("text-embedding-3-")
            || is("text-embedding-ada-002")
        {
            Self::Cl100kBase
        } else {
            // gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4-mini, chatgpt-4o, and the unknown.
            Self::O200kBase
        }
    }
}

/// The BPE tables, loaded once at start-up (about 0.1 s in a release build) and shared:
/// counting only reads them, from any thread.
///
/// Counting uses GitHub's `bpe-openai`, whose counts are identical to tiktoken's (the tests
/// check them against tiktoken-rs) but which is linear in the text even when it is built to
/// be slow (one character repeated a megabyte long), where tiktoken's merge is quadratic,
/// and about 1.6 times faster on ordinary prompts (`benches/estimate.rs`).
pub struct Tokenizers {
    /// Also serves o200k_harmony: it has the same ranks and the same split regex as
    /// o200k_base and differs only in special tokens, which ordinary encoding never produces.
    o200k: &'static Tokenizer,
    cl100k: &'static Tokenizer,
    /// `None` only in benchmarks that measure the tokenizer itself.
    memo: Option<CountMemo>,
}

/// Texts shorter than this are counted directly: hashing them costs about as much.
const MEMO_MIN_BYTES: usize = 256;
/// Entries per shard before the shard is cleared: bounds memory to a few MB.
const MEMO_SHARD_ENTRIES: usize = 4096;
const MEMO_SHARDS: usize = 16;

/// Counts of recently seen long texts. Chat clients resend the same system prompt, tool
/// definitions and conversation history with every turn, so most of a prompt's text was
/// counted moments ago. Keyed by a 64-bit hash of (encoding, text); a collision would give
/// one request a wrong estimate, which usage settlement corrects.
struct CountMemo {
    shards: Vec<Mutex<HashMap<u64, u32>>>,
}

impl CountMemo {
    fn new() -> Self {
        Self {
            shards: (0..MEMO_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn count(&self, encoding: Encoding, text: &str, count: impl FnOnce() -> u64) -> u64 {
        let mut hasher = DefaultHasher::new();
        (encoding as u8).hash(&mut hasher);
        text.hash(&mut hasher);
        let key = hasher.finish();
        let shard = &self.shards[(key as usize) % MEMO_SHARDS];
        let cached = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .copied();
        if let Some(tokens) = cached {
            return u64::from(tokens);
        }
        // Counted outside the lock: a long text takes a while.
        let tokens = count();
        let mut map = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= MEMO_SHARD_ENTRIES {
            map.clear();
        }
        map.insert(key, u32::try_from(tokens).unwrap_or(u32::MAX));
        tokens
    }
}

impl Tokenizers {
    /// Loads the o200k_base and cl100k_base tables.
    ///
    /// The tables are embedded in the binary, so this cannot fail today; the `Result` keeps
    /// start-up honest should loading ever become fallible.
    pub fn new() -> Result<Self, EstimateError> {
        Ok(Self {
            o200k: bpe_openai::o200k_base(),
            cl100k: bpe_openai::cl100k_base(),
            memo: Some(CountMemo::new()),
        })
    }

    /// The same tables without the memo of recent counts: every count runs the tokenizer.
    /// For benchmarks, whose repeated inputs would otherwise only measure the memo.
    pub fn without_memo() -> Result<Self, EstimateError> {
        Ok(Self {
            memo: None,
            ..Self::new()?
        })
    }

    /// The number of tokens of `text` in `encoding`, special-token text (`<|endoftext|>`)
    /// counted as ordinary text, as the API does for user content. Linear in the length of
    /// `text`; never panics.
    pub fn count(&self, encoding: Encoding, text: &str) -> u64 {
        let bpe = self.bpe(encoding);
        match &self.memo {
            Some(memo) if text.len() >= MEMO_MIN_BYTES => {
                memo.count(encoding, text, || bpe.count(text) as u64)
            }
            _ => bpe.count(text) as u64,
        }
    }

    /// Counts a sample on the calling thread, so that whatever each thread builds lazily for
    /// matching is built at start-up rather than during a request.
    pub fn warm(&self) {
        const SAMPLE: &str = "Warm up: words, numbers 12345, punctuation!? and\n\tspaces; \
                              ÜnïcödÉ, 漢字, emoji 😀 and code `fn main() {}`.";
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            self.count(encoding, SAMPLE);
        }
    }

    fn bpe(&self, encoding: Encoding) -> &'static Tokenizer {
        match encoding {
            Encoding::O200kBase | Encoding::O200kHarmony => self.o200k,
            Encoding::Cl100kBase => self.cl100k,
        }
    }
}

impl fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizers").finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// The tables, loaded once per test process.
    pub(in crate::estimate) fn tokenizers() -> &'static Tokenizers {
        static TOKENIZERS: OnceLock<Tokenizers> = OnceLock::new();
        TOKENIZERS.get_or_init(|| Tokenizers::new().expect("the embedded tables load"))
    }

    /// tiktoken's own count (tiktoken-rs, the reference implementation).
    fn naive(encoding: Encoding, text: &str) -> u64 {
        static O200K: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
        static CL100K: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
        let bpe = match encoding {
            Encoding::O200kBase | Encoding::O200kHarmony => {
                O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("embedded table"))
            }
            Encoding::Cl100kBase => {
                CL100K.get_or_init(|| tiktoken_rs::cl100k_base().expect("embedded table"))
            }
        };
        bpe.encode_ordinary(text).len() as u64
    }

    const ENCODINGS: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];

    const PROSE: &str = "It was the best of times, it was the worst of times, it was the age \
        of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch \
        of incredulity, it was the season of Light, it was the season of Darkness, it was the \
        spring of hope, it was the winter of despair.\n\nWe had everything before us, we had \
        nothing before us; we were all going direct to Heaven, we were all going direct the \
        other way. In short, the period was so far like the present period, that some of its \
        noisiest authorities insisted on its being received, for good or for evil, in the \
        superlative degree of comparison only. There were 2 kings & 1,234 queens (I'd say \
        they're \"mostly\" fine) -- e.g. U.S.A. 1999/12/31 at 23:59:59.\r\n\tDon't panic!\n";

    const CODE: &str = r#"
fn cut_point(text: &str, max_len: usize) -> usize {
    let mut last_boundary = 0;
    for (i, c) in text.char_indices() {
        if i + c.len_utf8() > max_len {
            return if last_boundary > 0 { last_boundary } else { i };
        }
    }
    text.len() // 100% safe, see #42: x[0]+=y*2;
}
"#;

    const JSON: &str = r#"{"type":"object","properties":{"location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},"unit":{"type":"string","enum":["celsius","fahrenheit"]},"days":{"type":"integer","minimum":1,"maximum":14}},"required":["location"],"additionalProperties":false}"#;

    /// Mixed scripts, combining marks, emoji, CJK, and whitespace other than ASCII spaces.
    const UNICODE: &str = "Ça va? Ἐν ἀρχῇ ἦν ὁ λόγος. 東京都は日本の首都です。\u{3000}안녕하세요! \
        Привет, мир 👋🏽 e\u{301}te\u{301} ½ Ⅻ ٣٤٥ नमस्ते\u{a0}दुनिया";

    #[test]
    fn pins_known_counts() {
        let t = tokenizers();
        assert_eq!(t.count(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(t.count(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(t.count(Encoding::O200kHarmony, "hello world"), 2);
        assert_eq!(t.count(Encoding::O200kBase, ""), 0);
        // Special-token text is ordinary text: several tokens, not one.
        assert!(t.count(Encoding::Cl100kBase, "<|endoftext|>") > 1);
    }

    #[test]
    fn natural_text_counts_exactly_as_tiktoken() {
        let t = tokenizers();
        let long_prose = PROSE.repeat(40);
        let long_json = format!("[{}]", [JSON; 30].join(","));
        for text in [PROSE, CODE, JSON, UNICODE, &long_prose, &long_json] {
            for encoding in ENCODINGS {
                assert_eq!(
                    t.count(encoding, text),
                    naive(encoding, text),
                    "{encoding:?}: {text:.40}"
                );
            }
        }
    }

    #[test]
    fn o200k_harmony_encodes_ordinary_text_as_o200k_base() {
        let harmony = tiktoken_rs::o200k_harmony().expect("the embedded table loads");
        for text in [PROSE, CODE, JSON, UNICODE] {
            assert_eq!(
                harmony.encode_ordinary(text).len() as u64,
                naive(Encoding::O200kBase, text)
            );
        }
    }

    #[test]
    fn adversarial_runs_count_exactly_as_tiktoken() {
        let t = tokenizers();
        let runs = [
            "a".repeat(20_000),
            "A".repeat(20_000),
            "😀".repeat(5_000),
            "7".repeat(20_000),
            "!".repeat(20_000),
            " ".repeat(20_000),
            "\n".repeat(20_000),
            "中".repeat(7_000),
            "ab1+/=".repeat(3_000),
            "e\u{301}".repeat(7_000),
            ".\n".repeat(10_000),
            "x".repeat(20_000) + &" ".repeat(20_000),
        ];
        for run in &runs {
            for encoding in ENCODINGS {
                assert_eq!(
                    t.count(encoding, run),
                    naive(encoding, run),
                    "{encoding:?} {:?}...",
                    run.chars().next()
                );
            }
        }
    }

    #[test]
    fn a_megabyte_of_spaces_does_not_panic() {
        // tiktoken's own encode_ordinary panics on this under o200k (regex stack overflow).
        let spaces = " ".repeat(1_000_000);
        assert_eq!(tokenizers().count(Encoding::O200kBase, &spaces), 7813);
    }

    #[test]
    fn memoized_counts_are_the_counts() {
        let t = Tokenizers::new().expect("tables");
        let long = PROSE.repeat(3);
        for _ in 0..3 {
            for encoding in ENCODINGS {
                assert_eq!(t.count(encoding, &long), naive(encoding, &long));
                assert_eq!(t.count(encoding, PROSE), naive(encoding, PROSE));
            }
        }
        // A shard that fills up is cleared, not grown.
        for i in 0..(MEMO_SHARD_ENTRIES * MEMO_SHARDS * 2) {
            t.count(Encoding::O200kBase, &format!("{i} {}", "x ".repeat(150)));
        }
        for shard in &t.memo.as_ref().expect("memo on by default").shards {
            assert!(shard.lock().expect("test mutex").len() <= MEMO_SHARD_ENTRIES);
        }
    }

    #[test]
    fn tokenizers_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tokenizers>();
    }

    #[test]
    fn encodings_by_model() {
        let cases = [
            ("gpt-4o", Encoding::O200kBase),
            ("gpt-4o-mini-2024-07-18", Encoding::O200kBase),
            (
                "ft:gpt-4o-mini-2024-07-18:acme:support:abc123",
                Encoding::O200kBase,
            ),
            ("gpt-4.1-nano", Encoding::O200kBase),
            ("gpt-4.5-preview", Encoding::O200kBase),
            ("gpt-5", Encoding::O200kBase),
            ("gpt-5-mini", Encoding::O200kBase),
            ("o1", Encoding::O200kBase),
            ("o3-mini", Encoding::O200kBase),
            ("o4-mini-2025-04-16", Encoding::O200kBase),
            ("chatgpt-4o-latest", Encoding::O200kBase),
            ("gpt-4", Encoding::Cl100kBase),
            ("GPT-4", Encoding::Cl100kBase),
            ("gpt-4-0613", Encoding::Cl100kBase),
            ("gpt-4-turbo", Encoding::Cl100kBase),
            ("gpt-4-32k", Encoding::Cl100kBase),
            ("ft:gpt-3.5-turbo-0125:acme::xyz", Encoding::Cl100kBase),
            ("gpt-3.5-turbo", Encoding::Cl100kBase),
            ("gpt-35-turbo-16k", Encoding::Cl100kBase),
            ("text-embedding-3-small", Encoding::Cl100kBase),
            ("text-embedding-ada-002", Encoding::Cl100kBase),
            ("gpt-oss-120b", Encoding::O200kHarmony),
            ("llama-3.1-8b-instruct", Encoding::O200kBase),
            ("", Encoding::O200kBase),
            ("ft:", Encoding::O200kBase),
        ];
        for (model, want) in cases {
            assert_eq!(Encoding::for_model(model), want, "{model}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Counts equal tiktoken's on text mixing every kind of piece the split regex knows.
        #[test]
        fn counts_equal_tiktoken(
            text in "([a-zA-Z]{1,4}|[0-9]{1,4}|[ \\t\\r\\n]{1,3}|['\".,!?/:;(){}<>_-]{1,3}|\
                      [\u{301}\u{a0}\u{3000}½Ⅻ٣é東😀👋🏽]){0,60}"
        ) {
            let t = tokenizers();
            for encoding in ENCODINGS {
                proptest::prop_assert_eq!(t.count(encoding, &text), naive(encoding, &text), "{:?}", encoding);
            }
        }
    }
}
