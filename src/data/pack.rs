//! (stub, being written)
use anyhow::Result;

pub fn run(_args: &crate::cli::PackArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
