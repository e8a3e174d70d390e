//! The `floodway` command with its hub on NATS JetStream (a real server on loopback): publish,
//! run, stats, tail, faults and their resubmission, replay.

use floodway_nats::testing::NatsServer;

mod common;
use common::{floodway, says, text};

#[test]
fn the_command_runs_on_nats() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    common::publish_run_resubmit_replay(d, |key| {
        format!(
            "[hub]\npath = \"stores.db\"\npartitions = 4\n\n[hub.nats]\nservers = [\"{url}\"]\nstream = \"SHOP\"\nsubject = \"shop\"\n{}",
            common::processors(key)
        )
    });

    // Stats by URL, without a config file.
    let stats = text(&floodway(
        d,
        &[
            "hub",
            "stats",
            "--nats",
            &url,
            "--stream",
            "SHOP",
            "--subject",
            "shop",
        ],
    ));
    assert!(stats.contains("NATS stream SHOP"), "{stats}");
    assert!(stats.contains("orders-view"), "{stats}");
    assert!(stats.contains("faults"), "{stats}");

    // A server that is not there is named, with what to check.
    let out = floodway(d, &["hub", "stats", "--nats", "nats://127.0.0.1:1"]);
    assert!(!out.status.success());
    says(&out, "cannot connect to NATS at nats://127.0.0.1:1");
}
