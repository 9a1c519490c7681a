//! Which class a request waits in, and values kept per class.
//!
//! A leaf: the configuration, the org table, the access log and the queue all name a
//! priority without importing each other.

use std::ops::{Index, IndexMut};

use serde::Deserialize;

/// Which class a request waits in: interactive requests go first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// Every class, in the order they are served.
    pub const ALL: [Priority; 2] = [Priority::Interactive, Priority::Batch];

    /// Parses the `x-sluice-priority` header value; `None` when unrecognized.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }
}

/// One `T` per class, indexed by [`Priority`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByPriority<T> {
    pub interactive: T,
    pub batch: T,
}

impl<T> Index<Priority> for ByPriority<T> {
    type Output = T;

    fn index(&self, priority: Priority) -> &T {
        match priority {
            Priority::Interactive => &self.interactive,
            Priority::Batch => &self.batch,
        }
    }
}

impl<T> IndexMut<Priority> for ByPriority<T> {
    fn index_mut(&mut self, priority: Priority) -> &mut T {
        match priority {
            Priority::Interactive => &mut self.interactive,
            Priority::Batch => &mut self.batch,
        }
    }
}
