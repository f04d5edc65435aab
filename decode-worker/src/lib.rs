//! Decode worker: the `serve` subcommand starts a Tandem worker (`tandem-worker`) in the
//! decode role; `generate` is the single-process reference run the disaggregated path must
//! match token for token.

pub mod generate;
