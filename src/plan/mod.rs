//! The budget planner: measure how much each tensor suffers under each format, then choose one
//! format per tensor that minimises the predicted error within a memory budget.

pub mod calibrate;
pub mod knapsack;
pub mod sensitivity;
pub mod sparsify;
