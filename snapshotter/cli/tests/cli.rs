//! The `streamsnap` binary as a user meets it: what goes to stdout and stderr, exit codes, and
//! messages for the usual first mistakes. A small in-process registry answers the referrers API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};

const CLI: &str = env!("CARGO_BIN_EXE_streamsnap");
const SUBJECT: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn streamsnap(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .env_remove("STREAMSNAP_LOG")
        .env_remove("NO_COLOR")
        .env("DOCKER_CONFIG", "/nonexistent")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A registry on 127.0.0.1 (plain HTTP, as for every loopback registry) whose referrers API
/// answers an empty index for every subject, and 404 for anything else.
fn empty_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    address
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        let path = request_line.split_whitespace().nth(1).unwrap_or("");
        let response = if path.starts_with("/v2/app/referrers/") {
            let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\n\
                 Content-Length: {}\r\n\r\n{index}",
                index.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
        };
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn no_referrers_leaves_stdout_empty_and_says_so_on_stderr() {
    let registry = empty_registry();
    let image = format!("{registry}/app@{SUBJECT}");
    let output = streamsnap(&["manifest", "list-referrers", "--image", &image]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stdout), "", "stdout stays empty for scripts");
    assert_eq!(
        text(&output.stderr),
        format!("{image} ({SUBJECT}) has no referrers\n")
    );

    let output = streamsnap(&[
        "manifest",
        "list-referrers",
        "--image",
        &image,
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stdout), "[]\n");
    assert_eq!(text(&output.stderr), "", "json: nothing but the document");
}

#[test]
fn logs_off_a_terminal_have_no_colour_codes() {
    let registry = empty_registry();
    let image = format!("{registry}/app@{SUBJECT}");
    // -vv: info and debug lines, written to a pipe.
    let output = streamsnap(&["-vv", "manifest", "list-referrers", "--image", &image]);
    assert!(output.status.success(), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("listed referrers"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes in {stderr:?}");
}

#[test]
fn a_reference_with_a_scheme_is_refused_once_with_the_form_to_use() {
    let output = streamsnap(&[
        "manifest",
        "list-referrers",
        "--image",
        "HTTP://127.0.0.1:5000/app:1",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(text(&output.stdout), "");
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "printed once: {stderr}");
    assert!(
        stderr.starts_with("error: \"HTTP://127.0.0.1:5000/app:1\" has a scheme")
            && stderr.contains("HOST[:PORT]/REPO:TAG")
            && stderr.contains("--plain-http"),
        "{stderr}"
    );
    assert!(!stderr.contains("port must be a number"), "{stderr}");
}

#[test]
fn a_short_name_goes_to_docker_hub_with_a_notice() {
    // Nothing listens on the registry this resolves to from here: what matters is the notice
    // before the (network) error, and that the error names the expanded reference.
    let output = streamsnap(&[
        "manifest",
        "list-referrers",
        "--image",
        "busybox",
        "--timeout",
        "1",
    ]);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "notice: busybox names no registry: using docker.io/library/busybox:latest"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("notice:").count(), 1, "{stderr}");
}

#[test]
fn every_help_succeeds() {
    for args in [
        &["--help"][..],
        &["artifact-streaming", "--help"],
        &["artifact-streaming", "operation", "cancel", "--help"],
        &["manifest", "list-referrers", "--help"],
        &["serve", "--help"],
        &["node", "run", "--help"],
    ] {
        let output = streamsnap(args);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert!(
            text(&output.stdout).contains("Usage: streamsnap"),
            "{args:?}"
        );
    }
    let serve = text(&streamsnap(&["serve", "--help"]).stdout);
    assert!(
        serve.contains("Required, unless --insecure-dev-loopback"),
        "{serve}"
    );
}
