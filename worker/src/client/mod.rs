//! Client-side commands that talk to the fleet's services rather than run the model:
//! [`submit`] (the bulk client), [`model_store`] (model packages in S3, for init containers)
//! and [`probe`] (container health checks).

pub mod model_store;
pub mod probe;
pub mod submit;
