//! Token estimation (in progress).
