//! Segments: the log's rows. One row holds a run of consecutive events of one partition, all
//! published in the same commit.
//!
//! Storing a row per event made every event one insert into two b-trees (the table and its
//! primary key), which bounded publishing near raw SQLite's insert rate and, since the log
//! shared its file (and SQLite's single writer) with the views then, bounded everything
//! written beside it. A segment costs one insert for up to [`MAX_EVENTS`] events, and reading
//! one hands out its events as slices of one buffer, without copying them. Offsets,
//! checkpoints and receipts stay per event; retention deletes whole segments (like a Kafka log
//! segment).
//!
//! The row's `data` is each event as a 4-byte little-endian length and the event's JSON.

use bytes::Bytes;

use crate::error::HubError;

/// Events in one segment at most.
pub(crate) const MAX_EVENTS: usize = 1_000;
/// Bytes in one segment at most, unless a single event is larger.
pub(crate) const MAX_BYTES: usize = 1 << 20;

/// The segment a commit is filling for one partition.
pub(crate) struct Filling {
    /// The offset the next event gets.
    next: u64,
    /// The offset of the first event in `data`.
    first: u64,
    count: usize,
    data: Vec<u8>,
    /// Bytes of segments written so far in this commit.
    pub(crate) written: usize,
}

impl Filling {
    /// A partition whose last offset given out is `last`.
    pub(crate) fn after(last: u64) -> Filling {
        Filling {
            next: last + 1,
            first: last + 1,
            count: 0,
            data: Vec::new(),
            written: 0,
        }
    }

    /// Whether `len` more bytes of event must go into a new segment.
    pub(crate) fn full_for(&self, len: usize) -> bool {
        self.count >= MAX_EVENTS || (self.count > 0 && self.data.len() + 4 + len > MAX_BYTES)
    }

    /// Adds an event; returns its offset.
    pub(crate) fn push(&mut self, event: &[u8]) -> u64 {
        if self.count == 0 {
            self.first = self.next;
        }
        let len = u32::try_from(event.len()).expect("events are far below 4 GiB");
        self.data.extend_from_slice(&len.to_le_bytes());
        self.data.extend_from_slice(event);
        self.count += 1;
        self.next += 1;
        self.next - 1
    }

    /// The last offset given out.
    pub(crate) fn last(&self) -> u64 {
        self.next - 1
    }

    /// The filled segment as `(first offset, last offset, data)`, if it has events; the next
    /// one starts empty.
    pub(crate) fn take(&mut self) -> Option<(u64, u64, Vec<u8>)> {
        if self.count == 0 {
            return None;
        }
        let data = std::mem::take(&mut self.data);
        self.written += data.len();
        self.count = 0;
        Some((self.first, self.next - 1, data))
    }
}

/// A stored segment being read, event by event.
pub(crate) struct Segment {
    data: Bytes,
    at: usize,
    /// The offset of the next event.
    next: u64,
    /// The offset of the segment's last event.
    last: u64,
}

impl Segment {
    /// The segment stored with the events `first..=last`.
    pub(crate) fn new(first: u64, last: u64, data: Bytes) -> Segment {
        Segment {
            data,
            at: 0,
            next: first,
            last,
        }
    }

    /// The next event and its offset; `None` after the last.
    pub(crate) fn next_event(&mut self) -> Result<Option<(u64, Bytes)>, HubError> {
        // The bounds come from the file: a damaged one is an error, never an overflow.
        if self.at == self.data.len() {
            if self.last.checked_add(1) != Some(self.next) {
                return Err(corrupt(format!(
                    "segment ends at offset {} instead of {}",
                    self.next.saturating_sub(1),
                    self.last
                )));
            }
            return Ok(None);
        }
        let header = self
            .data
            .get(self.at..self.at + 4)
            .ok_or_else(|| corrupt("segment cut inside an event's length".into()))?;
        let len = u32::from_le_bytes(header.try_into().expect("four bytes")) as usize;
        let start = self.at + 4;
        if start + len > self.data.len() || self.next > self.last {
            return Err(corrupt(format!(
                "segment holds more than its events (offset {})",
                self.next
            )));
        }
        let event = self.data.slice(start..start + len);
        self.at = start + len;
        let offset = self.next;
        self.next = offset.saturating_add(1);
        Ok(Some((offset, event)))
    }

    /// Whether every event has been read.
    pub(crate) fn is_done(&self) -> bool {
        self.next > self.last
    }

    /// Every event left, with its offset.
    pub(crate) fn events(mut self) -> Result<Vec<(u64, Bytes)>, HubError> {
        // At most one event per four bytes, whatever the stored bounds say.
        let count = self.last.saturating_add(1).saturating_sub(self.next);
        let mut out =
            Vec::with_capacity(usize::try_from(count).map_or(0, |c| c.min(self.data.len() / 4)));
        while let Some(event) = self.next_event()? {
            out.push(event);
        }
        Ok(out)
    }
}

fn corrupt(detail: String) -> HubError {
    HubError::Corrupt {
        what: "log segment",
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds a damaged file gives a segment are an error, not an allocation of terabytes or
    /// an overflow.
    #[test]
    fn damaged_bounds_are_corrupt_not_a_crash() {
        let mut filling = Filling::after(0);
        filling.push(b"{}");
        let (_, _, data) = filling.take().unwrap();
        for (first, last) in [(1, 1 << 40), (0, u64::MAX), (5, 2)] {
            let read = Segment::new(first, last, Bytes::from(data.clone())).events();
            assert!(
                matches!(read, Err(HubError::Corrupt { .. })),
                "{first}..={last}: {read:?}"
            );
        }
    }

    #[test]
    fn events_come_back_with_their_offsets() {
        let mut filling = Filling::after(41);
        assert_eq!(filling.push(b"{\"a\":1}"), 42);
        assert_eq!(filling.push(b""), 43);
        assert_eq!(filling.push(b"xyz"), 44);
        let (first, last, data) = filling.take().unwrap();
        assert_eq!((first, last), (42, 44));
        assert!(filling.take().is_none());
        assert_eq!(filling.last(), 44);
        let events = Segment::new(first, last, Bytes::from(data))
            .events()
            .unwrap();
        assert_eq!(
            events,
            vec![
                (42, Bytes::from_static(b"{\"a\":1}")),
                (43, Bytes::new()),
                (44, Bytes::from_static(b"xyz")),
            ]
        );
    }

    #[test]
    fn a_segment_fills_by_count_and_by_size() {
        let mut filling = Filling::after(0);
        for _ in 0..MAX_EVENTS {
            assert!(!filling.full_for(1));
            filling.push(b"x");
        }
        assert!(filling.full_for(1));
        filling.take();
        assert!(
            !filling.full_for(MAX_BYTES * 2),
            "an empty segment takes any event"
        );
        filling.push(&vec![b'x'; MAX_BYTES - 12]);
        assert!(filling.full_for(5));
        assert!(!filling.full_for(4));
    }

    #[test]
    fn reading_part_way_and_damage() {
        let mut filling = Filling::after(0);
        for e in [b"a", b"b", b"c"] {
            filling.push(e);
        }
        let (first, last, data) = filling.take().unwrap();
        let mut segment = Segment::new(first, last, Bytes::from(data.clone()));
        segment.next_event().unwrap();
        assert!(!segment.is_done());
        segment.next_event().unwrap();
        assert_eq!(
            segment.next_event().unwrap(),
            Some((3, Bytes::from_static(b"c")))
        );
        assert!(segment.is_done());
        // A segment claiming more events than it holds, or cut short, is corrupt.
        assert!(Segment::new(1, 4, Bytes::from(data.clone()))
            .events()
            .is_err());
        assert!(
            Segment::new(1, 3, Bytes::from(data[..data.len() - 1].to_vec()))
                .events()
                .is_err()
        );
        assert!(Segment::new(1, 2, Bytes::from(data)).events().is_err());
    }
}
