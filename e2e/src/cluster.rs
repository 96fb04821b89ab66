//! The test cluster's lifecycle: `up`, `down`, `status`, `env` (what `cargo xtask cluster`
//! runs).
//!
//! Everything lives in one state directory, `$WEFT_CACHE/cluster` (default
//! `~/.cache/weft/cluster`):
//!
//! ```text
//! state.json        ports, bin dir, the processes started (pid, binary, start time), ready flag
//! kubeconfig        admin kubeconfig (CN admin, O system:masters)
//! pki/              CAs, serving cert, client certs, ServiceAccount signing key, component kubeconfigs
//! etcd/             etcd's data directory (wiped on every `up`)
//! logs/<name>.log   each component's stdout and stderr
//! lock              held while `up` or `down` runs
//! ```
//!
//! These functions block; they run their Kubernetes calls on a private tokio runtime, so call
//! them from plain threads (xtask), not from inside an async runtime.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, File},
    future::Future,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Node, Pod, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use crate::process::{ProcessRecord, Stopped};
use crate::{
    images, node,
    pki::{self, PkiFiles},
    process::{self, Spawned},
};

/// The issuer of ServiceAccount tokens, as in a kubeadm cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audiences the apiserver accepts tokens for (`--api-audiences`). Weft's CA audience
/// `weft-ca` is deliberately not one of them: TokenRequest issues tokens for any audience, and
/// the CA checks its tokens with a TokenReview that names `weft-ca`, so a token meant for the
/// CA never works as a credential for the Kubernetes API itself.
pub const API_AUDIENCES: &[&str] = &[SERVICE_ACCOUNT_ISSUER];
/// `--service-cluster-ip-range`. The host routes it into the node's network namespace, where
/// kube-proxy's rules turn a Service address into a pod's (see [`node::net`]).
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
/// The field manager for everything this harness applies.
pub const FIELD_MANAGER: &str = "weft-e2e";

/// The control plane's components, in start order.
pub const COMPONENTS: [&str; 4] = [ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER];
/// The node's processes, in start order (after the control plane).
pub const NODE_COMPONENTS: [&str; 3] = [node::CONTAINERD, node::KUBELET, node::KUBE_PROXY];
/// Binaries the build must produce besides the components: tools and CoreDNS's image.
const TOOLS: [&str; 3] = [HELM, KUBECTL, COREDNS];
const ETCD: &str = "etcd";
const KUBE_APISERVER: &str = "kube-apiserver";
const KUBE_CONTROLLER_MANAGER: &str = "kube-controller-manager";
const KUBE_SCHEDULER: &str = "kube-scheduler";
const HELM: &str = "helm";
const KUBECTL: &str = "kubectl";
const COREDNS: &str = "coredns";

/// Bounded waits for each readiness signal. Generous: a cold start on a busy 2-core machine
/// is several times slower than a warm one.
const ETCD_READY: Duration = Duration::from_secs(60);
const APISERVER_READY: Duration = Duration::from_secs(120);
const COMPONENT_READY: Duration = Duration::from_secs(90);
const CRD_ESTABLISHED: Duration = Duration::from_secs(60);
const NODE_READY: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

/// Errors of the cluster harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Neither `WEFT_CACHE` nor `HOME` is set.
    #[error("neither WEFT_CACHE nor HOME is set, so there is no place for the cluster's state")]
    NoCacheDir,
    /// `e2e/cluster/build.sh` failed.
    #[error("building the cluster binaries failed ({status}): see the output above, or run `bash {script}`")]
    Build {
        /// The script's exit status.
        status: ExitStatus,
        /// The script.
        script: PathBuf,
    },
    /// `e2e/cluster/build.sh` succeeded but a binary is missing.
    #[error("the cluster build did not produce {0}")]
    MissingBinary(PathBuf),
    /// The system clock is before 1970 or absurdly far ahead.
    #[error("the system clock is unusable for certificate validity")]
    Clock,
    /// Certificate or key generation failed.
    #[error("generating the cluster's certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// The state file could not be parsed.
    #[error("the cluster state {} is unreadable ({source})", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The kubeconfig could not be loaded.
    #[error("loading the kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A Kubernetes API call failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
    /// A component exited while the cluster was starting.
    #[error("{component} exited during start-up ({status}); the end of {}:\n{tail}", log.display())]
    Exited {
        /// The component.
        component: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A readiness signal did not come in time.
    #[error("{what} was not ready after {}s (last check: {last}); the end of {}:\n{tail}", waited.as_secs(), log.display())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last probe's answer.
        last: String,
        /// The log of the component concerned.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// A CRD did not become Established in time.
    #[error("CRD {crd} was not Established after {}s (conditions: {conditions})", waited.as_secs())]
    NotEstablished {
        /// The CRD's name.
        crd: String,
        /// How long.
        waited: Duration,
        /// Its status conditions, as JSON.
        conditions: String,
    },
    /// helm failed.
    #[error("helm {args} failed:\n{output}")]
    Helm {
        /// Its arguments.
        args: String,
        /// What it printed.
        output: String,
    },
    /// The test webhook (see [`crate::webhook`]) could not be set up.
    #[error("the test webhook: {0}")]
    Webhook(String),
    /// This machine lacks something the node needs.
    #[error("cannot run the node: {0}")]
    NodePreflight(String),
    /// A command setting up the node failed.
    #[error("setting up the node: `{command}` failed: {output}")]
    NodeSetup {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        output: String,
    },
    /// A manifest could not be applied.
    #[error("manifest: {0}")]
    Manifest(String),
    /// Building or importing an image failed.
    #[error("images: {0}")]
    Images(String),
    /// No cluster is running.
    #[error(
        "the test cluster is not running ({reason}): run `cargo xtask cluster up` (or `cargo xtask test`)"
    )]
    NotRunning {
        /// Why it is considered not running.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube { context, source }
    }
}

/// The cluster's state directory and the files in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// `$WEFT_CACHE/cluster`, or `~/.cache/weft/cluster` when `WEFT_CACHE` is unset.
    pub fn from_env() -> Result<Self, Error> {
        let cache = match std::env::var_os("WEFT_CACHE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => match std::env::var_os("HOME") {
                Some(home) if !home.is_empty() => PathBuf::from(home).join(".cache/weft"),
                _ => return Err(Error::NoCacheDir),
            },
        };
        let cache = std::path::absolute(&cache)
            .map_err(|e| Error::io(format!("resolving {}", cache.display()), e))?;
        Ok(Self::new(cache.join("cluster")))
    }

    /// A state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }

    /// The node's directories.
    pub fn node(&self) -> node::NodeDirs {
        node::NodeDirs::new(&self.root)
    }

    /// The directory of the components' logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// One component's log.
    pub fn log(&self, component: &str) -> PathBuf {
        self.logs().join(format!("{component}.log"))
    }

    fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// The key the apiserver verifies ServiceAccount tokens with (PKCS#8 PEM, ECDSA P-256): tests
    /// that need a token the TokenRequest API will not mint (an expired one) sign it themselves.
    pub fn service_account_key(&self) -> PathBuf {
        self.pki().join("sa.key")
    }

    fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }

    /// Takes the directory's lock, waiting for another `up` or `down` to finish.
    fn lock(&self) -> Result<File, Error> {
        fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(format!("creating {}", self.root.display()), e))?;
        let path = self.root.join("lock");
        let file = File::create(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        file.lock().map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
        Ok(file)
    }

    fn read_state(&self) -> Result<Option<State>, Error> {
        let path = self.state_file();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::State { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Like `read_state`, but an unreadable state file (from a crash mid-write or another
    /// version) is removed with a warning: the processes it may have named are left alone.
    fn read_state_or_discard(&self) -> Result<Option<State>, Error> {
        match self.read_state() {
            Err(error @ Error::State { .. }) => {
                progress(&format!("{error}; discarding it (any processes it named are left alone)"));
                self.remove_state()?;
                Ok(None)
            }
            other => other,
        }
    }

    fn write_state(&self, state: &State) -> Result<(), Error> {
        let path = self.state_file();
        let tmp = path.with_extension("json.tmp");
        let json =
            serde_json::to_vec_pretty(state).map_err(|source| Error::State { path: path.clone(), source })?;
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn remove_state(&self) -> Result<(), Error> {
        for path in [self.state_file(), self.kubeconfig()] {
            remove_file(&path)?;
        }
        for dir in [self.pki(), self.etcd_data()] {
            remove_dir(&dir)?;
        }
        Ok(())
    }
}

/// The ports the control plane listens on: on 127.0.0.1, but the apiserver on the node's
/// veth address ([`node::net::HOST_IP`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    /// etcd's client port (plain HTTP, loopback only).
    pub etcd_client: u16,
    /// etcd's peer port.
    pub etcd_peer: u16,
    /// kube-apiserver's secure port.
    pub apiserver: u16,
    /// kube-controller-manager's secure (health) port.
    pub controller_manager: u16,
    /// kube-scheduler's secure (health) port.
    pub scheduler: u16,
}

/// What `state.json` records about a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// The ports in use.
    pub ports: Ports,
    /// The processes started so far, in start order.
    pub processes: Vec<ProcessRecord>,
    /// Set once every component is healthy and the CRDs are established.
    pub ready: bool,
}

impl State {
    /// The apiserver's URL: on the host's end of the node's veth pair, where the host, the
    /// node and the pods all reach it.
    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{}", node::net::HOST_IP, self.ports.apiserver)
    }

    /// Whether every component is recorded and still running.
    pub fn all_running(&self) -> bool {
        COMPONENTS.iter().chain(&NODE_COMPONENTS).all(|c| self.processes.iter().any(|p| p.name == *c))
            && self.processes.iter().all(process::is_running)
    }
}

/// What [`up`] did.
#[derive(Debug)]
pub enum Up {
    /// It started a cluster.
    Started {
        /// The new cluster's state.
        state: State,
        /// Time from the start of `up` to ready, including the binaries check.
        elapsed: Duration,
    },
    /// A cluster was already running; its CRDs were brought up to date.
    AlreadyRunning {
        /// Its state.
        state: State,
    },
}

/// Starts the cluster, unless it already runs. Builds the binaries if they are missing,
/// generates fresh PKI and an empty etcd, starts etcd, kube-apiserver,
/// kube-controller-manager and kube-scheduler detached from this process, waits for each to
/// be healthy, installs the CRDs of [`weft_api::crds`] and waits until they are established.
///
/// A state left by a run that died (a component gone, or a pid now used by another program)
/// is cleaned up first: the surviving components it recorded are stopped, nothing else.
/// When start-up fails, the components it started are stopped again and the logs are kept.
pub fn up() -> Result<Up, Error> {
    let paths = Paths::from_env()?;
    let _lock = paths.lock()?;
    let runtime = runtime()?;
    if let Some(state) = paths.read_state_or_discard()? {
        if state.ready && state.all_running() {
            runtime.block_on(async {
                let client = admin_client(&paths, Duration::from_secs(10)).await?;
                install_crds(&client, &weft_api::crds()).await
            })?;
            return Ok(Up::AlreadyRunning { state });
        }
        progress(
            "found the state of a cluster that is not running (stopped, killed or half started); cleaning it up",
        );
        report_stopped(&process::stop(&state.processes));
        paths.remove_state()?;
    }
    node::preflight()?;
    report_cleaned(&node::clean(&paths.node())?);
    let started = Instant::now();
    let bin_dir = build_binaries()?;
    let mut start = Start {
        paths: &paths,
        state: State { bin_dir, ports: free_ports()?, processes: Vec::new(), ready: false },
        spawned: Vec::new(),
    };
    match runtime.block_on(start.run()) {
        Ok(()) => Ok(Up::Started { state: start.state, elapsed: started.elapsed() }),
        Err(error) => {
            progress("start-up failed; stopping what was started (logs are kept)");
            report_stopped(&process::stop(&start.state.processes));
            // Reap our own children so no zombies linger while this process lives on.
            for spawned in &mut start.spawned {
                let _ = spawned.child.try_wait();
            }
            report_cleaned(&node::clean(&paths.node())?);
            paths.remove_state()?;
            Err(error)
        }
    }
}

/// What [`down`] did.
#[derive(Debug)]
pub enum Down {
    /// The recorded components were stopped and the node's remains removed.
    Stopped(Vec<(String, Stopped)>, node::Cleaned),
    /// There was no cluster state and nothing of a node to remove.
    NotRunning,
}

/// Stops the components recorded in the state file (only processes whose pid, start time and
/// binary all match the record): SIGTERM, a bounded wait, then SIGKILL. Then removes what the
/// node leaves (container processes, mounts, its network namespace and cgroups; see
/// [`node::clean`]), the state, the kubeconfig, the PKI and etcd's data; keeps the logs.
/// Without state it still removes a node's remains, so a second `down` has nothing to do.
pub fn down() -> Result<Down, Error> {
    let paths = Paths::from_env()?;
    let _lock = paths.lock()?;
    let state = paths.read_state_or_discard()?;
    let stopped = state.as_ref().map(|s| process::stop(&s.processes));
    let cleaned = node::clean(&paths.node())?;
    paths.remove_state()?;
    match stopped {
        Some(stopped) => Ok(Down::Stopped(stopped, cleaned)),
        None if !cleaned.is_empty() => Ok(Down::Stopped(Vec::new(), cleaned)),
        None => Ok(Down::NotRunning),
    }
}

/// The cluster as [`status`] sees it.
#[derive(Debug)]
pub struct Status {
    /// The state directory.
    pub paths: Paths,
    /// The recorded state, if any.
    pub state: Option<State>,
    /// Whether each recorded component is running.
    pub components: Vec<(ProcessRecord, bool)>,
    /// The apiserver's `/readyz` answer: `Ok` when ready, else why not. `None` without state.
    pub readyz: Option<Result<(), String>>,
    /// The node's `Ready` condition: `Ok` when ready, else why not. `None` without an apiserver.
    pub node: Option<Result<(), String>>,
    /// Every pod that is not running and ready, with the kubelet's reasons.
    pub pod_problems: Vec<String>,
}

impl Status {
    /// Whether the cluster is up and ready to use.
    pub fn is_ready(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.ready && s.all_running())
            && matches!(self.readyz, Some(Ok(())))
            && matches!(self.node, Some(Ok(())))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(state) = &self.state else {
            return writeln!(
                f,
                "the test cluster is not running (no state in {})",
                self.paths.root().display()
            );
        };
        let verdict = if self.is_ready() {
            "running and ready"
        } else if state.ready {
            "NOT healthy"
        } else {
            "starting, or left half started"
        };
        writeln!(f, "test cluster: {verdict}")?;
        for (record, running) in &self.components {
            let port = match record.name.as_str() {
                ETCD => format!("http://127.0.0.1:{}", state.ports.etcd_client),
                KUBE_APISERVER => state.apiserver_url(),
                KUBE_CONTROLLER_MANAGER => format!("https://127.0.0.1:{}", state.ports.controller_manager),
                KUBE_SCHEDULER => format!("https://127.0.0.1:{}", state.ports.scheduler),
                node::KUBELET => format!("https://{}:{}", node::net::NODE_IP, node::net::KUBELET_PORT),
                node::CONTAINERD => self.paths.node().containerd_socket().display().to_string(),
                node::KUBE_PROXY => format!("iptables mode, netns {}", node::net::NETNS),
                _ => String::new(),
            };
            let run = if *running { "running" } else { "STOPPED" };
            writeln!(f, "  {:<24} {run:<8} pid {:<8} {port}", record.name, record.pid)?;
        }
        match &self.readyz {
            Some(Ok(())) => writeln!(f, "  apiserver /readyz: ok")?,
            Some(Err(why)) => writeln!(f, "  apiserver /readyz: {why}")?,
            None => {}
        }
        match &self.node {
            Some(Ok(())) => writeln!(f, "  node {}: Ready", node::net::NODE_NAME)?,
            Some(Err(why)) => writeln!(f, "  node {}: NOT ready: {why}", node::net::NODE_NAME)?,
            None => {}
        }
        for problem in &self.pod_problems {
            writeln!(f, "  {problem}")?;
        }
        writeln!(f, "kubeconfig: {}", self.paths.kubeconfig().display())?;
        writeln!(f, "logs:       {}", self.paths.logs().display())?;
        writeln!(f, "binaries:   {}", state.bin_dir.display())
    }
}

/// Reports the state of the cluster, asking the apiserver's `/readyz` when it runs.
pub fn status() -> Result<Status, Error> {
    let paths = Paths::from_env()?;
    let state = paths.read_state()?;
    let components =
        state.iter().flat_map(|s| &s.processes).map(|p| (p.clone(), process::is_running(p))).collect();
    let (mut readyz, mut node_ready, mut pod_problems) = (None, None, Vec::new());
    if state.is_some() {
        runtime()?.block_on(async {
            let client = match admin_client(&paths, Duration::from_secs(5)).await {
                Ok(client) => client,
                Err(e) => return readyz = Some(Err(e.to_string())),
            };
            let answer = get(&client, "/readyz").await;
            let up = answer.is_ok();
            readyz = Some(answer);
            if !up {
                return;
            }
            let nodes: Api<Node> = Api::all(client.clone());
            node_ready = Some(match nodes.get_opt(node::net::NODE_NAME).await {
                Ok(Some(n)) => node::ready(&n),
                Ok(None) => Err("not registered".to_owned()),
                Err(e) => Err(one_line(&e.to_string())),
            });
            let pods: Api<Pod> = Api::all(client);
            match pods.list(&Default::default()).await {
                Ok(list) => pod_problems = list.items.iter().filter_map(node::pod_problem).collect(),
                Err(e) => pod_problems.push(format!("listing pods: {}", one_line(&e.to_string()))),
            }
        });
    }
    Ok(Status { paths, state, components, readyz, node: node_ready, pod_problems })
}

/// The environment a shell needs to use the cluster, from [`env`].
#[derive(Debug, Clone)]
pub struct Env {
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The directory with helm and the control-plane binaries.
    pub bin_dir: PathBuf,
}

impl Env {
    /// `export` lines for a POSIX shell: `eval "$(cargo xtask cluster env)"`.
    pub fn shell_exports(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport PATH={}:\"$PATH\"\n",
            shell_quote(&self.kubeconfig.to_string_lossy()),
            shell_quote(&self.bin_dir.to_string_lossy()),
        )
    }
}

/// The kubeconfig and bin dir of the running cluster; [`Error::NotRunning`] without one.
pub fn env() -> Result<Env, Error> {
    let paths = Paths::from_env()?;
    match paths.read_state()? {
        Some(state) if state.ready && state.all_running() => {
            Ok(Env { kubeconfig: paths.kubeconfig(), bin_dir: state.bin_dir })
        }
        Some(_) => Err(Error::NotRunning {
            reason: "a component has stopped; see `cargo xtask cluster status`".into(),
        }),
        None => Err(Error::NotRunning { reason: format!("no state in {}", paths.root().display()) }),
    }
}

/// Applies `crds` (server-side apply, field manager [`FIELD_MANAGER`]) and waits until every
/// one is Established.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        api.patch(name, &params, &Patch::Apply(crd))
            .await
            .map_err(Error::kube(format!("applying CRD {name}")))?;
    }
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        let deadline = Instant::now() + CRD_ESTABLISHED;
        loop {
            let current = api.get(name).await.map_err(Error::kube(format!("reading CRD {name}")))?;
            if is_established(&current) {
                break;
            }
            if Instant::now() >= deadline {
                let conditions = current
                    .status
                    .and_then(|s| s.conditions)
                    .map(|c| serde_json::to_string(&c).unwrap_or_default())
                    .unwrap_or_default();
                return Err(Error::NotEstablished {
                    crd: name.to_owned(),
                    waited: CRD_ESTABLISHED,
                    conditions,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// Whether a CRD has the condition `Established=True`.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

/// A [`kube::Config`] from the cluster's admin kubeconfig, for a client on the caller's runtime.
pub async fn admin_config(paths: &Paths) -> Result<Config, Error> {
    let path = paths.kubeconfig();
    let kubeconfig =
        Kubeconfig::read_from(&path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::Kubeconfig { path, source })
}

/// GETs `path` and maps any failure to a one-line reason.
pub(crate) async fn get(client: &Client, path: &str) -> Result<(), String> {
    let request = http::Request::get(path).body(Vec::new()).map_err(|e| e.to_string())?;
    client.request_text(request).await.map(drop).map_err(|e| one_line(&e.to_string()))
}

fn one_line(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.len() > 300 {
        let cut = (0..=300).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        format!("{}...", &text[..cut])
    } else {
        text
    }
}

async fn admin_client(paths: &Paths, timeout: Duration) -> Result<Client, Error> {
    let mut config = admin_config(paths).await?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.default_retry = false;
    Client::try_from(config).map_err(Error::kube("building a Kubernetes client"))
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting a tokio runtime", e))
}

fn progress(message: &str) {
    eprintln!("[cluster] {message}");
}

fn report_cleaned(cleaned: &node::Cleaned) {
    if !cleaned.is_empty() {
        progress(&format!("removed a node's remains: {cleaned}"));
    }
}

fn report_stopped(stopped: &[(String, Stopped)]) {
    for (name, how) in stopped {
        match how {
            Stopped::NotRunning => {}
            Stopped::Terminated => progress(&format!("stopped {name}")),
            Stopped::Killed => progress(&format!("killed {name} (it ignored SIGTERM)")),
            Stopped::StillRunning => progress(&format!("{name} survived SIGKILL; check it by hand")),
        }
    }
}

/// The build script, found from this crate's source directory.
fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/build.sh")
}

/// Runs `e2e/cluster/build.sh` (instant when the binaries are cached) and returns the bin dir.
pub fn build_binaries() -> Result<PathBuf, Error> {
    let script = build_script();
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io(format!("running {}", script.display()), e))?;
    if !output.status.success() {
        return Err(Error::Build { status: output.status, script });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    // Absolute and canonical: the recorded binary paths must match `/proc/<pid>/cmdline`
    // whatever the directory `down` runs from.
    let bin_dir = fs::canonicalize(printed)
        .map_err(|e| Error::io(format!("finding the bin dir {printed:?} that build.sh printed"), e))?;
    for name in COMPONENTS.iter().chain(&NODE_COMPONENTS[1..]).chain(&TOOLS) {
        let exe = bin_dir.join(name);
        if !exe.is_file() {
            return Err(Error::MissingBinary(exe));
        }
    }
    Ok(bin_dir)
}

/// Five distinct free ports on 127.0.0.1 (all held at once while choosing, so they differ).
fn free_ports() -> Result<Ports, Error> {
    let listeners = (0..5)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| Error::io("choosing free ports on 127.0.0.1", e))?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| Error::io("choosing free ports on 127.0.0.1", e))?;
    Ok(Ports {
        etcd_client: ports[0],
        etcd_peer: ports[1],
        apiserver: ports[2],
        controller_manager: ports[3],
        scheduler: ports[4],
    })
}

/// The images the node needs to run at all (its sandbox and its DNS), rebuilt at every `up`
/// (a second or two; the tags follow the content), and Weft's own if `cargo xtask images`
/// built them.
struct NodeImages {
    pause: images::Image,
    coredns: images::Image,
    weft: Vec<images::Image>,
}

impl NodeImages {
    fn build(bin_dir: &Path) -> Result<Self, Error> {
        let fail = |e: images::ImagesError| Error::Images(e.to_string());
        let dir = images::dir().map_err(fail)?;
        let pause = images::build_pause(&dir).map_err(fail)?;
        let coredns = images::build_coredns(bin_dir, &dir).map_err(fail)?;
        let weft = match images::ImageSet::load(&dir).map_err(fail)? {
            Some(set) => vec![set.operator, set.webhook, set.proxy, set.demo],
            None => Vec::new(),
        };
        Ok(Self { pause, coredns, weft })
    }

    fn to_import(&self) -> Vec<images::Image> {
        [&self.pause, &self.coredns].into_iter().chain(&self.weft).cloned().collect()
    }
}

/// One run of `up` from a clean state directory.
struct Start<'a> {
    paths: &'a Paths,
    state: State,
    spawned: Vec<Spawned>,
}

impl Start<'_> {
    async fn run(&mut self) -> Result<(), Error> {
        let paths = self.paths;
        // Keys and etcd's data are for this user only (etcd warns about anything wider).
        for (dir, mode) in [(paths.pki(), 0o700), (paths.etcd_data(), 0o700), (paths.logs(), 0o755)] {
            remove_dir(&dir)?;
            fs::create_dir_all(&dir)
                .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(mode)))
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        progress("generating certificates and keys");
        let pki = pki::generate(&paths.pki())?;
        let ports = self.state.ports;
        let url = self.state.apiserver_url();
        write_kubeconfig(&paths.kubeconfig(), &url, &pki.cluster_ca, &pki.admin, "admin")?;
        let kcm_kubeconfig = paths.pki().join("controller-manager.kubeconfig");
        write_kubeconfig(
            &kcm_kubeconfig,
            &url,
            &pki.cluster_ca,
            &pki.controller_manager,
            KUBE_CONTROLLER_MANAGER,
        )?;
        let scheduler_kubeconfig = paths.pki().join("scheduler.kubeconfig");
        write_kubeconfig(&scheduler_kubeconfig, &url, &pki.cluster_ca, &pki.scheduler, KUBE_SCHEDULER)?;
        let kubelet_kubeconfig = paths.pki().join("kubelet.kubeconfig");
        write_kubeconfig(&kubelet_kubeconfig, &url, &pki.cluster_ca, &pki.kubelet, node::KUBELET)?;
        let kube_proxy_kubeconfig = paths.pki().join("kube-proxy.kubeconfig");
        write_kubeconfig(&kube_proxy_kubeconfig, &url, &pki.cluster_ca, &pki.kube_proxy, node::KUBE_PROXY)?;
        paths.write_state(&self.state)?;

        progress("building the node's images (pause, CoreDNS) if they changed");
        let node_images = NodeImages::build(&self.state.bin_dir)?;
        progress(&format!("creating the node's network namespace {}", node::net::NETNS));
        let dirs = paths.node();
        let inputs = node::NodeInputs {
            pause_image: &node_images.pause.name,
            kubelet: node::config::KubeletFiles {
                client_ca: &pki.client_ca,
                serving_cert: &pki.kubelet_serving.cert,
                serving_key: &pki.kubelet_serving.key,
            },
            kube_proxy_kubeconfig: &kube_proxy_kubeconfig,
        };
        node::prepare(&dirs, &inputs, SERVICE_CLUSTER_IP_RANGE)?;

        progress(&format!("starting etcd on 127.0.0.1:{}", ports.etcd_client));
        self.spawn(ETCD, etcd_args(paths, &ports))?;
        self.wait(ETCD, "etcd /health", ETCD_READY, || async move { etcd_health(ports.etcd_client) }).await?;

        progress(&format!("starting kube-apiserver on {url}"));
        self.spawn(KUBE_APISERVER, apiserver_args(&ports, &pki))?;
        let admin = admin_client(paths, Duration::from_secs(5)).await?;
        self.wait(KUBE_APISERVER, "kube-apiserver /readyz", APISERVER_READY, || get(&admin, "/readyz"))
            .await?;

        progress("starting kube-controller-manager and kube-scheduler");
        self.spawn(KUBE_CONTROLLER_MANAGER, controller_manager_args(&ports, &pki, &kcm_kubeconfig))?;
        self.spawn(KUBE_SCHEDULER, scheduler_args(&ports, &pki, &scheduler_kubeconfig))?;

        progress("installing the CRDs");
        install_crds(&admin, &weft_api::crds()).await?;

        let kcm = health_client(ports.controller_manager, &pki)?;
        self.wait(KUBE_CONTROLLER_MANAGER, "kube-controller-manager /healthz", COMPONENT_READY, || {
            get(&kcm, "/healthz")
        })
        .await?;
        let scheduler = health_client(ports.scheduler, &pki)?;
        self.wait(KUBE_SCHEDULER, "kube-scheduler /healthz", COMPONENT_READY, || get(&scheduler, "/healthz"))
            .await?;
        // The controllers really work (not just serve /healthz) once the ServiceAccount
        // controller has made `default` in `default`: pods need it to be admitted.
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        self.wait(
            KUBE_CONTROLLER_MANAGER,
            "the default ServiceAccount (made by kube-controller-manager)",
            COMPONENT_READY,
            || async {
                match accounts.get_opt("default").await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err("not created yet".to_owned()),
                    Err(e) => Err(one_line(&e.to_string())),
                }
            },
        )
        .await?;

        self.start_node(&admin, &dirs, &node_images, &kubelet_kubeconfig).await?;

        self.state.ready = true;
        paths.write_state(&self.state)
    }

    /// Starts containerd, imports the images, starts the kubelet and kube-proxy, waits until
    /// the node is Ready and kube-proxy healthy, then runs CoreDNS on it and waits for it.
    async fn start_node(
        &mut self,
        admin: &Client,
        dirs: &node::NodeDirs,
        node_images: &NodeImages,
        kubelet_kubeconfig: &Path,
    ) -> Result<(), Error> {
        let netns = node::net::netns_path();
        progress("starting containerd in the node's namespace");
        let containerd = node::which(node::CONTAINERD)?;
        self.spawn_exe(node::CONTAINERD, &containerd, node::containerd_args(dirs), Some(&netns))?;
        self.wait(node::CONTAINERD, "containerd", COMPONENT_READY, || async { node::containerd_ready(dirs) })
            .await?;

        let to_import = node_images.to_import();
        progress(&format!("importing {} images into containerd", to_import.len()));
        images::import(&dirs.containerd_socket(), &to_import).map_err(|e| Error::Images(e.to_string()))?;

        progress("starting the kubelet and kube-proxy in the node's namespace");
        let kubelet = self.state.bin_dir.join(node::KUBELET);
        self.spawn_exe(node::KUBELET, &kubelet, node::kubelet_args(dirs, kubelet_kubeconfig), Some(&netns))?;
        let kube_proxy = self.state.bin_dir.join(node::KUBE_PROXY);
        self.spawn_exe(node::KUBE_PROXY, &kube_proxy, node::kube_proxy_args(dirs), Some(&netns))?;
        let nodes: Api<Node> = Api::all(admin.clone());
        self.wait(node::KUBELET, &format!("node {} Ready", node::net::NODE_NAME), NODE_READY, || async {
            match nodes.get_opt(node::net::NODE_NAME).await {
                Ok(Some(n)) => node::ready(&n),
                Ok(None) => Err("not registered yet".to_owned()),
                Err(e) => Err(one_line(&e.to_string())),
            }
        })
        .await?;
        self.wait(node::KUBE_PROXY, "kube-proxy /healthz", COMPONENT_READY, || async {
            let addr = SocketAddr::from((node::net::NODE_IP, node::net::KUBE_PROXY_HEALTHZ_PORT));
            crate::http::get(addr, "kube-proxy", "/healthz").await.map_err(|e| e.to_string()).and_then(
                |(status, body)| {
                    if status == 200 { Ok(()) } else { Err(format!("{status}: {}", one_line(&body))) }
                },
            )
        })
        .await?;

        progress("starting CoreDNS on the node");
        crate::apply::apply_yaml(admin, &node::config::coredns_manifests(&node_images.coredns.name), None)
            .await?;
        let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "kube-system");
        let pods: Api<Pod> = Api::namespaced(admin.clone(), "kube-system");
        self.wait(node::KUBELET, "CoreDNS available", NODE_READY, || async {
            match deployments.get_opt("coredns").await {
                Ok(Some(d)) if d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) >= 1 => {
                    Ok(())
                }
                Ok(_) => Err(node::pod_problems(&pods, "k8s-app=kube-dns").await),
                Err(e) => Err(one_line(&e.to_string())),
            }
        })
        .await
    }

    fn spawn(&mut self, name: &str, args: Vec<String>) -> Result<(), Error> {
        let exe = self.state.bin_dir.join(name);
        self.spawn_exe(name, &exe, args, None)
    }

    /// Starts `exe` as component `name`, inside the network namespace `netns` if given.
    fn spawn_exe(
        &mut self,
        name: &str,
        exe: &Path,
        args: Vec<String>,
        netns: Option<&Path>,
    ) -> Result<(), Error> {
        let log = self.paths.log(name);
        let spawned = match netns {
            Some(netns) => process::spawn_in_netns(name, exe, &args, &log, netns),
            None => process::spawn(name, exe, &args, &log),
        }
        .map_err(|e| Error::io(format!("starting {}", exe.display()), e))?;
        self.state.processes.push(spawned.record.clone());
        self.spawned.push(spawned);
        self.paths.write_state(&self.state)
    }

    /// Polls `probe` until it answers `Ok`, failing early when any started component exits
    /// and after `timeout` otherwise.
    async fn wait<F, Fut>(
        &mut self,
        component: &str,
        what: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let started = Instant::now();
        loop {
            for spawned in &mut self.spawned {
                if let Ok(Some(status)) = spawned.child.try_wait() {
                    return Err(Error::Exited {
                        component: spawned.record.name.clone(),
                        status,
                        log: spawned.log.clone(),
                        tail: tail(&spawned.log),
                    });
                }
            }
            let last = match probe().await {
                Ok(()) => {
                    progress(&format!("{what}: ready after {:.1}s", started.elapsed().as_secs_f64()));
                    return Ok(());
                }
                Err(why) => why,
            };
            if started.elapsed() >= timeout {
                let log = self.paths.log(component);
                return Err(Error::Timeout {
                    what: what.to_owned(),
                    waited: timeout,
                    last,
                    tail: tail(&log),
                    log,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn etcd_args(paths: &Paths, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=weft-e2e".into(),
        format!("--data-dir={}", paths.etcd_data().display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=weft-e2e={peer}"),
        // A throwaway test store: durability is not worth the fsync latency.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(ports: &Ports, pki: &PkiFiles) -> Vec<String> {
    let host = node::net::HOST_IP;
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        // The host's end of the node's veth pair: reachable from the host, the node and the
        // pods, and from nowhere else.
        format!("--bind-address={host}"),
        format!("--advertise-address={host}"),
        format!("--secure-port={}", ports.apiserver),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.client_ca.display()),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--kubelet-client-certificate={}", pki.apiserver_kubelet_client.cert.display()),
        format!("--kubelet-client-key={}", pki.apiserver_kubelet_client.key.display()),
        format!("--kubelet-certificate-authority={}", pki.cluster_ca.display()),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", pki.sa_pub.display()),
        format!("--service-account-signing-key-file={}", pki.sa_key.display()),
        format!("--api-audiences={}", API_AUDIENCES.join(",")),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
    ]
}

fn controller_manager_args(ports: &Ports, pki: &PkiFiles, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", ports.controller_manager),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--service-account-private-key-file={}", pki.sa_key.display()),
        format!("--root-ca-file={}", pki.cluster_ca.display()),
        "--use-service-account-credentials=true".into(),
        format!("--cluster-signing-cert-file={}", pki.client_ca.display()),
        format!("--cluster-signing-key-file={}", pki.client_ca_key.display()),
        "--leader-elect=false".into(),
        "--controllers=*".into(),
        "--profiling=false".into(),
    ]
}

fn scheduler_args(ports: &Ports, pki: &PkiFiles, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", ports.scheduler),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        "--leader-elect=false".into(),
        "--profiling=false".into(),
    ]
}

/// A client for a component's own secure port, verifying its certificate against the
/// cluster CA. No credentials: `/healthz` is always allowed.
fn health_client(port: u16, pki: &PkiFiles) -> Result<Client, Error> {
    let url = format!("https://127.0.0.1:{port}");
    let mut config =
        Config::new(url.parse().map_err(|_| Error::NotRunning { reason: format!("bad URL {url}") })?);
    config.root_cert = Some(vec![pki.cluster_ca_der.clone()]);
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(5));
    config.default_retry = false;
    Client::try_from(config).map_err(Error::kube("building a health-check client"))
}

/// etcd's `/health` over plain HTTP on loopback.
fn etcd_health(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response).map_err(|e| e.to_string())?;
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") && response.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(one_line(&response))
    }
}

/// Writes a kubeconfig that refers to the PKI files by absolute path.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    client: &pki::ClientFiles,
    user: &str,
) -> Result<(), Error> {
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "weft-e2e",
            "cluster": {"server": server, "certificate-authority": ca},
        }],
        "users": [{
            "name": user,
            "user": {"client-certificate": client.cert, "client-key": client.key},
        }],
        "contexts": [{
            "name": "weft-e2e",
            "context": {"cluster": "weft-e2e", "user": user, "namespace": "default"},
        }],
        "current-context": "weft-e2e",
        "preferences": BTreeMap::<String, String>::new(),
    });
    let yaml = serde_yaml::to_string(&kubeconfig)
        .map_err(|e| Error::io(format!("writing {}", path.display()), io::Error::other(e)))?;
    fs::write(path, yaml).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The last lines of a log, for error messages.
fn tail(log: &Path) -> String {
    const LINES: usize = 20;
    let Ok(file) = File::open(log) else {
        return format!("({} is missing)", log.display());
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(LINES)..]
        .iter()
        .map(|l| {
            let cut = (0..=l.len().min(400)).rev().find(|i| l.is_char_boundary(*i)).unwrap_or(0);
            format!("    {}", &l[..cut])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn remove_file(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coredns_version_is_the_one_its_go_mod_pins() {
        let go_mod = include_str!("../cluster/coredns/go.mod");
        let pinned = format!("github.com/coredns/coredns v{}", images::COREDNS_VERSION);
        assert!(go_mod.lines().any(|l| l.trim().starts_with(&pinned)), "go.mod does not pin {pinned}");
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn env_exports_kubeconfig_and_path() {
        let env = Env { kubeconfig: "/c/kubeconfig".into(), bin_dir: "/c/bin".into() };
        assert_eq!(
            env.shell_exports(),
            "export KUBECONFIG='/c/kubeconfig'\nexport PATH='/c/bin':\"$PATH\"\n"
        );
    }

    #[test]
    fn pki_files_are_written_with_private_keys_unreadable_to_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-e2e-pki-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pki = pki::generate(&dir).unwrap();
        for key in [&pki.serving_key, &pki.sa_key, &pki.admin.key, &pki.client_ca_key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let ca = fs::read_to_string(&pki.cluster_ca).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki.cluster_ca_der.starts_with(&[0x30]), "DER starts with a SEQUENCE");
        fs::remove_dir_all(&dir).unwrap();
    }
}
