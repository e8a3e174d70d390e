//! A real `moto_server` (PyPI `moto[server]`) for tests and benchmarks: on a free 127.0.0.1
//! port, stopped (killed) when dropped; and tables shaped as this crate's stores expect.
//!
//! The binary is found in `$FLOODWAY_MOTO_SERVER`, then in the virtualenv `scripts/test`
//! installs (`target/test-venv/bin/moto_server`), then on `PATH`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;

/// Where the `moto_server` binary is, or why there is none.
///
/// # Errors
/// A message that says how to install it.
pub fn server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FLOODWAY_MOTO_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let mut dir = std::env::current_dir().map_err(|e| e.to_string())?;
    loop {
        let candidate = dir.join("target/test-venv/bin/moto_server");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            "moto_server not found: run scripts/test (it installs PyPI moto[server] into \
             target/test-venv), or set FLOODWAY_MOTO_SERVER"
                .to_owned()
        })
}

/// One `moto_server`, with every AWS service this crate calls.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    /// Starts a server and waits until it listens.
    ///
    /// # Panics
    /// When the binary is missing, does not start, or does not listen within 30 s (this is
    /// for tests, where that is the failure to report).
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let binary = server_binary().unwrap_or_else(|why| panic!("{why}"));
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", binary.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A server of its own, and the configuration of clients that reach it.
    pub async fn configured() -> (Moto, SdkConfig) {
        let moto = Moto::start();
        let config = moto.config().await;
        (moto, config)
    }

    /// `http://127.0.0.1:port`, the endpoint of every service.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The configuration of clients that reach this server (region `us-east-1`, test
    /// credentials).
    pub async fn config(&self) -> SdkConfig {
        self.config_in("us-east-1").await
    }

    /// [`config`](Self::config) in `region` (the server keeps each region's resources apart).
    pub async fn config_in(&self, region: &str) -> SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .endpoint_url(&self.url)
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .load()
            .await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a DynamoDB table keyed by `pk` (a string), the shape of [`crate::DynamoDbFaults`],
/// [`crate::DynamoDbView`] and [`crate::DynamoDbState`] tables, with a stream of new and old
/// images if asked; the stream's ARN.
///
/// # Panics
/// When the table cannot be created.
pub async fn table(config: &SdkConfig, name: &str, stream: bool) -> Option<String> {
    create_table(config, name, false, stream, false).await
}

/// Creates a single table keyed by `pk` and `sk` (strings), the shape of
/// [`crate::DynamoDbRows`] tables, with a stream of new and old images if asked; the stream's
/// ARN.
///
/// # Panics
/// When the table cannot be created.
pub async fn single_table(config: &SdkConfig, name: &str, stream: bool) -> Option<String> {
    create_table(config, name, true, stream, false).await
}

/// Creates aws-lambda-stream's micro event store: a single table keyed by `pk` and `sk` with
/// its `DataIndex` (`data`, `sk`), where its `collect` flavor's items are found by
/// correlation key, and a stream of new and old images; the stream's ARN.
///
/// # Panics
/// When the table cannot be created.
pub async fn event_store(config: &SdkConfig, name: &str) -> String {
    create_table(config, name, true, true, true)
        .await
        .expect("a stream")
}

async fn create_table(
    config: &SdkConfig,
    name: &str,
    sk: bool,
    stream: bool,
    data_index: bool,
) -> Option<String> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType,
    };
    let dynamo = aws_sdk_dynamodb::Client::new(config);
    let pk = AttributeDefinition::builder()
        .attribute_name("pk")
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("attribute");
    let hash = KeySchemaElement::builder()
        .attribute_name("pk")
        .key_type(KeyType::Hash)
        .build()
        .expect("key");
    let mut request = dynamo
        .create_table()
        .table_name(name)
        .attribute_definitions(pk)
        .key_schema(hash)
        .billing_mode(BillingMode::PayPerRequest);
    if sk {
        let definition = AttributeDefinition::builder()
            .attribute_name("sk")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("attribute");
        let range = KeySchemaElement::builder()
            .attribute_name("sk")
            .key_type(KeyType::Range)
            .build()
            .expect("key");
        request = request.attribute_definitions(definition).key_schema(range);
    }
    if data_index {
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .expect("key")
        };
        let data = AttributeDefinition::builder()
            .attribute_name("data")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("attribute");
        let index = GlobalSecondaryIndex::builder()
            .index_name("DataIndex")
            .key_schema(key("data", KeyType::Hash))
            .key_schema(key("sk", KeyType::Range))
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::All)
                    .build(),
            )
            .build()
            .expect("index");
        request = request
            .attribute_definitions(data)
            .global_secondary_indexes(index);
    }
    if stream {
        let images = StreamSpecification::builder()
            .stream_enabled(true)
            .stream_view_type(StreamViewType::NewAndOldImages)
            .build()
            .expect("stream");
        request = request.stream_specification(images);
    }
    let created = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("cannot create table {name}: {e:?}"));
    created
        .table_description()
        .and_then(|t| t.latest_stream_arn())
        .map(str::to_owned)
}
