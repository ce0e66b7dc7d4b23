//! `api-shim`: the RunPod-compatible HTTP front of the job pipeline. See
//! `api-shim --help` for its configuration.

mod auth;
mod config;
mod error;
mod routes;
mod startup;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOG")
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = config::ShimConfig::parse();
    pipeline::contract::set_max_audio_bytes(cfg.max_audio_bytes);
    tracing::info!(config = ?cfg.masked(), "api-shim starting");
    let bind = cfg.bind.clone();
    let (app, _state) = startup::build(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
