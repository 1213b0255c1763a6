//! containerd's filter language, for `List` (Walk): `field.path==value,other!=x` selectors joined
//! by commas (all must match); several filter strings match when any does. Operators `==`,
//! `!=`, `~=` (regular expression) or none (the field is present). Field path components and
//! values may be quoted ("..." with escapes, or `...`).
//!
//! containerd's remote-snapshot handshake walks with
//! `labels."containerd.io/snapshot.ref"==<chain id>,parent==<parent key>`.

use crate::error::{Error, Result};

/// One parsed filter string.
#[derive(Debug)]
pub struct Filter {
    selectors: Vec<Selector>,
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex_lite::Regex),
}

/// Something filters look fields up in.
pub trait Fields {
    /// The value at a field path, or None if the object has no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

/// Parses every filter string; an empty list matches everything.
pub fn parse_all(filters: &[String]) -> Result<Vec<Filter>> {
    filters
        .iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| Filter::parse(f))
        .collect()
}

/// Whether `object` matches any of `filters` (all, if there are none).
pub fn matches_any(filters: &[Filter], object: &dyn Fields) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(object))
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self> {
        let mut parser = Parser {
            chars: text.chars().collect(),
            pos: 0,
            text,
        };
        let mut selectors = vec![parser.selector()?];
        while parser.eat(',') {
            selectors.push(parser.selector()?);
        }
        parser.skip_spaces();
        if parser.pos != parser.chars.len() {
            return Err(parser.error("unexpected characters after the filter"));
        }
        Ok(Self { selectors })
    }

    pub fn matches(&self, object: &dyn Fields) -> bool {
        self.selectors.iter().all(|s| {
            let value = object.field(&s.path);
            match (&s.op, value) {
                (Op::Present, value) => value.is_some(),
                (Op::Equal(want), Some(value)) => &value == want,
                (Op::NotEqual(want), Some(value)) => &value != want,
                (Op::NotEqual(_), None) => true,
                (Op::Matches(re), Some(value)) => re.is_match(&value),
                (_, None) => false,
            }
        })
    }
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> Error {
        Error::InvalidArgument(format!(
            "filter {:?}: {what} at position {}",
            self.text, self.pos
        ))
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_spaces();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.eat('.') {
            path.push(self.field()?);
        }
        self.skip_spaces();
        let rest: String = self.chars[self.pos..].iter().take(2).collect();
        let op = match rest.as_str() {
            "==" | "!=" | "~=" => {
                self.pos += 2;
                let value = self.value()?;
                match rest.as_str() {
                    "==" => Op::Equal(value),
                    "!=" => Op::NotEqual(value),
                    _ => Op::Matches(
                        regex_lite::Regex::new(&value)
                            .map_err(|e| self.error(&format!("bad regular expression: {e}")))?,
                    ),
                }
            }
            _ => Op::Present,
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String> {
        self.skip_spaces();
        match self.peek() {
            Some('"' | '`') => self.quoted(),
            _ => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
                {
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(self.error("expected a field name"));
                }
                Ok(self.chars[start..self.pos].iter().collect())
            }
        }
    }

    fn value(&mut self) -> Result<String> {
        self.skip_spaces();
        match self.peek() {
            Some('"' | '`') => self.quoted(),
            _ => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c != ',') {
                    self.pos += 1;
                }
                let value: String = self.chars[start..self.pos].iter().collect();
                let value = value.trim_end().to_owned();
                if value.is_empty() {
                    return Err(self.error("expected a value"));
                }
                Ok(value)
            }
        }
    }

    fn quoted(&mut self) -> Result<String> {
        let quote = self.peek().expect("caller checked");
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated quote"));
            };
            self.pos += 1;
            match c {
                c if c == quote => return Ok(out),
                '\\' if quote == '"' => {
                    let Some(escaped) = self.peek() else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.pos += 1;
                    out.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Obj(BTreeMap<String, String>);
    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [name] if name == "name" || name == "parent" => self.0.get(name).cloned(),
                [labels, key] if labels == "labels" => self.0.get(&format!("label:{key}")).cloned(),
                _ => None,
            }
        }
    }

    fn obj(pairs: &[(&str, &str)]) -> Obj {
        Obj(pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect())
    }

    #[test]
    fn the_remote_snapshot_handshake_filter_matches_exactly() {
        let filter = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==default/5/sha256:def"#,
        )
        .unwrap();
        let hit = obj(&[
            ("label:containerd.io/snapshot.ref", "sha256:abc"),
            ("parent", "default/5/sha256:def"),
        ]);
        let other_parent = obj(&[
            ("label:containerd.io/snapshot.ref", "sha256:abc"),
            ("parent", "x"),
        ]);
        let no_label = obj(&[("parent", "default/5/sha256:def")]);
        assert!(filter.matches(&hit));
        assert!(!filter.matches(&other_parent));
        assert!(!filter.matches(&no_label));
    }

    #[test]
    fn operators_presence_and_alternatives() {
        let o = obj(&[("name", "layer-1"), ("label:a", "x")]);
        let any = |fs: &[&str]| {
            matches_any(
                &parse_all(&fs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap(),
                &o,
            )
        };
        assert!(any(&[]));
        assert!(any(&["labels.a"]));
        assert!(!any(&["labels.b"]));
        assert!(any(&["name!=other"]));
        assert!(any(&["labels.b!=x"]), "a missing field is not equal");
        assert!(any(&[r#"name~=^layer-[0-9]+$"#]));
        assert!(!any(&["name==nope"]));
        assert!(
            any(&["name==nope", "labels.a==x"]),
            "filters are alternatives"
        );
        assert!(any(&[r#"name=="layer-1""#, "`labels`.a==x"]));
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        for bad in [
            "==x",
            "name==",
            r#"labels."unterminated"#,
            "name==a extra,",
            "name~=(",
        ] {
            assert!(
                matches!(Filter::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
