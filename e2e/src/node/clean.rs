//! Removing everything a node left behind, whether `down` stops a healthy node or `up` finds
//! the remains of one that crashed. Only what is provably the node's is touched: processes in
//! its cgroup or whose command line names its containerd socket, mounts below its
//! directories, its network namespace, its cgroups, and CNI records of its network.
//! Every step is idempotent, so a second run finds nothing to do.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use rustix::{
    mount::{UnmountFlags, unmount},
    process::{Pid, Signal, kill_process},
};

use super::{config::NodeDirs, net};
use crate::cluster::Error;

const CGROUP_FS: &str = "/sys/fs/cgroup";
/// Where the kubelet links container logs for log collectors (not configurable).
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";
/// Where libcni caches each attachment's result (containerd 1.6 does not move it).
const CNI_RESULTS: &str = "/var/lib/cni/results";
const KILL_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// What [`clean`] found and removed, for the caller to report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// Container processes and containerd shims killed.
    pub processes: usize,
    /// Mounts detached.
    pub mounts: usize,
    /// Whether the network namespace existed.
    pub netns: bool,
    /// Cgroup directories removed.
    pub cgroups: usize,
}

impl std::fmt::Display for Cleaned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} processes, {} mounts, {} cgroups", self.processes, self.mounts, self.cgroups)?;
        if self.netns { write!(f, ", the network namespace {}", net::NETNS) } else { Ok(()) }
    }
}

impl Cleaned {
    /// Whether there was nothing to clean.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Kills the node's container processes and shims, detaches its mounts, deletes its network
/// namespace and cgroups, and removes its directories. The kubelet, kube-proxy and containerd
/// themselves are stopped by pid before this, like the control plane.
pub fn clean(dirs: &NodeDirs) -> Result<Cleaned, Error> {
    let mut cleaned = Cleaned::default();
    let socket = dirs.containerd_socket();
    let mut victims = cgroup_processes();
    victims.extend(shims_of(&socket));
    victims.sort_unstable();
    victims.dedup();
    cleaned.processes = victims.len();
    kill_all(&victims);

    let mut mounts: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(&dirs.root) || m.starts_with(&dirs.run))
        .collect();
    // Deepest first: a mount below another must go before it.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in &mounts {
        match unmount(mount, UnmountFlags::DETACH) {
            Ok(()) => cleaned.mounts += 1,
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {}
            Err(e) => {
                return Err(Error::io(format!("unmounting {}", mount.display()), io::Error::from(e)));
            }
        }
    }

    cleaned.netns = net::exists();
    net::remove()?;
    unmount_empty_netns_dir();
    cleaned.cgroups = remove_cgroups()?;
    remove_links_into(Path::new(CONTAINER_LOG_LINKS), &dirs.pod_logs);
    remove_cni_results(&sandbox_ids(dirs));
    for dir in [&dirs.run, &dirs.root] {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::io(format!("removing {}", dir.display()), e));
            }
            _ => {}
        }
    }
    Ok(cleaned)
}

/// Every controller directory of the node's cgroup root (`/sys/fs/cgroup/<controller>/weft-node`).
fn cgroup_roots() -> Vec<PathBuf> {
    let Ok(controllers) = fs::read_dir(CGROUP_FS) else { return Vec::new() };
    controllers
        .filter_map(Result::ok)
        .map(|c| c.path().join(net::CGROUP_ROOT))
        .filter(|p| p.is_dir())
        .collect()
}

/// Creates the node's cgroup root in every v1 controller, so the kubelet finds it. A new
/// cpuset cgroup has no CPUs or memory nodes until given its parent's.
pub(crate) fn create_cgroups() -> Result<(), Error> {
    let controllers = fs::read_dir(CGROUP_FS).map_err(|e| Error::io(format!("reading {CGROUP_FS}"), e))?;
    for controller in controllers.filter_map(Result::ok) {
        let parent = controller.path();
        if !parent.join("cgroup.procs").is_file() {
            continue; // not a mounted hierarchy (e.g. the unified mount point's siblings)
        }
        let dir = parent.join(net::CGROUP_ROOT);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(parent.join(file)) {
                fs::write(dir.join(file), value.trim())
                    .map_err(|e| Error::io(format!("writing {}", dir.join(file).display()), e))?;
            }
        }
    }
    Ok(())
}

/// Every process in the node's cgroups (all controllers, all depths).
fn cgroup_processes() -> Vec<u32> {
    let mut pids = Vec::new();
    for root in cgroup_roots() {
        for dir in walk_dirs(&root) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
    }
    pids
}

/// containerd shims serving the node's containerd: their command line carries
/// `-address <socket>`.
fn shims_of(socket: &Path) -> Vec<u32> {
    let socket = socket.to_string_lossy();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            args.first().is_some_and(|a| a.contains("containerd-shim"))
                && args.windows(2).any(|w| w[0] == "-address" && w[1] == socket)
        })
        .collect()
}

fn kill_all(pids: &[u32]) {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for pid in pids {
        if let Some(pid) = i32::try_from(*pid).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, Signal::KILL);
        }
    }
    let deadline = Instant::now() + KILL_GRACE;
    // Killed processes disappear from /proc once reaped by their parents (or init).
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        thread::sleep(POLL);
    }
}

/// Mount points of this mount namespace, from `/proc/self/mountinfo` (octal escapes undone).
fn mount_points() -> Result<Vec<PathBuf>, Error> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape_mount(m))).collect())
}

/// Undoes mountinfo's escaping of space, tab, newline and backslash (`\040` and friends).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the node's cgroups, deepest first; returns how many went.
fn remove_cgroups() -> Result<usize, Error> {
    let mut removed = 0;
    for root in cgroup_roots() {
        let mut dirs = walk_dirs(&root);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            // A cgroup directory is removed with rmdir, its control files and all.
            match fs::remove_dir(&dir) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing cgroup {}", dir.display()), e)),
            }
        }
    }
    Ok(removed)
}

/// `root` and every directory below it.
fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut found = vec![root.to_owned()];
    let mut i = 0;
    while i < found.len() {
        if let Ok(entries) = fs::read_dir(&found[i]) {
            found.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    found
}

/// Removes the symlinks in `dir` that point below `target`.
fn remove_links_into(dir: &Path, target: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if fs::read_link(entry.path()).is_ok_and(|to| to.starts_with(target)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The ids of the pod sandboxes containerd's CRI plugin made (its per-sandbox directories).
fn sandbox_ids(dirs: &NodeDirs) -> Vec<String> {
    let sandboxes = dirs.containerd_root().join("io.containerd.grpc.v1.cri/sandboxes");
    let Ok(entries) = fs::read_dir(sandboxes) else { return Vec::new() };
    entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// Removes libcni's cached results of the node's pods: those of its network
/// (`weft-node-<sandbox>-<if>`) and those of containerd's loopback network for its sandboxes
/// (`cni-loopback-<sandbox>-lo`).
fn remove_cni_results(sandboxes: &[String]) {
    let Ok(entries) = fs::read_dir(CNI_RESULTS) else { return };
    let ours = format!("{}-", net::NETNS);
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let loopback = name
            .strip_prefix("cni-loopback-")
            .is_some_and(|rest| sandboxes.iter().any(|id| rest.starts_with(id.as_str())));
        if name.starts_with(&ours) || loopback {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// `ip netns add` makes `/run/netns` a mount point of its own; once no namespace is left in
/// it, that mount goes too.
fn unmount_empty_netns_dir() {
    let dir = Path::new("/run/netns");
    let empty = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
    let mounted = mount_points().is_ok_and(|mounts| mounts.iter().any(|m| m == dir));
    if empty && mounted {
        let _ = unmount(dir, UnmountFlags::DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn links_into_a_directory_are_removed_and_others_kept() {
        let dir = std::env::temp_dir().join(format!("weft-links-{}", std::process::id()));
        let links = dir.join("links");
        let ours = dir.join("ours");
        fs::create_dir_all(&links).unwrap();
        fs::create_dir_all(&ours).unwrap();
        std::os::unix::fs::symlink(ours.join("a.log"), links.join("a")).unwrap();
        std::os::unix::fs::symlink("/elsewhere/b.log", links.join("b")).unwrap();
        remove_links_into(&links, &ours);
        assert!(fs::symlink_metadata(links.join("a")).is_err());
        assert!(fs::symlink_metadata(links.join("b")).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
