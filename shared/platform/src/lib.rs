//! The ground every clm service stands on: typed configuration from `CLM_*`
//! environment variables, the gRPC server bootstrap with health, reflection
//! and graceful shutdown, telemetry, the error → `tonic::Status` vocabulary,
//! database connections picked by DSN scheme with embedded migrations, the
//! versioned hot-object cache (Redis or in-process), page tokens, and the
//! [`service::Service`] value each service of the binary is.

pub mod cache;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod identity;
pub mod paging;
pub mod secret;
pub mod server;
pub mod service;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod validate;

pub use config::{ConfigError, Env, Limits, PlatformConfig};
pub use error::{FieldViolation, StatusBuilder};
pub use secret::Secret;
