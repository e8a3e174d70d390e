//! HTTPS with rustls: whom the sink trusts, who it is, and what a TLS failure means.

use std::path::Path;
use std::sync::Arc;

use floodway::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, ClientConfig, RootCertStore};

use crate::HttpConfigError;

/// Whom the sink trusts and how it identifies itself, read from their files when set.
#[derive(Default)]
pub(crate) struct TlsSettings {
    /// Certificates to trust instead of the system's roots.
    ca: Option<Vec<CertificateDer<'static>>>,
    /// A certificate chain and its private key, for servers that ask for one (mTLS).
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl Clone for TlsSettings {
    fn clone(&self) -> Self {
        TlsSettings {
            ca: self.ca.clone(),
            identity: self
                .identity
                .as_ref()
                .map(|(chain, key)| (chain.clone(), key.clone_key())),
        }
    }
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_certificates", &self.ca.as_ref().map(Vec::len))
            .field("client_identity", &self.identity.is_some())
            .finish()
    }
}

fn tls_error(path: &Path, what: &str, reason: impl std::fmt::Display) -> HttpConfigError {
    HttpConfigError::Tls(format!("{what} {}: {reason}", path.display()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, HttpConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(path, what, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, what, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, what, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
}

impl TlsSettings {
    /// Trusts the PEM certificates in `path` instead of the system's roots.
    pub(crate) fn set_ca_file(&mut self, path: &Path) -> Result<(), HttpConfigError> {
        let certs = certificates(path, "ca_file")?;
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| tls_error(path, "ca_file", e))?;
        }
        self.ca = Some(certs);
        Ok(())
    }

    /// Identifies the client with the PEM chain in `cert` and the PEM key in `key`.
    pub(crate) fn set_identity(&mut self, cert: &Path, key: &Path) -> Result<(), HttpConfigError> {
        let chain = certificates(cert, "client_cert")?;
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, "client_key", e))?;
        // Built once here so that a key that does not match its certificate is refused now.
        builder()
            .with_root_certificates(RootCertStore::empty())
            .with_client_auth_cert(chain.clone(), key_der.clone_key())
            .map_err(|e| tls_error(key, "client_key", e))?;
        self.identity = Some((chain, key_der));
        Ok(())
    }

    /// The rustls configuration (ring's cryptography, TLS 1.2 and 1.3). The system's roots
    /// are read only when `https` is used and no `ca_file` replaces them.
    pub(crate) fn client_config(&self, https: bool) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(certs) => {
                roots.add_parsable_certificates(certs.iter().cloned());
            }
            None if https => {
                let native = rustls_native_certs::load_native_certs();
                for err in &native.errors {
                    tracing::warn!(error = %err, "reading the system's root certificates");
                }
                let (added, _ignored) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    tracing::error!(
                        "no root certificate found on this system: no https server will be \
                         trusted (install ca-certificates, or set ca_file)"
                    );
                }
            }
            None => {}
        }
        let builder = builder().with_root_certificates(roots);
        match &self.identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .expect("checked when the identity was set"),
        }
    }
}

/// The TLS error in a connection error's chain, if it is one.
fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error's `source` skips the error it wraps (often another io::Error around
        // the TLS error): step into it instead.
        // HTTP/2's errors do not give their cause as a source at all.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            .or_else(|| {
                e.downcast_ref::<h2::Error>()
                    .and_then(h2::Error::get_io)
                    .map(|io| io as &(dyn std::error::Error + 'static))
            });
        next = inner.or_else(|| e.source());
    }
    None
}

const FATAL_ALERTS: [AlertDescription; 10] = [
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::CertificateRequired,
    AlertDescription::ProtocolVersion,
    AlertDescription::HandshakeFailure,
];

fn fatal_tls_error(tls: &rustls::Error) -> bool {
    match tls {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::UnsupportedNameType => true,
        rustls::Error::AlertReceived(alert) => FATAL_ALERTS.contains(alert),
        _ => false,
    }
}

/// Whether the chain holds a TLS alert refusing the client's certificate that reached us only
/// as text. With TLS 1.3 a server checks the client's certificate after the client thinks the
/// handshake is done, so the alert arrives on the first read of the connection; the HTTP/2
/// layer then passes the error on as an `io::Error` holding its text, not the rustls error.
fn stringified_fatal_alert(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let text = io.to_string();
            if let Some(alert) = text.strip_prefix("received fatal alert: ") {
                return FATAL_ALERTS
                    .iter()
                    .any(|a| format!("{a:?}") == alert.trim());
            }
        }
        next = e.source();
    }
    false
}

/// Whether the chain holds an I/O error that timed out (hyper's connect timeout).
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// What a failed connection means: a certificate one side does not accept will not fix
/// itself (fatal: the configuration or the server's certificate is wrong), anything else
/// (refused, reset, a handshake cut short) is transient.
pub(crate) fn classify_connect(err: &(dyn std::error::Error + 'static), message: String) -> Error {
    let fatal = match find_tls_error(err) {
        Some(tls) => fatal_tls_error(tls),
        None if stringified_fatal_alert(err) => true,
        // A connection not made in time (the service's accept queue full) is overload, as a
        // call timed out is: adaptive concurrency backs off.
        None if timed_out(err) => {
            return Error::transient_msg("ConnectionError", message).with_timeout()
        }
        None => return Error::transient_msg("ConnectionError", message),
    };
    if fatal {
        Error::fatal_msg("TlsError", format!("{message} (fix the certificates)"))
    } else {
        Error::transient_msg("TlsError", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_connection_not_made_in_time_is_a_timeout() {
        // As hyper's connector reports its connect timeout: an I/O error timed out, wrapped.
        let timed_out = Wrapped(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        ));
        let err = classify_connect(&timed_out, "m".into());
        assert!(err.is_timeout());
        assert_eq!(err.class(), floodway::ErrorClass::Transient);
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let err = classify_connect(&refused, "m".into());
        assert!(!err.is_timeout());
        assert_eq!(err.class(), floodway::ErrorClass::Transient);
    }
}
