//! Child processes for integration tests: free ports, a kill-on-drop guard with a log file,
//! readiness polling, and a watchdog for processes kept in statics.
//!
//! Every process is started in its own process group (pgid = its pid), and is stopped by
//! signalling that group with the `kill` command: SIGTERM, up to 10 s of grace, then SIGKILL.
//! That also reaches grandchildren (Keycloak's `kc.sh` runs `java` as a child).
//!
//! Statics are never dropped, so a process kept in a `static` (shared by the tests of one
//! test binary) would outlive the test run. `Proc::spawn_watched` wraps it in a small `sh`
//! watchdog that polls the test process's pid once a second and stops the child (TERM, then
//! KILL after 10 s) when the test process is gone.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::tools;

/// Grace period between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// A loopback TCP port that was free a moment ago. Ports are never handed out twice by one
/// test process, so two helpers started concurrently do not collide with each other.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The last `lines` lines of a log file (for panic messages).
pub fn tail_log(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Poll `ready` every 100 ms until it returns true; panic naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(ready: F, timeout: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_inner(ready, timeout, what, None, None).await
}

/// Like [`wait_until`], and on timeout the panic message carries the tail of `log`.
pub async fn wait_until_logged<F, Fut>(ready: F, timeout: Duration, what: &str, log: &Path)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_inner(ready, timeout, what, Some(log), None).await
}

async fn wait_until_inner<F, Fut>(
    mut ready: F,
    timeout: Duration,
    what: &str,
    log: Option<&Path>,
    mut proc: Option<&mut Proc>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if ready().await {
            return;
        }
        if let Some(p) = proc.as_deref_mut()
            && let Some(status) = p.try_status()
        {
            panic!(
                "{what}: process {} exited ({status}) before becoming ready; last lines of {}:\n{}",
                p.name,
                p.log.display(),
                tail_log(&p.log, 60)
            );
        }
        if start.elapsed() >= timeout {
            match log {
                Some(log) => panic!(
                    "{what} did not become ready within {timeout:?}; last lines of {}:\n{}",
                    log.display(),
                    tail_log(log, 60)
                ),
                None => panic!("{what} did not become ready within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True if GET `url` answers 2xx within 2 s.
pub async fn http_ok(url: &str) -> bool {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(_) => return false,
    };
    matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
}

/// True if something accepts TCP connections on `addr`.
pub async fn tcp_open(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Send `signal` (e.g. "TERM", "KILL", "STOP", "CONT", "0") to process group `pgid` with
/// the `kill` command. Returns whether `kill` succeeded (for "0": whether the group exists).
pub fn signal_group(pgid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What is needed to spawn the same process again (for restarts).
#[derive(Clone, Debug)]
struct Spec {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    watchdog: bool,
}

impl Spec {
    fn from_command(cmd: &Command, watchdog: bool) -> Spec {
        Spec {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(|a| a.to_owned()).collect(),
            envs: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect(),
            cwd: cmd.get_current_dir().map(|p| p.to_owned()),
            watchdog,
        }
    }

    fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn to_command(&self) -> Command {
        let mut cmd = if self.watchdog {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(WATCHDOG_SH)
                .arg("authz-test-watchdog")
                .arg(std::process::id().to_string())
                .arg(&self.program)
                .args(&self.args);
            c
        } else {
            let mut c = Command::new(&self.program);
            c.args(&self.args);
            c
        };
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// `sh -c WATCHDOG_SH name <test pid> <program> <args...>`: runs the program in the
/// background; forwards TERM/INT/HUP to it; when the test process is gone, stops the program
/// (TERM, up to 10 s, then KILL of the whole process group) and, if the command's environment
/// has `AUTHZ_WATCHDOG_CLEANUP=<dir under /tmp or $TMPDIR>`, removes that directory (for temp
/// dirs owned by a static that is never dropped).
const WATCHDOG_SH: &str = r#"
parent=$1; shift
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do
  sleep 1 & wait $!
done
if kill -0 "$child" 2>/dev/null; then
  echo "authz-test-watchdog: test process $parent is gone, stopping pid $child" >&2
  kill -TERM "$child" 2>/dev/null
  i=0
  while kill -0 "$child" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  case "${AUTHZ_WATCHDOG_CLEANUP:-}" in
    /tmp/?*|"${TMPDIR:-/tmp}"/?*) rm -rf -- "$AUTHZ_WATCHDOG_CLEANUP" ;;
  esac
  if kill -0 "$child" 2>/dev/null; then kill -KILL -- -$$; fi
fi
wait "$child"
"#;

/// A child process that is stopped when dropped (or by [`Proc::kill`]).
pub struct Proc {
    name: String,
    log: PathBuf,
    spec: Spec,
    child: Option<Child>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawn `cmd` with stdout and stderr appended to `target/test-logs/<name>-<port>.log`.
    pub fn spawn(name: &str, port: u16, cmd: &Command) -> Proc {
        Self::spawn_opts(name, port, cmd, false)
    }

    /// Like [`Proc::spawn`], wrapped in the watchdog: use this for a process kept in a static.
    pub fn spawn_watched(name: &str, port: u16, cmd: &Command) -> Proc {
        Self::spawn_opts(name, port, cmd, true)
    }

    pub fn spawn_opts(name: &str, port: u16, cmd: &Command, watchdog: bool) -> Proc {
        let log = tools::test_logs_dir().join(format!("{name}-{port}.log"));
        let mut p = Proc {
            name: name.to_string(),
            log,
            spec: Spec::from_command(cmd, watchdog),
            child: None,
            exited: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(
            file,
            "=== [{}.{:03}] spawn{}: {}",
            now.as_secs(),
            now.subsec_millis(),
            if self.spec.watchdog {
                " (watchdog)"
            } else {
                ""
            },
            self.spec.command_line()
        );
        let err: File = file.try_clone().expect("clone log file handle");
        let mut cmd = self.spec.to_command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({}): {e}", self.name, self.spec.command_line()));
        self.child = Some(child);
        self.exited = None;
    }

    /// Pid of the spawned process (the watchdog `sh` when watched); it is also the
    /// process group id. Panics if the process has been killed.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of this process's log.
    pub fn tail(&self, lines: usize) -> String {
        tail_log(&self.log, lines)
    }

    /// `Some(status)` once the spawned process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Send a signal ("STOP", "CONT", "HUP", ...) to the whole process group.
    pub fn signal(&self, signal: &str) -> bool {
        signal_group(self.pid(), signal)
    }

    /// SIGTERM to the process group, wait up to 10 s for it to be gone, then SIGKILL.
    /// Idempotent.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id();
        // A stopped group would never act on SIGTERM.
        signal_group(pgid, "CONT");
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + KILL_GRACE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.exited.get_or_insert(status);
            }
            if self.exited.is_some() && !signal_group(pgid, "0") {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "{} (pgid {pgid}) still alive {KILL_GRACE:?} after SIGTERM: SIGKILL",
                    self.name
                );
                signal_group(pgid, "KILL");
                if let Ok(status) = child.wait() {
                    self.exited.get_or_insert(status);
                }
                // Orphaned group members are reaped by init shortly after.
                let reap_deadline = Instant::now() + Duration::from_secs(2);
                while signal_group(pgid, "0") && Instant::now() < reap_deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill (if running) and spawn the same command again; the log is appended to.
    pub fn respawn(&mut self) {
        self.kill();
        self.start();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Proc {
    /// Poll `ready` until true; panics naming `what` (with the log tail) on timeout or if the
    /// process exits first.
    pub async fn wait_until<F, Fut>(&mut self, ready: F, timeout: Duration, what: &str)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let log = self.log.clone();
        wait_until_inner(ready, timeout, what, Some(&log), Some(self)).await
    }
}
