//! Tandem's `.proto` files and their generated types: the public `tandem.v1` API and the
//! internal `tandem.internal.v1` worker RPCs. Nothing here is written by hand.

/// The public API: `tandem.v1.Inference`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// Worker and KV-control RPCs between the router and the workers.
pub mod internal {
    /// Version 1 of the internal RPCs.
    pub mod v1 {
        tonic::include_proto!("tandem.internal.v1");
    }
}

/// The subset of etcd's v3 API the registry uses (KV, Lease, Watch).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Encoded `FileDescriptorSet` of every Tandem proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
