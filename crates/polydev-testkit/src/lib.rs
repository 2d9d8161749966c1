//! What polydev's integration tests (`crates/polydev/tests`,
//! `crates/polydev-api/tests`) and its benchmarks (`polydev-bench`) share,
//! so neither re-implements the other: the `polydev serve` process they
//! start ([`Serve`]), sign-up and login bodies with real vault key
//! material ([`signup`]), and [`eventually`], the one way to wait for
//! something to become true. Never a dependency of the product.

mod enrol;
mod serve;
mod wait;

pub use enrol::{login_body, signup, wrong_login_body};
pub use serve::{user_add, Serve};
pub use wait::{eventually, eventually_blocking, eventually_every};
