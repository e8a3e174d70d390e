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
