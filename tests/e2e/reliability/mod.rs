//! The reliability guarantees of issue #9 (README, "Guarantees"), one module per property, each
//! proven with real traffic in network namespaces.

mod api_faults;
mod bad_input;
mod clash;
mod cli;
mod coexistence;
mod contention;
mod fuzz;
mod hostile;
mod lasting_faults;
mod restart;
mod security;
mod zero_loss;
