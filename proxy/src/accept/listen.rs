//! The proxy's listeners: their settings (`listen`) and binding them on each loopback address.

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpSocket};

use crate::{
    accept::conn::{Deadlines, Limits},
    config::{self, SettingError, Zero, nonzero_count, nonzero_duration},
};

/// Listen backlog: a node pulling many images opens many connections at once.
const BACKLOG: u32 = 1024;

/// What the proxy listeners need from the configuration (`listen`).
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// Port of the proxy on every address; the kernel redirects to it.
    pub port: u16,
    /// Loopback addresses to listen on.
    pub addresses: Vec<IpAddr>,
    /// Deadlines of both listeners' connections.
    pub deadlines: Deadlines,
    /// Connection limits of the proxy port, the per-client ones capped by the total.
    pub limits: Limits,
    /// Hand terminated HTTP/1.1 TLS 1.3 connections to the kernel's TLS where it has it.
    pub kernel_tls: bool,
}

/// A `listen` value the proxy cannot listen with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenSettingsError {
    #[error("must be a port number, not 0")]
    PortZero,
    #[error("needs at least one address")]
    NoAddress,
    #[error("{0} is not a loopback address; the proxy only listens on loopback")]
    NotLoopback(IpAddr),
    #[error(transparent)]
    Zero(#[from] Zero),
}

impl SettingError for ListenSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::PortZero => "listen.port",
            Self::NoAddress | Self::NotLoopback(_) => "listen.addresses",
            Self::Zero(z) => z.key(),
        }
    }
}

impl TryFrom<&config::Listen> for ListenSettings {
    type Error = ListenSettingsError;

    fn try_from(l: &config::Listen) -> Result<Self, Self::Error> {
        if l.port == 0 {
            return Err(ListenSettingsError::PortZero);
        }
        if l.addresses.is_empty() {
            return Err(ListenSettingsError::NoAddress);
        }
        if let Some(a) = l.addresses.iter().find(|a| !a.is_loopback()) {
            return Err(ListenSettingsError::NotLoopback(*a));
        }
        // A per-client limit above the listener's is not an error: lowering max_connections
        // alone must not make the other defaults invalid; the listener's limit caps them.
        let total = nonzero_count("listen.max_connections", l.max_connections)?;
        let limits = Limits {
            total,
            per_client: nonzero_count(
                "listen.max_connections_per_client",
                l.max_connections_per_client,
            )?,
            direct: nonzero_count("listen.max_direct_connections", l.max_direct_connections)?,
        }
        .within(total);
        let deadlines = Deadlines {
            handshake: nonzero_duration("listen.handshake_timeout", l.handshake_timeout)?,
            header: nonzero_duration("listen.header_timeout", l.header_timeout)?,
            idle: nonzero_duration("listen.idle_timeout", l.idle_timeout)?,
            write: nonzero_duration("listen.write_timeout", l.write_timeout)?,
        };
        Ok(Self {
            port: l.port,
            addresses: l.addresses.clone(),
            deadlines,
            limits,
            kernel_tls: l.kernel_tls,
        })
    }
}

/// A listener that could not be set up, with its address.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}")]
pub(crate) struct BindError {
    pub(crate) addr: SocketAddr,
    #[source]
    pub(crate) source: std::io::Error,
}

/// Binds the proxy port on each loopback address.
pub(crate) fn bind(addresses: &[IpAddr], port: u16) -> Result<Vec<TcpListener>, BindError> {
    addresses
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(*ip, port);
            let listen = || {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(addr)?;
                socket.listen(BACKLOG)
            };
            listen().map_err(|source| BindError { addr, source })
        })
        .collect()
}
