//! `api-shim`: the RunPod-compatible HTTP front of the job pipeline. See
//! `api-shim --help` for its configuration.

/// mimalloc: the request path allocates and frees many small buffers
/// across threads (glibc's malloc was ~15% of the CPU of the pipeline
/// overhead bench).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod auth;
mod config;
mod error;
mod limits;
mod routes;
mod startup;

use std::future::IntoFuture;

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
    pipeline::jobs::chat::set_max_audio_bytes(cfg.max_audio_bytes);
    tracing::info!(config = ?cfg.masked(), "api-shim starting");
    let bind = cfg.bind.clone();
    let deadline = std::time::Duration::from_secs(cfg.shutdown_timeout_s);
    let (app, state) = startup::build(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let stopping = state.shutdown_tx.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        pipeline::shutdown_signal().await;
        tracing::info!("stop requested: ending open streams, finishing open requests");
        let _ = stopping.send(true);
    });
    let mut stopped = state.shutdown.clone();
    tokio::select! {
        served = serve.into_future() => served?,
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(deadline).await;
        } => tracing::warn!(seconds = deadline.as_secs(), "shutdown deadline passed: closing what is still open"),
    }
    Ok(())
}
