//! A throwaway certificate authority for tests, made at run time with the `openssl` CLI (Debian
//! package `openssl`): nothing secret is kept in the repository and every run has its own keys.
//!
//! [`TestCa::generate`] writes, in a private temp dir (mode 0700, private keys 0600):
//! - `ca.crt` / `ca.key`: a self-signed CA (P-256, `CA:TRUE`, valid 7 days);
//! - `server.crt` / `server.key`: a server certificate issued by the CA for
//!   `subjectAltName = IP:127.0.0.1, DNS:localhost` (extended key usage serverAuth), used by the
//!   HTTPS registry and the in-process HTTPS servers;
//! - `token.crt` / `token.key`: the token-signing certificate issued by the CA (no extended key
//!   usage), whose key signs registry bearer tokens and whose certificate is the registry's
//!   `auth.token.rootcertbundle`;
//! - `certs.d/ca.crt`: a directory holding only the CA, the shape `skopeo --dest-cert-dir`,
//!   `--src-cert-dir` and docker's `certs.d/HOST/` expect (a `*.key` beside it would be taken for
//!   a client key pair);
//! - DER copies (`*.der`, keys as PKCS#8 `*.key.der`) for rustls and ring.
//!
//! Clients are told to trust `ca.crt` (curl `--cacert`, skopeo `--*-cert-dir`, containerd's
//! `hosts.toml` `ca = ...`); a client that is not told so must fail the TLS handshake.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use tempfile::TempDir;

use crate::bins::run;

/// How long the generated certificates are valid.
const DAYS: &str = "7";

/// The openssl config the CA and the CSRs are made with: no dependency on the machine's
/// openssl.cnf (whose default extensions would be added to ours).
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

const SERVER_EXT: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

const TOKEN_EXT: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A certificate and its private key, as PEM and DER files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8), mode 0600.
    pub key: PathBuf,
    /// DER certificate.
    pub cert_der: PathBuf,
    /// DER private key (PKCS#8), mode 0600.
    pub key_der: PathBuf,
}

impl CertFiles {
    fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            cert_der: dir.join(format!("{name}.der")),
            key_der: dir.join(format!("{name}.key.der")),
        }
    }
}

/// A generated test CA with its server and token-signing certificates. See the module doc. The
/// files are removed on drop.
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
    ca: CertFiles,
    server: CertFiles,
    token: CertFiles,
}

impl TestCa {
    /// Makes the CA, the server certificate and the token-signing certificate (P-256 keys).
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-ca.")
            .tempdir()
            .context("creating a temp dir for the test CA")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        let d = dir.path();
        let cnf = d.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF)?;
        fs::write(d.join("server.ext"), SERVER_EXT)?;
        fs::write(d.join("token.ext"), TOKEN_EXT)?;

        let ca = CertFiles::in_dir(d, "ca");
        gen_key(&ca.key)?;
        openssl(|c| {
            c.args(["req", "-new", "-x509", "-days", DAYS, "-sha256"])
                .args([
                    "-subj",
                    "/CN=streamsnap-e2e test CA",
                    "-extensions",
                    "v3_ca",
                ])
                .arg("-config")
                .arg(&cnf)
                .arg("-key")
                .arg(&ca.key)
                .arg("-out")
                .arg(&ca.cert)
        })?;
        let server = CertFiles::in_dir(d, "server");
        issue(d, &ca, &server, "/CN=127.0.0.1", &d.join("server.ext"))?;
        let token = CertFiles::in_dir(d, "token");
        issue(
            d,
            &ca,
            &token,
            "/CN=streamsnap-e2e token signer",
            &d.join("token.ext"),
        )?;
        for files in [&ca, &server, &token] {
            to_der(files)?;
        }
        let certs_d = d.join("certs.d");
        fs::create_dir(&certs_d)?;
        fs::copy(&ca.cert, certs_d.join("ca.crt"))?;
        Ok(Self {
            dir,
            ca,
            server,
            token,
        })
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM): what clients trust (`curl --cacert`).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca.cert
    }

    /// The CA's files (its key signs the other two certificates).
    pub fn ca(&self) -> &CertFiles {
        &self.ca
    }

    /// The server certificate for 127.0.0.1 and localhost, and its key.
    pub fn server(&self) -> &CertFiles {
        &self.server
    }

    /// The token-signing certificate and key.
    pub fn token_signer(&self) -> &CertFiles {
        &self.token
    }

    /// A directory holding only `ca.crt`: for `skopeo --dest-cert-dir`/`--src-cert-dir` and
    /// docker-style `certs.d/HOST:PORT/` layouts.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }
}

/// Runs `openssl` with the arguments `build` adds.
fn openssl(build: impl FnOnce(&mut Command) -> &mut Command) -> anyhow::Result<()> {
    let mut cmd = Command::new("openssl");
    run(build(&mut cmd))?;
    Ok(())
}

/// A P-256 private key in PKCS#8 PEM, mode 0600. openssl creates it under the umask in a dir
/// only we can enter, and it is narrowed right after.
fn gen_key(path: &Path) -> anyhow::Result<()> {
    openssl(|c| {
        c.args(["genpkey", "-algorithm", "EC"])
            .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
            .arg("-out")
            .arg(path)
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))
}

/// A key and a certificate for `subject`, issued by `ca` with the extensions in `ext_file`.
fn issue(
    dir: &Path,
    ca: &CertFiles,
    out: &CertFiles,
    subject: &str,
    ext_file: &Path,
) -> anyhow::Result<()> {
    gen_key(&out.key)?;
    let csr = out.cert.with_extension("csr");
    openssl(|c| {
        c.args(["req", "-new", "-sha256", "-subj", subject, "-config"])
            .arg(dir.join("openssl.cnf"))
            .arg("-key")
            .arg(&out.key)
            .arg("-out")
            .arg(&csr)
    })?;
    let serial = format!("0x{:016x}", rand_u64());
    openssl(|c| {
        c.args([
            "x509",
            "-req",
            "-sha256",
            "-days",
            DAYS,
            "-set_serial",
            &serial,
        ])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca.cert)
        .arg("-CAkey")
        .arg(&ca.key)
        .arg("-extfile")
        .arg(ext_file)
        .arg("-out")
        .arg(&out.cert)
    })
}

/// DER copies of a certificate and its key (the key as unencrypted PKCS#8, mode 0600).
fn to_der(files: &CertFiles) -> anyhow::Result<()> {
    openssl(|c| {
        c.args(["x509", "-outform", "DER", "-in"])
            .arg(&files.cert)
            .arg("-out")
            .arg(&files.cert_der)
    })?;
    openssl(|c| {
        c.args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&files.key)
            .arg("-out")
            .arg(&files.key_der)
    })?;
    fs::set_permissions(&files.key_der, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", files.key_der.display()))
}

/// A serial number that differs between runs (certificates with equal issuer and serial confuse
/// some clients' caches).
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random number generator works");
    u64::from_be_bytes(bytes) >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_ca_a_server_cert_for_loopback_and_a_token_signer() {
        let ca = TestCa::generate().unwrap();
        for files in [ca.ca(), ca.server(), ca.token_signer()] {
            for key in [&files.key, &files.key_der] {
                let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
            assert!(fs::metadata(&files.cert_der).unwrap().len() > 100);
        }
        let verify = |cert: &Path| {
            run(Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(ca.ca_cert_path())
                .arg(cert))
        };
        verify(&ca.server().cert).unwrap();
        verify(&ca.token_signer().cert).unwrap();
        let text = run(Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&ca.server().cert))
        .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        assert!(text.contains("DNS:localhost"), "{text}");
        let listed: Vec<_> = fs::read_dir(ca.cert_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(listed, ["ca.crt"]);
    }
}
