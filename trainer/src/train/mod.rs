//! Training: losses, the checkpointed forward/backward, gradient accumulation and clipping,
//! AdamW and learning-rate schedules, evaluation, metrics, run checkpoints and the run loop.

pub mod aux_loss;
pub mod evaluate;
pub mod grads;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod preference;
pub mod report;
pub mod run;
pub mod run_checkpoint;
pub mod schedule;
pub mod step;
pub mod update;

pub use memory::{layer_activation_bytes, StepMemory, StepShape};
pub use optim::{AdamW, AdamWConfig};
pub use preference::{
    pair_forward_backward, pair_metrics, policy_metrics, preference_step, sequence_logps, DpoLossType, PairBatch,
    PairOutput, PreferenceMetrics, PreferenceObjective, PreferenceSettings, Reference, ReferenceKind,
};
pub use report::{JsonReporter, ProgressReporter, QuietReporter, Reporter, RunSummary};
pub use run::{run_training, RunOptions};
pub use schedule::{Schedule, ScheduleKind};
pub use step::{
    forward_backward, forward_backward_keeping, forward_backward_with_head, HeadLoss, HeadPass, LossScaling,
    MicroBatch, MicroBatchOutput,
};
pub use update::{optimizer_step, StepProgress, StepReport, StepSettings};
