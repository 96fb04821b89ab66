//! Container images of Weft's components, built from files on this host: no registry, no base
//! image, no docker.
//!
//! Each image is an OCI image layout in a tar archive (what `ctr images import` reads) with one
//! uncompressed layer holding:
//!
//! ```text
//! /usr/local/bin/<binary>      the executable, the image's entrypoint
//! <every library ldd names>    at the host's path, symlinks on the way kept (Debian's merged /usr)
//! /etc/passwd, /etc/group      root, nonroot (65532), and weft-proxy (1337) in the proxy image
//! /tmp                         empty, mode 1777
//! /usr/sbin/iptables{,-restore,-save}   proxy image only: Debian's iptables-nft, its
//!                              extension modules and their libraries
//! ```
//!
//! The archives are reproducible: entries sorted, owned by root, every mtime 0, so the same
//! files give the same digests. Images are named `weft.local/<component>:<version>-<id>`, where
//! `<id>` is the first 12 hex digits of the image ID (the config digest, which `crictl images`
//! shows): a rebuilt binary gets a new tag, and an unchanged one keeps its tag.
//!
//! [`import`] loads archives into a containerd (1.6 or later) with `ctr`, in the CRI namespace,
//! unpacked for its default snapshotter, so kubelet finds them with `imagePullPolicy:
//! IfNotPresent`. [`ImageSet`] records the six images `cargo xtask images` builds.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
    process::{Command, ExitStatus},
};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster;

/// The registry part of every image name. Nothing serves it: images reach the node by
/// [`import`].
pub const REGISTRY: &str = "weft.local";
/// The containerd namespace of the CRI plugin, where kubelet looks for images.
pub const NAMESPACE: &str = "k8s.io";
/// UID and GID of `nonroot`, the user of every image but the proxy's and pause's.
pub const NONROOT: u32 = 65532;
/// UID and GID of `weft-proxy`, the user of the proxy image (the chart's `proxy.uid`).
pub const PROXY_UID: u32 = 1337;
/// UID and GID of the pause image, as upstream's.
pub const PAUSE_UID: u32 = 65535;
/// The pause image's version: that of the sandbox image kubelet 1.34 expects.
pub const PAUSE_VERSION: &str = "3.10";

const PATH_ENV: &str = "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BIN_DIR: &str = "usr/local/bin";
/// Debian's iptables with the nftables backend; `iptables*` are symlinks to it.
const IPTABLES_MULTI: &str = "/usr/sbin/xtables-nft-multi";
const IPTABLES_COMMANDS: [&str; 6] =
    ["iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save"];

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Why an image could not be built, saved, loaded or imported.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A command (`ldd`, `gcc`, `ctr`) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed (stderr, else stdout), trimmed.
        output: String,
    },
    /// `ldd` could not find a library the binary needs.
    #[error("{} needs {library}, which ldd does not find on this host", binary.display())]
    MissingLibrary {
        /// The binary.
        binary: PathBuf,
        /// The library's soname.
        library: String,
    },
    /// Two files want the same path in an image, or one wants a path below a symlink.
    #[error("the image cannot hold {}: {reason}", path.display())]
    Conflict {
        /// The path in the image.
        path: PathBuf,
        /// What is in the way.
        reason: String,
    },
    /// `images.json` is unreadable.
    #[error("{} is unreadable ({source}); run `cargo xtask images` again", path.display())]
    BadImageSet {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// An import reported success but containerd does not list the image.
    #[error("containerd at {} does not list {name} after importing it", socket.display())]
    NotImported {
        /// The containerd socket.
        socket: PathBuf,
        /// The image.
        name: String,
    },
    /// The cache directory could not be found.
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
}

impl ImagesError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// One image archive and the name it is imported under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The full reference, e.g. `weft.local/proxy:0.1.0-0123456789ab`.
    pub name: String,
    /// The OCI archive.
    pub archive: PathBuf,
}

impl Image {
    /// The tag: the part of [`Image::name`] after the last `:`.
    pub fn tag(&self) -> &str {
        self.name.rsplit_once(':').map_or("", |(_, tag)| tag)
    }
}

/// What goes into one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The repository under [`REGISTRY`]: `operator`, `proxy`, `pause`, ...
    pub component: String,
    /// The tag's first part: the chart's appVersion, or the upstream version (pause, coredns).
    pub version: String,
    /// The executable, installed as `/usr/local/bin/<its file name>`, the entrypoint. When
    /// dynamically linked, the libraries `ldd` names come with it.
    pub binary: PathBuf,
    /// UID and GID the image runs as.
    pub user: u32,
    /// Also carry Debian's iptables-nft and the user `weft-proxy`: the proxy image, whose init
    /// container (`weft-proxy init`) runs `iptables-restore`.
    pub iptables: bool,
}

/// Builds the image `spec` describes into `<out_dir>/<component>.tar` (replacing an older one).
pub fn build(spec: &ImageSpec, out_dir: &Path) -> Result<Image, ImagesError> {
    let layer = layer(spec)?;
    let archive = Archive::new(spec, layer.to_tar()?)?;
    fs::create_dir_all(out_dir).map_err(ImagesError::io(format!("creating {}", out_dir.display())))?;
    let path = out_dir.join(format!("{}.tar", spec.component));
    write_atomically(&path, &archive.to_tar()?)?;
    Ok(Image { name: archive.name, archive: path })
}

/// Compiles `e2e/images/pause.c` (`gcc -Os -static`) into `<out_dir>/pause` and builds
/// `weft.local/pause:<PAUSE_VERSION>-<id>` from it, run as [`PAUSE_UID`].
pub fn build_pause(out_dir: &Path) -> Result<Image, ImagesError> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/pause.c");
    fs::create_dir_all(out_dir).map_err(ImagesError::io(format!("creating {}", out_dir.display())))?;
    let binary = out_dir.join("pause");
    let mut gcc = Command::new("gcc");
    gcc.args(["-Os", "-static", "-o"]).arg(&binary).arg(&source);
    run(&mut gcc)?;
    let spec = ImageSpec {
        component: "pause".to_owned(),
        version: PAUSE_VERSION.to_owned(),
        binary,
        user: PAUSE_UID,
        iptables: false,
    };
    build(&spec, out_dir)
}

/// CoreDNS's version as `e2e/cluster/coredns/go.mod` pins it (a unit test holds them equal);
/// its image's tag starts with it.
pub const COREDNS_VERSION: &str = "1.14.7";

/// Builds `weft.local/coredns:<COREDNS_VERSION>-<id>` from `<bin_dir>/coredns` (the cluster's
/// build), run as [`NONROOT`].
pub fn build_coredns(bin_dir: &Path, out_dir: &Path) -> Result<Image, ImagesError> {
    let spec = ImageSpec {
        component: "coredns".to_owned(),
        version: COREDNS_VERSION.to_owned(),
        binary: bin_dir.join("coredns"),
        user: NONROOT,
        iptables: false,
    };
    build(&spec, out_dir)
}

/// `${WEFT_CACHE:-~/.cache/weft}/images`: the archives, `images.json` and `values.yaml`.
pub fn dir() -> Result<PathBuf, ImagesError> {
    let cluster = cluster::Paths::from_env()?;
    // The cluster's state directory is `<cache>/cluster`.
    let cache = cluster.root().parent().unwrap_or(cluster.root());
    Ok(cache.join("images"))
}

/// Imports `images` into the containerd at `containerd_socket` (namespace [`NAMESPACE`],
/// unpacked for its default snapshotter) with `ctr images import`, then checks that
/// `ctr images ls` lists every one.
pub fn import(containerd_socket: &Path, images: &[Image]) -> Result<(), ImagesError> {
    let ctr = || {
        let mut command = Command::new("ctr");
        command.arg("--address").arg(containerd_socket).args(["--namespace", NAMESPACE]);
        command
    };
    for image in images {
        run(ctr().args(["images", "import"]).arg(&image.archive))?;
    }
    let listed = run(ctr().args(["images", "ls", "-q"]))?;
    let listed: BTreeSet<&str> = listed.lines().map(str::trim).collect();
    match images.iter().find(|image| !listed.contains(image.name.as_str())) {
        Some(missing) => {
            Err(ImagesError::NotImported { socket: containerd_socket.to_owned(), name: missing.name.clone() })
        }
        None => Ok(()),
    }
}

/// The six images the test node runs, as `cargo xtask images` records them in `images.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSet {
    /// `weft.local/operator`.
    pub operator: Image,
    /// `weft.local/webhook`.
    pub webhook: Image,
    /// `weft.local/proxy`, with iptables.
    pub proxy: Image,
    /// `weft.local/demo`, the demo's app.
    pub demo: Image,
    /// `weft.local/pause`, the pod sandbox.
    pub pause: Image,
    /// `weft.local/coredns`, the cluster DNS.
    pub coredns: Image,
}

impl ImageSet {
    const FILE: &str = "images.json";

    /// All six, for [`import`].
    pub fn images(&self) -> Vec<Image> {
        [&self.operator, &self.webhook, &self.proxy, &self.demo, &self.pause, &self.coredns]
            .into_iter()
            .cloned()
            .collect()
    }

    /// Writes `<dir>/images.json` and returns its path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ImagesError> {
        let path = dir.join(Self::FILE);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|source| ImagesError::BadImageSet { path: path.clone(), source })?;
        write_atomically(&path, &json)?;
        Ok(path)
    }

    /// Reads `<dir>/images.json`; `None` when no images were built yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, ImagesError> {
        let path = dir.join(Self::FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImagesError::io(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|source| ImagesError::BadImageSet { path, source })
    }

    /// Helm values pointing the chart (`charts/weft`) at these images: `image.registry`
    /// [`REGISTRY`], `image.pullPolicy` `IfNotPresent`, and the tag of each of the operator,
    /// webhook and proxy.
    pub fn helm_values(&self) -> String {
        let mut values = String::from(
            "# Weft's images built on this host by `cargo xtask images` (never pulled: imported into\n\
             # the node's containerd).\n",
        );
        let _ = write!(values, "image:\n  registry: {REGISTRY}\n  pullPolicy: IfNotPresent\n");
        for (component, image) in
            [("operator", &self.operator), ("webhook", &self.webhook), ("proxy", &self.proxy)]
        {
            let _ = write!(values, "{component}:\n  image:\n    tag: {:?}\n", image.tag());
        }
        values
    }
}

// === Layer contents ===

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
    },
    /// A host file, read when the tar is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    Data {
        bytes: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
}

/// A file tree keyed by relative path; `BTreeMap` order puts parents before their children.
#[derive(Debug, Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Tree {
    /// Adds `entry` at `path` (relative or absolute: both mean the image's root) and a directory
    /// for each missing parent.
    fn insert(&mut self, path: impl AsRef<Path>, entry: Entry) -> Result<(), ImagesError> {
        let path = relative(path.as_ref());
        for parent in path.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_owned(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(other) => {
                    return Err(ImagesError::Conflict {
                        path: path.clone(),
                        reason: format!("{} is {other:?}", parent.display()),
                    });
                }
            }
        }
        match self.entries.get(&path) {
            Some(existing) if *existing == entry => Ok(()),
            // An explicit directory sets the mode of one created as a parent.
            Some(Entry::Dir { .. }) | None if matches!(entry, Entry::Dir { .. }) => {
                self.entries.insert(path, entry);
                Ok(())
            }
            None => {
                self.entries.insert(path, entry);
                Ok(())
            }
            Some(existing) => Err(ImagesError::Conflict {
                path: path.clone(),
                reason: format!("it already holds {existing:?}"),
            }),
        }
    }

    /// Adds the host file at absolute `path` under the same path, with every symlink met on the
    /// way to it (in any component) as a symlink, so the image resolves the path as the host
    /// does: `/lib/x86_64-linux-gnu/libc.so.6` on Debian becomes the symlink `/lib -> usr/lib`
    /// and the file `/usr/lib/x86_64-linux-gnu/libc.so.6`.
    fn add_host_file(&mut self, path: &Path) -> Result<(), ImagesError> {
        let mut resolved = PathBuf::from("/");
        // Components still to walk, the next one last.
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, path);
        let mut links = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&name);
            let meta = fs::symlink_metadata(&candidate)
                .map_err(ImagesError::io(format!("reading {}", candidate.display())))?;
            if meta.file_type().is_symlink() {
                links += 1;
                if links > 40 {
                    return Err(ImagesError::Conflict {
                        path: path.to_owned(),
                        reason: "too many levels of symlinks on the host".to_owned(),
                    });
                }
                let target = fs::read_link(&candidate)
                    .map_err(ImagesError::io(format!("reading the link {}", candidate.display())))?;
                self.insert(&candidate, Entry::Symlink { target: target.clone() })?;
                if target.has_root() {
                    resolved = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            } else {
                resolved = candidate;
            }
        }
        let meta =
            fs::metadata(&resolved).map_err(ImagesError::io(format!("reading {}", resolved.display())))?;
        if !meta.is_file() {
            return Err(ImagesError::Conflict {
                path: path.to_owned(),
                reason: format!("{} is not a regular file", resolved.display()),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        self.insert(&resolved, Entry::File { source: resolved.clone(), mode })
    }

    /// One line per entry, `<type><octal mode> <path>[ -> target]`, in archive order: what the
    /// layer holds, for tests.
    #[cfg(test)]
    fn listing(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(path, entry)| match entry {
                Entry::Dir { mode } => format!("d{mode:o} {}/", path.display()),
                Entry::File { mode, .. } | Entry::Data { mode, .. } => {
                    format!("f{mode:o} {}", path.display())
                }
                Entry::Symlink { target } => format!("l {} -> {}", path.display(), target.display()),
            })
            .collect()
    }

    /// The tree as a tar: entries in path order, owned by 0:0, mtime 0.
    fn to_tar(&self) -> Result<Vec<u8>, ImagesError> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_ustar();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            let appended = match entry {
                Entry::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, path, io::empty())
                }
                Entry::File { source, mode } => {
                    let bytes =
                        fs::read(source).map_err(ImagesError::io(format!("reading {}", source.display())))?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(bytes.len() as u64);
                    tar.append_data(&mut header, path, bytes.as_slice())
                }
                Entry::Data { bytes, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(bytes.len() as u64);
                    tar.append_data(&mut header, path, bytes.as_slice())
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)
                }
            };
            appended.map_err(ImagesError::io(format!("archiving {}", path.display())))?;
        }
        tar.into_inner().map_err(ImagesError::io("finishing a tar"))
    }
}

/// Pushes the components of `path` onto the stack `pending` so the first is popped first.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let names = path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    });
    let names: Vec<OsString> = names.collect();
    pending.extend(names.into_iter().rev());
}

/// `path` without its leading `/`.
fn relative(path: &Path) -> PathBuf {
    path.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// The layer of `spec`: the binary, its libraries, the users, /tmp and (proxy) iptables.
fn layer(spec: &ImageSpec) -> Result<Tree, ImagesError> {
    let mut tree = Tree::default();
    let name = spec.binary.file_name().ok_or_else(|| ImagesError::Conflict {
        path: spec.binary.clone(),
        reason: "the binary's path has no file name".to_owned(),
    })?;
    tree.insert(Path::new(BIN_DIR).join(name), Entry::File { source: spec.binary.clone(), mode: 0o755 })?;
    let mut needs_libraries = vec![spec.binary.clone()];
    if spec.iptables {
        tree.add_host_file(Path::new(IPTABLES_MULTI))?;
        for command in IPTABLES_COMMANDS {
            tree.insert(
                Path::new("usr/sbin").join(command),
                Entry::Symlink { target: "xtables-nft-multi".into() },
            )?;
        }
        // Every extension module, not only those our rules use: `iptables-save` must be able
        // to print whatever rules a pod's network namespace holds. About 2 MB.
        let modules = xtables_dir();
        let listed =
            fs::read_dir(&modules).map_err(ImagesError::io(format!("listing {}", modules.display())))?;
        for module in listed {
            let module = module.map_err(ImagesError::io(format!("listing {}", modules.display())))?.path();
            if module.extension().is_some_and(|e| e == "so") {
                tree.add_host_file(&module)?;
                needs_libraries.push(module);
            }
        }
        needs_libraries.push(IPTABLES_MULTI.into());
    }
    for library in libraries(&needs_libraries)? {
        tree.add_host_file(&library)?;
    }
    tree.insert("etc/passwd", Entry::Data { bytes: passwd(spec.iptables).into_bytes(), mode: 0o644 })?;
    tree.insert("etc/group", Entry::Data { bytes: group(spec.iptables).into_bytes(), mode: 0o644 })?;
    tree.insert("tmp", Entry::Dir { mode: 0o1777 })?;
    Ok(tree)
}

/// Where Debian's iptables looks for its extension modules (compiled in as XTABLES_LIBDIR).
fn xtables_dir() -> PathBuf {
    PathBuf::from(format!("/usr/lib/{}-linux-gnu/xtables", std::env::consts::ARCH))
}

fn passwd(proxy: bool) -> String {
    let mut users = format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/nonexistent:/usr/sbin/nologin\n"
    );
    if proxy {
        let _ =
            writeln!(users, "weft-proxy:x:{PROXY_UID}:{PROXY_UID}:weft-proxy:/nonexistent:/usr/sbin/nologin");
    }
    users
}

fn group(proxy: bool) -> String {
    let mut groups = format!("root:x:0:\nnonroot:x:{NONROOT}:\n");
    if proxy {
        let _ = writeln!(groups, "weft-proxy:x:{PROXY_UID}:");
    }
    groups
}

/// The shared libraries (and the dynamic loader) that `ldd` names for `binaries`, as absolute
/// host paths; none for static binaries.
fn libraries(binaries: &[PathBuf]) -> Result<BTreeSet<PathBuf>, ImagesError> {
    let output = Command::new("ldd")
        .args(binaries)
        .output()
        .map_err(ImagesError::io("running ldd (Debian package libc-bin)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // ldd says a static binary is "not a dynamic executable" and exits 1: no failure here.
    let only_static = stderr.lines().all(|l| l.trim().is_empty() || l.trim() == "not a dynamic executable");
    if !output.status.success() && !only_static {
        let command = match binaries {
            [one] => format!("ldd {}", one.display()),
            [first, rest @ ..] => format!("ldd {} (and {} more)", first.display(), rest.len()),
            [] => "ldd".to_owned(),
        };
        return Err(ImagesError::Command {
            command,
            status: output.status,
            output: stderr.trim().to_owned(),
        });
    }
    parse_ldd(&stdout).map_err(|(binary, library)| ImagesError::MissingLibrary {
        binary: binary.or_else(|| binaries.first().cloned()).unwrap_or_default(),
        library,
    })
}

/// The absolute paths in `ldd` output. For a library it did not find, `Err` with the soname
/// and, when ldd was given several files, the one that needs it.
fn parse_ldd(output: &str) -> Result<BTreeSet<PathBuf>, (Option<PathBuf>, String)> {
    let mut paths = BTreeSet::new();
    let mut binary = None;
    for line in output.lines() {
        // `<binary>:` headers when ldd is given several files.
        if !line.starts_with(char::is_whitespace) {
            binary = line.strip_suffix(':').map(PathBuf::from);
            continue;
        }
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((soname, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err((binary, soname.trim().to_owned()));
                }
                target
            }
            None => line,
        };
        // `/lib/x86_64-linux-gnu/libc.so.6 (0x...)`; `linux-vdso.so.1 (0x...)` is in the kernel.
        let path = path.split(" (").next().unwrap_or(path).trim();
        if path.starts_with('/') {
            paths.insert(PathBuf::from(path));
        }
    }
    Ok(paths)
}

// === The OCI archive ===

/// An image's blobs and its index, ready to be written as an OCI image layout.
#[derive(Debug)]
struct Archive {
    name: String,
    tree: Tree,
}

impl Archive {
    fn new(spec: &ImageSpec, layer: Vec<u8>) -> Result<Self, ImagesError> {
        let layer_digest = sha256(&layer);
        let entrypoint = Path::new("/").join(BIN_DIR).join(spec.binary.file_name().unwrap_or_default());
        let (architecture, os) = (oci_architecture(), "linux");
        let config = json!({
            "architecture": architecture,
            "os": os,
            "config": {
                "User": format!("{0}:{0}", spec.user),
                "Env": [PATH_ENV],
                "Entrypoint": [entrypoint],
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        });
        let config = to_json(&config);
        let config_digest = sha256(&config);
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
        }));
        let manifest_digest = sha256(&manifest);
        let name = image_name(&spec.component, &spec.version, &config_digest);
        let tag = name.rsplit_once(':').map_or("", |(_, tag)| tag);
        let index = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": { "architecture": architecture, "os": os },
                "annotations": {
                    // ctr names the image from this one; the OCI one holds the tag.
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }));
        let mut tree = Tree::default();
        tree.insert(
            "oci-layout",
            Entry::Data { bytes: br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), mode: 0o644 },
        )?;
        tree.insert("index.json", Entry::Data { bytes: index, mode: 0o644 })?;
        for (digest, bytes) in [(layer_digest, layer), (config_digest, config), (manifest_digest, manifest)] {
            tree.insert(blob_path(&digest), Entry::Data { bytes, mode: 0o644 })?;
        }
        Ok(Self { name, tree })
    }

    fn to_tar(&self) -> Result<Vec<u8>, ImagesError> {
        self.tree.to_tar()
    }
}

/// `weft.local/<component>:<version>-<first 12 hex digits of the config digest>`.
fn image_name(component: &str, version: &str, config_digest: &str) -> String {
    let hex = config_digest.trim_start_matches("sha256:");
    format!("{REGISTRY}/{component}:{version}-{}", &hex[..12.min(hex.len())])
}

fn blob_path(digest: &str) -> PathBuf {
    Path::new("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// `sha256:<hex>`.
fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut text = String::from("sha256:");
    for byte in digest.as_ref() {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

fn to_json(value: &serde_json::Value) -> Vec<u8> {
    // Serialising a `Value` cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The OCI (Go) name of this host's architecture.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// === Helpers ===

/// Runs `command`; its stdout on success.
fn run(command: &mut Command) -> Result<String, ImagesError> {
    let line = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let output = command.output().map_err(ImagesError::io(format!("running {line}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let text = if stderr.trim().is_empty() { stdout.trim() } else { stderr.trim() };
        return Err(ImagesError::Command { command: line, status: output.status, output: text.to_owned() });
    }
    Ok(stdout)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImagesError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&partial, path)
    };
    write().map_err(ImagesError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-images-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A fake "binary" (ldd calls it not dynamic): the image is built from it without libraries.
    fn spec(dir: &Path, contents: &str) -> ImageSpec {
        let binary = dir.join("tool");
        fs::write(&binary, contents).unwrap();
        ImageSpec {
            component: "tool".to_owned(),
            version: "1.2.3".to_owned(),
            binary,
            user: NONROOT,
            iptables: false,
        }
    }

    fn entries(archive: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut tar = tar::Archive::new(fs::File::open(archive).unwrap());
        let mut entries = BTreeMap::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            assert_eq!(entry.header().mtime().unwrap(), 0);
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            entries.insert(path, bytes);
        }
        entries
    }

    #[test]
    fn same_inputs_give_the_same_digest_and_a_new_binary_a_new_tag() {
        let dir = temp_dir("digest");
        let spec = spec(&dir, "#!/bin/false\none\n");
        let first = build(&spec, &dir.join("a")).unwrap();
        let again = build(&spec, &dir.join("b")).unwrap();
        assert_eq!(first.name, again.name);
        assert_eq!(fs::read(&first.archive).unwrap(), fs::read(&again.archive).unwrap());

        fs::write(&spec.binary, "#!/bin/false\ntwo\n").unwrap();
        let rebuilt = build(&spec, &dir.join("a")).unwrap();
        assert_ne!(first.name, rebuilt.name);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_are_registry_component_version_and_twelve_hex_digits() {
        let name = image_name("proxy", "0.1.0", &sha256(b"config"));
        let (repository, tag) = name.rsplit_once(':').unwrap();
        assert_eq!(repository, "weft.local/proxy");
        let (version, id) = tag.rsplit_once('-').unwrap();
        assert_eq!(version, "0.1.0");
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(Image { name: name.clone(), archive: PathBuf::new() }.tag(), tag);
    }

    #[test]
    fn the_archive_is_an_oci_layout_whose_config_runs_the_binary() {
        let dir = temp_dir("layout");
        let image = build(&spec(&dir, "#!/bin/false\n"), &dir).unwrap();
        let entries = entries(&image.archive);
        let index: serde_json::Value = serde_json::from_slice(&entries["index.json"]).unwrap();
        let descriptor = &index["manifests"][0];
        assert_eq!(descriptor["annotations"]["io.containerd.image.name"], image.name.as_str());
        let blob = |digest: &serde_json::Value| {
            let digest = digest.as_str().unwrap();
            let bytes = &entries[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))];
            assert_eq!(sha256(bytes), digest, "a blob's name is its digest");
            bytes.clone()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&descriptor["digest"])).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert!(image.name.contains(&config_id(&manifest)));
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["Entrypoint"], json!(["/usr/local/bin/tool"]));
        assert_eq!(config["config"]["WorkingDir"], "/");
        assert_eq!(config["config"]["Env"], json!([PATH_ENV]));
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer).as_str(), "uncompressed");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn config_id(manifest: &serde_json::Value) -> String {
        manifest["config"]["digest"].as_str().unwrap()["sha256:".len()..][..12].to_owned()
    }

    #[test]
    fn a_static_binary_comes_with_the_users_and_tmp_only() {
        let dir = temp_dir("static");
        let tree = layer(&spec(&dir, "#!/bin/false\n")).unwrap();
        assert_eq!(
            tree.listing(),
            [
                "d755 etc/",
                "f644 etc/group",
                "f644 etc/passwd",
                "d1777 tmp/",
                "d755 usr/",
                "d755 usr/local/",
                "d755 usr/local/bin/",
                "f755 usr/local/bin/tool",
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dynamic_binary_brings_its_libraries_and_the_symlinks_to_them() {
        // /bin/sh is dynamically linked on every Debian.
        let spec = ImageSpec {
            component: "sh".to_owned(),
            version: "1".to_owned(),
            binary: "/bin/sh".into(),
            user: NONROOT,
            iptables: false,
        };
        let tree = layer(&spec).unwrap();
        let listing = tree.listing();
        let has_file = |name: &str| listing.iter().any(|l| l.starts_with('f') && l.ends_with(name));
        assert!(has_file("/libc.so.6"), "{listing:#?}");
        assert!(has_file("/ld-linux-x86-64.so.2") || std::env::consts::ARCH != "x86_64", "{listing:#?}");
        // Every symlink's target is in the image too.
        for line in listing.iter().filter(|l| l.starts_with("l ")) {
            let (link, target) = line["l ".len()..].split_once(" -> ").unwrap();
            let base = if target.starts_with('/') {
                PathBuf::new()
            } else {
                Path::new(link).parent().unwrap().to_owned()
            };
            let target = relative(&base.join(target));
            assert!(resolves(&tree, &target), "{link} -> {} in {listing:#?}", target.display());
        }
    }

    /// Whether `path` names an entry of `tree`, following symlinks in it.
    fn resolves(tree: &Tree, path: &Path) -> bool {
        let mut current = PathBuf::new();
        for component in path.components() {
            match component {
                Component::ParentDir => {
                    current.pop();
                }
                Component::Normal(name) => {
                    current.push(name);
                    if let Some(Entry::Symlink { target }) = tree.entries.get(&current) {
                        let base = if target.has_root() {
                            PathBuf::new()
                        } else {
                            current.parent().unwrap().to_owned()
                        };
                        current = relative(&base.join(target));
                    }
                }
                _ => {}
            }
        }
        tree.entries.contains_key(&current)
    }

    #[test]
    fn the_proxy_layer_carries_iptables_and_its_user() {
        let dir = temp_dir("proxy");
        let mut spec = spec(&dir, "#!/bin/false\n");
        spec.iptables = true;
        spec.user = PROXY_UID;
        let tree = layer(&spec).unwrap();
        let listing = tree.listing();
        for command in ["iptables", "iptables-restore", "iptables-save"] {
            assert!(listing.contains(&format!("l usr/sbin/{command} -> xtables-nft-multi")), "{listing:#?}");
        }
        assert!(listing.iter().any(|l| l.starts_with('f') && l.ends_with("/xtables-nft-multi")));
        assert!(listing.iter().any(|l| l.ends_with("/xtables/libxt_owner.so")));
        assert!(listing.iter().any(|l| l.contains("libnftnl.so")));
        let Some(Entry::Data { bytes, .. }) = tree.entries.get(Path::new("etc/passwd")) else { panic!() };
        assert!(String::from_utf8_lossy(bytes).contains("weft-proxy:x:1337:1337:"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ldd_output_is_parsed_into_paths() {
        let output = "/usr/bin/a:\n\
            \tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1d)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f1d)\n\
            /usr/bin/b:\n\
            \tstatically linked\n";
        let paths: Vec<PathBuf> = parse_ldd(output).unwrap().into_iter().collect();
        assert_eq!(
            paths,
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
        assert_eq!(parse_ldd("\tlibgone.so.1 => not found\n"), Err((None, "libgone.so.1".to_owned())));
        let several =
            "/usr/bin/a:\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n/usr/bin/b:\n\tlibgone.so.1 => not found\n";
        assert_eq!(parse_ldd(several), Err((Some("/usr/bin/b".into()), "libgone.so.1".to_owned())));
    }

    #[test]
    fn a_path_below_a_symlink_is_a_conflict() {
        let mut tree = Tree::default();
        tree.insert("/lib", Entry::Symlink { target: "usr/lib".into() }).unwrap();
        assert!(tree.insert("/lib/libc.so.6", Entry::Data { bytes: vec![], mode: 0o644 }).is_err());
        tree.insert("/tmp", Entry::Dir { mode: 0o1777 }).unwrap();
        tree.insert("/tmp/x", Entry::Data { bytes: vec![], mode: 0o644 }).unwrap();
        assert_eq!(tree.listing(), ["l lib -> usr/lib", "d1777 tmp/", "f644 tmp/x"]);
    }

    #[test]
    fn helm_values_set_the_registry_and_each_tag() {
        let image = |component: &str| Image {
            name: format!("weft.local/{component}:0.1.0-0123456789ab"),
            archive: PathBuf::from(format!("/cache/{component}.tar")),
        };
        let set = ImageSet {
            operator: image("operator"),
            webhook: image("webhook"),
            proxy: image("proxy"),
            demo: image("demo"),
            pause: image("pause"),
            coredns: image("coredns"),
        };
        let values: serde_json::Value = serde_yaml::from_str(&set.helm_values()).unwrap();
        assert_eq!(values["image"]["registry"], "weft.local");
        assert_eq!(values["image"]["pullPolicy"], "IfNotPresent");
        for component in ["operator", "webhook", "proxy"] {
            assert_eq!(values[component]["image"]["tag"], "0.1.0-0123456789ab");
        }

        let dir = temp_dir("set");
        assert_eq!(ImageSet::load(&dir).unwrap(), None);
        set.save(&dir).unwrap();
        assert_eq!(ImageSet::load(&dir).unwrap(), Some(set));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A private containerd (Debian's, CRI disabled) in a temporary directory, stopped on drop.
    struct Containerd {
        dir: PathBuf,
        child: std::process::Child,
    }

    impl Containerd {
        fn start() -> Containerd {
            let dir = temp_dir("containerd");
            let config = format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {socket:?}\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
                root = dir.join("root"),
                state = dir.join("state"),
                socket = dir.join("containerd.sock"),
                opt = dir.join("opt"),
            );
            fs::write(dir.join("config.toml"), config).unwrap();
            let log = fs::File::create(dir.join("containerd.log")).unwrap();
            let child = Command::new("containerd")
                .arg("--config")
                .arg(dir.join("config.toml"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("containerd (Debian package containerd) runs");
            let containerd = Containerd { dir, child };
            for _ in 0..100 {
                if containerd.ctr().arg("version").output().is_ok_and(|o| o.status.success()) {
                    return containerd;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            panic!("containerd did not start; see {}", containerd.dir.join("containerd.log").display());
        }

        fn socket(&self) -> PathBuf {
            self.dir.join("containerd.sock")
        }

        fn ctr(&self) -> Command {
            let mut ctr = Command::new("ctr");
            ctr.arg("--address").arg(self.socket()).args(["--namespace", NAMESPACE]);
            ctr
        }
    }

    impl Drop for Containerd {
        fn drop(&mut self) {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&self.child),
                rustix::process::Signal::TERM,
            );
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn imported_images_run_in_containerd() {
        let containerd = Containerd::start();
        let out = temp_dir("import");
        // A dynamically linked binary from the host, with its libraries, and our static pause.
        let echo = build(
            &ImageSpec {
                component: "echo".to_owned(),
                version: "1".to_owned(),
                binary: "/bin/echo".into(),
                user: NONROOT,
                iptables: false,
            },
            &out,
        )
        .unwrap();
        let pause = build_pause(&out).unwrap();
        import(&containerd.socket(), &[echo.clone(), pause.clone()]).unwrap();

        let said =
            run(containerd.ctr().args(["run", "--rm", &echo.name, "weft-echo", "/usr/local/bin/echo", "hi"]))
                .unwrap();
        assert_eq!(said.trim(), "hi");

        // pause runs as 65535 and exits 0 on SIGTERM.
        let mut sandbox = containerd.ctr().args(["run", "--rm", &pause.name, "weft-pause"]).spawn().unwrap();
        let mut user = String::new();
        for _ in 0..50 {
            let ps = run(containerd.ctr().args(["task", "ps", "weft-pause"])).unwrap_or_default();
            if let Some(pid) = ps.lines().nth(1).and_then(|l| l.split_whitespace().next()) {
                user = fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("Uid:")
                            .map(|ids| ids.split_whitespace().next().unwrap_or("").to_owned())
                    })
                    .unwrap_or_default();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(user, PAUSE_UID.to_string());
        run(containerd.ctr().args(["task", "kill", "--signal", "SIGTERM", "weft-pause"])).unwrap();
        assert!(sandbox.wait().unwrap().success());
        drop(containerd);
        fs::remove_dir_all(&out).unwrap();
    }
}
