//! husk-agent: placeholder entry point until the runtime issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("husk-agent is not built yet")
}
