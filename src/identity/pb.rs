//! istiod's `IstioCertificateService`, generated from proto/istio/ca.proto.

#[allow(clippy::all, missing_docs)]
pub mod istio {
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

pub use istio::v1::auth::*;
