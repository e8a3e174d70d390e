//! Faults as people read them: the table of `faults list` and the page of `faults show`, the
//! same whichever store holds them (`floodway faults` for the embedded hub and NATS,
//! `floodway faults --dynamodb-table` for DynamoDB, in a build with the `aws` feature).

use std::fmt::Write as _;

use crate::error::Error;
use crate::fault_store::{Resubmission, StoredFault};

/// A time (ms since the epoch) as RFC 3339 in UTC, to the millisecond.
pub fn time(ms: i64) -> String {
    let (year, month, day) = crate::event::civil_date(ms);
    let of_day = ms.rem_euclid(86_400_000);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000
    )
}

/// The faults as a table, a line each, newest first as given; a sentence when there are none.
pub fn table(faults: &[StoredFault]) -> String {
    if faults.is_empty() {
        return "no faults match\n".to_owned();
    }
    let mut out = format!(
        "{:<32} {:<24} {:>5} {:<9} {:<36} message\n",
        "id", "last seen", "seen", "status", "processor/pipeline/step: error"
    );
    for f in faults {
        let place = format!("{}/{}/{}: {}", f.processor, f.pipeline, f.step, f.name);
        let message: String = f.message.chars().take(60).collect();
        let _ = writeln!(
            out,
            "{:<32} {:<24} {:>5} {:<9} {:<36} {}",
            f.id,
            time(f.last_seen),
            f.seen,
            f.status.as_str(),
            place,
            message
        );
    }
    out
}

/// One fault in full: where and why it failed, its record and event, and its resubmissions.
///
/// # Errors
/// When the stored event is not a fault event.
pub fn page(fault: &StoredFault, history: &[Resubmission]) -> Result<String, Error> {
    let details = fault.details()?;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("fault      {}", fault.id));
    line(format!(
        "status     {} (seen {} times, first {}, last {})",
        fault.status.as_str(),
        fault.seen,
        time(fault.first_seen),
        time(fault.last_seen)
    ));
    line(format!(
        "where      processor {} / pipeline {} / step {}",
        fault.processor, fault.pipeline, fault.step
    ));
    let err = &details.err;
    line(format!(
        "error      {} ({}, {} attempts): {}",
        err.name, err.class, err.attempts, err.message
    ));
    let r = &details.uow.record;
    line(format!(
        "record     {} partition {} offset {} attempt {}",
        r.source, r.partition, r.offset, r.attempt
    ));
    line(match r.encoding.as_str() {
        _ if r.redacted => "data       (not kept: the pipeline redacts fields; resubmission \
                            reads the record from its source)"
            .to_owned(),
        _ if r.truncated.is_some() => format!(
            "data       (not kept: the fault had {} bytes, trimmed to fit its store; \
             resubmission reads the record from its source)",
            r.truncated.unwrap_or_default()
        ),
        "utf8" => format!("data       {}", r.data),
        other => format!("data       ({other}) {}", r.data),
    });
    if let Some(event) = &details.uow.event {
        let pretty = serde_json::to_string_pretty(event).unwrap_or_else(|_| event.to_string());
        line(format!("event      {pretty}"));
    }
    if history.is_empty() {
        line("never resubmitted".to_owned());
    }
    for h in history {
        line(format!(
            "resubmitted {}: {} ({})",
            time(h.at),
            h.outcome,
            h.detail
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(784_111_777_123), "1994-11-06T08:49:37.123Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
