//! The processes the cluster runs: starting them detached, recognising them later, and
//! stopping exactly those (never another process that happens to reuse a pid).

use std::{
    fs::{self, File},
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

/// How long a component gets to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the kernel to reap a component after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// One process the cluster started, as recorded in the state file.
///
/// A pid alone is not an identity: after a reboot or a long time the kernel reuses it. The
/// record also keeps the binary it ran and its start time (in clock ticks since boot, from
/// `/proc/<pid>/stat`), and a process is only "ours" when all three match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The component's name, e.g. `kube-apiserver`.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// The absolute path of the binary it runs (its `argv[0]`).
    pub exe: PathBuf,
    /// Its start time in clock ticks after boot.
    pub start_ticks: u64,
}

/// A process started by [`spawn`], with its handle so start-up can notice an early exit.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) record: ProcessRecord,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

/// Starts `exe` with `args` in a new process group, stdin closed, stdout and stderr appended
/// to `log`, so that it outlives the caller and ignores the caller's terminal signals.
pub(crate) fn spawn(name: &str, exe: &Path, args: &[String], log: &Path) -> io::Result<Spawned> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let child =
        Command::new(exe).args(args).stdin(Stdio::null()).stdout(out).stderr(err).process_group(0).spawn()?;
    // `spawn` returns after the exec succeeded, so /proc already shows the new program.
    let pid = child.id();
    let start_ticks = proc_stat(pid)
        .map(|s| s.start_ticks)
        .ok_or_else(|| io::Error::other(format!("{name} (pid {pid}) exited at once")))?;
    Ok(Spawned {
        record: ProcessRecord { name: name.to_owned(), pid, exe: exe.to_owned(), start_ticks },
        child,
        log: log.to_owned(),
    })
}

/// Like [`spawn`], but the process starts inside the network namespace bound at `netns`
/// (e.g. `/run/netns/weft-node`), in this process's mount namespace. A child inherits the
/// namespaces of the thread that creates it, so a short-lived thread enters the namespace and
/// starts the child; this process's other threads stay where they are.
pub(crate) fn spawn_in_netns(
    name: &str,
    exe: &Path,
    args: &[String],
    log: &Path,
    netns: &Path,
) -> io::Result<Spawned> {
    let namespace = File::open(netns)?;
    thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&namespace),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                spawn(name, exe, args, log)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other(format!("starting {name} in {}", netns.display()))))
    })
}

struct ProcStat {
    state: char,
    start_ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; field 22 is the start time, so 19 further on.
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

fn argv0(pid: u32) -> Option<PathBuf> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|b| *b == 0).next()?;
    Some(PathBuf::from(String::from_utf8_lossy(first).into_owned()))
}

/// Whether the recorded process still runs: same pid, same start time, same binary, and not
/// a zombie (a component that exited but whose parent has not reaped it yet has stopped).
pub(crate) fn is_running(record: &ProcessRecord) -> bool {
    match proc_stat(record.pid) {
        Some(stat) if stat.start_ticks == record.start_ticks && !matches!(stat.state, 'Z' | 'X') => {
            argv0(record.pid).is_some_and(|exe| exe == record.exe)
        }
        _ => false,
    }
}

/// How one component ended under [`stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was no longer running (or the pid now belongs to another program): nothing was sent.
    NotRunning,
    /// It exited after SIGTERM.
    Terminated,
    /// It ignored SIGTERM for the grace period and was killed.
    Killed,
    /// It survived even SIGKILL's grace period (e.g. stuck in uninterruptible I/O).
    StillRunning,
}

/// Stops the recorded processes, last started first: SIGTERM to those still running (as
/// [`is_running`] decides), a bounded wait, then SIGKILL to any left. Signals go only to
/// processes that match their record.
pub(crate) fn stop(records: &[ProcessRecord]) -> Vec<(String, Stopped)> {
    let mut outcome: Vec<(String, Stopped)> = Vec::with_capacity(records.len());
    let mut pending = Vec::new();
    for record in records.iter().rev() {
        if is_running(record) && signal(record, Signal::TERM) {
            pending.push(record);
            outcome.push((record.name.clone(), Stopped::Terminated));
        } else {
            outcome.push((record.name.clone(), Stopped::NotRunning));
        }
    }
    let pending = wait_exit(pending, TERM_GRACE);
    for record in &pending {
        signal(record, Signal::KILL);
        set(&mut outcome, &record.name, Stopped::Killed);
    }
    for record in wait_exit(pending, KILL_GRACE) {
        set(&mut outcome, &record.name, Stopped::StillRunning);
    }
    outcome
}

fn set(outcome: &mut [(String, Stopped)], name: &str, to: Stopped) {
    if let Some(entry) = outcome.iter_mut().find(|(n, _)| n == name) {
        entry.1 = to;
    }
}

fn signal(record: &ProcessRecord, signal: Signal) -> bool {
    let Some(pid) = i32::try_from(record.pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    kill_process(pid, signal).is_ok()
}

/// Polls until every process in `pending` has exited or `grace` is over; returns those left.
fn wait_exit(mut pending: Vec<&ProcessRecord>, grace: Duration) -> Vec<&ProcessRecord> {
    let deadline = Instant::now() + grace;
    loop {
        pending.retain(|r| is_running(r));
        if pending.is_empty() || Instant::now() >= deadline {
            return pending;
        }
        // Polling /proc: an unrelated process has no exit notification to wait on.
        thread::sleep(POLL);
    }
}
