//! systemd's service protocol (`sd_notify`): one datagram per state to the socket named in
//! `NOTIFY_SOCKET`, when the service manager set one (`Type=notify`); nothing otherwise. The
//! daemon says `READY=1` once replay is done, `WATCHDOG=1` from the serving runtime
//! (`WatchdogSec=`), and `STOPPING=1` when it begins to drain.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) if there is a notify socket; a failure is logged, not fatal.
pub fn notify(state: &str) {
    if let Err(error) = send(state) {
        tracing::warn!(%error, state, "could not notify the service manager");
    }
}

fn send(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        // An abstract socket (what systemd itself hands out).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)?;
        }
        None => {
            socket.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(())
}

/// How often to send `WATCHDOG=1`: half the manager's `WATCHDOG_USEC`, if it set one for this
/// process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
