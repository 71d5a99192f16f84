//! Files and directories allot creates are its own: data, usage, spill
//! and spool files `0600`, their directories `0700`, whatever the umask.
#![cfg(unix)]

use allot_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_usage_spill_and_spool_files_are_readable_by_their_owner_only() {
    let stack = Stack::start().await;
    // A settled request, so that the spool has written records.
    let (_, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(allot::pb::Unit::Tokens, "1000", balance())],
        )
        .await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    wait_until("the request to settle", Duration::from_secs(20), || async {
        stack.settled_records().await >= 1
    })
    .await;

    let dir = &stack.dir.0;
    assert_eq!(
        mode(&dir.join("coordinator.redb")),
        0o600,
        "the budget store"
    );
    assert_eq!(mode(&dir.join("usage.redb")), 0o600, "the usage store");
    assert_eq!(mode(&dir.join("usage-spill")), 0o700, "the spill directory");
    let spool = &stack.agent_config.spool_dir;
    assert_eq!(mode(spool), 0o700, "the agent's spool directory");
    let files: Vec<_> = std::fs::read_dir(spool)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}
