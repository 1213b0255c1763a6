//! The snapshotter as a plain (non-remote) snapshotter: containerd's semantics and error kinds,
//! with the mounts it returns actually mounted by the kernel (needs root).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use streamsnap_snapshotter::error::Error;
use streamsnap_snapshotter::store::Kind;
use streamsnap_snapshotter::{Mount, Snapshotter};

fn open(root: &Path) -> Snapshotter {
    Snapshotter::open(root, None).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Mounts `mounts` on `target` with mount(8), as containerd would.
struct Mounted(std::path::PathBuf);

impl Mounted {
    fn new(mounts: &[Mount], target: &Path) -> Self {
        assert_eq!(mounts.len(), 1);
        let m = &mounts[0];
        std::fs::create_dir_all(target).unwrap();
        let status = Command::new("mount")
            .args(["-t", &m.kind, "-o", &m.options.join(","), &m.source])
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "mount {m:?} failed");
        Self(target.to_owned())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn layers_stack_like_the_overlayfs_snapshotter() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("root"));
    let mnt = dir.path().join("mnt");

    // Base layer: bind mount of an empty dir, written, committed.
    let m = s
        .prepare("base-active", None, BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].kind, "bind");
    {
        let _mounted = Mounted::new(&m, &mnt);
        std::fs::write(mnt.join("a"), "from base").unwrap();
        std::fs::write(mnt.join("gone"), "deleted above").unwrap();
    }
    s.commit("base", "base-active", labels(&[("l", "1")]))
        .unwrap();
    assert!(
        matches!(s.stat("base-active"), Err(Error::NotFound { .. })),
        "the active key is gone after commit"
    );
    let info = s.stat("base").unwrap();
    assert_eq!(
        (info.kind, info.labels.get("l").map(String::as_str)),
        (Kind::Committed, Some("1"))
    );
    assert!(s.usage("base").unwrap().size > 0);

    // Upper layer: overlay, a file replaced and one deleted.
    let m = s
        .prepare("top-active", Some("base"), BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].kind, "overlay");
    {
        let _mounted = Mounted::new(&m, &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("a")).unwrap(), "from base");
        std::fs::write(mnt.join("a"), "from top").unwrap();
        std::fs::remove_file(mnt.join("gone")).unwrap();
    }
    s.commit("top", "top-active", BTreeMap::new()).unwrap();

    // A view of the stack: read-only overlay with both layers.
    let m = s.view("v", Some("top"), BTreeMap::new()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    assert!(m[0].options.iter().all(|o| !o.starts_with("upperdir")));
    {
        let _mounted = Mounted::new(&m, &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("a")).unwrap(), "from top");
        assert!(!mnt.join("gone").exists());
        assert!(
            std::fs::write(mnt.join("x"), "no").is_err(),
            "a view is read-only"
        );
    }
    // A view of a single layer is a read-only bind of it.
    let m = s.view("v1", Some("base"), BTreeMap::new()).unwrap();
    assert_eq!(
        (m[0].kind.as_str(), m[0].options.contains(&"ro".to_owned())),
        ("bind", true)
    );
    assert_eq!(s.mounts("v1").unwrap(), m);

    // Error kinds containerd relies on.
    assert!(matches!(
        s.prepare("top-active2", Some("missing"), BTreeMap::new())
            .await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.prepare("v", Some("top"), BTreeMap::new()).await,
        Err(Error::AlreadyExists { .. })
    ));
    let _ = s
        .prepare("open", Some("top"), BTreeMap::new())
        .await
        .unwrap();
    assert!(
        matches!(
            s.prepare("x", Some("open"), BTreeMap::new()).await,
            Err(Error::FailedPrecondition(_))
        ),
        "parent must be committed"
    );
    assert!(matches!(
        s.commit("top", "open", BTreeMap::new()),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(
        matches!(
            s.commit("y", "base", BTreeMap::new()),
            Err(Error::FailedPrecondition(_))
        ),
        "only active snapshots commit"
    );
    assert!(
        matches!(s.remove("base"), Err(Error::FailedPrecondition(_))),
        "a parent cannot be removed"
    );
    assert!(matches!(s.remove("nope"), Err(Error::NotFound { .. })));
    assert!(matches!(s.stat("nope"), Err(Error::NotFound { .. })));

    // Update: labels only.
    let info = s
        .update("top", labels(&[("a", "1"), ("b", "2")]), &[])
        .unwrap();
    assert_eq!(info.labels.len(), 2);
    let info = s
        .update(
            "top",
            labels(&[("a", "9")]),
            &["labels.a".into(), "labels.b".into()],
        )
        .unwrap();
    assert_eq!(info.labels, labels(&[("a", "9")]));
    assert!(matches!(
        s.update("top", BTreeMap::new(), &["parent".into()]),
        Err(Error::InvalidArgument(_))
    ));

    // Walk with filters.
    let names = |filters: &[&str]| {
        let mut names: Vec<String> = s
            .list(&filters.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&[]), ["base", "open", "top", "v", "v1"]);
    assert_eq!(names(&["kind==committed"]), ["base", "top"]);
    assert_eq!(names(&["parent==top"]), ["open", "v"]);
    assert_eq!(names(&[r#"labels.a==9"#, "name==base"]), ["base", "top"]);
    assert!(matches!(
        s.list(&["==".into()]),
        Err(Error::InvalidArgument(_))
    ));

    // Remove children then parents; Cleanup removes directories no record owns.
    for key in ["open", "v", "v1", "top", "base"] {
        s.remove(key).unwrap();
    }
    let snapshots = dir.path().join("root/snapshots");
    std::fs::create_dir_all(snapshots.join("999/fs")).unwrap();
    s.cleanup().unwrap();
    assert_eq!(std::fs::read_dir(&snapshots).unwrap().count(), 0);
}

#[tokio::test]
async fn snapshots_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    {
        let s = open(&root);
        s.prepare("a-active", None, BTreeMap::new()).await.unwrap();
        s.commit("a", "a-active", labels(&[("k", "v")])).unwrap();
        s.prepare("b", Some("a"), BTreeMap::new()).await.unwrap();
    }
    let s = open(&root);
    assert_eq!(s.stat("a").unwrap().labels, labels(&[("k", "v")]));
    assert_eq!(s.stat("b").unwrap().parent.as_deref(), Some("a"));
    let m = s.mounts("b").unwrap();
    assert_eq!(m[0].kind, "overlay");
    // New ids do not collide with the old ones.
    s.prepare("c", Some("a"), BTreeMap::new()).await.unwrap();
    assert_ne!(s.mounts("c").unwrap(), m);
}

#[tokio::test]
async fn an_upper_dir_takes_the_owner_of_its_parents_root() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("root"));
    let m = s
        .prepare("base-active", None, BTreeMap::new())
        .await
        .unwrap();
    let base_fs = Path::new(&m[0].source).to_owned();
    std::os::unix::fs::chown(&base_fs, Some(100_000), Some(100_000)).unwrap();
    s.commit("base", "base-active", BTreeMap::new()).unwrap();
    let m = s
        .prepare("child", Some("base"), BTreeMap::new())
        .await
        .unwrap();
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(upper).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (100_000, 100_000));
}
