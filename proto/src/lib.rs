//! Tandem's `.proto` files and their generated types.
//!
//! Empty until the gRPC API lands (`tandem.v1.Inference`, `tandem.v1.Admin`,
//! `tandem.internal.v1`); nothing here pretends to serve yet.
