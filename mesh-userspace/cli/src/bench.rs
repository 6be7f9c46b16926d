//! Benchmarks that run in the lab (`cargo xtask bench ...`). Each measures
//! Lacewing against baselines in the same run and prints ratios, ending with
//! one `RESULT` line.

pub mod control_plane;
pub mod l4;
pub mod local;
pub mod tunnel;
