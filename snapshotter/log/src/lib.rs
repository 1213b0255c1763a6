//! What the streamsnap binaries (`streamsnap`, `streamsnap-snapshotterd`) share about logging:
//! how a log filter is read, and when colours are used.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// `info`, `debug,h2=info`, `streamsnap_cache=trace`, ... A directive without `=` must be a
/// level: a typo such as `inf` would otherwise parse as a target name and switch every log line
/// off. `None` when `spec` is not such a filter.
pub fn parse_filter(spec: &str) -> Option<Targets> {
    let levels_ok = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('='))
        .all(|d| d.parse::<LevelFilter>().is_ok());
    if !levels_ok {
        return None;
    }
    spec.parse().ok()
}

/// Colours only for a person at a terminal: not in a file, journald or `kubectl logs`, and not
/// when NO_COLOR is set (https://no-color.org).
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_levels_or_target_level_pairs() {
        assert!(parse_filter("info").is_some());
        assert!(parse_filter("debug").is_some());
        assert!(parse_filter("debug,h2=info").is_some());
        assert!(parse_filter("streamsnap_snapshotter=debug").is_some());
        assert!(parse_filter("warn,streamsnap_registry=trace").is_some());
        assert!(parse_filter("inf").is_none(), "a misspelt level is refused");
        assert!(parse_filter("info,verbose").is_none());
    }
}
