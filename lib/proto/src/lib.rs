//! Weft's operator-to-proxy contract (`proto/weft/proxy/v1/config.proto`): the messages a proxy
//! runs on and the `ConfigDiscovery` gRPC service that streams them; and the mesh CA's
//! `Certificates` service (`proto/weft/identity/v1/ca.proto`).
//!
//! Messages serialize to and from the proto3 JSON mapping with serde (pbjson), so a YAML or JSON
//! file of a `ProxyConfig` is the same message the control plane sends.

/// Version 1 of the proxy contract.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/weft.proxy.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/weft.proxy.v1.serde.rs"));
}

/// The mesh CA's `Certificates` service (`proto/weft/identity/v1/ca.proto`): a certificate
/// request and a ServiceAccount token in, the caller's certificate out.
pub mod identity {
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/weft.identity.v1.rs"));
    }
}

/// The encoded `FileDescriptorSet` of the contract (for gRPC reflection and tooling).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
