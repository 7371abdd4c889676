//! `cluster.toml`: everything a client needs to reach a cluster.
//!
//! ```toml
//! ca_cert = "certs/ca.pem"          # relative paths: from this file's folder
//! client_cert = "certs/client.pem"
//! client_key = "certs/client-key.pem"
//!
//! [[nodes]]
//! id = 1
//! addr = "127.0.0.1:7001"
//! metrics_addr = "127.0.0.1:9001"   # optional
//! ```

use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One node as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    /// Node id (its certificate names it).
    pub id: NodeId,
    /// QUIC address.
    pub addr: SocketAddr,
    /// Prometheus metrics address, if served.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

/// The contents of a cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// A client certificate issued by the CA (PEM).
    pub client_cert: PathBuf,
    /// Its private key (PEM).
    pub client_key: PathBuf,
    /// The nodes.
    pub nodes: Vec<ClusterNode>,
}

/// A cluster file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// I/O failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a valid cluster file.
    #[error("parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
}

impl ClusterFile {
    /// Reads a cluster file, resolving relative paths from its folder.
    ///
    /// # Errors
    /// [`ClusterFileError`] naming the file.
    pub fn load(path: &Path) -> Result<ClusterFile, ClusterFileError> {
        let mut f = Self::load_as_written(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut f.ca_cert, &mut f.client_cert, &mut f.client_key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(f)
    }

    /// Reads a cluster file with its paths as written (relative ones
    /// relative to its folder): what to edit and [`Self::save`] back.
    ///
    /// # Errors
    /// [`ClusterFileError`] naming the file.
    pub fn load_as_written(path: &Path) -> Result<ClusterFile, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        let f: ClusterFile = toml::from_str(&text).map_err(|e| ClusterFileError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if f.nodes.is_empty() {
            return Err(ClusterFileError::Parse {
                path: path.to_owned(),
                reason: "lists no nodes".into(),
            });
        }
        Ok(f)
    }

    /// Writes the file (paths as given).
    ///
    /// # Errors
    /// [`ClusterFileError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), ClusterFileError> {
        let text = toml::to_string_pretty(self).expect("cluster file serialises");
        std::fs::write(path, text).map_err(|source| ClusterFileError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })
    }
}
