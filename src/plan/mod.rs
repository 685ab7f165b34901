//! The budget planner: measure how much each tensor suffers under each format, then choose one
//! format per tensor that minimises the predicted error within a memory budget.
//!
//! [`calibrate`] collects input statistics, [`fisher`] the loss gradients, [`sensitivity`] turns
//! them into predicted errors, [`allocate`] chooses (with [`knapsack`] for the optimal strategy)
//! within a [`budget`], [`quantize`] runs the job end to end and [`report`] presents it.

pub mod allocate;
pub mod budget;
pub mod calibrate;
pub mod fisher;
pub mod frontier;
pub mod kl_sensitivity;
pub mod knapsack;
pub mod quantize;
pub mod report;
pub mod sensitivity;
pub mod sparse_alloc;
pub mod sparsify;
