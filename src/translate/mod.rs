//! Pure functions from the mesh model and current certificates to Envoy resources. No I/O.

pub mod secret;
