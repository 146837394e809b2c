//! Fleet harness: real PostgreSQL servers (a primary, synchronous standbys) and a real nginx
//! in front of several daemons, all on loopback ports inside a test's temp directory.
//!
//! Nothing here fakes the database or the balancer: the fleet tests are about what survives
//! a killed primary or a lost node, and only the real programs fail the way production
//! fails. Every wait has a deadline and, when it passes, panics with the tail of the
//! server's own log, so a hung test says why instead of timing out silently. Dropping a
//! [`Postgres`] or an [`Nginx`] stops it, so no server outlives its test.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as in CI containers), the
//! server-side programs (`initdb`, `pg_ctl`, `pg_basebackup`) run as the system user
//! `postgres` through `runuser`, in directories handed to that user; otherwise they run as
//! the current user, which PostgreSQL accepts. The client programs (`psql`, `pg_isready`)
//! connect over TCP with trust authentication and need no particular user, so they run
//! directly: that keeps them killable when a deadline passes (a `SIGKILL` to `runuser`
//! would leave its child behind).

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one PostgreSQL operation (start, stop, base backup, a query) may take.
const PG_DEADLINE: Duration = Duration::from_secs(60);
/// How long a new standby may take to be reported `sync` by the primary.
const SYNC_DEADLINE: Duration = Duration::from_secs(30);
/// How long nginx may take to listen, or to pick up a reload.
const NGINX_DEADLINE: Duration = Duration::from_secs(30);
/// The daemon's database on every server.
pub const DATABASE: &str = "memory";
/// Where the Debian/Ubuntu packages put PostgreSQL 15's programs.
const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
const DEFAULT_NGINX: &str = "/usr/sbin/nginx";
/// The longest path a Unix socket may have (sun_path is 108 bytes, NUL included).
const MAX_SOCKET_PATH: usize = 107;

/// A PostgreSQL program: `PG_BIN_DIR/NAME`, or PostgreSQL 15's Debian location.
pub fn pg_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PG_BIN_DIR").unwrap_or_else(|| DEFAULT_PG_BIN_DIR.into());
    PathBuf::from(dir).join(name)
}

/// The nginx program: `NGINX_BIN`, or `/usr/sbin/nginx`.
pub fn nginx_bin() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .unwrap_or_else(|| DEFAULT_NGINX.into())
        .into()
}

/// Why the fleet tests cannot run here, if they cannot: a missing PostgreSQL program or
/// nginx, or (as root) no `runuser` or no `postgres` user. Fleet tests call this first and
/// skip with the reason rather than fail on a machine without the tools.
pub fn fleet_tools_missing() -> Option<String> {
    for name in [
        "initdb",
        "pg_ctl",
        "postgres",
        "pg_basebackup",
        "psql",
        "pg_isready",
    ] {
        let path = pg_bin(name);
        if !path.is_file() {
            return Some(format!(
                "{} is missing (set PG_BIN_DIR to PostgreSQL's bin directory)",
                path.display()
            ));
        }
    }
    let nginx = nginx_bin();
    if !nginx.is_file() {
        return Some(format!(
            "{} is missing (set NGINX_BIN to nginx)",
            nginx.display()
        ));
    }
    if is_root() {
        let runs = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|status| status.success())
                .unwrap_or(false)
        };
        if !runs("runuser", &["--version"]) {
            return Some("running as root, and runuser is missing".into());
        }
        if !runs("id", &["-u", "postgres"]) {
            return Some("running as root, and there is no postgres user to run PostgreSQL".into());
        }
    }
    None
}

/// A free TCP port on 127.0.0.1 (bound, read, released). Another process could take it
/// before it is used, but the kernel hands out ports in an order that makes that rare.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// `n` distinct free ports: all are held until all are found, so none comes twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound address").port())
        .collect()
}

/// Whether this process's effective user is root, from `/proc/self/status` (no libc here).
fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            if let Some(line) = status.lines().find(|line| line.starts_with("Uid:")) {
                // Real, effective, saved and filesystem uid, in that order.
                if let Some(euid) = line.split_whitespace().nth(2) {
                    return euid == "0";
                }
            }
        }
        Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// A server-side PostgreSQL program, as `postgres` when we are root. It runs in `cwd` (a
/// directory `postgres` owns): PostgreSQL's programs fail when they cannot read their
/// working directory, and a test's is often root's.
fn pg_server_command(name: &str, cwd: &Path) -> Command {
    let mut command = if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        command
    } else {
        Command::new(pg_bin(name))
    };
    command.current_dir(cwd);
    clear_pg_env(&mut command);
    command
}

/// A client program (`psql`, `pg_isready`), run as ourselves.
fn pg_client_command(name: &str) -> Command {
    let mut command = Command::new(pg_bin(name));
    clear_pg_env(&mut command);
    command.env("PGCONNECT_TIMEOUT", "10");
    command
}

/// Drops the caller's `PGHOST`, `PGPORT`, `PGDATABASE`, ...: the harness says where to
/// connect on every command line and a stray variable must not send it elsewhere.
fn clear_pg_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            command.env_remove(name);
        }
    }
}

/// Runs `command` to completion within `deadline`, its output captured. On the deadline it
/// is sent SIGTERM (which `runuser` passes on to its child), then SIGKILL, and this returns
/// an error.
fn run_within(command: &mut Command, deadline: Duration) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: cannot start: {e}"))?;
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    // Both pipes are drained while the child runs, or a chatty child would block on one.
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let until = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                signal(child.id(), "TERM");
                let grace = Instant::now() + Duration::from_secs(2);
                while Instant::now() < grace {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
                let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
                return Err(format!(
                    "{shown}: still running after {deadline:?}; stderr:\n{stderr}"
                ));
            }
            Err(e) => return Err(format!("{shown}: cannot wait: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`run_within`], and a non-zero exit is an error too (with both outputs).
fn run_ok(command: &mut Command, deadline: Duration) -> Result<String, String> {
    let shown = format!("{command:?}");
    let output = run_within(command, deadline)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{shown}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Sends `SIGNAL` to `pid` with kill(1) (no libc here). Errors are ignored: the process may
/// be gone already.
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` is a live process. A zombie counts as gone: it holds no port, no shared
/// memory and no files, and nobody may ever reap it (our parent may not be an init that
/// does).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`, since comm may hold one.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The last `lines` lines of a log file, for a panic message.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Makes `root` (created if need be) a place where `postgres` can have a directory: as
/// root, `root` becomes 0755 (temp dirs are 0700) and every directory above it must let
/// others through already; we do not loosen directories we did not make.
fn prepare_root(root: &Path) {
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    if !is_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", root.display()));
    let root = root
        .canonicalize()
        .unwrap_or_else(|e| panic!("resolving {}: {e}", root.display()));
    for dir in root.ancestors().skip(1) {
        let mode = fs::metadata(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "the postgres user cannot pass through {} (mode {:o}): put the fleet's temp \
             directory elsewhere (TMPDIR) or chmod o+x it",
            dir.display(),
            mode & 0o7777
        );
    }
}

/// A directory for one server, owned by the user the server runs as.
fn server_home(root: &Path, port: u16) -> PathBuf {
    prepare_root(root);
    let home = root.join(format!("pg{port}"));
    fs::create_dir(&home).unwrap_or_else(|e| panic!("creating {}: {e}", home.display()));
    if is_root() {
        run_ok(
            Command::new("chown").arg("postgres:").arg(&home),
            PG_DEADLINE,
        )
        .unwrap_or_else(|e| panic!("handing {} to postgres: {e}", home.display()));
    }
    home
}

/// Appends `text` to a file of the data directory. Appending (never creating) keeps the
/// file owned by `postgres` even when we write it as root; in PostgreSQL's configuration
/// files the last setting of a name wins.
fn append(path: &Path, text: &str) {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("appending to {}: {e}", path.display()));
}

/// One PostgreSQL server: its own data directory, port and log, in `home`.
pub struct Postgres {
    /// The server's directory (owned by the server's user): `data/`, `server.log` and the
    /// Unix socket.
    pub home: PathBuf,
    /// The data directory.
    pub dir: PathBuf,
    pub port: u16,
    /// The postmaster's pid while the harness believes it runs (read from postmaster.pid).
    pub pid: Option<u32>,
    /// Everything the server logs (pg_ctl's `-l`).
    pub log: PathBuf,
}

impl Postgres {
    /// A new primary on 127.0.0.1:`port` with a `memory` database, trust authentication
    /// for local and loopback connections (replication included), and WAL shipped to
    /// standbys. fsync stays on: durability across a killed server is what the fleet
    /// tests test.
    pub fn init_primary(root: &Path, port: u16) -> Postgres {
        let home = server_home(root, port);
        let dir = home.join("data");
        let mut pg = Postgres {
            log: home.join("server.log"),
            home,
            dir,
            port,
            pid: None,
        };
        run_ok(
            pg_server_command("initdb", &pg.home)
                .arg("-D")
                .arg(&pg.dir)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]),
            PG_DEADLINE,
        )
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        append(
            &pg.dir.join("postgresql.conf"),
            &format!(
                "\n# fleet harness\n\
                 listen_addresses = '127.0.0.1'\n\
                 max_connections = 100\n\
                 wal_level = replica\n\
                 max_wal_senders = 5\n\
                 wal_keep_size = '128MB'\n\
                 hot_standby = on\n\
                 synchronous_commit = on\n\
                 fsync = on\n\
                 shared_buffers = '32MB'\n\
                 logging_collector = off\n\
                 log_line_prefix = '%m [%p] %q%a '\n\
                 {}",
                pg.local_settings()
            ),
        );
        fs::write(
            pg.dir.join("pg_hba.conf"),
            "# fleet harness: anyone on this machine, no password\n\
             local all all trust\n\
             host all all 127.0.0.1/32 trust\n\
             local replication all trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .unwrap_or_else(|e| panic!("writing pg_hba.conf: {e}"));
        pg.start();
        pg.psql_in("postgres", &format!("CREATE DATABASE {DATABASE}"));
        pg
    }

    /// A hot standby of `primary` on 127.0.0.1:`port`, made the primary's synchronous
    /// standby under `name` (its `application_name`): once this returns, every commit the
    /// primary acknowledges is on this standby too. A later standby of the same primary
    /// takes over as the synchronous one (`synchronous_standby_names` names one).
    pub fn standby_of(primary: &Postgres, root: &Path, port: u16, name: &str) -> Postgres {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "standby name {name:?}: use lowercase letters, digits and _"
        );
        let mut pg = Postgres::copy_of(primary, root, port, &["-R"]);
        // The copied postgresql.conf carries the primary's port and socket directory.
        append(
            &pg.dir.join("postgresql.conf"),
            &format!("\n# fleet harness: standby {name}\n{}", pg.local_settings()),
        );
        // -R wrote a primary_conninfo without application_name, which is what the primary
        // matches against synchronous_standby_names.
        append(
            &pg.dir.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'\n",
                primary.port
            ),
        );
        pg.start();
        primary.psql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{name}'"
        ));
        primary.psql("SELECT pg_reload_conf()");
        primary.wait_sync(name, &pg);
        pg
    }

    /// `pg_basebackup` of `primary` (WAL streamed along) into a new server home for `port`,
    /// with `extra` arguments (`-R` for a standby); not started.
    fn copy_of(primary: &Postgres, root: &Path, port: u16, extra: &[&str]) -> Postgres {
        let home = server_home(root, port);
        let dir = home.join("data");
        let pg = Postgres {
            log: home.join("server.log"),
            home,
            dir,
            port,
            pid: None,
        };
        run_ok(
            pg_server_command("pg_basebackup", &pg.home)
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-D"])
                .arg(&pg.dir)
                .args(extra)
                .args(["-X", "stream", "--checkpoint=fast"]),
            PG_DEADLINE,
        )
        .unwrap_or_else(|e| panic!("pg_basebackup: {e}\nprimary's log:\n{}", primary.log_tail()));
        pg
    }

    /// A base backup of `primary` (`pg_basebackup`, WAL included), made ready to run as a
    /// server of its own on `port` but not started: the database as it was when the backup
    /// was taken, for a restore drill.
    pub fn base_backup_of(primary: &Postgres, root: &Path, port: u16) -> Postgres {
        let pg = Postgres::copy_of(primary, root, port, &[]);
        append(
            &pg.dir.join("postgresql.conf"),
            &format!(
                "\n# fleet harness: a restored base backup\n{}",
                pg.local_settings()
            ),
        );
        // The primary's own standby is not the restored server's.
        append(
            &pg.dir.join("postgresql.auto.conf"),
            "synchronous_standby_names = ''\n",
        );
        pg
    }

    /// Waits until the primary reports the standby `name` as `sync`.
    pub fn wait_sync(&self, name: &str, standby: &Postgres) {
        let until = Instant::now() + SYNC_DEADLINE;
        let query =
            format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'");
        let mut state = String::new();
        while Instant::now() < until {
            state = self.psql(&query);
            if state == "sync" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "standby {name} is not a synchronous standby after {SYNC_DEADLINE:?} (state {state:?})\n\
             primary's log:\n{}\nstandby's log:\n{}",
            self.log_tail(),
            standby.log_tail()
        );
    }

    /// The settings that differ between servers of one fleet.
    fn local_settings(&self) -> String {
        // Only a short enough path can be a socket; without one, TCP is all there is.
        let socket = self.home.join(format!(".s.PGSQL.{}", self.port));
        let socket_dir = if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            self.home.to_string_lossy().replace('\'', "''")
        } else {
            String::new()
        };
        format!(
            "port = {}\nunix_socket_directories = '{socket_dir}'\n",
            self.port
        )
    }

    /// The daemon's connection URL for this server.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Runs `sql` in the `memory` database and returns its rows, unaligned (`|` between
    /// columns, a line per row, no header), trimmed. Panics with psql's error on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(DATABASE, sql)
    }

    /// [`Postgres::psql`] that returns the failure instead (e.g. a write refused by a
    /// standby, or a commit still waiting for a lost synchronous standby at `deadline`).
    pub fn try_psql(&self, sql: &str, deadline: Duration) -> Result<String, String> {
        self.run_psql(DATABASE, sql, deadline)
    }

    /// `sql` through psql in `database`, its rows or its failure by `deadline`.
    fn run_psql(&self, database: &str, sql: &str, deadline: Duration) -> Result<String, String> {
        run_ok(
            pg_client_command("psql")
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", database, "-c", sql]),
            deadline,
        )
        .map(|out| out.trim_end_matches('\n').to_owned())
    }

    fn psql_in(&self, database: &str, sql: &str) -> String {
        self.run_psql(database, sql, PG_DEADLINE)
            .unwrap_or_else(|e| {
                panic!(
                    "psql on port {}: {e}\nserver log:\n{}",
                    self.port,
                    self.log_tail()
                )
            })
    }

    /// Starts the server on its data directory (again, after [`Postgres::stop`] or
    /// [`Postgres::kill9`]) and waits until it accepts connections.
    pub fn start(&mut self) {
        run_ok(
            pg_server_command("pg_ctl", &self.home)
                .arg("-D")
                .arg(&self.dir)
                .args(["-w", "-t", "60", "-l"])
                .arg(&self.log)
                .arg("start"),
            PG_DEADLINE + Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("pg_ctl start: {e}\nserver log:\n{}", self.log_tail()));
        self.pid = Some(self.read_pid().unwrap_or_else(|| {
            panic!(
                "no postmaster.pid in {} after start\nserver log:\n{}",
                self.dir.display(),
                self.log_tail()
            )
        }));
        self.wait_accepting();
    }

    /// The postmaster's pid, from the first line of postmaster.pid.
    fn read_pid(&self) -> Option<u32> {
        fs::read_to_string(self.dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid in postmaster.pid, if that process is alive and is a postmaster of this data
    /// directory. After a SIGKILL the file stays behind, and its pid may since have been
    /// given to an unrelated process, which must not be signalled.
    fn running_postmaster(&self) -> Option<u32> {
        let pid = self.read_pid()?;
        // A postmaster works in its data directory.
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        let ours = self.dir.canonicalize().is_ok_and(|dir| dir == cwd);
        (ours && alive(pid)).then_some(pid)
    }

    /// Kills the postmaster with SIGKILL, as a crash or an OOM kill would, and waits until
    /// it and its backends are gone. The backends exit on their own when they see the
    /// postmaster die; waiting for them matters because a server started again on the same
    /// data directory refuses to while old backends still hold its shared memory.
    pub fn kill9(&mut self) {
        let Some(pid) = self.running_postmaster() else {
            panic!(
                "kill9: no postmaster runs on {}\nserver log:\n{}",
                self.dir.display(),
                self.log_tail()
            );
        };
        self.pid = None;
        let children = children_of(pid);
        signal(pid, "KILL");
        let until = Instant::now() + PG_DEADLINE;
        while alive(pid) || children.iter().any(|&child| alive(child)) {
            assert!(
                Instant::now() < until,
                "postmaster {pid} or its backends still alive {PG_DEADLINE:?} after SIGKILL\n\
                 server log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The dead postmaster may linger as a zombie until whatever adopted it (pid 1 in a
        // container) gets round to reaping it, and a zombie still "exists" to the check the
        // next postmaster makes on the pid in its lock files: it would refuse to start. The
        // files are stale for certain now, so they go, as PostgreSQL would remove them.
        let socket_lock = self.home.join(format!(".s.PGSQL.{}.lock", self.port));
        for lock in [self.dir.join("postmaster.pid"), socket_lock] {
            let holder = fs::read_to_string(&lock)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
            if holder == Some(pid) {
                let _ = fs::remove_file(&lock);
            }
        }
    }

    /// Stops the server cleanly (`pg_ctl -m fast`: sessions are ended, a checkpoint is
    /// written).
    pub fn stop(&mut self) {
        run_ok(
            pg_server_command("pg_ctl", &self.home)
                .arg("-D")
                .arg(&self.dir)
                .args(["-m", "fast", "-w", "-t", "60", "stop"]),
            PG_DEADLINE + Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("pg_ctl stop: {e}\nserver log:\n{}", self.log_tail()));
        self.pid = None;
    }

    /// Promotes a standby to primary, waiting until it accepts writes.
    pub fn promote(&self) {
        run_ok(
            pg_server_command("pg_ctl", &self.home)
                .arg("-D")
                .arg(&self.dir)
                .args(["-w", "-t", "60", "promote"]),
            PG_DEADLINE + Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("pg_ctl promote: {e}\nserver log:\n{}", self.log_tail()));
    }

    /// Waits until the server accepts connections (`pg_isready`).
    pub fn wait_accepting(&self) {
        let until = Instant::now() + PG_DEADLINE;
        loop {
            let ready = run_within(
                pg_client_command("pg_isready")
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .args(["-U", "postgres", "-d", "postgres", "-t", "2"]),
                Duration::from_secs(10),
            )
            .is_ok_and(|out| out.status.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < until,
                "PostgreSQL on port {} does not accept connections after {PG_DEADLINE:?}\n\
                 server log:\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of the server's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Postgres {
    /// Stops the server at once (`-m immediate`, no checkpoint), whatever state the test
    /// left it in, and kills the postmaster if that did not work.
    fn drop(&mut self) {
        if self.running_postmaster().is_none() {
            return;
        }
        let _ = run_within(
            pg_server_command("pg_ctl", &self.home)
                .arg("-D")
                .arg(&self.dir)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"]),
            Duration::from_secs(40),
        );
        if let Some(pid) = self.running_postmaster() {
            signal(pid, "KILL");
        }
    }
}

/// A libpq-style URL listing several servers, for a client that must find the writable
/// one among them (the primary, or the standby promoted in its place).
pub fn multi_host_url(hosts: &[&Postgres]) -> String {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|pg| format!("127.0.0.1:{}", pg.port))
        .collect();
    format!(
        "postgresql://postgres@{}/{DATABASE}?target_session_attrs=read-write",
        hosts.join(",")
    )
}

/// The repository's nginx front for the fleet.
pub fn deploy_conf_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/memory-sidecar.conf")
}

/// The deploy file with its example nodes replaced by `backends` ("127.0.0.1:PORT") and its
/// listen address by `listen`: the lines between the `# nodes:begin`/`# nodes:end` and
/// `# listen:begin`/`# listen:end` markers. The nodes keep the parameters (max_fails, ...)
/// of the file's first example node, so the tests run with what operators deploy.
pub fn render_site_conf(deploy: &str, listen: &str, backends: &[String]) -> String {
    assert!(!backends.is_empty(), "nginx needs at least one backend");
    let mut out = String::with_capacity(deploy.len() + 256);
    let mut lines = deploy.lines();
    let (mut nodes_blocks, mut listen_blocks) = (0, 0);
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let marker = line.trim();
        let end = match marker {
            "# nodes:begin" => "# nodes:end",
            "# listen:begin" => "# listen:end",
            _ => continue,
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        let mut inside = Vec::new();
        let end_line = loop {
            let next = lines
                .next()
                .unwrap_or_else(|| panic!("deploy file: {marker} without {end}"));
            if next.trim() == end {
                break next;
            }
            inside.push(next.trim());
        };
        if end == "# listen:end" {
            listen_blocks += 1;
            out.push_str(&format!("{indent}listen {listen};\n"));
        } else {
            nodes_blocks += 1;
            // `server ADDR PARAMS;`: keep PARAMS.
            let params = inside
                .iter()
                .find_map(|line| line.strip_prefix("server "))
                .and_then(|rest| {
                    let rest = rest.trim_end_matches(';').trim();
                    rest.split_once(char::is_whitespace)
                        .map(|(_, params)| format!(" {}", params.trim()))
                })
                .unwrap_or_default();
            for backend in backends {
                out.push_str(&format!("{indent}server {backend}{params};\n"));
            }
        }
        out.push_str(end_line);
        out.push('\n');
    }
    assert_eq!(
        nodes_blocks, 1,
        "deploy file: expected one # nodes:begin block"
    );
    assert_eq!(
        listen_blocks, 1,
        "deploy file: expected one # listen:begin block"
    );
    out
}

/// nginx running the repository's front (deploy/nginx/memory-sidecar.conf) on
/// 127.0.0.1:`port`, from a private prefix: its config, logs, pid and temp files all live
/// there, so it never touches /etc/nginx, /var/log/nginx or /var/lib/nginx.
pub struct Nginx {
    pub prefix: PathBuf,
    pub port: u16,
    /// The master process's pid.
    pub pid: u32,
    child: Child,
}

impl Nginx {
    /// Starts nginx in front of `backends` ("127.0.0.1:PORT" each) and waits until its port
    /// accepts connections.
    pub fn start(root: &Path, port: u16, backends: &[String]) -> Nginx {
        let prefix = root.join(format!("nginx{port}"));
        fs::create_dir_all(prefix.join("tmp"))
            .unwrap_or_else(|e| panic!("creating {}: {e}", prefix.display()));
        Nginx::write_site(&prefix, port, backends);
        let p = prefix.display();
        // As root, nginx's workers would otherwise run as `nobody`, which cannot reach a
        // prefix inside a 0700 temp dir (request bodies over client_body_buffer_size are
        // spooled there).
        let user = if is_root() { "user root;\n" } else { "" };
        let main = format!(
            "# fleet harness: a private nginx\n\
             {user}worker_processes 1;\n\
             error_log {p}/error.log info;\n\
             pid {p}/nginx.pid;\n\
             # Old workers left by a reload, or by Drop's graceful stop, go within 5 s.\n\
             worker_shutdown_timeout 5s;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {p}/tmp/body;\n\
             \x20   proxy_temp_path {p}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {p}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {p}/tmp/scgi;\n\
             \x20   include {p}/memory-sidecar.conf;\n\
             }}\n"
        );
        fs::write(prefix.join("nginx.conf"), main)
            .unwrap_or_else(|e| panic!("writing {p}/nginx.conf: {e}"));
        // A bad configuration is reported as such here rather than as "never listened".
        run_ok(Nginx::command(&prefix).arg("-t"), NGINX_DEADLINE)
            .unwrap_or_else(|e| panic!("nginx -t: {e}"));
        let output = fs::File::create(prefix.join("nginx.out"))
            .unwrap_or_else(|e| panic!("creating {p}/nginx.out: {e}"));
        let child = Nginx::command(&prefix)
            // In the foreground, so the master is our child and its pid is known.
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("a second handle"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", nginx_bin().display()));
        let mut nginx = Nginx {
            pid: child.id(),
            prefix,
            port,
            child,
        };
        nginx.wait_listening();
        nginx
    }

    fn command(prefix: &Path) -> Command {
        let mut command = Command::new(nginx_bin());
        let mut p = prefix.as_os_str().to_owned();
        p.push("/");
        command
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            // The log for messages before the configuration is read.
            .arg("-e")
            .arg(prefix.join("error.log"));
        command
    }

    fn write_site(prefix: &Path, port: u16, backends: &[String]) {
        let deploy_path = deploy_conf_path();
        let deploy = fs::read_to_string(&deploy_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", deploy_path.display()));
        let site = render_site_conf(&deploy, &format!("127.0.0.1:{port}"), backends);
        let path = prefix.join("memory-sidecar.conf");
        fs::write(&path, site).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn wait_listening(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + NGINX_DEADLINE;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nginx exited ({status}) instead of listening\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < until,
                "nginx does not listen on {addr} after {NGINX_DEADLINE:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Points nginx at `backends` instead: rewrites the config, checks it (`nginx -t`),
    /// sends SIGHUP and waits until new workers run it; old workers are given up to 5 s to
    /// finish what they were serving.
    pub fn reload(&mut self, backends: &[String]) {
        Nginx::write_site(&self.prefix, self.port, backends);
        run_ok(Nginx::command(&self.prefix).arg("-t"), NGINX_DEADLINE)
            .unwrap_or_else(|e| panic!("nginx -t before reload: {e}"));
        let old = children_of(self.pid);
        signal(self.pid, "HUP");
        let until = Instant::now() + NGINX_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited ({status}) on reload\n{}", self.logs());
            }
            let now = children_of(self.pid);
            if now.iter().any(|pid| !old.contains(pid)) {
                break;
            }
            assert!(
                Instant::now() < until,
                "nginx started no new worker {NGINX_DEADLINE:?} after SIGHUP\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let until = Instant::now() + Duration::from_secs(5);
        while old.iter().any(|&pid| alive(pid)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The front's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The front's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The ends of nginx's error log and its own output.
    pub fn logs(&self) -> String {
        format!(
            "nginx error.log:\n{}\nnginx output:\n{}",
            tail(&self.prefix.join("error.log"), 40),
            tail(&self.prefix.join("nginx.out"), 20)
        )
    }
}

impl Drop for Nginx {
    /// A graceful stop (SIGQUIT), then SIGKILL after 5 s.
    fn drop(&mut self) {
        let workers = children_of(self.pid);
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid, "QUIT");
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Workers die with their master; make sure of it.
        for pid in workers {
            if alive(pid) {
                signal(pid, "KILL");
            }
        }
    }
}
