//! (stub, being written)
use anyhow::Result;

pub fn run(_args: &crate::cli::SynthArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
