//! husk-vmm: placeholder entry point until the VMM issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("husk-vmm is not built yet")
}
