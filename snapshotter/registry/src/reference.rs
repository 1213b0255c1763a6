//! Image references (`registry/name:tag@digest`) with the grammar of the distribution project's
//! `reference` package: lowercase path components, optional registry host with port, tag of at
//! most 128 word characters, sha256 digests.

use std::fmt;
use std::str::FromStr;

use streamsnap_format::Digest;

use crate::error::{Error, Result};

/// The registry used when a reference names none, as Docker does.
pub const DOCKER_HUB: &str = "docker.io";
const NAME_TOTAL_LENGTH_MAX: usize = 255;
const TAG_LENGTH_MAX: usize = 128;

/// A repository in a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    /// `host[:port]` as written by the user, e.g. `127.0.0.1:5000` or `docker.io`.
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub name: String,
}

impl Repository {
    pub fn new(registry: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed image reference: a repository and a tag, a digest, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `[registry/]name[:tag][@digest]`. The first path component is a registry host when
    /// it contains `.` or `:`, is `localhost`, or has uppercase letters; otherwise the registry
    /// is `docker.io`, where a single-component name gets the `library/` prefix. Without tag and
    /// digest the tag is `latest`.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidReference {
            reference: s.chars().take(300).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty reference".into()));
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            return Err(invalid(format!(
                "give the reference without a scheme ({scheme}://): HOST[:PORT]/REPO:TAG, \
                 e.g. {rest}"
            )));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                let digest = digest
                    .parse::<Digest>()
                    .map_err(|e| invalid(e.to_string()))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(i) if last_slash.is_none_or(|j| i > j) => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|r| invalid(r.into()))?;
        }
        let (registry, remote) = match name.split_once('/') {
            Some((first, remote)) if looks_like_host(first) => (first, remote),
            _ => (DOCKER_HUB, name),
        };
        validate_host(registry).map_err(|r| invalid(r.into()))?;
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let remote = if registry == DOCKER_HUB && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote.to_owned()
        };
        validate_name(&remote).map_err(|r| invalid(r.into()))?;
        if registry.len() + 1 + remote.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(invalid(format!(
                "repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
            )));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            repository: Repository::new(registry, remote),
            tag,
            digest,
        })
    }

    /// Whether `s` names no registry, so that [`Reference::parse`] puts it on Docker Hub
    /// (`busybox` is `docker.io/library/busybox:latest`), as Docker, containerd's CRI plugin and
    /// the kubelet do.
    pub fn is_short_name(s: &str) -> bool {
        let name = s.split_once('@').map_or(s, |(name, _)| name);
        !matches!(name.split_once('/'), Some((first, _)) if looks_like_host(first))
    }

    /// What goes after `/manifests/`: the digest if there is one, else the tag, else `latest`.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository pinned to `digest`, without a tag.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

fn looks_like_host(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

/// `tag := [\w][\w.-]{0,127}`
pub(crate) fn validate_tag(tag: &str) -> std::result::Result<(), &'static str> {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let bytes = tag.as_bytes();
    match bytes.first() {
        None => Err("empty tag"),
        Some(&c) if !word(c) => Err("tag must start with a letter, digit or underscore"),
        Some(_) if bytes.len() > TAG_LENGTH_MAX => Err("tag is longer than 128 characters"),
        Some(_) if !bytes.iter().all(|&c| word(c) || c == b'.' || c == b'-') => {
            Err("tag may contain only letters, digits, '_', '.' and '-'")
        }
        Some(_) => Ok(()),
    }
}

/// `host[:port]` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
fn validate_host(registry: &str) -> std::result::Result<(), &'static str> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or("unterminated IPv6 address in registry")?;
        if v6.is_empty()
            || !v6
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err("invalid IPv6 address in registry");
        }
        match after {
            "" => ("", None),
            p => (
                "",
                Some(p.strip_prefix(':').ok_or("invalid registry host")?),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return Err("registry port must be a number");
    }
    if !registry.starts_with('[') {
        for component in host.split('.') {
            let b = component.as_bytes();
            let ok = !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-');
            if !ok {
                return Err("invalid registry host name");
            }
        }
    }
    Ok(())
}

/// `path-component ('/' path-component)*`, `path-component := [a-z0-9]+ (separator [a-z0-9]+)*`,
/// `separator := [_.] | '__' | '-'+`.
fn validate_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository name must be lowercase");
    }
    for component in name.split('/') {
        validate_component(component.as_bytes())?;
    }
    Ok(())
}

fn validate_component(b: &[u8]) -> std::result::Result<(), &'static str> {
    const BAD: &str = "repository path components are lowercase letters and digits, separated by \
                       '.', '_', '__' or dashes, starting and ending with a letter or digit";
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() {
        return Err("empty repository path component");
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: must follow and be followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return Err(BAD),
        }
        if start == 0 || !b.get(i).copied().is_some_and(alnum) {
            return Err(BAD);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_the_usual_forms() {
        let digest: Digest = D.parse().unwrap();
        #[rustfmt::skip]
        let table: &[(&str, &str, &str, Option<&str>)] = &[
            ("busybox", "docker.io", "library/busybox", Some("latest")),
            ("busybox:1.36", "docker.io", "library/busybox", Some("1.36")),
            ("user/app", "docker.io", "user/app", Some("latest")),
            ("index.docker.io/user/app:v1", "docker.io", "user/app", Some("v1")),
            ("127.0.0.1:5000/a/b:tag", "127.0.0.1:5000", "a/b", Some("tag")),
            ("localhost/a", "localhost", "a", Some("latest")),
            ("localhost:5000/a-b__c/d.e", "localhost:5000", "a-b__c/d.e", Some("latest")),
            ("ghcr.io/o/r/x", "ghcr.io", "o/r/x", Some("latest")),
            ("[::1]:5000/a", "[::1]:5000", "a", Some("latest")),
            ("Registry/a", "Registry", "a", Some("latest")),
        ];
        for (input, registry, name, tag) in table {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.repository.registry, *registry, "{input}");
            assert_eq!(r.repository.name, *name, "{input}");
            assert_eq!(r.tag.as_deref(), *tag, "{input}");
            assert_eq!(r.digest, None, "{input}");
        }
        let r = Reference::parse(&format!("localhost/a@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.digest), (None, Some(digest)));
        assert_eq!(r.reference(), D);
        let r = Reference::parse(&format!("a/b:tag@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.digest), (Some("tag"), Some(digest)));
        assert_eq!(r.to_string(), format!("docker.io/a/b:tag@{D}"));
        assert_eq!(r.reference(), D);
        let pinned = r.with_digest(digest);
        assert_eq!(pinned.to_string(), format!("docker.io/a/b@{D}"));
    }

    #[test]
    fn short_names_are_the_ones_without_a_registry_host() {
        for short in ["busybox", "busybox:1.36", "user/app", &format!("app@{D}")] {
            assert!(Reference::is_short_name(short), "{short}");
        }
        for full in [
            "docker.io/library/busybox",
            "docker.io/busybox",
            "localhost/a",
            "127.0.0.1:5000/a:tag",
            "ghcr.io/o/r",
            &format!("reg.example/app@{D}"),
        ] {
            assert!(!Reference::is_short_name(full), "{full}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "127.0.0.1:5000/a/b:tag",
            "docker.io/library/busybox:latest",
            &format!("localhost/x@{D}"),
        ] {
            let r: Reference = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        let long_tag = format!("a:{}", "t".repeat(129));
        let long_name = format!("localhost/{}", "a".repeat(250));
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("localhost/UP", "lowercase"),
            ("a//b", "empty repository path component"),
            ("a/b/", "empty repository path component"),
            ("a/-b", "path components"),
            ("a/b-", "path components"),
            ("a/b..c", "path components"),
            ("a/b___c", "path components"),
            ("a/b c", "path components"),
            ("a:", "empty tag"),
            ("a:.x", "tag must start"),
            ("a:x/y", "port must be a number"),
            ("a:x!y", "tag may contain"),
            (&long_tag, "longer than 128"),
            (&long_name, "longer than 255"),
            ("a@sha256:abc", "64 hex"),
            ("a@md5:abc", "sha256"),
            ("host:port/a", "port must be a number"),
            ("-bad.host/a", "host name"),
            ("[::1/a", "IPv6"),
            ("HTTP://reg.example:5000/a:1", "without a scheme (HTTP://)"),
            ("https://reg.example/a", "e.g. reg.example/a"),
        ];
        for (input, want) in table {
            let e = Reference::parse(input).expect_err(input).to_string();
            assert!(e.contains(want), "{input:?}: {e:?} should mention {want:?}");
        }
    }
}
