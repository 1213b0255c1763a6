//! The HTTP API's JSON types and paths, shared by the server and the client. Version 1: every
//! path starts with [`PREFIX`]; fields may be added within a version, never removed or renamed.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use streamsnap_format::Digest;

/// Every API path starts with this.
pub const PREFIX: &str = "/v1";
/// Where the registry posts its notifications.
pub const WEBHOOK_PATH: &str = "/v1/registry-events";
/// Liveness probe; needs no token.
pub const HEALTH_PATH: &str = "/v1/healthz";

/// The state of a conversion operation. Terminal states never change again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationState {
    NotStarted,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl OperationState {
    pub const ALL: [Self; 5] = [
        Self::NotStarted,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Canceled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "NotStarted",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Canceled => "Canceled",
        }
    }
}

impl fmt::Display for OperationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A repository's streaming state: Active repositories convert newly pushed images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Streaming {
    #[default]
    Inactive,
    Active,
}

impl fmt::Display for Streaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inactive => "Inactive",
            Self::Active => "Active",
        })
    }
}

/// What kind of streaming artifact a repository's conversions make (docs/format.md): `chunked`
/// (the content in zstd chunks, a second copy of the image) or `index` (a table of contents and
/// decompression checkpoints over the original gzip layers: no second copy, gzip layers only).
pub use streamsnap_format::media::ArtifactKind;

/// What started an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// A `POST .../operations` (`streamsnap artifact-streaming create`).
    Api,
    /// A registry push notification into an Active repository.
    Push,
}

/// Bytes of source layers (compressed) converted so far, of the total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// Conversion settings an operation was asked for; `None` means the service's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationOptions {
    /// Convert even if the image already has a streaming artifact.
    #[serde(default)]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
}

/// A conversion operation: one image manifest (by digest) of one repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    /// Repository name relative to the service's registry, e.g. `team/app`.
    pub repository: String,
    /// What the operation was asked for: the tag (as it was when asked), or the digest.
    pub reference: String,
    /// The manifest or index converted, pinned when the operation was created.
    pub manifest_digest: Digest,
    pub state: OperationState,
    pub progress: Progress,
    /// Why it failed or was canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The streaming artifact's manifest, once Succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_digest: Option<Digest>,
    /// The image manifest the artifact refers to (the linux/amd64 entry when
    /// `manifest_digest` is an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_digest: Option<Digest>,
    pub trigger: Trigger,
    pub options: OperationOptions,
    /// The kind of artifact it converts to: its repository's kind when the conversion
    /// started (absent before, and in operations of older versions, which were all chunked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ArtifactKind>,
    /// Times the service (or the replica running it) died while it ran; it is resumed, on
    /// another replica or after a restart.
    #[serde(default)]
    pub interruptions: u32,
    /// A cancel was asked for and not yet carried out.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The replica (worker) running the operation, or the last one that ran it:
    /// `HOSTNAME-PID-RANDOM` of a `streamsnap serve` process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// Creation order (the queue order).
    pub seq: u64,
}

impl Operation {
    /// `repository:tag` or `repository@digest`.
    pub fn image(&self) -> String {
        if self.reference.contains(':') {
            format!("{}@{}", self.repository, self.reference)
        } else {
            format!("{}:{}", self.repository, self.reference)
        }
    }
}

/// Operations of a repository counted by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(rename = "NotStarted")]
    pub not_started: u64,
    #[serde(rename = "Running")]
    pub running: u64,
    #[serde(rename = "Succeeded")]
    pub succeeded: u64,
    #[serde(rename = "Failed")]
    pub failed: u64,
    #[serde(rename = "Canceled")]
    pub canceled: u64,
}

impl Counts {
    pub fn add(&mut self, state: OperationState) {
        *self.get_mut(state) += 1;
    }

    pub fn get(&self, state: OperationState) -> u64 {
        match state {
            OperationState::NotStarted => self.not_started,
            OperationState::Running => self.running,
            OperationState::Succeeded => self.succeeded,
            OperationState::Failed => self.failed,
            OperationState::Canceled => self.canceled,
        }
    }

    fn get_mut(&mut self, state: OperationState) -> &mut u64 {
        match state {
            OperationState::NotStarted => &mut self.not_started,
            OperationState::Running => &mut self.running,
            OperationState::Succeeded => &mut self.succeeded,
            OperationState::Failed => &mut self.failed,
            OperationState::Canceled => &mut self.canceled,
        }
    }
}

/// A repository's streaming state, artifact kind and operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub name: String,
    pub streaming: Streaming,
    /// What its conversions make, from the next one started (absent from older services:
    /// chunked).
    #[serde(default)]
    pub kind: ArtifactKind,
    /// When the streaming state or the kind last changed; absent if they never did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Timestamp>,
    pub operations: Counts,
}

/// `GET /v1/repositories`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryList {
    pub repositories: Vec<Repository>,
}

/// `PUT /v1/repositories/{name}`: what is absent stays as it is; at least one is required.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRepository {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<Streaming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ArtifactKind>,
}

/// `POST /v1/repositories/{name}/operations`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOperation {
    /// A tag or a digest in the repository.
    pub reference: String,
    #[serde(default)]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
}

/// `GET /v1/repositories/{name}/operations`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationList {
    pub operations: Vec<Operation>,
}

/// What the webhook did with an envelope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSummary {
    /// Operations created.
    pub created: u32,
    /// Pushes whose manifest already had an operation, or redelivered events.
    pub duplicates: u32,
    /// Deletes of manifests whose streaming artifacts were removed.
    pub deleted: u32,
    /// Everything else (pulls, blobs, inactive repositories, artifacts, fallback indexes).
    pub ignored: u32,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Percent-encodes a repository name as one path segment (`team/app` -> `team%2Fapp`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a percent-encoded path segment; `None` for bad escapes or non-UTF-8 results.
pub fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Milliseconds since the Unix epoch, written as RFC 3339 UTC (`2026-01-31T12:00:00.000Z`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// Parses what [`fmt::Display`] writes (fraction optional, `Z` only).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_suffix('Z')?;
        let (date, time) = s.split_once('T')?;
        let mut d = date.splitn(3, '-').map(|p| p.parse::<u64>().ok());
        let (year, month, day) = (d.next()??, d.next()??, d.next()??);
        let (time, millis) = match time.split_once('.') {
            Some((t, frac)) => {
                let frac = format!("{frac:0<3}");
                (t, frac.get(..3)?.parse::<u64>().ok()?)
            }
            None => (time, 0),
        };
        let mut t = time.splitn(3, ':').map(|p| p.parse::<u64>().ok());
        let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        if second > 60 || year < 1970 {
            return None;
        }
        let days = days_from_civil(year, month, day);
        Some(Self(
            ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis,
        ))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0 % 1000;
        let secs = self.0 / 1000;
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            rest / 3600,
            rest % 3600 / 60,
            rest % 60
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 UTC time: {s:?}")))
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year % 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_and_parse_as_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        let t = Timestamp(1_795_865_712_413);
        assert_eq!(t.to_string(), "2026-11-28T11:35:12.413Z");
        assert_eq!(Timestamp::parse(&t.to_string()), Some(t));
        assert_eq!(
            Timestamp::parse("2024-02-29T23:59:59Z"),
            Some(Timestamp(1_709_251_199_000))
        );
        assert_eq!(
            Timestamp(1_709_251_199_000).to_string(),
            "2024-02-29T23:59:59.000Z"
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00+01:00",
        ] {
            assert_eq!(Timestamp::parse(bad), None, "{bad}");
        }
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn repository_names_round_trip_as_one_segment() {
        assert_eq!(encode_segment("team/app"), "team%2Fapp");
        assert_eq!(decode_segment("team%2Fapp").as_deref(), Some("team/app"));
        assert_eq!(decode_segment("team%2fapp").as_deref(), Some("team/app"));
        assert_eq!(decode_segment("a%2"), None);
        assert_eq!(decode_segment("a%zz"), None);
    }

    #[test]
    fn states_serialize_with_their_names() {
        assert_eq!(
            serde_json::to_string(&OperationState::NotStarted).unwrap(),
            "\"NotStarted\""
        );
        assert_eq!(
            serde_json::to_string(&Streaming::Active).unwrap(),
            "\"Active\""
        );
        assert_eq!(
            serde_json::to_string(&ArtifactKind::Index).unwrap(),
            "\"index\""
        );
        for kind in ArtifactKind::ALL {
            assert_eq!(kind.as_str().parse::<ArtifactKind>(), Ok(kind));
        }
        assert!(
            "zstd"
                .parse::<ArtifactKind>()
                .unwrap_err()
                .contains("chunked or index")
        );
        let mut counts = Counts::default();
        counts.add(OperationState::Failed);
        let json = serde_json::to_value(counts).unwrap();
        assert_eq!(json["Failed"], 1);
        assert_eq!(counts.get(OperationState::Failed), 1);
    }

    #[test]
    fn repository_updates_leave_out_what_they_do_not_change() {
        // A request of an older client: the kind stays as it is.
        let old: UpdateRepository = serde_json::from_str(r#"{"streaming":"Active"}"#).unwrap();
        assert_eq!(old.streaming, Some(Streaming::Active));
        assert_eq!(old.kind, None);
        let kind_only = UpdateRepository {
            kind: Some(ArtifactKind::Index),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&kind_only).unwrap(),
            r#"{"kind":"index"}"#
        );
        assert!(serde_json::from_str::<UpdateRepository>(r#"{"kind":"zstd"}"#).is_err());
        // A repository object of an older service has no kind: chunked.
        let repo: Repository = serde_json::from_str(
            r#"{"name":"r","streaming":"Inactive","operations":{"NotStarted":0,"Running":0,
               "Succeeded":0,"Failed":0,"Canceled":0}}"#,
        )
        .unwrap();
        assert_eq!(repo.kind, ArtifactKind::Chunked);
    }
}
