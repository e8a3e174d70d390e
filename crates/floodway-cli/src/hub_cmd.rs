//! `floodway hub`: publish, tail, generate, retain, unsubscribe, stats, upgrade.

use std::io::{BufRead, Read as _, Write};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use floodway::hub::{ReadOptions, StartAt};
use floodway::pipeline::TypeFilter;
use floodway::{Event, Source};

use crate::util::{show_time, HubArgs};

#[derive(clap::Subcommand)]
pub(crate) enum HubCommand {
    /// Publish events from JSON lines (a file, or standard input with `-`).
    ///
    /// Every line must be one event (`id`, `type`, `timestamp`, `partitionKey`, payload).
    /// Lines that are not are reported with their numbers, and the others are stored, unless
    /// `--atomic` asks for all or nothing. The event id is the idempotency key: publishing the
    /// same file twice within the dedupe window stores its events once.
    ///
    /// Example: floodway hub publish --hub floodway.db orders.jsonl
    Publish {
        #[command(flatten)]
        hub: HubArgs,
        /// The file of JSON lines, or `-` for standard input.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        /// Store nothing if any line is bad.
        #[arg(long)]
        atomic: bool,
        /// Store every event even if its id was published recently.
        #[arg(long)]
        no_dedupe: bool,
        /// Start at this line of the input (1 is the first): to go on from where a publish
        /// that stopped says it got to.
        #[arg(long, value_name = "LINE", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        from_line: u64,
    },
    /// Print events as JSON lines: the last few, then new ones with `--follow`.
    ///
    /// Example: floodway hub tail --type 'order-*' --follow
    Tail {
        #[command(flatten)]
        hub: HubArgs,
        /// Only events of this type (exact, or with `*` wildcards).
        #[arg(long = "type", value_name = "PATTERN")]
        event_type: Option<String>,
        /// How many of the newest events to print first.
        #[arg(long, short = 'n', default_value_t = 10)]
        lines: usize,
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print generated order events as JSON lines (for trying things out, and for tests).
    ///
    /// Example: floodway hub generate --events 10000 > orders.jsonl
    Generate {
        /// How many events.
        #[arg(long, default_value_t = 1_000)]
        events: usize,
        /// Seed of the generator: the same seed gives the same events.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Per mille of lines replaced by malformed ones.
        #[arg(long, default_value_t = 0)]
        poison: u32,
    },
    /// Delete old events: those published longer ago than `--max-age`, and per partition the
    /// oldest beyond `--max-bytes`, except those a subscription has not read yet (unless
    /// `--delete-unread`): the hub then stays over the limits, and the subscriptions behind are
    /// named. It deletes in short transactions, so processors running beside it barely wait.
    ///
    /// Example: floodway hub retain --hub floodway.db --max-age 7d
    Retain {
        #[command(flatten)]
        hub: HubArgs,
        /// Delete events published longer ago than this (e.g. 7d, 12h).
        #[arg(long, value_name = "DURATION")]
        max_age: Option<String>,
        /// Per partition, keep at most this many bytes of the newest events.
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u64>,
        /// Delete by the limits even what a subscription has not read (it skips what is gone).
        #[arg(long)]
        delete_unread: bool,
    },
    /// Remove a subscription: its checkpoints (and so what it holds back from retention).
    /// Refused while a process owns it. Opened again, it starts anew.
    ///
    /// Example: floodway hub unsubscribe --hub floodway.db old-processor
    Unsubscribe {
        #[command(flatten)]
        hub: HubArgs,
        /// The subscription (a processor's name).
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Partitions, sizes and subscription lag.
    ///
    /// Example: floodway hub stats --hub floodway.db
    Stats {
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Bring a hub file made by an earlier Floodway up to this one's format: its views move
    /// into a file of their own beside it (`<hub>-views`), where a view's writes and
    /// publishing no longer wait for each other. Stop every process using the hub first: it
    /// is refused while one owns a subscription of the file, but a process that only reads
    /// views, or whose processors read NATS, leaves no trace there. Publishing waits while
    /// the views are copied. Cut short, the hub opens as before, and running it again
    /// finishes the move.
    ///
    /// Example: floodway hub upgrade --hub floodway.db
    Upgrade {
        #[command(flatten)]
        hub: HubArgs,
        /// Upgrade the file of a NATS hub's views and faults: its processors' subscriptions
        /// are consumers on the server, so nothing in the file says whether they run; stop
        /// them first.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) async fn run(command: HubCommand) -> anyhow::Result<()> {
    match command {
        HubCommand::Publish {
            hub,
            input,
            atomic,
            no_dedupe,
            from_line,
        } => publish(hub, input, atomic, no_dedupe, from_line).await,
        HubCommand::Tail {
            hub,
            event_type,
            lines,
            follow,
        } => tail(hub, event_type, lines, follow).await,
        HubCommand::Stats { hub } => stats(hub).await,
        HubCommand::Retain {
            hub,
            max_age,
            max_bytes,
            delete_unread,
        } => retain(hub, max_age, max_bytes, delete_unread).await,
        HubCommand::Unsubscribe { hub, name } => unsubscribe(hub, &name).await,
        HubCommand::Upgrade { hub, force } => upgrade(hub, force).await,
        HubCommand::Generate {
            events,
            seed,
            poison,
        } => generate(events, seed, poison),
    }
}

/// Events published per call: a hub commit each.
const PUBLISH_CHUNK: usize = 1_000;

/// Publishes a file of JSON lines as it reads it: memory stays flat whatever the file's size
/// (one chunk of events at a time), and a bar shows the bytes read. Bad lines are reported as
/// they are met. With `--atomic`, every line is checked in a first pass before anything is
/// stored (standard input is first copied to a temporary file for that). Stopped (an error,
/// Ctrl-C, SIGTERM), it says the line the events stored go through, to go on with
/// `--from-line`; a chunk being committed is committed first.
async fn publish(
    args: HubArgs,
    input: PathBuf,
    atomic: bool,
    no_dedupe: bool,
    from_line: u64,
) -> anyhow::Result<()> {
    let mut spool = None;
    let path = if input.as_os_str() != "-" {
        Some(input.clone())
    } else if atomic {
        // All or nothing needs two passes: keep standard input on disk, not in memory.
        let mut file = tempfile::NamedTempFile::new().context("cannot create a spool file")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut file).context("reading standard input")?;
        spool.insert(file).path().to_owned().into()
    } else {
        None
    };
    if atomic {
        let mut lines = Lines::open(path.as_deref(), &input, "checking")?;
        lines.skip_to(from_line)?;
        while lines.next_event()?.is_some() {}
        lines.bar.finish_and_clear();
        if lines.rejected > 0 {
            bail!(
                "{} of {} lines are not events; nothing was published (--atomic)",
                lines.rejected,
                lines.rejected + lines.events
            );
        }
    }
    let hub = args.open_events(true).await?;
    let mut lines = Lines::open(path.as_deref(), &input, "publishing")?;
    lines.skip_to(from_line)?;
    let bar = lines.bar.clone();
    // Lines are read and decoded on a thread of their own while the previous chunk is being
    // committed; the channel holds two chunks, so memory stays flat. Each chunk comes with
    // the number of the last line it read.
    type Chunk = anyhow::Result<(Vec<Event>, u64)>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let reader = std::thread::spawn(move || loop {
        let mut chunk = Vec::with_capacity(PUBLISH_CHUNK);
        while chunk.len() < PUBLISH_CHUNK {
            match lines.next_event() {
                Ok(Some(event)) => chunk.push(event),
                Ok(None) => break,
                Err(err) => {
                    // What was read before the failure is published first.
                    let _ = tx.blocking_send(Ok((std::mem::take(&mut chunk), lines.number)));
                    let _ = tx.blocking_send(Err(err));
                    return lines;
                }
            }
        }
        let last = chunk.len() < PUBLISH_CHUNK;
        if tx.blocking_send(Ok((chunk, lines.number))).is_err() || last {
            return lines;
        }
    });
    let (mut stored, mut duplicates) = (0, 0);
    // The line the events stored go through.
    let mut through = from_line - 1;
    let stopped = |stored: u64, through: u64| Stopped {
        stored,
        through,
        no_dedupe,
    };
    let mut interrupted = std::pin::pin!(crate::util::shutdown_signal());
    loop {
        let chunk = tokio::select! {
            chunk = rx.recv() => chunk,
            () = &mut interrupted => {
                bar.finish_and_clear();
                bail!("interrupted: {}", stopped(stored, through));
            }
        };
        let Some(chunk) = chunk else { break };
        // Cut short, the error says what is stored already.
        let (chunk, last_line) = chunk.with_context(|| stopped(stored, through))?;
        // Lines with no event to store (the end, bad lines) move the line only.
        if !chunk.is_empty() {
            let receipt = hub
                .publish(&chunk, !no_dedupe)
                .await
                .with_context(|| stopped(stored, through))?;
            stored += receipt.stored as u64;
            duplicates += receipt.duplicates;
        }
        through = last_line;
        bar.set_message(format!("{stored} events stored"));
    }
    let lines = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reading thread failed"))?;
    lines.bar.finish_and_clear();
    let place = hub.describe();
    let rejected = lines.rejected;
    say!(
        "published {stored} events to {place} ({duplicates} duplicates skipped, {rejected} lines rejected)"
    );
    if rejected > 0 {
        bail!("{rejected} lines were rejected (see above)");
    }
    Ok(())
}

/// What a publish cut short had stored, and how to go on: from the line after it (publishing
/// the whole input again also skips what is stored, within the hub's dedupe window, unless
/// deduplication is off).
struct Stopped {
    stored: u64,
    through: u64,
    no_dedupe: bool,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events stored, from the input's lines through line {}; go on with \
             --from-line {}",
            self.stored,
            self.through,
            self.through + 1
        )?;
        if !self.no_dedupe {
            f.write_str(" (publishing the whole input again skips what is stored, within the hub's dedupe window)")?;
        }
        Ok(())
    }
}

/// The events of a JSON-lines input, read one line at a time into one buffer.
struct Lines {
    reader: Box<dyn BufRead + Send>,
    /// Bytes, not text: a line that is not UTF-8 is a line that is not an event, not a
    /// failure of the whole input.
    line: Vec<u8>,
    number: u64,
    events: u64,
    rejected: u64,
    bar: indicatif::ProgressBar,
}

impl Lines {
    /// `path`, or standard input when `None`; `shown` names it in errors.
    fn open(
        path: Option<&std::path::Path>,
        shown: &std::path::Path,
        what: &str,
    ) -> anyhow::Result<Lines> {
        let (reader, size): (Box<dyn BufRead + Send>, Option<u64>) = match path {
            None => (Box::new(std::io::BufReader::new(std::io::stdin())), None),
            Some(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("cannot read {}", shown.display()))?;
                let size = file.metadata().ok().map(|m| m.len());
                (
                    Box::new(std::io::BufReader::with_capacity(1 << 16, file)),
                    size,
                )
            }
        };
        Ok(Lines {
            reader,
            line: Vec::new(),
            number: 0,
            events: 0,
            rejected: 0,
            bar: bytes_progress(size, what),
        })
    }

    /// Reads through the lines before line `first` (1 is the first), without decoding them.
    fn skip_to(&mut self, first: u64) -> anyhow::Result<()> {
        while self.number + 1 < first {
            let read = skip_line(&mut self.reader)
                .with_context(|| format!("reading line {}", self.number + 1))?;
            if read == 0 {
                bail!(
                    "the input has {} lines, none from line {first}",
                    self.number
                );
            }
            self.number += 1;
            self.bar.inc(read);
        }
        Ok(())
    }

    /// The next event, or `None` at the end; a line that is no event is reported on standard
    /// error and counted.
    fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            self.line.clear();
            // At most an event's size and its line end in memory: a longer line (a file
            // with no line ends, given by mistake) is skipped through, not held whole.
            let read = (&mut self.reader)
                .take(LINE_LIMIT as u64)
                .read_until(b'\n', &mut self.line)
                .with_context(|| format!("reading line {}", self.number + 1))?;
            if read == 0 {
                return Ok(None);
            }
            self.number += 1;
            self.bar.inc(read as u64);
            if read == LINE_LIMIT && self.line.last() != Some(&b'\n') {
                let rest = skip_line(&mut self.reader)
                    .with_context(|| format!("reading line {}", self.number))?;
                self.bar.inc(rest);
                self.rejected += 1;
                let size = (read as u64).saturating_add(rest);
                let limit = floodway::event::DEFAULT_MAX_EVENT_SIZE;
                self.bar.suspend(|| {
                    eprintln!(
                        "line {}: event is {size} bytes, over the limit of {limit} bytes",
                        self.number
                    );
                });
                continue;
            }
            let mut text = self.line.as_slice();
            while let [rest @ .., b'\n' | b'\r'] = text {
                text = rest;
            }
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match Event::decode(text) {
                Ok(event) => {
                    self.events += 1;
                    return Ok(Some(event));
                }
                Err(err) => {
                    self.rejected += 1;
                    self.bar
                        .suspend(|| eprintln!("line {}: {err}", self.number));
                }
            }
        }
    }
}

/// The longest line `hub publish` reads: the largest event and a `\r\n`.
const LINE_LIMIT: usize = floodway::event::DEFAULT_MAX_EVENT_SIZE + 2;

/// Reads through the rest of a line, its `\n` included, without keeping it; the bytes read.
fn skip_line(reader: &mut dyn BufRead) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(skipped);
        }
        let (used, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if end {
            return Ok(skipped);
        }
    }
}

/// A bar of bytes read (a spinner when the size is unknown, as for standard input).
fn bytes_progress(size: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let (bar, template) = match size {
        Some(size) => (
            indicatif::ProgressBar::new(size),
            "{prefix} [{elapsed_precise}] {bar:40.cyan/blue} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta}) {msg}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{prefix} [{elapsed_precise}] {spinner} {binary_bytes} ({binary_bytes_per_sec}) {msg}",
        ),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_owned());
    bar
}

async fn tail(
    args: HubArgs,
    pattern: Option<String>,
    lines: usize,
    follow: bool,
) -> anyhow::Result<()> {
    let hub = args.open_events(false).await?;
    let filter = pattern.as_deref().map(TypeFilter::parse).transpose()?;
    let keep = |data: &[u8]| -> Option<String> {
        let text = std::str::from_utf8(data).ok()?;
        // A record that is not JSON may hold control characters a terminal would obey.
        let shown = || crate::util::printable(text).into_owned();
        match &filter {
            None => Some(shown()),
            Some(f) => {
                let event = Event::decode(data).ok()?;
                f.matches(event.event_type()).then(shown)
            }
        }
    };
    let mut stdout = std::io::stdout();
    // Following, the reader starts before the newest are read, so that nothing published in
    // between is missed; what both see is shown once (by id).
    let mut reader = match follow {
        true => {
            let name = format!("tail-{}", std::process::id());
            // A transient reader that never commits: the tail leaves no subscription behind.
            let options = ReadOptions {
                start: StartAt::End,
                transient: true,
                ..ReadOptions::default()
            };
            let sub = hub
                .subscribe(&name, options)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(sub.reader)
        }
        false => None,
    };
    let newest = hub
        .newest(lines, &|d: &[u8]| keep(d).is_some())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut shown = std::collections::HashSet::new();
    for data in newest {
        if let Some(line) = keep(&data) {
            writeln!(stdout, "{line}")?;
            if let Ok(event) = Event::decode(&data) {
                shown.insert(event.id().to_owned());
            }
        }
    }
    stdout.flush()?;
    let Some(reader) = reader.as_mut() else {
        return Ok(());
    };
    loop {
        let batch = tokio::select! {
            batch = reader.next_batch(500) => batch?,
            () = crate::util::shutdown_signal() => return Ok(()),
        };
        let Some(records) = batch else { return Ok(()) };
        for r in records {
            if let Some(line) = keep(&r.data) {
                let repeat =
                    !shown.is_empty() && Event::decode(&r.data).is_ok_and(|e| shown.remove(e.id()));
                if !repeat {
                    writeln!(stdout, "{line}")?;
                }
            }
        }
        stdout.flush()?;
    }
}

async fn stats(args: HubArgs) -> anyhow::Result<()> {
    let hub = args.open_events(false).await?;
    let stats = hub.stats().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    say!("{}", stats.description);
    say!(
        "{:>9} {:>10} {:>12} {:>12} {:>12}",
        "partition",
        "events",
        "first",
        "last",
        "bytes"
    );
    let or_blank = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for p in &stats.partitions {
        say!(
            "{:>9} {:>10} {:>12} {:>12} {:>12}",
            p.partition,
            p.events,
            or_blank(p.offsets.map(|o| o.0)),
            or_blank(p.offsets.map(|o| o.1)),
            or_blank(p.bytes)
        );
    }
    if let Some(faults) = stats.faults {
        say!("{:>9} {:>10}", "faults", faults);
    }
    let total: u64 =
        stats.partitions.iter().map(|p| p.events).sum::<u64>() + stats.faults.unwrap_or(0);
    say!("{:>9} {:>10}", "all", total);
    if stats.subscriptions.is_empty() {
        say!("no subscriptions yet");
    } else {
        say!("\n{:<32} {:>10}  progress", "subscription", "lag");
        for s in &stats.subscriptions {
            say!("{:<32} {:>10}  {}", s.name, s.lag, s.progress);
            if let Some((owner, since)) = &s.owner {
                say!("{:<32} owned by {owner} since {}", "", show_time(*since));
            }
        }
    }
    if let Some(newest) = stats.newest_published {
        say!("\nnewest event published {}", show_time(newest));
    }
    Ok(())
}

fn generate(events: usize, seed: u64, poison: u32) -> anyhow::Result<()> {
    let events = floodway::testing::generate::orders(events, seed);
    let mut lines: Vec<String> = events.iter().map(Event::to_json).collect();
    floodway::testing::generate::poison_lines(&mut lines, poison, seed);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

async fn retain(
    args: HubArgs,
    max_age: Option<String>,
    max_bytes: Option<u64>,
    delete_unread: bool,
) -> anyhow::Result<()> {
    if max_age.is_none() && max_bytes.is_none() {
        bail!("say what to keep: --max-age (e.g. 7d) and/or --max-bytes");
    }
    let max_age = max_age
        .as_deref()
        .map(|a| {
            humantime::parse_duration(a)
                .with_context(|| format!("--max-age `{a}` is not a duration like 7d or 12h"))
        })
        .transpose()?;
    let hub = args.open_events(false).await?;
    let retention = floodway::hub::Retention {
        max_age,
        max_bytes_per_partition: max_bytes,
        keep_unread: !delete_unread,
    };
    let report = hub
        .apply_retention(&retention)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    say!(
        "deleted {} events and forgot {} idempotency keys from {}",
        report.deleted,
        report.forgotten,
        hub.describe()
    );
    if report.kept_unread > 0 {
        say!(
            "kept {} events over the limits: subscriptions {} have not read them (remove one that \
             is no longer used with `floodway hub unsubscribe`, or pass --delete-unread)",
            report.kept_unread,
            report.behind.join(", ")
        );
    }
    Ok(())
}

async fn unsubscribe(args: HubArgs, name: &str) -> anyhow::Result<()> {
    let hub = args.open_events(false).await?;
    let removed = hub
        .unsubscribe(name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !removed {
        bail!("{} has no subscription `{name}`", hub.describe());
    }
    say!("removed subscription `{name}` from {}", hub.describe());
    Ok(())
}

async fn upgrade(args: HubArgs, force: bool) -> anyhow::Result<()> {
    let path = args.path()?;
    if args.nats()?.is_some() && !force {
        bail!(
            "the hub's events are on NATS, where its processors' subscriptions are consumers on \
             the server: nothing in {} says whether they run. Stop every process using the hub, \
             then run `floodway hub upgrade --force`",
            path.display()
        );
    }
    let file = path.clone();
    let done = tokio::task::spawn_blocking(move || {
        floodway_embedded::Hub::upgrade(
            &file,
            &floodway_embedded::HubOptions::default(),
            |view, rows| say!("copied view `{view}`: {rows} rows"),
        )
    })
    .await
    .context("the upgrade stopped")??;
    match done {
        floodway_embedded::Upgrade::MovedViews { views_file, views } => say!(
            "moved {} view(s) of {} into {}: the hub has this Floodway's format",
            views.len(),
            path.display(),
            views_file.display()
        ),
        floodway_embedded::Upgrade::Current { views_file } => say!(
            "{} already has this Floodway's format (its views are in {}): nothing to do",
            path.display(),
            views_file.display()
        ),
        other => say!("{}: {other:?}", path.display()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line far longer than any event (a file without line ends) is one rejected line read
    /// through in bounded memory; the events after it are read.
    #[test]
    fn a_line_longer_than_any_event_is_rejected_without_being_held() {
        let mut input = vec![b'a'; 8 << 20];
        input.extend_from_slice(
            b"\n{\"id\":\"e-1\",\"type\":\"t\",\"timestamp\":1,\"partitionKey\":\"k\"}\n",
        );
        let mut lines = Lines {
            reader: Box::new(std::io::Cursor::new(input)),
            line: Vec::new(),
            number: 0,
            events: 0,
            rejected: 0,
            bar: indicatif::ProgressBar::hidden(),
        };
        let event = lines
            .next_event()
            .unwrap()
            .expect("the event after the long line");
        assert_eq!(event.id(), "e-1");
        assert!(lines.next_event().unwrap().is_none());
        assert_eq!((lines.rejected, lines.events, lines.number), (1, 1, 2));
        assert!(
            lines.line.capacity() <= 2 * LINE_LIMIT,
            "{} bytes held for one line",
            lines.line.capacity()
        );
    }
}
