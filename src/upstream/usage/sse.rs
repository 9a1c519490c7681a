//! The SSE stream scanner: frames events incrementally as chunks pass, parses only the few
//! that can carry usage or an error, and can strip the usage chunk sluice itself asked for.

use std::borrow::Cow;

use bytes::Bytes;

use crate::endpoint::Endpoint;

use serde::Deserialize;

use super::{is_json_space, Envelope, RawUsage, Usage};

/// Bytes of an incomplete event kept for scanning when not stripping. Usage events are small
/// and usage sits at the end of the big ones (`response.completed`), so a longer event keeps
/// only its tail, plus a note of what its head said.
const SCAN_CARRY_CAP: usize = 64 * 1024;
/// The most bytes of one incomplete event held back from the client while stripping.
const STRIP_HOLD_CAP: usize = 1024 * 1024;
/// How much of an event's start tells its type: the `event:` line, or the data's leading
/// `"type"` member.
const HEAD_LEN: usize = 1024;

/// A Responses API terminal event, the one that carries the usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Terminal {
    /// `response.completed` or `response.incomplete`.
    Ended,
    /// `response.failed`: the usage may still be there, and the stream counts as an error.
    Failed,
}

impl Terminal {
    fn from_type(name: &[u8]) -> Option<Self> {
        match name {
            b"response.completed" | b"response.incomplete" => Some(Self::Ended),
            b"response.failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// Incremental SSE framing: finds where each event ends (at a blank line, with any of the
/// line endings the SSE spec allows: `\n`, `\r\n`, `\r`), across chunk boundaries.
#[derive(Debug)]
struct Framer {
    /// Only line endings since the last line ending, so another one makes a blank line.
    at_line_start: bool,
    /// The last byte was a `\r` ending a line, so an `\n` now completes that `\r\n`.
    after_cr: bool,
    /// A blank line ended with a `\r` that was the last byte seen: the event is complete, but
    /// whether the next byte (an `\n`) belongs to its ending is not known yet. Stripping needs
    /// exact event bounds, so the event stays incomplete until that byte arrives.
    pending_end: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            at_line_start: true,
            after_cr: false,
            pending_end: false,
        }
    }
}

fn is_line_end(b: &u8) -> bool {
    *b == b'\n' || *b == b'\r'
}

impl Framer {
    /// Scans `bytes[from..]` and returns the index just past the end of the next complete
    /// event (its blank line included), or `None` once every byte is consumed without one.
    fn next_end(&mut self, bytes: &[u8], from: usize) -> Option<usize> {
        let mut i = from;
        if self.pending_end && i < bytes.len() {
            self.pending_end = false;
            return Some(if bytes[i] == b'\n' { i + 1 } else { i });
        }
        while i < bytes.len() {
            match bytes[i] {
                b'\n' if self.after_cr => {
                    self.after_cr = false;
                    i += 1;
                }
                b'\n' if self.at_line_start => return Some(i + 1),
                b'\r' if self.at_line_start => {
                    self.after_cr = false;
                    return match bytes.get(i + 1) {
                        Some(b'\n') => Some(i + 2),
                        Some(_) => Some(i + 1),
                        None => {
                            self.pending_end = true;
                            None
                        }
                    };
                }
                b => {
                    if is_line_end(&b) {
                        self.at_line_start = true;
                        self.after_cr = b == b'\r';
                        i += 1;
                    } else {
                        self.at_line_start = false;
                        self.after_cr = false;
                        let rest = &bytes[i + 1..];
                        i += 1 + rest.iter().position(is_line_end).unwrap_or(rest.len());
                    }
                }
            }
        }
        None
    }
}

/// The lines of an event, split at `\r\n`, `\n` or `\r`.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match rest.iter().position(is_line_end) {
            None => (rest, &rest[rest.len()..]),
            Some(i) => {
                let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
                let next = if crlf { i + 2 } else { i + 1 };
                (&rest[..i], &rest[next..])
            }
        };
        rest = next;
        Some(line)
    })
}

/// The fields of one SSE event that matter here: its `event:` name and its data, with
/// several `data:` lines joined by `\n` as the SSE spec says.
struct Fields<'a> {
    name: Option<&'a [u8]>,
    data: Cow<'a, [u8]>,
}

impl<'a> Fields<'a> {
    fn parse(event: &'a [u8]) -> Self {
        let mut name = None;
        let mut data: Option<Cow<'a, [u8]>> = None;
        for line in lines(event) {
            if line.first().is_none_or(|b| *b == b':') {
                continue;
            }
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &line[line.len()..]),
            };
            match field {
                b"event" => name = Some(value),
                b"data" => {
                    data = Some(match data {
                        None => Cow::Borrowed(value),
                        Some(previous) => {
                            let mut joined = previous.into_owned();
                            joined.push(b'\n');
                            joined.extend_from_slice(value);
                            Cow::Owned(joined)
                        }
                    })
                }
                _ => {}
            }
        }
        Self {
            name,
            data: data.unwrap_or(Cow::Borrowed(b"")),
        }
    }

    fn named(&self, name: &str) -> bool {
        self.name == Some(name.as_bytes())
    }
}

/// What a cheap byte scan of event data found, deciding whether it is worth parsing. Quotes
/// inside JSON strings are escaped, so a `"usage"` or `"error"` token with bare quotes is a
/// real key or value, never text a model wrote.
#[derive(Default)]
struct Marks {
    /// A `"usage"` key whose value is an object (not the `null` of ordinary chat chunks).
    usage: bool,
    /// An `"error"` key whose value is not `null`, or an `"error"` string value (`"type"`).
    error: bool,
    /// A quoted terminal event type, for streams without `event:` lines.
    terminal: Option<Terminal>,
}

impl Marks {
    fn scan(data: &[u8]) -> Self {
        let mut marks = Self::default();
        let mut i = 0;
        while let Some(offset) = data[i..].iter().position(|b| *b == b'"') {
            let quote = i + offset;
            let rest = &data[quote + 1..];
            if let Some(after) = rest.strip_prefix(b"usage\"") {
                marks.usage |= value_after_colon(after) == Some(b'{');
            } else if let Some(after) = rest.strip_prefix(b"error\"") {
                marks.error |= value_after_colon(after) != Some(b'n');
            } else if rest.starts_with(b"response.") {
                let name_len = rest.iter().position(|b| *b == b'"').unwrap_or(rest.len());
                if let Some(terminal) = Terminal::from_type(&rest[..name_len]) {
                    marks.terminal = Some(terminal);
                }
            }
            i = quote + 1;
        }
        marks
    }
}

/// The first byte of the value after a key's closing quote, or `None` when no colon follows
/// (the token was a value, not a key).
fn value_after_colon(after: &[u8]) -> Option<u8> {
    let mut rest = after.iter().copied().skip_while(|b| is_json_space(*b));
    if rest.next()? != b':' {
        return None;
    }
    rest.find(|b| !is_json_space(*b))
}

/// The last top-level-looking `usage` in the tail of an event whose head was dropped: the
/// last `"usage": {` whose object parses with a prompt count. Responses put `usage` after
/// `output` and `tools`, so a nested `"usage"` (a tool's parameter schema) comes earlier and
/// lacks token counts anyway.
fn usage_from_tail(tail: &[u8], endpoint: Endpoint) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(key) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        let after = &tail[key + KEY.len()..];
        if value_after_colon(after) == Some(b'{') {
            if let Some(open) = after.iter().position(|b| *b == b'{') {
                // Reads one object and ignores what follows it: the rest of the event.
                let mut de = serde_json::Deserializer::from_slice(&after[open..]);
                let usage = RawUsage::deserialize(&mut de)
                    .ok()
                    .and_then(|raw| raw.resolve(endpoint));
                if usage.is_some() {
                    return usage;
                }
            }
        }
        end = key;
    }
    None
}

/// Watches an SSE response stream as it passes through the proxy, chunk by chunk, and finds
/// the usage in it.
///
/// - Chat and legacy completions (and any other endpoint but responses): the last event
///   whose data has a top-level `usage` object. With `include_usage` that is the final chunk
///   with `"choices": []`, just before `data: [DONE]`.
/// - Responses: the `response.usage` of the terminal `response.completed`,
///   `response.incomplete` or `response.failed` event.
///
/// Events end at a blank line with any SSE line ending; they may be split across chunks
/// anywhere and one chunk may hold many. Memory is bounded: at most 64 KiB of an incomplete
/// event is carried for scanning, and at most 1 MiB held back while stripping.
#[derive(Debug)]
pub struct SseUsage {
    endpoint: Endpoint,
    strip: bool,
    framer: Framer,
    /// The incomplete event so far: whole while stripping, else at most its last
    /// `SCAN_CARRY_CAP` bytes.
    carry: Vec<u8>,
    /// `carry` lost the head of its event (scan mode only).
    truncated: bool,
    /// What the lost head said, when `truncated`.
    truncated_head: Option<Terminal>,
    usage: Option<Usage>,
    saw_error: bool,
}

impl SseUsage {
    /// `strip_usage_chunk`: sluice added `include_usage` itself, so the client did not ask
    /// for the usage-only chunk and must not see it. Exactly that event (a chunk with
    /// `"choices": []` and a non-null `usage`) is removed from the bytes forwarded; every
    /// other byte is left identical. Only chat and legacy completions streams have that
    /// chunk, so for other endpoints the flag is ignored (nothing is held back for nothing).
    /// When not stripping, bytes pass through unchanged.
    pub fn new(endpoint: Endpoint, strip_usage_chunk: bool) -> Self {
        Self {
            endpoint,
            strip: strip_usage_chunk
                && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions),
            framer: Framer::default(),
            carry: Vec::new(),
            truncated: false,
            truncated_head: None,
            usage: None,
            saw_error: false,
        }
    }

    /// Feeds the next chunk of the upstream body and returns the bytes to forward now.
    ///
    /// Not stripping: returns the same `Bytes` (zero-copy) and only scans. Stripping: may
    /// hold back an incomplete trailing event until its end arrives; an incomplete event
    /// over 1 MiB cannot be the usage chunk, so stripping stops for the rest of the stream
    /// and everything held is forwarded.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.strip {
            self.feed_stripping(chunk)
        } else {
            self.scan(&chunk);
            chunk
        }
    }

    /// End of stream: returns anything held back. An event the stream ended inside (no
    /// blank line after it) still counts for usage: SSE clients drop it, but the upstream
    /// did report it.
    pub fn finish(&mut self) -> Bytes {
        self.framer = Framer::default();
        let held = std::mem::take(&mut self.carry);
        if held.is_empty() {
            return Bytes::new();
        }
        let stripped = if std::mem::take(&mut self.truncated) {
            let head = self.truncated_head.take();
            self.on_truncated_event(head, &held);
            false
        } else {
            self.on_event(&held)
        };
        if self.strip && !stripped {
            Bytes::from(held)
        } else {
            Bytes::new()
        }
    }

    /// The usage seen so far (the last one found).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether an error event was seen: `data: {"error": ...}`, an `event: error` (or
    /// `"type": "error"`) event, or a `response.failed` event (a mid-stream upstream error).
    pub fn saw_error(&self) -> bool {
        self.saw_error
    }

    /// Scan mode: handles every event that completes in `chunk` and carries the rest.
    fn scan(&mut self, chunk: &[u8]) {
        let mut start = 0;
        while let Some(end) = self.framer.next_end(chunk, start) {
            if self.carry.is_empty() {
                self.on_event(&chunk[start..end]);
            } else {
                self.carry_for_scan(&chunk[start..end]);
                let event = std::mem::take(&mut self.carry);
                if std::mem::take(&mut self.truncated) {
                    let head = self.truncated_head.take();
                    self.on_truncated_event(head, &event);
                } else {
                    self.on_event(&event);
                }
                // Keeps the allocation for the next split event.
                self.carry = event;
                self.carry.clear();
            }
            start = end;
        }
        self.carry_for_scan(&chunk[start..]);
    }

    /// Appends to the scan carry, keeping only its last `SCAN_CARRY_CAP` bytes; the first
    /// time the head is dropped, notes whether it named a terminal event.
    fn carry_for_scan(&mut self, piece: &[u8]) {
        let len = self.carry.len() + piece.len();
        if len <= SCAN_CARRY_CAP {
            self.carry.extend_from_slice(piece);
            return;
        }
        if !self.truncated {
            let mut head = Vec::with_capacity(HEAD_LEN);
            head.extend_from_slice(&self.carry[..self.carry.len().min(HEAD_LEN)]);
            let more = HEAD_LEN - head.len();
            head.extend_from_slice(&piece[..piece.len().min(more)]);
            self.truncated = true;
            self.truncated_head = head_terminal(&head);
        }
        if piece.len() >= SCAN_CARRY_CAP {
            self.carry.clear();
            self.carry
                .extend_from_slice(&piece[piece.len() - SCAN_CARRY_CAP..]);
        } else {
            self.carry.drain(..len - SCAN_CARRY_CAP);
            self.carry.extend_from_slice(piece);
        }
    }

    fn feed_stripping(&mut self, chunk: Bytes) -> Bytes {
        let out = if self.carry.is_empty() {
            let (tail, kept) = self.strip_events(&chunk, 0);
            self.carry.extend_from_slice(&chunk[tail..]);
            match kept {
                // The usual case: whole events, none stripped, no copy.
                None => chunk.slice(..tail),
                Some(kept) => Bytes::from(kept),
            }
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            let scanned = buf.len();
            buf.extend_from_slice(&chunk);
            let (tail, kept) = self.strip_events(&buf, scanned);
            self.carry = buf.split_off(tail);
            Bytes::from(kept.unwrap_or(buf))
        };
        if self.carry.len() <= STRIP_HOLD_CAP {
            return out;
        }
        // An event this long is not the small usage-only chunk: stop holding anything back.
        self.strip = false;
        let held = std::mem::take(&mut self.carry);
        let mut all = Vec::with_capacity(out.len() + held.len());
        all.extend_from_slice(&out);
        all.extend_from_slice(&held);
        self.carry_for_scan(&held);
        Bytes::from(all)
    }

    /// Handles the events that complete in `buf`, where the held event starts at 0 and bytes
    /// before `from` were framed already. Returns where the incomplete tail starts and, when
    /// an event was stripped, the bytes before the tail that are kept.
    fn strip_events(&mut self, buf: &[u8], from: usize) -> (usize, Option<Vec<u8>>) {
        let mut start = 0;
        let mut scan_from = from;
        let mut kept_from = 0;
        let mut kept: Option<Vec<u8>> = None;
        while let Some(end) = self.framer.next_end(buf, scan_from) {
            if self.on_event(&buf[start..end]) {
                kept.get_or_insert_with(|| Vec::with_capacity(buf.len()))
                    .extend_from_slice(&buf[kept_from..start]);
                kept_from = end;
            }
            start = end;
            scan_from = end;
        }
        if let Some(kept) = kept.as_mut() {
            kept.extend_from_slice(&buf[kept_from..start]);
        }
        (start, kept)
    }

    /// Handles one complete event; returns whether it is the usage-only chunk to strip.
    fn on_event(&mut self, event: &[u8]) -> bool {
        let fields = Fields::parse(event);
        if fields.named("error") {
            self.saw_error = true;
        }
        let data = fields.data.as_ref();
        if data.is_empty() || data == b"[DONE]" {
            return false;
        }
        if self.endpoint == Endpoint::Responses {
            self.on_responses_event(&fields);
            return false;
        }
        let marks = Marks::scan(data);
        if !marks.usage && !marks.error {
            return false;
        }
        let Some(envelope) = Envelope::parse(data) else {
            return false;
        };
        self.saw_error |= envelope.is_error();
        let Some(raw) = envelope.usage else {
            return false;
        };
        if let Some(usage) = raw.resolve(self.endpoint) {
            self.usage = Some(usage);
        }
        self.strip && envelope.choices.is_some_and(|choices| choices.is_empty())
    }

    fn on_responses_event(&mut self, fields: &Fields<'_>) {
        let data = fields.data.as_ref();
        // OpenAI names every event, so the name alone rules out the many delta events.
        let (named_terminal, candidate) = match fields.name {
            Some(name) => {
                let terminal = Terminal::from_type(name);
                (terminal, terminal.is_some() || fields.named("error"))
            }
            None => {
                let marks = Marks::scan(data);
                (None, marks.terminal.is_some() || marks.error)
            }
        };
        if named_terminal == Some(Terminal::Failed) {
            self.saw_error = true;
        }
        if !candidate {
            return;
        }
        let Some(envelope) = Envelope::parse(data) else {
            return;
        };
        self.saw_error |= envelope.is_error();
        let terminal = named_terminal.or_else(|| {
            envelope
                .kind
                .as_deref()
                .and_then(|kind| Terminal::from_type(kind.as_bytes()))
        });
        let Some(terminal) = terminal else {
            return;
        };
        self.saw_error |= terminal == Terminal::Failed;
        let usage = envelope
            .response
            .and_then(|response| response.usage)
            .and_then(|raw| raw.resolve(self.endpoint));
        if usage.is_some() {
            self.usage = usage;
        }
    }

    /// An event longer than the scan carry: only its tail and what its head said are left.
    fn on_truncated_event(&mut self, head: Option<Terminal>, tail: &[u8]) {
        if self.endpoint == Endpoint::Responses {
            match head {
                None => return,
                Some(terminal) => self.saw_error |= terminal == Terminal::Failed,
            }
        }
        if let Some(usage) = usage_from_tail(tail, self.endpoint) {
            self.usage = Some(usage);
        }
    }
}

/// Whether the first bytes of an event name a terminal Responses API event, by its `event:`
/// line or, failing that, a quoted type in its data.
fn head_terminal(head: &[u8]) -> Option<Terminal> {
    let fields = Fields::parse(head);
    match fields.name {
        Some(name) => Terminal::from_type(name),
        None => Marks::scan(&fields.data).terminal,
    }
}

/// The fixtures are shared with the JSON tests of [`super`].
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHAT_ID: &str = r#""id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8""#;

    fn chat_chunk(choices: &str, usage: &str) -> String {
        format!("data: {{{CHAT_ID},\"choices\":{choices},\"usage\":{usage}}}")
    }

    fn delta(content: &str) -> String {
        chat_chunk(
            &format!(
                r#"[{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}]"#,
                serde_json::to_string(content).expect("a string serializes")
            ),
            "null",
        )
    }

    pub(in crate::upstream::usage) const CHAT_USAGE: &str = r#"{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;

    /// The events of a chat stream with `include_usage`, and the index of the usage chunk.
    fn chat_events() -> (Vec<String>, usize) {
        let events = vec![
            chat_chunk(
                r#"[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]"#,
                "null",
            ),
            delta("Hello"),
            // Model text about usage is escaped JSON, and must not look like a usage chunk.
            delta(
                r#"! Your "usage": {"prompt_tokens": 1, "completion_tokens": 2} and "choices": []"#,
            ),
            delta(" How can I help?"),
            chat_chunk(
                r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]"#,
                "null",
            ),
            chat_chunk("[]", CHAT_USAGE),
            "data: [DONE]".to_owned(),
        ];
        (events, 5)
    }

    const RESPONSE_HEAD: &str = r#""id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958"#;
    // A tool whose parameter is named "usage": echoed back in the response object.
    const TOOLS: &str = r#""tools":[{"type":"function","name":"report","description":"Report a usage figure.","parameters":{"type":"object","properties":{"usage":{"type":"object","properties":{"input_tokens":{"type":"integer"}}}}},"strict":true}]"#;
    pub(in crate::upstream::usage) const RESPONSES_USAGE: &str = r#"{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}"#;

    pub(in crate::upstream::usage) fn response_object(
        status: &str,
        output: &str,
        usage: &str,
    ) -> String {
        format!(
            r#"{{{RESPONSE_HEAD},"status":"{status}","background":false,"error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":{output},"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":null,"summary":null}},"store":true,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto",{TOOLS},"top_p":1.0,"truncation":"disabled","usage":{usage},"user":null,"metadata":{{}}}}"#
        )
    }

    fn responses_event(kind: &str, seq: u32, rest: &str) -> String {
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{seq},{rest}}}")
    }

    pub(in crate::upstream::usage) fn message(text: &str) -> String {
        format!(
            r#"[{{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c5","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":{},"annotations":[]}}]}}]"#,
            serde_json::to_string(text).expect("a string serializes")
        )
    }

    fn responses_events(text: &str) -> Vec<String> {
        let item = r#""item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c5","output_index":0,"content_index":0"#;
        vec![
            responses_event(
                "response.created",
                0,
                &format!(
                    "\"response\":{}",
                    response_object("in_progress", "[]", "null")
                ),
            ),
            responses_event(
                "response.in_progress",
                1,
                &format!(
                    "\"response\":{}",
                    response_object("in_progress", "[]", "null")
                ),
            ),
            responses_event(
                "response.output_text.delta",
                2,
                &format!(r#"{item},"delta":"Hi","logprobs":[]"#),
            ),
            responses_event(
                "response.output_text.delta",
                3,
                &format!(r#"{item},"delta":" there, \"usage\": {{}}!","logprobs":[]"#),
            ),
            responses_event(
                "response.output_text.done",
                4,
                &format!(
                    "{item},\"text\":{},\"logprobs\":[]",
                    serde_json::to_string(text).expect("a string serializes")
                ),
            ),
            responses_event(
                "response.completed",
                5,
                &format!(
                    "\"response\":{}",
                    response_object("completed", &message(text), RESPONSES_USAGE)
                ),
            ),
        ]
    }

    const SEPARATORS: [&str; 3] = ["\n\n", "\r\n\r\n", "\r\r"];

    /// Joins events into a stream with `sep` as both line and event ending: `\n\n` ends
    /// `\n`-terminated lines with a blank line, and likewise for the others.
    fn stream(events: &[String], sep: &str) -> String {
        let line_end = &sep[..sep.len() / 2];
        events
            .iter()
            .map(|event| format!("{}{sep}", event.replace('\n', line_end)))
            .collect()
    }

    fn chat_fixture(sep: &str) -> (String, String) {
        let (mut events, usage_at) = chat_events();
        let whole = stream(&events, sep);
        events.remove(usage_at);
        (whole, stream(&events, sep))
    }

    /// Feeds `input` split at `splits` (sorted, deduplicated or not) and returns everything
    /// forwarded plus the scanner.
    fn run(endpoint: Endpoint, strip: bool, input: &[u8], splits: &[usize]) -> (Vec<u8>, SseUsage) {
        let mut sse = SseUsage::new(endpoint, strip);
        let mut out = Vec::new();
        let mut last = 0;
        for &split in splits.iter().chain(std::iter::once(&input.len())) {
            let split = split.clamp(last, input.len());
            out.extend_from_slice(&sse.feed(Bytes::copy_from_slice(&input[last..split])));
            last = split;
        }
        out.extend_from_slice(&sse.finish());
        (out, sse)
    }

    pub(in crate::upstream::usage) const CHAT_WANT: Usage = Usage {
        prompt_tokens: 9,
        completion_tokens: 12,
    };
    pub(in crate::upstream::usage) const RESPONSES_WANT: Usage = Usage {
        prompt_tokens: 37,
        completion_tokens: 11,
    };

    fn check_chat(sep: &str, splits: &[usize]) {
        let (whole, stripped) = chat_fixture(sep);
        let (out, sse) = run(Endpoint::ChatCompletions, false, whole.as_bytes(), splits);
        assert_eq!(out, whole.as_bytes(), "{sep:?} {splits:?}");
        assert_eq!(sse.usage(), Some(CHAT_WANT), "{sep:?} {splits:?}");
        assert!(!sse.saw_error());

        let (out, sse) = run(Endpoint::ChatCompletions, true, whole.as_bytes(), splits);
        assert_eq!(
            String::from_utf8_lossy(&out),
            stripped,
            "{sep:?} {splits:?}"
        );
        assert_eq!(sse.usage(), Some(CHAT_WANT), "{sep:?} {splits:?}");
        assert!(!sse.saw_error());
    }

    /// Not stripping only: the flag is ignored for responses (see
    /// `strip_flag_is_ignored_for_responses`).
    fn check_responses(sep: &str, splits: &[usize]) {
        let whole = stream(&responses_events("Hi there!"), sep);
        let (out, sse) = run(Endpoint::Responses, false, whole.as_bytes(), splits);
        assert_eq!(out, whole.as_bytes(), "{sep:?} {splits:?}");
        assert_eq!(sse.usage(), Some(RESPONSES_WANT), "{sep:?} {splits:?}");
        assert!(!sse.saw_error());
    }

    #[test]
    fn chat_usage_found_at_every_single_split() {
        for sep in SEPARATORS {
            let len = chat_fixture(sep).0.len();
            for split in 0..=len {
                check_chat(sep, &[split]);
            }
        }
    }

    #[test]
    fn responses_usage_found_at_every_single_split() {
        for sep in SEPARATORS {
            let len = stream(&responses_events("Hi there!"), sep).len();
            for split in 0..=len {
                check_responses(sep, &[split]);
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        for sep in SEPARATORS {
            let len = chat_fixture(sep).0.len();
            check_chat(sep, &(0..len).collect::<Vec<_>>());
            let len = stream(&responses_events("Hi there!"), sep).len();
            check_responses(sep, &(0..len).collect::<Vec<_>>());
        }
    }

    proptest! {
        /// Whatever bytes an upstream sends, in whatever chunks, the scanner never panics and,
        /// when not stripping, forwards every byte unchanged.
        #[test]
        fn garbage_never_panics(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::prelude::any::<u8>(),
                        proptest::sample::select(b"\r\n:{}[]\"data event usage choices".to_vec()),
                    ],
                    0..64,
                ),
                0..24,
            ),
            strip in proptest::prelude::any::<bool>(),
            responses in proptest::prelude::any::<bool>(),
        ) {
            let endpoint = if responses { Endpoint::Responses } else { Endpoint::ChatCompletions };
            let mut scanner = SseUsage::new(endpoint, strip);
            let mut out = Vec::new();
            for chunk in &chunks {
                out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(chunk)));
            }
            out.extend_from_slice(&scanner.finish());
            let _ = scanner.usage();
            let _ = scanner.saw_error();
            if !strip {
                let input: Vec<u8> = chunks.concat();
                proptest::prop_assert_eq!(out, input);
            }
        }
    }

    proptest! {
        #[test]
        fn usage_found_for_any_splitting(
            sep in 0..SEPARATORS.len(),
            mut splits in proptest::collection::vec(0usize..6000, 0..24),
        ) {
            splits.sort_unstable();
            check_chat(SEPARATORS[sep], &splits);
            check_responses(SEPARATORS[sep], &splits);
        }
    }

    #[test]
    fn not_stripping_returns_the_same_bytes() {
        let (whole, _) = chat_fixture("\n\n");
        let chunk = Bytes::from(whole);
        let mut sse = SseUsage::new(Endpoint::ChatCompletions, false);
        let out = sse.feed(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
        assert!(sse.finish().is_empty());
        assert_eq!(sse.usage(), Some(CHAT_WANT));
    }

    #[test]
    fn stripping_whole_events_without_usage_is_zero_copy() {
        let (events, _) = chat_events();
        let chunk = Bytes::from(stream(&events[..3], "\n\n"));
        let mut sse = SseUsage::new(Endpoint::ChatCompletions, true);
        let out = sse.feed(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
    }

    #[test]
    fn stripping_holds_back_only_an_incomplete_event() {
        let (events, usage_at) = chat_events();
        let first = stream(&events[..1], "\n\n");
        let usage = stream(&events[usage_at..=usage_at], "\n\n");
        let mut sse = SseUsage::new(Endpoint::ChatCompletions, true);
        let input = format!("{first}{}", &usage[..40]);
        assert_eq!(sse.feed(Bytes::from(input)), first.as_bytes());
        assert_eq!(sse.feed(Bytes::from(usage[40..].to_owned())), "");
        assert_eq!(sse.feed(Bytes::from_static(b"data: [DONE]")), "");
        assert_eq!(sse.finish(), "data: [DONE]");
        assert_eq!(sse.usage(), Some(CHAT_WANT));
    }

    #[test]
    fn usage_chunks_with_choices_are_not_stripped() {
        // vLLM's continuous usage stats: every chunk carries usage; only the usage-only chunk
        // that sluice asked for goes.
        let events = vec![
            chat_chunk(
                r#"[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]"#,
                r#"{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}"#,
            ),
            chat_chunk(
                "[]",
                r#"{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}"#,
            ),
            "data: [DONE]".to_owned(),
        ];
        let whole = stream(&events, "\n\n");
        let want = stream(&[events[0].clone(), events[2].clone()], "\n\n");
        let (out, sse) = run(Endpoint::ChatCompletions, true, whole.as_bytes(), &[]);
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert_eq!(
            sse.usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 2
            })
        );
    }

    #[test]
    fn text_mentioning_usage_is_not_usage() {
        let (events, usage_at) = chat_events();
        let whole = stream(&events[..usage_at], "\n\n");
        for strip in [false, true] {
            let (out, sse) = run(Endpoint::ChatCompletions, strip, whole.as_bytes(), &[]);
            assert_eq!(out, whole.as_bytes());
            assert_eq!(sse.usage(), None);
        }
    }

    #[test]
    fn comments_and_stray_blank_lines_pass_through() {
        let (events, usage_at) = chat_events();
        let whole = format!(
            "\n: keep-alive\n\n{}\n\n{}\n\n\nid: 7\n{}\n\n",
            events[1], events[2], events[usage_at]
        );
        let want = format!("\n: keep-alive\n\n{}\n\n{}\n\n\n", events[1], events[2]);
        let (out, sse) = run(Endpoint::ChatCompletions, true, whole.as_bytes(), &[]);
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert_eq!(sse.usage(), Some(CHAT_WANT));
    }

    #[test]
    fn unterminated_last_event_still_counts() {
        let (events, usage_at) = chat_events();
        let whole = format!("{}{}", stream(&events[..1], "\n\n"), events[usage_at]);
        let (out, sse) = run(Endpoint::ChatCompletions, false, whole.as_bytes(), &[100]);
        assert_eq!(out, whole.as_bytes());
        assert_eq!(sse.usage(), Some(CHAT_WANT));
    }

    #[test]
    fn legacy_completions_and_multiline_data() {
        let whole = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
        let (out, sse) = run(Endpoint::Completions, true, whole.as_bytes(), &[]);
        assert_eq!(out, b"data: [DONE]\n\n");
        assert_eq!(
            sse.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            })
        );
    }

    #[test]
    fn chat_error_event_is_detected() {
        let (events, _) = chat_events();
        let whole = format!(
            "{}data: {{\"error\":{{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}}}\n\n",
            stream(&events[..2], "\n\n")
        );
        for split in [0, 500, whole.len() - 30] {
            let (out, sse) = run(Endpoint::ChatCompletions, true, whole.as_bytes(), &[split]);
            assert_eq!(out, whole.as_bytes());
            assert!(sse.saw_error());
            assert_eq!(sse.usage(), None);
        }
    }

    #[test]
    fn responses_error_events_are_detected() {
        let events = responses_events("Hi");
        let error = r#"event: error
data: {"type":"error","code":"server_error","message":"The server had an error.","param":null,"sequence_number":3}"#;
        let whole = stream(
            &[events[0].clone(), events[2].clone(), error.to_owned()],
            "\n\n",
        );
        let (_, sse) = run(Endpoint::Responses, false, whole.as_bytes(), &[]);
        assert!(sse.saw_error());
        assert_eq!(sse.usage(), None);

        // Without `event:` lines, by the data's type.
        let unnamed = error.replace("event: error\n", "");
        let (_, sse) = run(Endpoint::Responses, false, unnamed.as_bytes(), &[]);
        assert!(sse.saw_error());

        let failed = responses_event(
            "response.failed",
            4,
            &format!(
                "\"response\":{}",
                response_object(
                    "failed",
                    "[]",
                    r#"{"input_tokens":37,"output_tokens":0,"total_tokens":37}"#
                )
            ),
        );
        let whole = stream(&[events[0].clone(), failed], "\r\n\r\n");
        let (_, sse) = run(Endpoint::Responses, false, whole.as_bytes(), &[]);
        assert!(sse.saw_error());
        assert_eq!(
            sse.usage(),
            Some(Usage {
                prompt_tokens: 37,
                completion_tokens: 0
            })
        );
    }

    #[test]
    fn responses_without_event_lines() {
        let events: Vec<String> = responses_events("Hi there!")
            .iter()
            .map(|event| event.lines().skip(1).collect())
            .collect();
        let whole = stream(&events, "\n\n");
        let (_, sse) = run(Endpoint::Responses, false, whole.as_bytes(), &[]);
        assert_eq!(sse.usage(), Some(RESPONSES_WANT));
        assert!(!sse.saw_error());
    }

    #[test]
    fn long_terminal_event_is_found_from_its_tail() {
        let text = "All work and no play makes Jack a dull boy. ".repeat(8000);
        let whole = stream(&responses_events(&text), "\n\n");
        assert!(whole.len() > 4 * SCAN_CARRY_CAP);
        for chunk_len in [1000, 4096, 70_000] {
            let mut sse = SseUsage::new(Endpoint::Responses, false);
            for chunk in whole.as_bytes().chunks(chunk_len) {
                sse.feed(Bytes::copy_from_slice(chunk));
                assert!(sse.carry.len() <= SCAN_CARRY_CAP);
            }
            sse.finish();
            assert_eq!(sse.usage(), Some(RESPONSES_WANT), "{chunk_len}");
        }
        // A long event that is not terminal does not count, even if its tail has a usage.
        let mut events = responses_events(&text);
        events.pop();
        events.push(responses_event(
            "response.output_item.done",
            6,
            &format!(
                "\"item\":{}",
                response_object("x", &message(&text), RESPONSES_USAGE)
            ),
        ));
        let whole = stream(&events, "\n\n");
        let splits: Vec<usize> = (0..whole.len()).step_by(5000).collect();
        let (_, sse) = run(Endpoint::Responses, false, whole.as_bytes(), &splits);
        assert_eq!(sse.usage(), None);
    }

    #[test]
    fn stripping_gives_up_on_a_huge_event() {
        let (mut events, _) = chat_events();
        events.insert(2, delta(&"x".repeat(3 * STRIP_HOLD_CAP / 2)));
        let whole = stream(&events, "\n\n");
        let mut sse = SseUsage::new(Endpoint::ChatCompletions, true);
        let (mut fed, mut out) = (0, Vec::new());
        for chunk in whole.as_bytes().chunks(16 * 1024) {
            fed += chunk.len();
            out.extend_from_slice(&sse.feed(Bytes::copy_from_slice(chunk)));
            assert!(fed - out.len() <= STRIP_HOLD_CAP + 16 * 1024);
            assert!(sse.carry.len() <= STRIP_HOLD_CAP);
        }
        out.extend_from_slice(&sse.finish());
        // Everything after giving up is forwarded, the usage chunk included.
        assert!(out == whole.as_bytes());
        assert_eq!(sse.usage(), Some(CHAT_WANT));
    }

    #[test]
    fn strip_flag_is_ignored_for_responses() {
        let sse = SseUsage::new(Endpoint::Responses, true);
        assert!(!sse.strip);
    }

    #[test]
    fn arrays_are_not_usage_or_events() {
        let whole = format!(
            "data: {{{CHAT_ID},\"choices\":[],\"usage\":[9,12,null,null]}}\n\n\
             data: [{{\"prompt_tokens\":5}},[],null,null,{{\"usage\":{{}}}}]\n\ndata: [DONE]\n\n"
        );
        let (out, sse) = run(Endpoint::ChatCompletions, true, whole.as_bytes(), &[]);
        assert_eq!(out, whole.as_bytes());
        assert_eq!(sse.usage(), None);
        let failed = r#"data: {"type":"response.completed","response":[{"input_tokens":1}]}"#;
        let (_, sse) = run(Endpoint::Responses, false, failed.as_bytes(), &[]);
        assert_eq!(sse.usage(), None);
    }
}
