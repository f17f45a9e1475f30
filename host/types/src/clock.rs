//! Wall-clock readings, in the two forms the host records: RFC 3339 text
//! (dead letters, quarantines, activations) and Unix milliseconds (leases,
//! latencies).

/// Current time as RFC 3339 (UTC, seconds), e.g. `2026-01-01T00:00:00Z`.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis().max(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_is_utc_to_the_second() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), "2026-01-01T00:00:00Z".len(), "{t}");
        assert!(t.ends_with('Z'), "{t}");
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok());
    }

    #[test]
    fn unix_ms_is_after_2020() {
        assert!(super::unix_ms() > 1_577_836_800_000);
    }
}
