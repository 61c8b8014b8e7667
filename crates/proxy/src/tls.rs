//! TLS termination: rustls with its safe defaults (TLS 1.2 and 1.3), ALPN `h2` and
//! `http/1.1`, certificates chosen by SNI and reloaded when their files change (a renewed
//! Kubernetes Secret) without a restart. A reload that fails keeps the certificates in use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// One loaded certificate: its chain, key, and the end-entity certificate for name checks.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    leaf: CertificateDer<'static>,
}

/// Picks the certificate for the name a client asks for (SNI).
#[derive(Debug)]
pub struct CertStore {
    files: Vec<larder_config::CertificateFiles>,
    loaded: ArcSwap<Vec<Loaded>>,
}

impl CertStore {
    /// Loads every certificate; an unreadable or mismatched file is an error naming it.
    pub fn load(files: &[larder_config::CertificateFiles]) -> Result<Arc<CertStore>, String> {
        let loaded = load_all(files)?;
        Ok(Arc::new(CertStore {
            files: files.to_vec(),
            loaded: ArcSwap::from_pointee(loaded),
        }))
    }

    /// Loads the files again; on failure the certificates in use stay.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = load_all(&self.files)?;
        self.loaded.store(Arc::new(loaded));
        Ok(())
    }

    /// The directories holding the files, to watch.
    pub fn directories(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .files
            .iter()
            .flat_map(|f| [&f.cert_file, &f.key_file])
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        let wanted = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name.to_owned()).ok());
        if let Some(name) = wanted {
            for cert in loaded.iter() {
                let valid = webpki::EndEntityCert::try_from(&cert.leaf)
                    .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok());
                if valid {
                    return Some(cert.key.clone());
                }
            }
        }
        // No SNI, or no certificate for that name: the first one (clients then decide).
        loaded.first().map(|c| c.key.clone())
    }
}

fn load_all(files: &[larder_config::CertificateFiles]) -> Result<Vec<Loaded>, String> {
    let provider = rustls::crypto::ring::default_provider();
    files
        .iter()
        .map(|f| {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert_file)
                .and_then(|certs| certs.collect::<Result<_, _>>())
                .map_err(|e| format!("reading certificates from {}: {e}", f.cert_file.display()))?;
            let leaf = chain
                .first()
                .cloned()
                .ok_or_else(|| format!("{} holds no certificate", f.cert_file.display()))?;
            let key_der = PrivateKeyDer::from_pem_file(&f.key_file).map_err(|e| {
                format!("reading the private key from {}: {e}", f.key_file.display())
            })?;
            let signing = provider
                .key_provider
                .load_private_key(key_der)
                .map_err(|e| format!("unusable private key in {}: {e}", f.key_file.display()))?;
            let key = CertifiedKey::new(chain, signing);
            key.keys_match().map_err(|e| {
                format!(
                    "{} does not belong to the certificate in {}: {e}",
                    f.key_file.display(),
                    f.cert_file.display()
                )
            })?;
            Ok(Loaded {
                key: Arc::new(key),
                leaf,
            })
        })
        .collect()
}

/// The listener's TLS setup: safe protocol defaults, ALPN for HTTP/2 and HTTP/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, String> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reloads the certificates whenever their directories change (Secret volumes swap a
/// symlink; renewals rewrite files). Runs until dropped.
pub fn watch(store: Arc<CertStore>) -> Result<impl std::future::Future<Output = ()>, String> {
    use notify::Watcher;
    let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("watching certificates: {e}"))?;
    for dir in store.directories() {
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| format!("watching {}: {e}", dir.display()))?;
    }
    Ok(async move {
        let _watcher = watcher;
        while changes.recv().await.is_some() {
            // A renewal writes the chain and the key separately: wait for both.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while changes.try_recv().is_ok() {}
            match store.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; the current certificates stay")
                }
            }
        }
    })
}
