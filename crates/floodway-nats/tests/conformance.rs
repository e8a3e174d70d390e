//! The event hub contract's conformance suite on NATS JetStream: a server of its own per
//! scenario, on a free loopback port with a temporary store.

use std::sync::Arc;

use floodway::SharedHub;
use floodway_nats::testing::NatsServer;
use floodway_nats::{NatsEventHub, NatsHub, NatsHubOptions};

async fn fresh() -> (SharedHub, NatsServer) {
    let server = NatsServer::start();
    let options = NatsHubOptions {
        servers: vec![server.url()],
        stream: "CONFORMANCE".into(),
        subject: "conformance".into(),
        partitions: Some(4),
        ..NatsHubOptions::default()
    };
    let hub = NatsHub::connect(&options).await.unwrap();
    (Arc::new(NatsEventHub::new(hub, Default::default())), server)
}

floodway::hub_conformance_tests!(fresh);

/// JetStream's reader is buffered, so the scenario of a buffered reader's dropped pulls runs
/// here rather than passing over it.
#[tokio::test]
async fn the_reader_is_buffered() {
    use floodway::Source;
    let (hub, _server) = fresh().await;
    let sub = hub
        .subscribe("buffered", floodway::ReadOptions::default())
        .await
        .unwrap();
    assert!(sub.reader.buffered());
}
