//! `tramontane data`.

/// Arguments of `tramontane data`.
#[derive(clap::Args)]
pub struct DataArgs {}

/// Runs `tramontane data`.
pub fn run(_args: DataArgs) -> anyhow::Result<()> {
    anyhow::bail!("`data` is being written")
}
