//! Identifier newtypes that cross crate and process boundaries.

use std::fmt;

/// A KV transfer from a prefill worker into one decode worker's reserved blocks. Unique per
/// decode worker, which issues it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

/// A KV block index in the destination worker's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvBlockId(pub u32);

/// The client's (or the router's) id for one request; carried in logs and in the
/// `x-tandem-request-id` metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(pub String);

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
