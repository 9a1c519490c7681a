//! Which OpenAI endpoint a request path names.
//!
//! The endpoint decides whether sluice reads the body whole (to estimate its tokens) or
//! streams it through, and it is the bounded `endpoint` label of every metric.

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
    /// Classifies a request path. `None` when the path is not under `/v1/`.
    pub fn from_path(path: &str) -> Option<Self> {
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
    fn only_estimated_endpoints_read_the_body() {
        assert!(Endpoint::ChatCompletions.reads_body());
        assert!(Endpoint::Responses.reads_body());
        assert!(!Endpoint::Files.reads_body());
        assert!(!Endpoint::Audio.reads_body());
        assert!(!Endpoint::Other.reads_body());
    }
}
