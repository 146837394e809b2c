//! Where the daemon listens: TCP (an address, or every address a hostname resolves to) or a
//! unix socket file, made with the configured mode and group and removed at shutdown.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::{Listen, UnixSocket};

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

impl Listener {
    /// Binds one `--listen` value: a TCP listener per address it resolves to, or the socket.
    pub async fn bind(listen: &Listen, unix: &UnixSocket) -> anyhow::Result<Vec<Listener>> {
        match listen {
            Listen::Tcp(address) => {
                let addresses: Vec<SocketAddr> = tokio::net::lookup_host(address.as_str())
                    .await
                    .with_context(|| format!("resolving {address}"))?
                    .collect();
                let mut listeners = Vec::new();
                let mut refused = None;
                for resolved in addresses {
                    match TcpListener::bind(resolved).await {
                        Ok(listener) => listeners.push(Listener::Tcp(listener)),
                        // A name that also resolves to an address family this host lacks (::1
                        // without IPv6) is served on the others.
                        Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => {
                            refused = Some(error);
                        }
                        Err(error) => {
                            return Err(error).with_context(|| format!("binding {resolved}"))
                        }
                    }
                }
                if listeners.is_empty() {
                    match refused {
                        Some(error) => {
                            return Err(error).with_context(|| format!("binding {address}"))
                        }
                        None => bail!("{address} resolves to no address"),
                    }
                }
                Ok(listeners)
            }
            Listen::Unix(path) => Ok(vec![bind_unix(path, unix)?]),
        }
    }

    /// `http://address` or `unix:/path`, for the log and the start-up line.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(address) => format!("http://{address}"),
                Err(_) => "http://?".to_owned(),
            },
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// The stream of a new connection and the peer's address (loopback for a unix socket).
    pub(super) async fn accept(&self) -> io::Result<(Stream, IpAddr)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), peer.ip()))
            }
            Listener::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), IpAddr::V4(Ipv4Addr::LOCALHOST)))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Makes the socket file: a stale one (a socket nobody answers on) is replaced, anything else
/// at the path is left alone and refused; then its mode and group.
fn bind_unix(path: &Path, unix: &UnixSocket) -> anyhow::Result<Listener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            );
        }
        // Stale only if nobody is there: refused. Any other answer (a live socket, one we may
        // not reach) is left alone.
        match std::os::unix::net::UnixStream::connect(path) {
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(_) => bail!("{} is in use by another process", path.display()),
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "{} exists and cannot be checked: refusing to replace it",
                        path.display()
                    )
                })
            }
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding unix:{}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(unix.mode))
        .with_context(|| format!("chmod {:o} {}", unix.mode, path.display()))?;
    if let Some(group) = &unix.group {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {group} {}", path.display()))?;
    }
    Ok(Listener::Unix(listener, path.to_owned()))
}

/// A group's id: a number, or a name in /etc/group.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .with_context(|| format!("no group {group:?} in /etc/group"))
}

/// A connection's stream, either kind.
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
