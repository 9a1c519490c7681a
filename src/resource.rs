//! Which resource a limit meters: requests or tokens. A leaf every layer speaks: the bucket
//! meters a [`Resource`], an upstream header family ([`crate::upstream::ratelimit::Family`])
//! reports on one, and a 429 may name one ([`crate::retry::Class::RateLimited`]).

/// What a limit meters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Requests,
    Tokens,
}

impl Resource {
    pub const BOTH: [Resource; 2] = [Resource::Requests, Resource::Tokens];

    /// A Prometheus label value, and the name the status document and logs use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// One value per [`Resource`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerResource<T> {
    pub requests: T,
    pub tokens: T,
}

impl<T> PerResource<T> {
    pub fn get(&self, resource: Resource) -> &T {
        match resource {
            Resource::Requests => &self.requests,
            Resource::Tokens => &self.tokens,
        }
    }

    pub fn get_mut(&mut self, resource: Resource) -> &mut T {
        match resource {
            Resource::Requests => &mut self.requests,
            Resource::Tokens => &mut self.tokens,
        }
    }
}
