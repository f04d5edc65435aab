//! Decode worker. Today it runs one prompt end to end in this process (`generate`), the
//! single-process reference the disaggregated path must match token for token.

pub mod generate;
