//! Mutual TLS for every QUIC connection: a cluster CA, node certificates
//! whose DNS name binds the node id, client certificates, and the rustls /
//! quinn configurations built from them.
//!
//! - A node's certificate carries the DNS name `node-<id>.tessera` (see
//!   [`node_server_name`]). A dialer connects with that name, so rustls
//!   refuses a server that is not the node it meant to reach; an acceptor
//!   checks the id a peer claims with [`verify_claimed_node`] against the
//!   certificate the peer presented.
//! - Client certificates carry `client.tessera`: valid against the CA, never
//!   valid as a node. Admin certificates carry `admin.tessera` instead: the
//!   only ones whose connections may split shards, move replicas and
//!   transfer leadership ([`peer_is_admin`]); data requests take either.
//! - Two ALPN protocols: [`PEER_ALPN`] (node to node) and [`CLIENT_ALPN`]
//!   (clients). A handshake offering neither fails.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::NodeId;

/// ALPN of node-to-node (Raft) traffic.
pub const PEER_ALPN: &[u8] = b"tessera-peer/1";
/// ALPN of client traffic.
pub const CLIENT_ALPN: &[u8] = b"tessera-client/1";
/// The DNS name in every client certificate.
pub const CLIENT_NAME: &str = "client.tessera";
/// The DNS name in every admin certificate (a client that may administer).
pub const ADMIN_NAME: &str = "admin.tessera";

/// The DNS name a node's certificate carries and dialers verify.
pub fn node_server_name(node: NodeId) -> String {
    format!("node-{}.tessera", node.0)
}

/// What can go wrong setting up or checking TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (bad key, unusable CA).
    #[error("tls configuration: {0}")]
    Config(String),
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate is not valid for the node id it claims.
    #[error("peer claims to be {claimed} but its certificate is not for that node: {reason}")]
    WrongIdentity {
        /// The id the peer claimed.
        claimed: NodeId,
        /// Why the certificate does not match.
        reason: String,
    },
    /// The connection negotiated an unexpected ALPN protocol.
    #[error("unexpected ALPN protocol {0:?}")]
    WrongAlpn(Option<String>),
}

/// The PEM files one party (node or client) uses: the cluster CA, its own
/// certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// Loaded certificate material.
#[derive(Debug)]
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("bad certificate PEM: {e:?}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Reads the three PEM files.
    ///
    /// # Errors
    /// [`TlsError::Io`] or [`TlsError::Pem`] naming the file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let key_bytes = read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            reason: format!("no usable private key: {e:?}"),
        })?;
        Ok(TlsIdentity {
            ca: pem_certs(&files.ca_cert)?,
            chain: pem_certs(&files.cert)?,
            key,
        })
    }

    /// Builds an identity from DER material (tests, in-memory setups).
    pub fn from_der(
        ca: CertificateDer<'static>,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        TlsIdentity {
            ca: vec![ca],
            chain: vec![cert],
            key,
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Config(format!("cluster CA: {e}")))?;
        }
        Ok(roots)
    }

    /// The QUIC server configuration of a node: it requires a client
    /// certificate from the cluster CA and speaks both ALPN protocols.
    ///
    /// # Errors
    /// [`TlsError::Config`] when the key or CA is unusable.
    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("node certificate: {e}")))?;
        cfg.alpn_protocols = vec![PEER_ALPN.to_vec(), CLIENT_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(transport);
        Ok(sc)
    }

    /// The QUIC client configuration for dialing nodes with `alpn`,
    /// presenting this identity's certificate.
    ///
    /// # Errors
    /// [`TlsError::Config`] when the key or CA is unusable.
    pub fn client_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("own certificate: {e}")))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        cc.transport_config(transport);
        Ok(cc)
    }
}

/// The ALPN protocol a connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Checks that the certificate `conn`'s peer presented is valid for node
/// `claimed` (its DNS name is `node-<claimed>.tessera`). The chain itself was
/// verified against the cluster CA during the handshake.
///
/// # Errors
/// [`TlsError::NoPeerCertificate`] or [`TlsError::WrongIdentity`].
pub fn verify_claimed_node(conn: &quinn::Connection, claimed: NodeId) -> Result<(), TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    cert_is_for_node(leaf, claimed)
}

/// Whether the certificate `conn`'s peer presented is an admin
/// certificate (its DNS name is [`ADMIN_NAME`]; the chain was verified
/// against the cluster CA during the handshake).
pub fn peer_is_admin(conn: &quinn::Connection) -> bool {
    let Some(certs) = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return false;
    };
    certs.first().is_some_and(cert_is_admin)
}

/// Whether the certificate `conn`'s peer presented names one of `nodes`
/// (the chain was verified against the cluster CA during the handshake).
pub fn peer_is_node(conn: &quinn::Connection, nodes: impl IntoIterator<Item = NodeId>) -> bool {
    let Some(certs) = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return false;
    };
    let Some(leaf) = certs.first() else {
        return false;
    };
    nodes.into_iter().any(|n| cert_is_for_node(leaf, n).is_ok())
}

/// Whether `cert` is valid for [`ADMIN_NAME`].
pub fn cert_is_admin(cert: &CertificateDer<'_>) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let name = ServerName::try_from(ADMIN_NAME).expect("a valid DNS name");
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Checks that `cert` names node `claimed`.
///
/// # Errors
/// [`TlsError::WrongIdentity`] saying why not.
pub fn cert_is_for_node(cert: &CertificateDer<'_>, claimed: NodeId) -> Result<(), TlsError> {
    let wrong = |reason: String| TlsError::WrongIdentity { claimed, reason };
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| wrong(e.to_string()))?;
    let name = ServerName::try_from(node_server_name(claimed)).map_err(|e| wrong(e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|e| wrong(e.to_string()))
}

/// Certificate issuing: a cluster CA and the certificates it signs.
#[cfg(feature = "server")]
pub mod issue {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };

    /// A cluster certificate authority (its key included).
    pub struct ClusterCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    /// One issued certificate and its key, as PEM and DER.
    pub struct Issued {
        /// Certificate, PEM.
        pub cert_pem: String,
        /// Private key, PEM (PKCS#8).
        pub key_pem: String,
        /// Certificate, DER.
        pub cert_der: CertificateDer<'static>,
        /// Private key, DER.
        pub key_der: PrivateKeyDer<'static>,
    }

    fn err(e: rcgen::Error) -> TlsError {
        TlsError::Config(format!("certificate generation: {e}"))
    }

    fn ca_params(cluster: &str) -> Result<CertificateParams, TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Tessera cluster CA ({cluster})"),
        );
        dn.push(DnType::OrganizationName, "Tessera");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2124, 1, 1);
        Ok(p)
    }

    impl ClusterCa {
        /// A new CA with a fresh key, named after `cluster`.
        ///
        /// # Errors
        /// [`TlsError::Config`] if key generation fails.
        pub fn generate(cluster: &str) -> Result<Self, TlsError> {
            let key = KeyPair::generate().map_err(err)?;
            let cert = ca_params(cluster)?.self_signed(&key).map_err(err)?;
            Ok(ClusterCa { cert, key })
        }

        /// Restores a CA from its key (PEM); certificates it signs verify
        /// against the CA certificate first issued with that key and name.
        ///
        /// # Errors
        /// [`TlsError::Config`] for an unusable key.
        pub fn from_key_pem(cluster: &str, key_pem: &str) -> Result<Self, TlsError> {
            let key = KeyPair::from_pem(key_pem).map_err(err)?;
            let cert = ca_params(cluster)?.self_signed(&key).map_err(err)?;
            Ok(ClusterCa { cert, key })
        }

        /// The CA certificate, PEM.
        pub fn cert_pem(&self) -> String {
            self.cert.pem()
        }

        /// The CA certificate, DER.
        pub fn cert_der(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }

        /// The CA's private key, PEM.
        pub fn key_pem(&self) -> String {
            self.key.serialize_pem()
        }

        fn issue(
            &self,
            dns_name: String,
            common_name: String,
            expired: bool,
        ) -> Result<Issued, TlsError> {
            let mut p = CertificateParams::new(vec![dns_name]).map_err(err)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, common_name);
            p.distinguished_name = dn;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            } else {
                p.not_before = rcgen::date_time_ymd(2024, 1, 1);
                p.not_after = rcgen::date_time_ymd(2124, 1, 1);
            }
            let key = KeyPair::generate().map_err(err)?;
            let cert = p.signed_by(&key, &self.cert, &self.key).map_err(err)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                cert_der: cert.der().clone(),
                key_der: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            })
        }

        /// A node certificate binding `node`'s id.
        ///
        /// # Errors
        /// [`TlsError::Config`] if signing fails.
        pub fn issue_node(&self, node: NodeId) -> Result<Issued, TlsError> {
            self.issue(node_server_name(node), format!("tessera {node}"), false)
        }

        /// A node certificate that expired in 2021 (for tests of refusal).
        ///
        /// # Errors
        /// [`TlsError::Config`] if signing fails.
        pub fn issue_expired_node(&self, node: NodeId) -> Result<Issued, TlsError> {
            self.issue(node_server_name(node), format!("tessera {node}"), true)
        }

        /// A client certificate (valid against the CA, never as a node).
        ///
        /// # Errors
        /// [`TlsError::Config`] if signing fails.
        pub fn issue_client(&self, name: &str) -> Result<Issued, TlsError> {
            self.issue(
                CLIENT_NAME.to_string(),
                format!("tessera client {name}"),
                false,
            )
        }

        /// An admin certificate: a client that may also split, move
        /// replicas and transfer leadership.
        ///
        /// # Errors
        /// [`TlsError::Config`] if signing fails.
        pub fn issue_admin(&self, name: &str) -> Result<Issued, TlsError> {
            self.issue(
                ADMIN_NAME.to_string(),
                format!("tessera admin {name}"),
                false,
            )
        }

        /// The identity of a party holding `issued`, trusting this CA.
        pub fn identity(&self, issued: &Issued) -> TlsIdentity {
            TlsIdentity::from_der(
                self.cert_der(),
                issued.cert_der.clone(),
                issued.key_der.clone_key(),
            )
        }
    }

    /// Writes `contents` to `path` (mode 0600 for keys), creating folders.
    ///
    /// # Errors
    /// [`TlsError::Io`] naming the file.
    pub fn write_pem(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
        let io = |action, source| TlsError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("create folder for", e))?;
        }
        std::fs::write(path, contents).map_err(|e| io("write", e))?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("restrict", e))?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::issue::ClusterCa;
    use super::*;

    #[test]
    fn node_certificates_bind_their_id() {
        let ca = ClusterCa::generate("t").unwrap();
        let n2 = ca.issue_node(NodeId(2)).unwrap();
        cert_is_for_node(&n2.cert_der, NodeId(2)).unwrap();
        assert!(matches!(
            cert_is_for_node(&n2.cert_der, NodeId(3)),
            Err(TlsError::WrongIdentity { .. })
        ));
        let client = ca.issue_client("c").unwrap();
        assert!(cert_is_for_node(&client.cert_der, NodeId(1)).is_err());
        assert!(!cert_is_admin(&client.cert_der));
        let admin = ca.issue_admin("a").unwrap();
        assert!(cert_is_admin(&admin.cert_der));
        assert!(cert_is_for_node(&admin.cert_der, NodeId(1)).is_err());
        assert!(!cert_is_admin(&ca.issue_node(NodeId(1)).unwrap().cert_der));
    }

    #[test]
    fn a_restored_ca_signs_for_the_original_certificate() {
        let ca = ClusterCa::generate("t").unwrap();
        let again = ClusterCa::from_key_pem("t", &ca.key_pem()).unwrap();
        let issued = again.issue_node(NodeId(7)).unwrap();
        let ee = webpki::EndEntityCert::try_from(&issued.cert_der).unwrap();
        let ca_der = ca.cert_der();
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
    }
}
