//! Docker credential helpers, run as the docker CLI runs them: `credHelpers` for one registry,
//! `credsStore` for the others, `docker-credential-NAME get` with the registry on stdin. The
//! helpers here are shell scripts on PATH (this binary's only test changes PATH).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use streamsnap_registry::CredentialStore;

fn helper(dir: &Path, name: &str, body: &str) {
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn cred_helpers_and_creds_store_answer_as_in_docker() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("asked");
    // "ecr" knows one registry; "store" knows Docker Hub; both log what they were asked.
    helper(
        dir.path(),
        "ecr",
        &format!(
            "read server; echo \"ecr $1 $server\" >> {log}\n\
             [ \"$server\" = 123.dkr.ecr.example.com ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"AWS\",\"Secret\":\"ecr-secret\"}}'",
            log = log.display()
        ),
    );
    helper(
        dir.path(),
        "store",
        &format!(
            "read server; echo \"store $1 $server\" >> {log}\n\
             case \"$server\" in https://index.docker.io/v1/) echo '{{\"Username\":\"hub\",\"Secret\":\"hub-secret\"}}';; \
             *) echo 'credentials not found in native keychain'; exit 1;; esac",
            log = log.display()
        ),
    );
    helper(dir.path(), "broken", "exit 7");
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: this test binary has this one test; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", dir.path().display())) };

    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"auths": {"inline.example.com": {"auth": "dTpw"}, "https://index.docker.io/v1/": {}},
            "credHelpers": {"123.dkr.ecr.example.com": "ecr", "broken.example.com": "broken"},
            "credsStore": "store"}"#,
    )
    .unwrap();
    let store = CredentialStore::from_docker_config(Some(&config)).unwrap();
    let ecr = store.lookup("123.dkr.ecr.example.com").await.unwrap();
    assert_eq!(
        (ecr.username.as_str(), ecr.password()),
        ("AWS", "ecr-secret")
    );
    let hub = store.lookup("docker.io").await.unwrap();
    assert_eq!(hub.password(), "hub-secret");
    let inline = store.lookup("inline.example.com").await.unwrap();
    assert_eq!(inline.username, "u");
    assert!(store.lookup("unknown.example.com").await.is_none());
    assert!(store.lookup("broken.example.com").await.is_none());
    // Answers are reused for a while: asking again runs nothing.
    let before = std::fs::read_to_string(&log).unwrap();
    store.lookup("123.dkr.ecr.example.com").await.unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
    assert!(
        before.contains("ecr get 123.dkr.ecr.example.com"),
        "{before}"
    );
    assert!(
        before.contains("store get https://index.docker.io/v1/"),
        "{before}"
    );
    // Debug output names helpers, never secrets.
    let debug = format!("{store:?}");
    assert!(
        debug.contains("ecr") && !debug.contains("secret"),
        "{debug}"
    );

    // A helper name that is not a plain name is refused at load.
    std::fs::write(&config, r#"{"credsStore": "../../bin/sh"}"#).unwrap();
    assert!(CredentialStore::from_docker_config(Some(&config)).is_err());
}
