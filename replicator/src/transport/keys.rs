//! Identities: this side's certificate and key ([`Identity`]), the pinned
//! peer certificate ([`PeerCert`]), key generation and fingerprints.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TransportError;

/// SHA-256 fingerprint of a DER certificate, as `sha256:` + hex.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Generates a self-signed ECDSA P-256 certificate for `host_name`;
/// returns `(cert_pem, key_pem)`.
pub fn generate_identity(host_name: &str) -> Result<(String, String), TransportError> {
    let ck = rcgen::generate_simple_self_signed(vec![host_name.to_owned()])?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// Generates an identity and writes `DIR/NAME.crt` (mode 0644) and
/// `DIR/NAME.key` (mode 0600), creating `dir` if needed. Refuses to overwrite
/// an existing key. Returns the two paths.
pub fn write_identity(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TransportError> {
    let (cert_pem, key_pem) = generate_identity(name)?;
    fs::create_dir_all(dir).map_err(|source| TransportError::File {
        what: "creating directory",
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TransportError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TransportError::File {
        what: "writing",
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|source| TransportError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

fn parse_cert(pem: &[u8]) -> Result<CertificateDer<'static>, TransportError> {
    CertificateDer::from_pem_slice(pem).map_err(|source| TransportError::Pem {
        what: "certificate",
        source,
    })
}

/// This side's certificate and private key.
pub struct Identity {
    pub(super) cert: CertificateDer<'static>,
    pub(super) key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert", &fingerprint(&self.cert))
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Parses PEM certificate and private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let cert = parse_cert(cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TransportError::Pem {
            what: "private key",
            source,
        })?;
        Ok(Identity { cert, key })
    }

    /// Reads PEM certificate and key files.
    pub fn load(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TransportError> {
        let cert = read_file(cert_path.as_ref(), "reading certificate")?;
        let key = read_file(key_path.as_ref(), "reading private key")?;
        Self::from_pem(&cert, &key)
    }

    /// Generates a fresh self-signed identity (for tests and ephemeral use).
    pub fn generate(host_name: &str) -> Result<Self, TransportError> {
        let (c, k) = generate_identity(host_name)?;
        Self::from_pem(c.as_bytes(), k.as_bytes())
    }

    /// The certificate, as the peer should pin it.
    pub fn cert(&self) -> PeerCert {
        PeerCert {
            der: self.cert.clone(),
        }
    }
}

/// The peer's pinned certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub(super) der: CertificateDer<'static>,
}

impl fmt::Debug for PeerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerCert")
            .field(&self.fingerprint())
            .finish()
    }
}

impl PeerCert {
    /// Parses a PEM certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TransportError> {
        Ok(PeerCert {
            der: parse_cert(pem)?,
        })
    }

    /// Reads a PEM certificate file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        Self::from_pem(&read_file(path.as_ref(), "reading peer certificate")?)
    }

    /// A certificate from DER bytes.
    pub fn from_der(der: Vec<u8>) -> Self {
        PeerCert {
            der: CertificateDer::from(der),
        }
    }

    /// DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 fingerprint (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }
}
