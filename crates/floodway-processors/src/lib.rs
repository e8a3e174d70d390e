//! Ready-made Floodway processors, configured in a TOML file or built in Rust:
//!
//! | kind | what it does |
//! |---|---|
//! | `materialize` | events of chosen types into a latest-wins view ([`processors::materialize`]) |
//! | `http` | events to an external API, rate-limited, with adaptive or fixed concurrency, timeouts, retries and the breaker; responses optionally published as events ([`processors::http_gateway`]) |
//! | `forward` | events into another hub ([`processors::forward`]) |
//! | `fault-monitor` | fault events into the fault store ([`processors::fault_monitor`]) |
//!
//! Every processor reads the subscription named after it and sends its faults to the hub as
//! `fault` events, where the fault monitor stores them. The hub is the embedded SQLite file or
//! a NATS JetStream stream ([`hubs`]); views and faults are kept in the SQLite file either way.
//! [`config`] describes the file format.

pub mod background;
pub mod config;
pub mod hubs;
pub mod processors;

pub use background::{start_background, Background, BackgroundReport};
pub use config::{Config, ConfigError, ProcessorConfig};
pub use hubs::Hubs;
pub use processors::{
    build_all, cep_timers, from_config, run_all, run_all_pausable, Pauses, SetupError,
};
