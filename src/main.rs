//! The `assetd` binary: parse the command line, run the subcommand.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    assetd::cli::run().await
}
