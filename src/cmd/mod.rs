//! One module per subcommand: parse arguments, call the libraries, print.

pub mod chat;
pub mod data;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod model_args;
pub mod serve;
pub mod train;
