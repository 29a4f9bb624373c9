//! The reliability guarantees of issue #9 (README, "Guarantees"), one module per property, each
//! proven with real traffic in network namespaces.

mod api_faults;
mod bad_input;
mod coexistence;
mod contention;
mod fuzz;
mod hostile;
mod restart;
mod security;
mod zero_loss;
