//! The bare hop as its own process, so that `agent_bench` can measure its
//! CPU time per request beside the agent's.
//!
//! Run: `bare_hop --listen 127.0.0.1:9000 --upstream http://127.0.0.1:8000`

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut upstream) = (None, None);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next(),
            "--upstream" => upstream = args.next(),
            other => anyhow::bail!("unknown flag {other}: use --listen ADDR --upstream URL"),
        }
    }
    let listen = listen.ok_or_else(|| anyhow::anyhow!("--listen ADDR is required"))?;
    let upstream = upstream.ok_or_else(|| anyhow::anyhow!("--upstream URL is required"))?;
    // Two workers, like the agent on this 2-core machine.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            allot_e2e::bare_hop::serve(listener, upstream).await;
            Ok(())
        })
}
