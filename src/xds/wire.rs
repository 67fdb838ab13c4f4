//! Generated gRPC services and wire messages (proto/winmesh/*.proto). Responses carry each resource
//! payload as shared `Bytes`; requests are envoy-types' own messages.

#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
        pub mod secret {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.secret.v3.rs"));
            }
        }
    }
}

pub use envoy::service::discovery::v3::*;
pub use envoy::service::secret::v3 as sds;
