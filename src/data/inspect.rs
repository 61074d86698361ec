//! (stub, being written)
use anyhow::Result;

pub fn run(_args: &crate::cli::InspectArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
