//! TLS for `shoal server --tls-cert FILE --tls-key FILE`: rustls on `ring` (no
//! aws-lc), HTTP/1.1 over TLS 1.2 or 1.3.
//!
//! [`Listener`] accepts TCP connections and runs each TLS handshake in its own
//! task, bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent client never holds
//! up the others; connections whose handshake fails are logged and dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const READY_MAX: usize = 256;

/// The certificate chain and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("TLS certificate {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file could not be read or holds no PEM private key.
    #[error("TLS key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("TLS certificate {cert} with key {key}: {reason}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |reason: String| TlsError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err("holds no PEM private key".into()),
        e => err(format!("not a PEM private key: {e}")),
    })
}

/// The server's rustls configuration for `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(&files.cert)?;
    let key = key(&files.key)?;
    let pair = |reason: String| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason,
    };
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| pair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS listener for `axum::serve`.
#[derive(Debug)]
pub struct Listener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Wraps `tcp`: accepts on it in a task of its own, handshakes concurrently.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Listener> {
        let addr = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(READY_MAX);
        let accept_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off a little.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Listener {
            ready,
            addr,
            accept_task,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task holds the sender until the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_certificate_and_key_files_are_refused_precisely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("empty.pem"), "").expect("write");
        std::fs::write(
            p("junk.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let files = |c: &str, k: &str| TlsFiles {
            cert: p(c),
            key: p(k),
        };
        let e = server_config(&files("missing.pem", "empty.pem")).expect_err("missing");
        assert!(matches!(e, TlsError::Cert { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = server_config(&files("empty.pem", "empty.pem")).expect_err("empty");
        assert!(
            matches!(&e, TlsError::Cert { reason, .. } if reason == "holds no PEM certificate"),
            "{e}"
        );
        let e = server_config(&files("junk.pem", "empty.pem")).expect_err("junk");
        assert!(
            matches!(&e, TlsError::Cert { reason, .. } if reason.starts_with("not PEM")),
            "{e}"
        );

        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert a");
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert b");
        std::fs::write(p("a.pem"), a.cert.pem()).expect("write");
        std::fs::write(p("a.key"), a.key_pair.serialize_pem()).expect("write");
        std::fs::write(p("b.key"), b.key_pair.serialize_pem()).expect("write");
        server_config(&files("a.pem", "a.key")).expect("a valid pair");
        let e = server_config(&files("a.pem", "empty.pem")).expect_err("no key");
        assert!(
            matches!(&e, TlsError::Key { reason, .. } if reason == "holds no PEM private key"),
            "{e}"
        );
        // A certificate is not a key.
        let e = server_config(&files("a.pem", "a.pem")).expect_err("cert as key");
        assert!(matches!(e, TlsError::Key { .. }), "{e}");
        let e = server_config(&files("a.pem", "b.key")).expect_err("other key");
        assert!(matches!(e, TlsError::Pair { .. }), "{e}");
    }
}
