//! The `floodway` command with its hub on NATS JetStream (a real server on loopback): publish,
//! run, stats, tail, faults and their resubmission, replay.

use floodway_nats::testing::NatsServer;

mod common;
#[path = "common/console.rs"]
mod console;
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

    // The console of a NATS hub: lag per partition from the consumers, faults from the
    // store, through the same contracts as the embedded hub.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let served = console::Served::console(d, &[]).await;
        let port = served.port;
        let (_, session) = console::http(port, "GET", "/api/session", &[], None).await;
        assert!(
            session["hub"]
                .as_str()
                .unwrap()
                .contains("NATS stream SHOP"),
            "{session}"
        );
        let flow = console::poll(port, "/api/flow", &[], |f| {
            f["samples"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;
        let sample = &flow["samples"][0];
        let view = sample["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "orders-view")
            .unwrap_or_else(|| panic!("{sample}"));
        assert_eq!(view["partitions"].as_array().unwrap().len(), 4, "{view}");
        assert_eq!(view["lag"], 0, "{view}");
        let (_, groups) =
            console::http(port, "GET", "/api/faults/groups?status=resolved", &[], None).await;
        assert_eq!(
            groups["groups"][0]["cause"]["name"], "MissingKey",
            "{groups}"
        );
        served.stop();
    });

    // A server that is not there is named, with what to check.
    let out = floodway(d, &["hub", "stats", "--nats", "nats://127.0.0.1:1"]);
    assert!(!out.status.success());
    says(&out, "cannot connect to NATS at nats://127.0.0.1:1");
}
