//! Helpers shared by the commands: where the hub is, times, progress bars, signals.

use std::sync::Arc;

use floodway::hub::SharedHub;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use floodway_embedded::{Hub, HubOptions};
use floodway_processors::Config;
use indicatif::{ProgressBar, ProgressStyle};

/// Where the hub is: `--hub FILE`, `--nats URL`, or the `[hub]` of `--config FILE`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct HubArgs {
    /// The hub file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "floodway.db",
        conflicts_with = "config"
    )]
    pub(crate) hub: PathBuf,
    /// A configuration file whose `[hub]` names the hub.
    #[arg(long, short, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// A NATS server: the hub is a JetStream stream there (see --stream, --subject).
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    pub(crate) nats: Option<String>,
    /// The JetStream stream, with --nats.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "FLOODWAY",
        requires = "nats"
    )]
    pub(crate) stream: String,
    /// The subject prefix of the stream, with --nats.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "floodway",
        requires = "nats"
    )]
    pub(crate) subject: String,
}

impl HubArgs {
    /// The NATS settings, when the hub is on NATS.
    pub(crate) fn nats(&self) -> anyhow::Result<Option<floodway_nats::NatsHubOptions>> {
        if let Some(url) = &self.nats {
            return Ok(Some(floodway_nats::NatsHubOptions {
                servers: vec![url.clone()],
                stream: self.stream.clone(),
                subject: self.subject.clone(),
                ..Default::default()
            }));
        }
        if let Some(config) = &self.config {
            let c = Config::load(config)?;
            if let Some(nats) = &c.hub.nats {
                return Ok(Some(nats.hub_options(Some(&c.hub))));
            }
        }
        Ok(None)
    }

    /// Opens the event hub: the embedded file (it must exist unless `to_publish`: see
    /// [`open_to_publish`](Self::open_to_publish)), or NATS.
    pub(crate) async fn open_events(&self, to_publish: bool) -> anyhow::Result<SharedHub> {
        if let Some(options) = self.nats()? {
            let hub = floodway_nats::NatsHub::connect(&options).await?;
            return Ok(Arc::new(floodway_nats::NatsEventHub::new(
                hub,
                Default::default(),
            )));
        }
        Ok(Arc::new(if to_publish {
            self.open_to_publish()?
        } else {
            self.open()?
        }))
    }

    /// The hub file's path (with NATS, the file of views and faults).
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.config {
            Some(config) => Config::load(config)?.hub.path,
            None => self.hub.clone(),
        })
    }

    /// Opens the hub file (with NATS, the store of views and faults); it must exist.
    pub(crate) fn open(&self) -> anyhow::Result<Hub> {
        let path = self.path()?;
        let options = HubOptions {
            create: false,
            ..HubOptions::default()
        };
        Ok(Hub::open(&path, options)?)
    }

    /// Opens the hub to publish to, creating it if it is missing, with a small page cache:
    /// appending to the log needs little, and publishing a large file stays under 64 MiB
    /// (BENCHMARKS.md).
    pub(crate) fn open_to_publish(&self) -> anyhow::Result<Hub> {
        let (path, partitions) = match &self.config {
            Some(config) => {
                let c = Config::load(config)?;
                (c.hub.path, c.hub.partitions)
            }
            None => (self.hub.clone(), None),
        };
        let options = HubOptions {
            partitions,
            page_cache_kib: 4 * 1024,
            ..HubOptions::default()
        };
        Ok(Hub::open(&path, options)?)
    }
}

/// Milliseconds since the epoch from: a number of milliseconds, an RFC 3339 time with its
/// zone (`2026-11-26T10:00:00Z`, `2026-11-26 11:00:00.250+01:00`; seconds and a fraction
/// optional), or a duration ago (`15m`, `2h`, `1d`). A time without a zone is refused: read
/// as UTC, a local time copied from elsewhere would name another moment.
pub(crate) fn parse_time(text: &str) -> anyhow::Result<i64> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let dated = text.len() >= 16 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-';
    if dated && text.is_ascii() {
        return parse_datetime(text);
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        let time = SystemTime::now()
            .checked_sub(ago)
            .context("that duration reaches before 1970")?;
        return Ok(millis(time));
    }
    bail!("`{text}` is not a time: use milliseconds since the epoch, 2026-11-26T10:00:00Z, or a duration ago like 15m")
}

/// An RFC 3339 date and time with its zone: `Z`, `UTC` or an offset (`+01:00`, `-0500`,
/// `+01`), after the time or a space.
fn parse_datetime(text: &str) -> anyhow::Result<i64> {
    let no_zone = || {
        anyhow!(
            "`{text}` has no zone: add Z for UTC or the offset of its zone (e.g. \
             {}+01:00)",
            text.trim_end()
        )
    };
    let (clock, offset_minutes) = if let Some(clock) = text
        .strip_suffix(['Z', 'z'])
        .or_else(|| text.strip_suffix("UTC"))
    {
        (clock, 0)
    } else {
        // An offset's sign comes after the date's own dashes.
        let sign_at = text[10..]
            .rfind(['+', '-'])
            .map(|i| i + 10)
            .ok_or_else(no_zone)?;
        let offset = &text.as_bytes()[sign_at + 1..];
        let digit = |i: usize| offset.get(i).filter(|b| b.is_ascii_digit()).is_some();
        // `HH`, `HHMM` or `HH:MM`.
        let minutes_at = match offset.len() {
            2 if digit(0) && digit(1) => None,
            4 if (0..4).all(digit) => Some(2),
            5 if digit(0) && digit(1) && offset[2] == b':' && digit(3) && digit(4) => Some(3),
            _ => return Err(no_zone()),
        };
        let number =
            |at: usize| i64::from(offset[at] - b'0') * 10 + i64::from(offset[at + 1] - b'0');
        let (hours, minutes) = (number(0), minutes_at.map_or(0, number));
        if hours > 23 || minutes > 59 {
            bail!("`{text}`: an offset is at most 23:59");
        }
        let sign = if text.as_bytes()[sign_at] == b'-' {
            -1
        } else {
            1
        };
        (&text[..sign_at], sign * (hours * 60 + minutes))
    };
    let mut clock = clock.trim_end().replacen(' ', "T", 1);
    if clock.len() == 16 {
        clock.push_str(":00");
    }
    let time = humantime::parse_rfc3339_weak(&format!("{clock}Z"))
        .map_err(|e| anyhow!("`{text}` is not a time: {e}"))?;
    Ok(millis(time) - offset_minutes * 60_000)
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A time in milliseconds, for people.
pub(crate) fn show_time(ms: i64) -> String {
    floodway::fault_report::time(ms)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// A counter of `what` for work whose total is not known: how many so far, and how fast.
pub(crate) fn counter(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {spinner} {pos} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Prints a line to stdout; when stdout is a closed pipe (`floodway hub stats | head`), exits
/// quietly instead of panicking; when it cannot be written otherwise (a full disk), exits
/// with the error rather than succeed with part of the output.
pub(crate) fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let text = args.to_string();
    let mut out = std::io::stdout().lock();
    if let Err(err) = out
        .write_all(printable(&text).as_bytes())
        .and_then(|()| out.write_all(b"\n"))
    {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {err}");
        std::process::exit(1);
    }
}

/// `text` with its control characters but newlines and tabs escaped as JSON escapes them
/// (`\u001b`): what the command prints can quote events and their faults, and a terminal obeys
/// an escape sequence in them (rewriting lines, setting the title, writing the clipboard). In
/// a JSON string the escape is the same character, so JSON printed stays JSON.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match unsafe_char(c) {
            true => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            false => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Where a demo keeps its hub `file`: in `dir` (made if missing) or in a temporary directory
/// (returned, to live as long as the demo); an error if the hub is there already, for a demo
/// starts from a fresh hub.
pub(crate) fn fresh_demo_hub(
    dir: Option<&std::path::Path>,
    file: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, std::path::PathBuf)> {
    use anyhow::Context as _;
    let (temp, dir) = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (None, dir.to_owned())
        }
        None => {
            let temp = tempfile::tempdir()?;
            let dir = temp.path().to_owned();
            (Some(temp), dir)
        }
    };
    let hub = dir.join(file);
    let views = dir.join(format!("{file}-views"));
    if hub.exists() || views.exists() {
        anyhow::bail!(
            "{} or {} exists: the demo starts from a fresh hub; remove them (with their -wal \
             and -shm files) or pick another --dir",
            hub.display(),
            views.display()
        );
    }
    Ok((temp, hub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        // Offsets are the zone's: every form of one moment is that moment.
        for form in [
            "2023-11-14T23:13:20.000+01:00",
            "2023-11-14 23:13:20+01:00",
            "2023-11-14 23:13:20 +0100",
            "2023-11-14T23:13:20+01",
            "2023-11-14T17:13:20-05:00",
            "2023-11-14T22:13:20.000Z",
            "2023-11-14 22:13:20 UTC",
        ] {
            assert_eq!(parse_time(form).unwrap(), 1_700_000_000_000, "{form}");
        }
        assert_eq!(parse_time("2023-11-14T22:13Z").unwrap(), 1_699_999_980_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20.250-00:30").unwrap(),
            1_700_001_800_250
        );
        // A time without its zone names no moment.
        for zoneless in ["2023-11-14 22:13:20", "2023-11-14T22:13:20.5"] {
            let err = parse_time(zoneless).unwrap_err().to_string();
            assert!(err.contains("no zone"), "{zoneless}: {err}");
        }
        assert!(parse_time("2023-11-14T22:13:20+25:00").is_err());
        // Not ASCII, or an offset of another shape: refused, never a panic.
        for odd in [
            "2023-11-1é 10:00:00+01:00",
            "2023-11-14T22:13:20+0é0",
            "2023-11-14T22:13:20+0:100",
            "2023-11-14T22:13:20+1",
        ] {
            assert!(parse_time(odd).is_err(), "{odd}");
        }
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(
            printable("e-1\u{1b}]52;c;aGk=\u{7}\r\u{9b}x"),
            "e-1\\u001b]52;c;aGk=\\u0007\\u000d\\u009bx"
        );
        // JSON stays JSON, with the same value: a C1 character JSON allows as it is.
        let json = "{\"n\":\"it\u{92}s\"}";
        let shown: serde_json::Value = serde_json::from_str(&printable(json)).unwrap();
        assert_eq!(
            shown,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        let ago = parse_time("1h").unwrap();
        let now = millis(SystemTime::now());
        assert!((now - ago - 3_600_000).abs() < 5_000);
        assert!(parse_time("yesterday")
            .unwrap_err()
            .to_string()
            .contains("15m"));
    }
}
