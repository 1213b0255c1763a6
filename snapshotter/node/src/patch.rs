//! The edit itself: containerd's config text in, the same text with streamsnap's settings out.
//!
//! Only the keys streamsnap needs are touched; comments, order, quoting and every other key stay
//! as they were (the TOML is edited in place, not re-serialised). A key that already has the
//! wanted value is left alone, so patching a patched config gives the same bytes.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, InlineTable, Item, Table, Value};

use crate::error::{Error, Result};
use crate::version::ContainerdVersion;

/// The CRI plugin's table holding `snapshotter` in a version 2 config (containerd 1.6/1.7).
const V2_CRI: [&str; 3] = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
/// The CRI image service's table holding `snapshotter` in a version 3 config (containerd 2.x).
const V3_CRI: [&str; 2] = ["plugins", "io.containerd.cri.v1.images"];

/// What streamsnap's settings point containerd at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The proxy plugin's name, which the CRI plugin is told to use as its snapshotter.
    pub plugin: String,
    /// The snapshotter daemon's socket (`streamsnap-snapshotterd --address`).
    pub socket: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            plugin: "streamsnap".to_owned(),
            socket: PathBuf::from("/run/streamsnap/snapshotter.sock"),
        }
    }
}

/// containerd's config file versions streamsnap can patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigVersion {
    /// `version = 2`: containerd 1.x (2.x reads it too, migrating it at load).
    V2,
    /// `version = 3`: containerd 2.0 and later.
    V3,
}

/// The version of the config `text`. A config without a `version` key is version 1 (refused)
/// unless it holds nothing at all: then the version containerd itself would write, 3 for
/// containerd 2.x, 2 otherwise.
pub fn config_version(
    text: &str,
    path: &Path,
    containerd: Option<&ContainerdVersion>,
) -> Result<ConfigVersion> {
    let doc = parse(text, path)?;
    version_of(&doc, path, containerd)
}

fn version_of(
    doc: &DocumentMut,
    path: &Path,
    containerd: Option<&ContainerdVersion>,
) -> Result<ConfigVersion> {
    let containerd_2 = containerd.is_some_and(|v| v.major >= 2);
    let Some(item) = doc.get("version") else {
        if doc.as_table().is_empty() {
            return Ok(if containerd_2 {
                ConfigVersion::V3
            } else {
                ConfigVersion::V2
            });
        }
        return Err(Error::ConfigVersion1 {
            path: path.to_owned(),
        });
    };
    let version = item.as_integer().ok_or_else(|| Error::Shape {
        path: path.to_owned(),
        what: format!("`version` is {}, not an integer", item.type_name()),
    })?;
    match version {
        2 => Ok(ConfigVersion::V2),
        3 => match containerd {
            Some(v) if v.major < 2 => Err(Error::ConfigTooNew {
                path: path.to_owned(),
                config: version,
                containerd: v.to_string(),
            }),
            _ => Ok(ConfigVersion::V3),
        },
        1 => Err(Error::ConfigVersion1 {
            path: path.to_owned(),
        }),
        other => Err(Error::UnknownConfigVersion {
            path: path.to_owned(),
            version: other,
        }),
    }
}

/// `text` (the config at `path`, empty if there is none) with streamsnap's settings:
/// `[proxy_plugins.NAME]` of type `snapshot` at the socket, and the CRI plugin's snapshotter set
/// to it with snapshot annotations on (`disable_snapshot_annotations = false`, the key of both
/// config versions; containerd 2.1 also takes it as the sign to pull without the transfer
/// service, which does not send the annotations).
pub fn patch(
    text: &str,
    path: &Path,
    settings: &Settings,
    containerd: Option<&ContainerdVersion>,
) -> Result<String> {
    let mut doc = parse(text, path)?;
    let version = version_of(&doc, path, containerd)?;
    if doc.as_table().is_empty() && !text.trim().is_empty() {
        // Only comments: toml_edit keeps them as trailing text, which new tables would follow
        // without them. Keep them on top, as they were.
        let mut kept = text.to_owned();
        if !kept.ends_with('\n') {
            kept.push('\n');
        }
        return Ok(kept + &patch("", path, settings, containerd)?);
    }
    if doc.get("version").is_none() {
        let number = match version {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        };
        doc.insert("version", Item::Value(Value::from(number)));
    }
    let socket = settings.socket.to_string_lossy().into_owned();
    {
        let plugin = table_at(
            doc.as_item_mut(),
            &["proxy_plugins", &settings.plugin],
            path,
        )?;
        set(plugin, "type", Value::from("snapshot"), path)?;
        set(plugin, "address", Value::from(socket), path)?;
    }
    let cri: &[&str] = match version {
        ConfigVersion::V2 => &V2_CRI,
        ConfigVersion::V3 => &V3_CRI,
    };
    let cri = table_at(doc.as_item_mut(), cri, path)?;
    set(
        cri,
        "snapshotter",
        Value::from(settings.plugin.as_str()),
        path,
    )?;
    set(
        cri,
        "disable_snapshot_annotations",
        Value::from(false),
        path,
    )?;
    Ok(doc.to_string())
}

/// Whether `text` already has every setting [`patch`] would write.
pub fn is_patched(
    text: &str,
    path: &Path,
    settings: &Settings,
    containerd: Option<&ContainerdVersion>,
) -> Result<bool> {
    Ok(patch(text, path, settings, containerd)? == text)
}

/// Whether `text` has a `[proxy_plugins.NAME]` entry, whatever its settings.
pub fn has_proxy_plugin(text: &str, path: &Path, plugin: &str) -> Result<bool> {
    let doc = parse(text, path)?;
    Ok(doc
        .get("proxy_plugins")
        .and_then(Item::as_table_like)
        .is_some_and(|t| t.contains_key(plugin)))
}

fn parse(text: &str, path: &Path) -> Result<DocumentMut> {
    text.parse::<DocumentMut>().map_err(|e| Error::Parse {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// The table at `keys` below `root`, created where missing: intermediate tables implicit (no
/// header of their own), the last one with a header; inside an inline table, inline tables.
fn table_at<'a>(root: &'a mut Item, keys: &[&str], path: &Path) -> Result<&'a mut Item> {
    let mut item = root;
    for (depth, key) in keys.iter().enumerate() {
        let inline = matches!(item, Item::Value(Value::InlineTable(_)));
        let dotted = keys[..depth].join(".");
        let table = item.as_table_like_mut().ok_or_else(|| Error::Shape {
            path: path.to_owned(),
            what: format!("`{dotted}` is not a table"),
        })?;
        if table.get(key).is_none() {
            let new = if inline {
                Item::Value(Value::InlineTable(InlineTable::new()))
            } else {
                let mut t = Table::new();
                t.set_implicit(depth + 1 < keys.len());
                Item::Table(t)
            };
            table.insert(key, new);
        }
        item = table.get_mut(key).expect("inserted above");
    }
    if !item.is_table_like() {
        return Err(Error::Shape {
            path: path.to_owned(),
            what: format!("`{}` is {}, not a table", keys.join("."), item.type_name()),
        });
    }
    Ok(item)
}

/// Sets `key` in `table` to `new` unless it already has that value; a replaced value keeps its
/// surrounding whitespace and comment.
fn set(table: &mut Item, key: &str, new: Value, path: &Path) -> Result<()> {
    let table = table.as_table_like_mut().expect("table_at returns tables");
    match table.get_mut(key) {
        Some(Item::Value(old)) => {
            if same_value(old, &new) {
                return Ok(());
            }
            let decor = old.decor().clone();
            *old = new;
            *old.decor_mut() = decor;
            Ok(())
        }
        Some(other) => Err(Error::Shape {
            path: path.to_owned(),
            what: format!("`{key}` is {}, not a value", other.type_name()),
        }),
        None => {
            table.insert(key, Item::Value(new));
            Ok(())
        }
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        (Value::Integer(a), Value::Integer(b)) => a.value() == b.value(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> ContainerdVersion {
        text.parse().unwrap()
    }

    fn p(text: &str, containerd: &str) -> String {
        patch(
            text,
            Path::new("config.toml"),
            &Settings::default(),
            Some(&v(containerd)),
        )
        .unwrap()
    }

    const AKS_V2: &str = r#"version = 2
oom_score = -999
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "mcr.microsoft.com/oss/kubernetes/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
[metrics]
  address = "0.0.0.0:10257"
"#;

    #[test]
    fn version_2_gets_the_cri_plugin_keys_and_keeps_the_rest() {
        let out = p(AKS_V2, "1.7.15");
        assert!(out.starts_with(
            "version = 2\noom_score = -999\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  \
             sandbox_image"
        ));
        let doc: toml::Table = toml::from_str(&out).unwrap();
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(cri["snapshotter"].as_str(), Some("streamsnap"));
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
        assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
        let proxy = &doc["proxy_plugins"]["streamsnap"];
        assert_eq!(proxy["type"].as_str(), Some("snapshot"));
        assert_eq!(
            proxy["address"].as_str(),
            Some("/run/streamsnap/snapshotter.sock")
        );
        assert_eq!(doc["metrics"]["address"].as_str(), Some("0.0.0.0:10257"));
        assert!(
            out.contains("      runtime_type = \"io.containerd.runc.v2\"\n"),
            "{out}"
        );
        assert_eq!(p(&out, "1.7.15"), out, "patching twice changes nothing");
    }

    #[test]
    fn version_3_gets_the_image_service_keys() {
        let text = "version = 3\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n    \
                    snapshotter = 'overlayfs' # the default\n    disable_snapshot_annotations = \
                    true\n";
        let out = p(text, "2.1.4");
        assert!(
            out.contains("    snapshotter = \"streamsnap\" # the default\n"),
            "{out}"
        );
        assert!(
            out.contains("    disable_snapshot_annotations = false\n"),
            "{out}"
        );
        assert!(
            out.contains("[plugins.'io.containerd.cri.v1.images']"),
            "{out}"
        );
        assert!(!out.contains("grpc.v1.cri"), "{out}");
        assert_eq!(p(&out, "2.1.4"), out);
    }

    #[test]
    fn an_empty_config_gets_the_version_containerd_writes() {
        let v2 = p("", "1.6.20");
        assert!(v2.starts_with("version = 2\n"), "{v2}");
        assert!(
            v2.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd]"),
            "{v2}"
        );
        let v3 = p("# nothing yet\n", "2.0.0");
        assert!(v3.starts_with("# nothing yet\nversion = 3\n"), "{v3}");
        assert!(
            v3.contains("[plugins.\"io.containerd.cri.v1.images\"]"),
            "{v3}"
        );
        let doc: toml::Table = toml::from_str(&v3).unwrap();
        assert_eq!(
            doc["proxy_plugins"]["streamsnap"]["type"].as_str(),
            Some("snapshot")
        );
    }

    #[test]
    fn a_version_2_config_on_containerd_2_keeps_version_2_keys() {
        let out = p("version = 2\n", "2.0.1");
        assert!(out.contains("grpc.v1.cri"), "{out}");
    }

    #[test]
    fn unsupported_versions_are_refused() {
        let path = Path::new("c.toml");
        let s = Settings::default();
        let err = patch("root = \"/x\"\n", path, &s, None).unwrap_err();
        assert!(matches!(err, Error::ConfigVersion1 { .. }), "{err}");
        let err = patch("version = 3\n", path, &s, Some(&v("1.7.0"))).unwrap_err();
        assert!(
            err.to_string().contains("version 3 needs containerd 2.0"),
            "{err}"
        );
        let err = patch("version = 7\n", path, &s, None).unwrap_err();
        assert!(matches!(
            err,
            Error::UnknownConfigVersion { version: 7, .. }
        ));
        let err = patch("version = 2\nproxy_plugins = 3\n", path, &s, None).unwrap_err();
        assert!(err.to_string().contains("`proxy_plugins` is"), "{err}");
        assert!(matches!(
            patch("version = [", path, &s, None).unwrap_err(),
            Error::Parse { .. }
        ));
    }

    #[test]
    fn inline_tables_and_existing_plugins_are_respected() {
        let text = "version = 2\nproxy_plugins = { stargz = { type = \"snapshot\", address = \
                    \"/run/stargz.sock\" } }\n";
        let out = p(text, "1.6.20");
        let doc: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(
            doc["proxy_plugins"]["stargz"]["address"].as_str(),
            Some("/run/stargz.sock")
        );
        assert_eq!(
            doc["proxy_plugins"]["streamsnap"]["type"].as_str(),
            Some("snapshot")
        );
        assert!(has_proxy_plugin(&out, Path::new("c"), "streamsnap").unwrap());
        assert!(!has_proxy_plugin(text, Path::new("c"), "streamsnap").unwrap());
        assert!(is_patched(&out, Path::new("c"), &Settings::default(), None).unwrap());
    }

    #[test]
    fn another_socket_or_name_is_a_change() {
        let out = p(AKS_V2, "1.7.0");
        let other = Settings {
            plugin: "streamsnap".into(),
            socket: "/var/run/other.sock".into(),
        };
        let moved = patch(&out, Path::new("c"), &other, None).unwrap();
        assert_ne!(moved, out);
        assert!(
            moved.contains("address = \"/var/run/other.sock\""),
            "{moved}"
        );
    }
}
