//! A real browser for the console's tests: headless Chromium driven through the DevTools
//! protocol over its WebSocket. Clicks are mouse events at the element's place on the page
//! and text is typed as input, as a person would; screenshots are the browser's own.
//!
//! Chromium is found in `$FLOODWAY_CHROMIUM`, then as `chromium` on the PATH (Debian's
//! package, which `scripts/test` installs when it is missing).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium with one page, stopped when dropped.
pub(crate) struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    session: String,
    next: u64,
    /// What the page reported as errors: exceptions, console errors, refused content.
    errors: Vec<String>,
}

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("FLOODWAY_CHROMIUM") {
        return path.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let path = Path::new(dir).join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!(
        "Chromium is missing: run scripts/test (it installs Debian's `chromium`), or set \
         FLOODWAY_CHROMIUM to a Chromium or Chrome binary"
    );
}

impl Browser {
    /// Starts Chromium, headless, with a fresh profile and a 1400x1000 window, in New York's
    /// time zone (so that the pages show times with an offset other than the machine's).
    pub(crate) async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--window-size=1400,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .env("TZ", "America/New_York")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Chromium starts");
        // Chromium writes its port and the browser's WebSocket path here once it listens.
        let ports = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                if text.lines().count() >= 2 {
                    break text;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Chromium did not open its DevTools port within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut lines = text.lines();
        let port = lines.next().unwrap().trim();
        let path = lines.next().unwrap().trim();
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("the DevTools WebSocket opens");
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next: 0,
            errors: Vec::new(),
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser.call("Log.enable", json!({})).await;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await;
        browser
    }

    /// Calls a DevTools method on the page (on the browser before a page is attached).
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("DevTools takes the call");
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer within 30 s"))
                .expect("the DevTools WebSocket is open")
                .expect("DevTools answers");
            let Message::Text(text) = reply else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            match reply["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    self.errors
                        .push(reply["params"]["exceptionDetails"].to_string());
                }
                Some("Log.entryAdded") if reply["params"]["entry"]["level"] == "error" => {
                    self.errors
                        .push(reply["params"]["entry"]["text"].to_string());
                }
                Some("Runtime.consoleAPICalled") if reply["params"]["type"] == "error" => {
                    self.errors.push(reply["params"]["args"].to_string());
                }
                _ => {}
            }
            if reply["id"] == json!(id) {
                if let Some(error) = reply.get("error") {
                    panic!("{method}: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    /// What the page reported as errors so far (exceptions, console errors, content the
    /// security policy refused, failed requests).
    pub(crate) fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value.
    pub(crate) async fn eval(&mut self, js: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        result["result"]["value"].clone()
    }

    /// Opens `url` and waits until the page has loaded.
    pub(crate) async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for("document.readyState === 'complete'", "the page loads")
            .await;
    }

    /// Waits until `js` is truthy (20 s at most) and returns its value.
    pub(crate) async fn wait_for(&mut self, js: &str, what: &str) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(js).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let body = self.eval("document.body.innerText").await;
                panic!("waited 20 s for {what} ({js}); the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the first element `selector` finds, with the mouse, at its middle.
    pub(crate) async fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.left + r.width / 2, r.top + r.height / 2]; }})()",
            s = json!(selector)
        );
        let at = self
            .wait_for(&js, &format!("an element to click: {selector}"))
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// Types `text` into the field `selector` finds, replacing what it held.
    pub(crate) async fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector).await;
        self.eval(&format!(
            "document.querySelector({}).select()",
            json!(selector)
        ))
        .await;
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Chooses `value` in the select `selector` finds, as a person picking it would.
    pub(crate) async fn choose(&mut self, selector: &str, value: &str) {
        self.eval(&format!(
            "(() => {{ const s = document.querySelector({}); s.value = {}; \
             s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()",
            json!(selector),
            json!(value)
        ))
        .await;
    }

    /// Saves a PNG of the page as it is shown into `target/console/NAME.png`, and into
    /// `$FLOODWAY_SCREENSHOTS/NAME.png` when that is set (the README's pictures).
    pub(crate) async fn screenshot(&mut self, name: &str) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console")];
        if let Some(dir) = std::env::var_os("FLOODWAY_SCREENSHOTS") {
            dirs.push(PathBuf::from(dir));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
