//! Client-side commands that talk to the fleet's services rather than run the model:
//! [`submit`] (the bulk client), [`dlq`] (dead letters back to the work queue) and
//! [`model_store`] (model packages in S3, for init containers) with the `service` feature, and
//! [`probe`] (container health checks, std only).

#[cfg(feature = "service")]
pub mod dlq;
#[cfg(feature = "service")]
pub mod model_store;
pub mod probe;
#[cfg(feature = "service")]
pub mod submit;
