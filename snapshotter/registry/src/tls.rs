//! Which certificates a registry's TLS must chain to: the system roots (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` are honoured), plus, per registry host, the CA files configured for it
//! (`[registry.hosts."HOST"] ca_file`). A CA configured for one registry is trusted for that
//! registry only.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// The system roots; a registry host -> its extra CA files.
pub(crate) fn verifier(
    provider: Arc<CryptoProvider>,
    ca_files: &[(String, PathBuf)],
) -> Result<Arc<dyn ServerCertVerifier>> {
    let system = system_roots();
    let build = |roots: RootCertStore| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::TlsConfig(e.to_string()))
    };
    let mut by_host: HashMap<String, RootCertStore> = HashMap::new();
    for (registry, path) in ca_files {
        let pem = std::fs::read(path).map_err(|source| Error::CaFile {
            path: path.clone(),
            reason: source.to_string(),
        })?;
        let certs: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::CaFile {
                    path: path.clone(),
                    reason: format!("not PEM certificates: {e}"),
                })?;
        if certs.is_empty() {
            return Err(Error::CaFile {
                path: path.clone(),
                reason: "holds no certificate".into(),
            });
        }
        let roots = by_host
            .entry(host_of(registry))
            .or_insert_with(|| system.clone());
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error::CaFile {
                path: path.clone(),
                reason: format!("none of its {ignored} certificate(s) is a usable CA"),
            });
        }
    }
    let default = build(system)?;
    let mut hosts = HashMap::new();
    for (host, roots) in by_host {
        hosts.insert(host, build(roots)?);
    }
    Ok(Arc::new(PerHost { default, hosts }))
}

/// The system's roots; a warning when there are none.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping unreadable system certificate");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!(
            "no system root certificates found: HTTPS registries will fail certificate \
             verification (install the ca-certificates package, or set SSL_CERT_FILE)"
        );
    }
    roots
}

/// `host[:port]` -> `host` (the name TLS verifies), lowercase, brackets dropped.
fn host_of(registry: &str) -> String {
    let registry = registry.trim().to_ascii_lowercase();
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
        _ => registry,
    }
}

/// A verifier per host with its own CAs, the system's for every other host.
struct PerHost {
    default: Arc<WebPkiServerVerifier>,
    hosts: HashMap<String, Arc<WebPkiServerVerifier>>,
}

impl fmt::Debug for PerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerHost")
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PerHost {
    fn for_name(&self, name: &ServerName<'_>) -> &Arc<WebPkiServerVerifier> {
        let host = match name {
            ServerName::DnsName(dns) => dns.as_ref().to_ascii_lowercase(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            _ => return &self.default,
        };
        self.hosts.get(&host).unwrap_or(&self.default)
    }
}

impl ServerCertVerifier for PerHost {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.for_name(server_name).verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.default.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_drop_ports_and_brackets() {
        assert_eq!(host_of("Reg.IO:5000"), "reg.io");
        assert_eq!(host_of("127.0.0.1:443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5000"), "::1");
        assert_eq!(host_of("reg.io"), "reg.io");
    }

    #[test]
    fn unusable_ca_files_are_refused_naming_the_file() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        for path in [missing, empty] {
            let err = verifier(provider.clone(), &[("r:5000".into(), path.clone())]).unwrap_err();
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        assert!(verifier(provider, &[]).is_ok());
    }
}
