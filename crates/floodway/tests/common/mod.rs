//! Helpers shared by the runtime's integration tests.

use floodway::Event;

/// Event `i` of key `key`: id `e-{i}`, time `1000 + i`, a field `n`.
pub(crate) fn event(i: u32, key: &str) -> Event {
    Event::builder("thing-happened", key)
        .id(format!("e-{i}"))
        .timestamp(1_000 + i64::from(i))
        .field("n", i)
        .build()
}

/// Events `0..n` over `keys` keys (`k0`, `k1`, ...).
pub(crate) fn events(n: u32, keys: u32) -> Vec<Event> {
    (0..n)
        .map(|i| event(i, &format!("k{}", i % keys)))
        .collect()
}
