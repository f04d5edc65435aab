//! The front door: request validation, tokenization, worker choice and P/D orchestration.
//!
//! Empty until the cluster issue; nothing here pretends to serve yet.
