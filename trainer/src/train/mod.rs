//! Training: losses (and, as they land, checkpointed backward, optimizer, the loop).

pub mod loss;
