//! The proxy side by side with direct, HAProxy and nginx, on one machine in one run:
//! `cargo xtask bench proxy [--quick]` (which installs the tools and builds weft-proxy first), or
//! `cargo run --release -p weft-bench --bin proxy -- --weft-proxy target/release/weft-proxy`.
//!
//! Layout (the team's research notes outside this repository, `../shared/research/performance.md`
//! §7): this process and every load generator run on CPU 0; the
//! origin (nginx, 1 KB body) and every system under test run on CPU 1, so each path has one
//! cross-CPU round trip and direct and proxied runs stay comparable. Every proxy runs one worker
//! (`nbthread 1`, `worker_processes 1`, `--workers 1`), access logs off, upstream keep-alive on.
//! All traffic is on 127.0.0.1; every load run is bounded in requests and in time.
//!
//! The two-hop chains are sidecar pairs: client -> outbound proxy -> mTLS -> inbound proxy ->
//! origin, Weft's and one built from HAProxy the same way. Both use certificates from one
//! `weft-identity` root (ECDSA P-256, TLS 1.3, client certificate required, HTTP/1.1 inside the
//! tunnel, connections kept and reused). Weft's outbound checks that the inbound's certificate
//! carries the expected SPIFFE ID; HAProxy cannot check a URI SAN, so its outbound checks only the
//! chain (and sends no SNI: it would check the certificate's DNS names against it).
//!
//! - M0: TCP ping-pong round trip between the two CPUs (the floor).
//! - M1: fixed-rate latency (oha, open loop, `--latency-correction`), HTTP/1.1 and HTTP/2,
//!   targets interleaved round by round; overhead = percentile minus direct's from the same round.
//! - M2: closed-loop max throughput (wrk for HTTP/1.1, h2load for HTTP/2) and the proxy's CPU
//!   from /proc/<pid>/stat.
//! - M3: proxy CPU per 1000 rps, from the M1 HTTP/1.1 runs.
//! - M4: RSS idle, under load (VmHWM after M1 and M2), and per idle keep-alive connection.
//! - M5: full mTLS handshakes (no resumption) per proxy CPU-second against each chain's inbound
//!   proxy, from `weft_bench::handshake` (rustls, on CPU 0).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};
use weft_bench::{
    Percentiles, handshake, nearest_rank,
    procfs::{clk_tck, cpu_ticks, status_kib},
};
use weft_identity::{Credentials, SpiffeId, TrustBundle, Tunnel, ca::Issuer, tls};

#[derive(Debug, Parser)]
struct Args {
    /// Developer mode, under 3 minutes: 3 rounds of 2 s, short M2 runs, 1k idle connections
    /// only. Indicative; BENCHMARKS.md records full runs.
    #[arg(long)]
    quick: bool,
    /// M1 rounds (every target once per round, interleaved). Default 5 (3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of fixed-rate load per M1 run. Default 15 (2 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// M1 request rate (all connections together).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// M1 connections.
    #[arg(long, default_value_t = 16)]
    connections: u64,
    /// The weft-proxy binary (release build).
    #[arg(long, default_value = "target/release/weft-proxy")]
    weft_proxy: PathBuf,
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    /// M4: how many idle keep-alive connections to hold, e.g. `1000,10000`. Default 1000 and
    /// 10k (1000 with --quick); capped by what HAProxy's maxconn allows under the open-file limit.
    #[arg(long, value_delimiter = ',')]
    idle_connections: Option<Vec<usize>>,
    /// First of the loopback ports used (P to P+111).
    #[arg(long, default_value_t = 27080)]
    base_port: u16,
    /// Raw results (JSON). Default bench/results/proxy.json (proxy-quick.json with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: the M0 ping-pong server (run on CPU 1).
    #[arg(long, hide = true)]
    pingpong_server: Option<SocketAddr>,
    /// Only write the sidecar pairs' certificates into DIR and exit: `root.pem`, and
    /// `inbound.{crt,key}` and `outbound.{crt,key}` for `spiffe://cluster.local/ns/bench/sa/inbound`
    /// and `.../outbound` (valid one day). `bench/profile-proxy.sh … mtls` uses them.
    #[arg(long, value_name = "DIR")]
    write_certs: Option<PathBuf>,
}

/// What one measured path is made of.
#[derive(Clone, Debug)]
struct Target {
    name: &'static str,
    /// Port for HTTP/1.1 and for HTTP/2 (prior knowledge, h2c).
    h1: u16,
    h2: u16,
    /// Processes whose CPU and memory are the system under test's (none for direct).
    pids: Vec<u32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.pingpong_server {
        return pingpong_server(addr);
    }
    if let Some(dir) = &args.write_certs {
        std::fs::create_dir_all(dir)?;
        Mesh::issue(dir)?;
        return Ok(());
    }
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 3 } else { 5 });
    let seconds = args.seconds.unwrap_or(if quick { 2 } else { 15 });
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(if quick { "bench/results/proxy-quick.json" } else { "bench/results/proxy.json" })
    });
    let started = Instant::now();

    pin_self_to_cpu0()?;
    let nofile = raise_nofile();
    let load_before = loadavg();
    let work = std::env::temp_dir().join(format!("weft-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(work.join("tmp"))?;
    let mut procs = Procs::default();
    let result = run(&args, quick, rounds, seconds, nofile, &work, &mut procs, started, load_before);
    procs.stop_all();
    // Only this run's own directory, named by our pid.
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("raw results: {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    args: &Args,
    quick: bool,
    rounds: usize,
    seconds: u64,
    nofile: u64,
    work: &Path,
    procs: &mut Procs,
    started: Instant,
    load_before: String,
) -> Result<Value> {
    let b = args.base_port;
    let p = |off: u16| b + off;
    // A run counts only if its achieved rate is this close to the asked one.
    let tolerance = if quick { 0.02 } else { 0.01 };
    let weft = std::fs::canonicalize(&args.weft_proxy).with_context(|| {
        format!("{} (build it: cargo build --release -p weft-proxy)", args.weft_proxy.display())
    })?;

    // --- the servers, all on CPU 1 ---
    let body = "a".repeat(1024);
    let origin = p(0);
    write(
        work,
        "nginx-origin.conf",
        &nginx_conf(
            work,
            "origin",
            nofile,
            &format!(
                "server {{ listen 127.0.0.1:{origin}; listen 127.0.0.1:{} http2;\n  location / {{ default_type text/plain; return 200 \"{body}\"; }} }}",
                p(100)
            ),
        ),
    )?;
    write(
        work,
        "nginx-proxy.conf",
        &nginx_conf(
            work,
            "proxy",
            nofile,
            &format!(
                "upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{}; listen 127.0.0.1:{} http2;\n  location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}",
                p(2),
                p(102)
            ),
        ),
    )?;
    procs.start("nginx origin", "nginx", &["-e", "stderr", "-c", &path_str(work, "nginx-origin.conf")])?;
    let nginx =
        procs.start("nginx", "nginx", &["-e", "stderr", "-c", &path_str(work, "nginx-proxy.conf")])?;

    // The sidecar pairs' certificates: the same files for Weft and HAProxy.
    let mesh = Mesh::issue(work)?;

    // HAProxy needs two descriptors per connection and refuses a maxconn the limit cannot hold.
    let maxconn = (nofile / 2).saturating_sub(100).min(25_000);
    let haproxy = |name: &str, binds: &[String], server: &str, procs: &mut Procs| -> Result<u32> {
        let file = format!("haproxy-{name}.cfg");
        write(work, &file, &haproxy_cfg(binds, server, maxconn))?;
        procs.start(&format!("haproxy {name}"), "haproxy", &["-db", "-f", &path_str(work, &file)])
    };
    let plain_binds =
        |h1: u16, h2: u16| [format!("bind 127.0.0.1:{h1}"), format!("bind 127.0.0.1:{h2} proto h2")];
    let ha = haproxy("one", &plain_binds(p(1), p(101)), &format!("127.0.0.1:{origin}"), procs)?;
    // TLS 1.3 only and a client certificate from the root required, as Weft's inbound does.
    let ha_in = haproxy(
        "chain-in",
        &[format!(
            "bind 127.0.0.1:{} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
            p(14),
            mesh.inbound.combined,
            mesh.root
        )],
        &format!("127.0.0.1:{origin}"),
        procs,
    )?;
    // Checks the inbound's chain only: HAProxy cannot match a URI SAN, and given an `sni` it
    // would check the certificate's DNS names, which a mesh certificate does not have.
    let ha_out = haproxy(
        "chain-out",
        &plain_binds(p(11), p(111)),
        &format!(
            "127.0.0.1:{} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
            p(14),
            mesh.outbound.combined,
            mesh.root
        ),
        procs,
    )?;

    // How an outbound proxy carries HTTP/1.1 to a meshed inbound: one HTTP/1.1 tunnel per
    // request in flight, or all requests multiplexed over one HTTP/2 tunnel.
    #[derive(Clone, Copy)]
    enum Tunnels {
        Http1,
        H2,
    }
    let weft_proc = |name: &str,
                     listen: u16,
                     admin: u16,
                     to: u16,
                     tls: Option<(&Files, Option<(&SpiffeId, Tunnels)>)>,
                     procs: &mut Procs|
     -> Result<u32> {
        let file = format!("weft-{name}.yaml");
        // Routed by Host (the alias 127.0.0.1), so HTTP/1.1 and HTTP/2 share the listener and
        // the upstream is HTTP/1.1 for both, as for HAProxy and nginx. An endpoint with an
        // identity is reached over mTLS (ALPN weft/http1, or weft/h2-http1 when upgraded) and
        // must present that identity.
        let (identity, policy) = match tls {
            Some((_, Some((id, tunnels)))) => {
                let upgrade = match tunnels {
                    Tunnels::Http1 => "DO_NOT_UPGRADE",
                    Tunnels::H2 => "UPGRADE",
                };
                (
                    format!(", identity: \"{id}\""),
                    format!("    trafficPolicy: {{connectionPool: {{h2Upgrade: {upgrade}}}}}\n"),
                )
            }
            _ => (String::new(), String::new()),
        };
        write(
            work,
            &file,
            &format!(
                "version: bench\nservices:\n  - name: origin\n    aliases: [\"127.0.0.1\"]\n    ports: [{{number: {to}, protocol: HTTP1, endpoints: [{{address: \"127.0.0.1:{to}\"{identity}}}]}}]\n{policy}"
            ),
        )?;
        let mut args = vec![
            "--config".to_owned(),
            path_str(work, &file),
            "--no-redirect".into(),
            "--listen".into(),
            format!("127.0.0.1:{listen}"),
            "--admin-addr".into(),
            format!("127.0.0.1:{admin}"),
            "--workers".into(),
            "1".into(),
            "--max-connections".into(),
            "30000".into(),
            "--log".into(),
            "warn".into(),
        ];
        // With credentials every listener also terminates mesh mTLS, and endpoints with an
        // identity are dialled over it.
        if let Some((files, _)) = tls {
            args.extend([
                "--cert-file".to_owned(),
                files.cert.clone(),
                "--key-file".into(),
                files.key.clone(),
                "--trust-bundle-file".into(),
                mesh.root.clone(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.start(&format!("weft {name}"), weft.to_str().context("path")?, &args)
    };
    let wf = weft_proc("one", p(3), p(20), origin, None, procs)?;
    let wf_in = weft_proc("chain-in", p(13), p(21), origin, Some((&mesh.inbound, None)), procs)?;
    let to_inbound = |tunnels| Some((&mesh.outbound, Some((&mesh.inbound_id, tunnels))));
    let wf_out = weft_proc("chain-out", p(10), p(22), p(13), to_inbound(Tunnels::Http1), procs)?;
    let wf_in_h2 = weft_proc("h2-chain-in", p(16), p(24), origin, Some((&mesh.inbound, None)), procs)?;
    let wf_out_h2 = weft_proc("h2-chain-out", p(15), p(23), p(16), to_inbound(Tunnels::H2), procs)?;

    let mut targets = vec![
        Target { name: "direct", h1: origin, h2: p(100), pids: vec![] },
        Target { name: "haproxy", h1: p(1), h2: p(101), pids: vec![ha] },
        Target { name: "nginx", h1: p(2), h2: p(102), pids: vec![nginx] },
        Target { name: "weft", h1: p(3), h2: p(3), pids: vec![wf] },
        Target { name: "weft-mtls-chain", h1: p(10), h2: p(10), pids: vec![wf_out, wf_in] },
        Target { name: "weft-mtls-h2-chain", h1: p(15), h2: p(15), pids: vec![wf_out_h2, wf_in_h2] },
        Target { name: "haproxy-mtls-chain", h1: p(11), h2: p(111), pids: vec![ha_out, ha_in] },
    ];
    for t in &targets {
        wait_ready(t.h1, &body)?;
        // HTTP/2 ports are checked by the warm-up runs below.
    }
    procs.check_alive()?;

    // --- M4 idle, before any request but the readiness one ---
    let idle: BTreeMap<&str, u64> = targets.iter().map(|t| (t.name, rss_kib(&t.pids))).collect();

    // --- M0 ---
    eprintln!("M0: TCP ping-pong between the CPUs");
    let m0 = pingpong(p(50), if quick { 20_000 } else { 200_000 })?;

    // --- M1 (and M3 from its HTTP/1.1 runs) ---
    let protocols: &[&str] = &["http1", "http2"];
    for t in &targets {
        for proto in protocols {
            oha(&args.oha, t, proto, args.rate, args.connections, 1, None)?; // warm-up, unchecked
        }
    }
    // HAProxy's inbound accepts nothing but mTLS; Weft's would also take plaintext, so make sure
    // its outbound really tunnels.
    for admin in [p(21), p(24)] {
        let (tunneled, plain) = weft_requests_by_tls(admin)?;
        ensure!(
            tunneled > 0 && plain == 0,
            "Weft's inbound (admin :{admin}) got {tunneled} requests over mTLS and {plain} without: the pair is not an mTLS pair"
        );
    }
    let mut m1_runs = Vec::new();
    for round in 1..=rounds {
        eprintln!("M1 round {round}/{rounds}");
        for proto in protocols {
            for t in &targets {
                let cpu0 = cpu_ticks(&t.pids);
                let run = oha(&args.oha, t, proto, args.rate, args.connections, seconds, Some(tolerance))?;
                let cpu_s = (cpu_ticks(&t.pids) - cpu0) as f64 / clk_tck();
                let mut run = run;
                run["round"] = json!(round);
                run["proxy_cpu_seconds"] = json!(cpu_s);
                run["rss_kib"] = json!(rss_kib(&t.pids));
                m1_runs.push(run);
            }
        }
    }
    procs.check_alive()?;
    let hwm_m1: BTreeMap<&str, u64> = targets.iter().map(|t| (t.name, hwm_kib(&t.pids))).collect();

    // --- M2 ---
    let m2_seconds = if quick { 3 } else { 10 };
    let mut m2_runs = Vec::new();
    for round in 1..=(if quick { 1 } else { 3 }) {
        for t in &targets {
            for proto in protocols {
                eprintln!("M2 round {round}: {} {proto}", t.name);
                let cpu0 = cpu_ticks(&t.pids);
                let mut run =
                    if *proto == "http2" { h2load(t.h2, m2_seconds)? } else { wrk(t.h1, m2_seconds)? };
                let cpu_s = (cpu_ticks(&t.pids) - cpu0) as f64 / clk_tck();
                run["round"] = json!(round);
                run["target"] = json!(t.name);
                run["protocol"] = json!(proto);
                run["proxy_cpu_seconds"] = json!(cpu_s);
                m2_runs.push(run);
            }
        }
    }
    procs.check_alive()?;
    let hwm_m2: BTreeMap<&str, u64> = targets.iter().map(|t| (t.name, hwm_kib(&t.pids))).collect();
    // Tunnels each Weft inbound accepted over M1 and M2 (M5 adds its own handshakes later).
    let tunnels = json!({
        "weft-mtls-chain": weft_tunnels_accepted(p(21))?,
        "weft-mtls-h2-chain": weft_tunnels_accepted(p(24))?,
    });

    // --- M5: against each pair's inbound proxy, the one that terminates mTLS ---
    let m5_seconds = if quick { 3 } else { 10 };
    let m5_rounds = if quick { 1 } else { 3 };
    let servers = [("weft", p(13), wf_in), ("haproxy", p(14), ha_in)];
    // Weft's inbound must present this identity; HAProxy's carries it too.
    let inbound_name = tls::server_name(&mesh.inbound_id)?;
    let handshakes = |port: u16, seconds: u64| {
        handshake::run(&handshake::Load {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config: mesh.client.clone(),
            server_name: inbound_name.clone(),
            workers: M5_WORKERS,
            duration: Duration::from_secs(seconds),
            // Far above what one core can do: a safety bound, not the usual end of a run.
            max_handshakes: 20_000 * seconds,
            io_timeout: Duration::from_secs(5),
        })
    };
    let check = |name: &str, o: &handshake::Outcome| {
        ensure!(
            o.errors == 0 && o.handshakes > 0,
            "M5 {name}: {} handshakes, {} errors: {:?}",
            o.handshakes,
            o.errors,
            o.error_kinds
        );
        Ok(())
    };
    for (name, port, _) in servers {
        check(name, &handshakes(port, 1))?; // warm-up
    }
    let mut m5_runs = Vec::new();
    for round in 1..=m5_rounds {
        for (name, port, pid) in servers {
            eprintln!("M5 round {round}/{m5_rounds}: {name}");
            let cpu0 = cpu_ticks(&[pid]);
            let o = handshakes(port, m5_seconds);
            let ticks = cpu_ticks(&[pid]) - cpu0;
            check(name, &o)?;
            // Fewer ticks would make the 10 ms tick of /proc/<pid>/stat a large part of the result.
            ensure!(ticks >= 20, "M5 {name}: the server used only {ticks} CPU ticks");
            let cpu_s = ticks as f64 / clk_tck();
            let seconds = o.elapsed.as_secs_f64();
            m5_runs.push(json!({
                "server": name, "round": round, "handshakes": o.handshakes, "errors": o.errors,
                "seconds": seconds, "handshakes_per_second": o.handshakes as f64 / seconds,
                "proxy_cpu_seconds": cpu_s, "handshakes_per_cpu_second": o.handshakes as f64 / cpu_s,
            }));
        }
    }
    procs.check_alive()?;

    // --- M4 per idle connection ---
    // 10k, or as many as HAProxy's maxconn (bounded by the open-file limit) allows.
    let most = 10_000.min(maxconn.saturating_sub(100) as usize);
    let counts: Vec<usize> = args
        .idle_connections
        .clone()
        .unwrap_or_else(|| if quick { vec![1000] } else { vec![1000, 10_000] })
        .into_iter()
        .map(|n| n.min(most))
        .collect();
    let mut m4_conns = Vec::new();
    for t in targets.iter_mut().filter(|t| t.pids.len() == 1) {
        for &n in &counts {
            // A fresh process each time: after M1 and M2 its heap has free space that new
            // connections would fill without growing RSS, hiding their cost.
            eprintln!("M4: {n} idle keep-alive connections to a restarted {}", t.name);
            let pid = procs.restart(t.pids[0])?;
            t.pids[0] = pid;
            wait_ready(t.h1, &body)?;
            thread::sleep(Duration::from_millis(300));
            let before = rss_kib(&[pid]);
            let conns = open_idle(t.h1, n)?;
            // Held idle long enough for what each proxy does with an idle connection to show:
            // Weft parks an HTTP/1 connection idle for 100 ms, and gives the freed pages back
            // within two of its 1 s ticks. HAProxy and nginx free at once.
            thread::sleep(M4_HOLD);
            let after = rss_kib(&[pid]);
            drop(conns);
            thread::sleep(Duration::from_millis(500));
            m4_conns.push(json!({
                "target": t.name, "connections": n, "rss_before_kib": before, "rss_after_kib": after,
                "bytes_per_connection": (after as f64 - before as f64) * 1024.0 / n as f64,
            }));
        }
    }
    procs.check_alive()?;

    let load_after = loadavg();
    let report = json!({
        "quick": quick,
        "date": date(),
        "commit": command_line("git", &["rev-parse", "HEAD"]),
        // Uncommitted changes under proxy/ or bench/ make the commit alone not the code measured.
        "dirty": !command_line("git", &["status", "--porcelain", "--", "proxy", "bench/src"]).is_empty(),
        "machine": machine(),
        "tools": tools(&args.oha),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "nofile": nofile,
        "settings": {"rounds": rounds, "seconds": seconds, "rate": args.rate, "connections": args.connections,
                     "body_bytes": 1024, "rate_tolerance": tolerance, "m2_seconds": m2_seconds, "m2_connections": 64,
                     "m5_rounds": m5_rounds, "m5_seconds": m5_seconds, "m5_workers": M5_WORKERS},
        "targets": targets.iter().map(|t| json!({"name": t.name, "h1_port": t.h1, "h2_port": t.h2, "processes": t.pids.len()})).collect::<Vec<_>>(),
        "m0": m0,
        "m1": m1_runs,
        "m2": m2_runs,
        "m4": {"idle_rss_kib": idle, "hwm_after_m1_kib": hwm_m1, "hwm_after_m2_kib": hwm_m2, "idle_connections": m4_conns, "hold_s": M4_HOLD.as_secs()},
        "m5": m5_runs,
        "tunnels_after_m2": tunnels,
        "elapsed_seconds": started.elapsed().as_secs_f64(),
    });
    println!("{}", summary(&report, &targets));
    Ok(report)
}

/// M5's concurrent client connections: enough to keep the one-worker server busy while each
/// blocking client thread does its own half of a handshake on CPU 0.
const M5_WORKERS: usize = 8;
/// How long M4 holds its connections idle before reading RSS.
const M4_HOLD: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------- certificates

/// The bench's mesh: one root, an inbound and an outbound identity (ECDSA P-256), written as
/// files both Weft and HAProxy read, and M5's client configuration.
struct Mesh {
    /// The root, PEM: Weft's trust bundle and HAProxy's `ca-file`.
    root: String,
    inbound: Files,
    outbound: Files,
    inbound_id: SpiffeId,
    /// Presents the outbound identity, accepts only the inbound one, never resumes.
    client: Arc<rustls::ClientConfig>,
}

/// One identity's files.
struct Files {
    cert: String,
    key: String,
    /// Certificate then key, as HAProxy's `crt` wants them.
    combined: String,
}

impl Mesh {
    fn issue(work: &Path) -> Result<Mesh> {
        let now = SystemTime::now();
        // Longer than any run; the certificates live in the run's own directory only.
        let lifetime = Duration::from_secs(24 * 3600);
        let ca = Issuer::new_root("cluster.local", now, lifetime)?;
        write(work, "root.pem", ca.root_pem())?;
        let files = |sa: &str| -> Result<(SpiffeId, Files, Credentials)> {
            let id = SpiffeId::new("cluster.local", "bench", sa)?;
            let issued = ca.issue(&id, now, lifetime)?;
            write(work, &format!("{sa}.crt"), &issued.cert_pem)?;
            write(work, &format!("{sa}.key"), &issued.key_pem)?;
            write(work, &format!("{sa}.pem"), &format!("{}{}", issued.cert_pem, issued.key_pem))?;
            let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?;
            let files = Files {
                cert: path_str(work, &format!("{sa}.crt")),
                key: path_str(work, &format!("{sa}.key")),
                combined: path_str(work, &format!("{sa}.pem")),
            };
            Ok((id, files, creds))
        };
        let (inbound_id, inbound, _) = files("inbound")?;
        let (_, outbound, outbound_creds) = files("outbound")?;
        let bundle = TrustBundle::from_pem(ca.root_pem().as_bytes())?;
        let client =
            handshake::without_resumption(tls::client_config(&outbound_creds, &bundle, Tunnel::Http1)?);
        Ok(Mesh { root: path_str(work, "root.pem"), inbound, outbound, inbound_id, client })
    }
}

// ---------------------------------------------------------------- configs

fn nginx_conf(work: &Path, name: &str, nofile: u64, server: &str) -> String {
    let w = work.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\npid {w}/nginx-{name}.pid;\n\
         error_log stderr warn;\nevents {{ worker_connections {}; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
         client_body_temp_path {w}/tmp/body-{name};\n  proxy_temp_path {w}/tmp/proxy-{name};\n\
         {server}\n}}\n",
        nofile.saturating_sub(100)
    )
}

/// One frontend with `binds` (whole `bind` lines) and one server, `server` being its address
/// and options.
fn haproxy_cfg(binds: &[String], server: &str, maxconn: u64) -> String {
    let binds: String = binds.iter().map(|b| format!("  {b}\n")).collect();
    format!(
        "global\n  nbthread 1\n  maxconn {maxconn}\n\
         defaults\n  mode http\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
           timeout http-keep-alive 300s\n  http-reuse always\n\
         frontend fe\n{binds}  default_backend be\n\
         backend be\n  server s {server}\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
}

fn path_str(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

// ---------------------------------------------------------------- processes

/// The servers this run started; stopped (by pid) however the run ends.
#[derive(Debug, Default)]
struct Procs(Vec<Proc>);

#[derive(Debug)]
struct Proc {
    name: String,
    program: String,
    args: Vec<String>,
    child: Child,
}

impl Procs {
    /// Starts `program` pinned to CPU 1 (`taskset` execs it, so the child's pid is the server's).
    fn start(&mut self, name: &str, program: &str, args: &[&str]) -> Result<u32> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_on_cpu1(name, program, &args)?;
        let pid = child.id();
        self.0.push(Proc { name: name.to_owned(), program: program.to_owned(), args, child });
        Ok(pid)
    }

    /// Stops the server with this pid and starts it again the same way; the new pid.
    fn restart(&mut self, pid: u32) -> Result<u32> {
        let p = self.0.iter_mut().find(|p| p.child.id() == pid).context("no such server")?;
        stop(&p.name, &mut p.child, Instant::now() + Duration::from_secs(5));
        p.child = spawn_on_cpu1(&p.name, &p.program, &p.args)?;
        Ok(p.child.id())
    }

    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.0 {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited early ({status})", p.name);
            }
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for p in &self.0 {
            let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.0 {
            stop(&p.name, &mut p.child, deadline);
        }
    }
}

fn spawn_on_cpu1(name: &str, program: &str, args: &[String]) -> Result<Child> {
    Command::new("taskset")
        .args(["-c", "1", program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name} ({program})"))
}

/// SIGTERM (again, harmlessly, if already sent), then SIGKILL at the deadline.
fn stop(name: &str, child: &mut Child, deadline: Instant) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!("{name} did not stop on SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs a load generator on CPU 0 with a hard time limit; its stdout.
fn run_bounded(program: &str, args: &[String], limit: Duration) -> Result<String> {
    let mut child = Command::new("taskset")
        .args(["-c", "0", program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} {} ran over {limit:?}", args.join(" "));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("{program} {} failed ({status}): {err}", args.join(" "));
    }
    Ok(out)
}

/// Pins this process (and so every load generator it starts) to CPU 0; the servers are started
/// on CPU 1.
fn pin_self_to_cpu0() -> Result<()> {
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    ensure!(cpus >= 2, "this benchmark needs 2 CPUs (load generators on 0, servers on 1); {cpus} available");
    let status = Command::new("taskset")
        .args(["-a", "-c", "-p", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux) is needed")?;
    ensure!(status.success(), "taskset -p failed");
    Ok(())
}

/// Raises this process's open-file limit (inherited by every server it starts) to 65536 where
/// allowed (CAP_SYS_RESOURCE), else the soft limit to the hard one; returns the limit in force.
fn raise_nofile() -> u64 {
    let pid = std::process::id().to_string();
    let limits = || -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_owned();
        let f: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (f.first().copied().unwrap_or(1024), f.get(1).copied().unwrap_or(1024))
    };
    let set = |n: u64| {
        Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}:{n}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !set(65536) {
        let (_, hard) = limits();
        eprintln!("could not raise the open-file limit to 65536 here; using the hard limit, {hard}");
        set(hard);
    }
    limits().0
}

// ---------------------------------------------------------------- /proc

/// utime + stime of the processes, in clock ticks.
fn rss_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmRSS:")
}

fn hwm_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmHWM:")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- HTTP by hand

fn request(stream: &mut TcpStream, body_len: usize) -> Result<()> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reader = BufReader::new(&*stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    ensure!(line.starts_with("HTTP/1.1 200"), "unexpected status line {line:?}");
    let mut length = None;
    loop {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "connection closed in the response head");
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let length = length.context("no content-length")?;
    ensure!(length == body_len, "body of {length} bytes, expected {body_len}");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    ensure!(reader.buffer().is_empty(), "extra bytes after the response");
    Ok(())
}

fn wait_ready(port: u16, body: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt =
            TcpStream::connect(("127.0.0.1", port)).map_err(anyhow::Error::from).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                request(&mut s, body.len())
            });
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("port {port} not ready: {e:#}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// N keep-alive connections, one request answered on each, left open and idle.
fn open_idle(port: u16, n: usize) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        ensure!(Instant::now() < deadline, "opening {n} connections took over 120 s");
        let mut s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        request(&mut s, 1024).with_context(|| format!("connection {i}"))?;
        conns.push(s);
    }
    Ok(conns)
}

/// Requests a Weft proxy counted (`weft_requests_total`, from its admin port) with and without
/// TLS.
fn weft_requests_by_tls(admin: u16) -> Result<(u64, u64)> {
    let text = weft_metrics(admin)?;
    let (mut tls, mut plain) = (0, 0);
    for (line, n) in samples(&text, "weft_requests_total{") {
        if line.contains("tls=\"true\"") {
            tls += n;
        } else {
            plain += n;
        }
    }
    Ok((tls, plain))
}

/// Mesh tunnels a Weft inbound accepted (`weft_tls_handshakes_total`, side accept, ok).
fn weft_tunnels_accepted(admin: u16) -> Result<u64> {
    let text = weft_metrics(admin)?;
    let accepted = samples(&text, "weft_tls_handshakes_total{")
        .filter(|(line, _)| line.contains("side=\"accept\"") && line.contains("result=\"ok\""));
    Ok(accepted.map(|(_, n)| n).sum())
}

/// A Weft proxy's `/metrics`, from its admin port.
fn weft_metrics(admin: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", admin))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.take(16 << 20).read_to_string(&mut text)?;
    ensure!(
        text.starts_with("HTTP/1.1 200"),
        "admin :{admin}/metrics: {}",
        text.lines().next().unwrap_or("")
    );
    Ok(text)
}

/// The samples of the series starting with `prefix`: each line with its value.
fn samples<'t>(text: &'t str, prefix: &'t str) -> impl Iterator<Item = (&'t str, u64)> {
    text.lines().filter(move |l| l.starts_with(prefix)).map(|line| {
        let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        (line, n)
    })
}

// ---------------------------------------------------------------- M0

fn pingpong_server(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    while s.read_exact(&mut b).is_ok() {
        if s.write_all(&b).is_err() {
            break;
        }
    }
    Ok(())
}

fn pingpong(port: u16, iterations: usize) -> Result<Value> {
    let addr = format!("127.0.0.1:{port}");
    let me = std::env::current_exe()?;
    let mut server = Procs::default();
    server.start("ping-pong server", me.to_str().context("path")?, &["--pingpong-server", &addr])?;
    let result = pingpong_client(&addr, iterations);
    server.stop_all();
    result
}

fn pingpong_client(addr: &str, iterations: usize) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut b = [7u8; 1];
    let limit = Instant::now() + Duration::from_secs(60);
    let mut rtts = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        if Instant::now() > limit {
            break;
        }
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = s.shutdown(Shutdown::Both);
    let p = Percentiles::of(&rtts).context("no samples")?;
    let p999 = nearest_rank(&rtts, 0.999);
    Ok(
        json!({"samples": p.count, "rtt_us": {"p50": p.p50, "p90": p.p90, "p99": p.p99, "p99.9": p999, "max": p.max}}),
    )
}

// ---------------------------------------------------------------- M1 and M2 tools

/// One fixed-rate oha run: `seconds × rate` requests at `rate` per second over `connections`.
fn oha(
    oha: &Path,
    t: &Target,
    proto: &str,
    rate: u64,
    connections: u64,
    seconds: u64,
    tolerance: Option<f64>,
) -> Result<Value> {
    let port = if proto == "http2" { t.h2 } else { t.h1 };
    let n = rate * seconds;
    let mut args: Vec<String> =
        ["-n", &n.to_string(), "-q", &rate.to_string(), "-c", &connections.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["--latency-correction", "--no-tui", "--output-format", "json"].map(String::from));
    if proto == "http2" {
        args.push("--http2".into());
    }
    args.push(format!("http://127.0.0.1:{port}/"));
    let limit = Duration::from_secs(seconds * 3 + 15);
    let out = run_bounded(oha.to_str().context("path")?, &args, limit)?;
    let raw: Value = serde_json::from_str(&out).with_context(|| format!("oha output: {out}"))?;
    let s = |k: &str| raw["summary"][k].as_f64().unwrap_or(f64::NAN);
    let lat = |k: &str| raw["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1e6;
    let ok = raw["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total_status: u64 = raw["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let errors: u64 =
        raw["errorDistribution"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
    let achieved = s("requestsPerSec");
    let run = json!({
        "target": t.name, "protocol": proto, "requests": n, "ok": ok,
        "non_200": total_status - ok, "errors": errors,
        "achieved_rps": achieved, "total_seconds": s("total"),
        "latency_us": {"p50": lat("p50"), "p90": lat("p90"), "p99": lat("p99"), "p99.9": lat("p99.9"), "max": s("slowest") * 1e6},
        "size_per_request": raw["summary"]["sizePerRequest"],
    });
    if let Some(tolerance) = tolerance {
        ensure!(
            ok == n && errors == 0,
            "{} {proto}: {ok} of {n} answered 200, {errors} errors: {run}",
            t.name
        );
        ensure!(
            achieved >= rate as f64 * (1.0 - tolerance),
            "{} {proto}: achieved {achieved:.0} rps of {rate} (more than {}% short)",
            t.name,
            tolerance * 100.0
        );
    }
    Ok(run)
}

/// One closed-loop wrk run: 1 thread, 64 connections.
fn wrk(port: u16, seconds: u64) -> Result<Value> {
    let args: Vec<String> = ["-t1", "-c64", &format!("-d{seconds}s"), &format!("http://127.0.0.1:{port}/")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = run_bounded("wrk", &args, Duration::from_secs(seconds + 30))?;
    let find =
        |prefix: &str| out.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()));
    let rps: f64 = find("Requests/sec:").context("wrk: no Requests/sec")?.parse()?;
    let requests: u64 = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("wrk: no request count")?;
    let non2xx: u64 = find("Non-2xx or 3xx responses:").map(|v| v.parse().unwrap_or(u64::MAX)).unwrap_or(0);
    let socket_errors = find("Socket errors:").unwrap_or_default();
    ensure!(
        non2xx == 0 && socket_errors.is_empty(),
        "wrk on {port}: {non2xx} non-2xx, socket errors {socket_errors:?}"
    );
    Ok(json!({"rps": rps, "requests": requests, "seconds": seconds, "connections": 64}))
}

/// One closed-loop h2load run over HTTP/2 (h2c): 1 thread, 16 connections, 10 streams each.
fn h2load(port: u16, seconds: u64) -> Result<Value> {
    let args: Vec<String> =
        ["-t1", "-c16", "-m10", "-D", &seconds.to_string(), &format!("http://127.0.0.1:{port}/")]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let out = run_bounded("h2load", &args, Duration::from_secs(seconds + 30))?;
    // "finished in 3.00s, 41234.33 req/s, 44.12MB/s"
    let rps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok())
        .context("h2load: no req/s")?;
    // "requests: N total, N started, N done, N succeeded, 0 failed, 0 errored, 0 timeout"
    let counts =
        out.lines().find_map(|l| l.strip_prefix("requests: ")).context("h2load: no request counts")?;
    let count = |what: &str| {
        counts.split(", ").find_map(|c| c.strip_suffix(what)?.trim().parse::<u64>().ok()).unwrap_or(u64::MAX)
    };
    // "status codes: N 2xx, 0 3xx, 0 4xx, 0 5xx"
    let statuses = out.lines().find_map(|l| l.strip_prefix("status codes: ")).unwrap_or_default();
    let non2xx: u64 = statuses
        .split(", ")
        .filter(|c| !c.ends_with(" 2xx"))
        .map(|c| c.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX))
        .sum();
    let (failed, errored, timeout) = (count(" failed"), count(" errored"), count(" timeout"));
    ensure!(
        failed == 0 && errored == 0 && timeout == 0 && non2xx == 0,
        "h2load on {port}: {failed} failed, {errored} errored, {timeout} timed out, {non2xx} not 2xx"
    );
    Ok(
        json!({"rps": rps, "requests": count(" succeeded"), "seconds": seconds, "connections": 16, "streams_per_connection": 10}),
    )
}

// ---------------------------------------------------------------- summary

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (med, v[0], v[n - 1])
}

const PCTS: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

/// Per target and protocol: each percentile's overhead over direct in the same round.
fn overheads(report: &Value, proto: &str, target: &str) -> BTreeMap<&'static str, (f64, f64, f64)> {
    let runs = report["m1"].as_array().cloned().unwrap_or_default();
    let of = |name: &str, round: u64| {
        runs.iter()
            .find(|r| r["target"] == name && r["protocol"] == proto && r["round"].as_u64() == Some(round))
            .cloned()
    };
    let rounds: Vec<u64> = runs
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    PCTS.iter()
        .map(|&p| {
            let deltas = rounds
                .iter()
                .filter_map(|&r| {
                    Some(
                        of(target, r)?["latency_us"][p].as_f64()?
                            - of("direct", r)?["latency_us"][p].as_f64()?,
                    )
                })
                .collect();
            (p, median_min_max(deltas))
        })
        .collect()
}

fn m1_median(
    report: &Value,
    proto: &str,
    target: &str,
    f: impl Fn(&Value) -> Option<f64>,
) -> (f64, f64, f64) {
    let runs = report["m1"].as_array().cloned().unwrap_or_default();
    median_min_max(
        runs.iter().filter(|r| r["target"] == target && r["protocol"] == proto).filter_map(f).collect(),
    )
}

fn m2_of(report: &Value, proto: &str, target: &str) -> (f64, f64) {
    let runs = report["m2"].as_array().cloned().unwrap_or_default();
    let runs: Vec<&Value> = runs.iter().filter(|r| r["target"] == target && r["protocol"] == proto).collect();
    let rps = median_min_max(runs.iter().filter_map(|r| r["rps"].as_f64()).collect()).0;
    let cores = median_min_max(
        runs.iter().filter_map(|r| Some(r["proxy_cpu_seconds"].as_f64()? / r["seconds"].as_f64()?)).collect(),
    )
    .0;
    (rps, cores)
}

/// Proxy CPU per 1000 rps over all M1 HTTP/1.1 runs of a target: total CPU-seconds over total
/// thousands of requests (one sum, so the 10 ms tick of /proc/<pid>/stat does not dominate).
fn cpu_per_1000(report: &Value, target: &str) -> f64 {
    let runs = report["m1"].as_array().cloned().unwrap_or_default();
    let (cpu, requests) = runs
        .iter()
        .filter(|r| r["target"] == target && r["protocol"] == "http1")
        .filter_map(|r| Some((r["proxy_cpu_seconds"].as_f64()?, r["requests"].as_f64()?)))
        .fold((0.0, 0.0), |(c, n), (dc, dn)| (c + dc, n + dn));
    cpu / (requests / 1000.0)
}

fn summary(report: &Value, targets: &[Target]) -> String {
    let mut s = String::new();
    let set = &report["settings"];
    let mib = |kib: f64| kib / 1024.0;
    let m0 = &report["m0"]["rtt_us"];
    let _ = writeln!(
        s,
        "\n**M0 floor** — TCP ping-pong RTT between the two CPUs, 1 byte ({} samples): p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs.\n",
        report["m0"]["samples"],
        m0["p50"].as_f64().unwrap_or(f64::NAN),
        m0["p90"].as_f64().unwrap_or(f64::NAN),
        m0["p99"].as_f64().unwrap_or(f64::NAN),
        m0["p99.9"].as_f64().unwrap_or(f64::NAN)
    );
    for proto in ["http1", "http2"] {
        let _ = writeln!(
            s,
            "**M1 {}** — {} rps, {} connections, 1 KB, {} rounds of {} s; latency added over direct in the same round, µs, median [min–max]; direct is absolute.\n",
            if proto == "http1" { "HTTP/1.1" } else { "HTTP/2 (h2c, upstream HTTP/1.1)" },
            set["rate"],
            set["connections"],
            set["rounds"],
            set["seconds"]
        );
        let _ = writeln!(s, "| target | p50 | p90 | p99 | p99.9 | achieved rps (min) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for t in targets {
            let cells: Vec<String> = if t.name == "direct" {
                PCTS.iter()
                    .map(|p| {
                        let (m, lo, hi) =
                            m1_median(report, proto, "direct", |r| r["latency_us"][*p].as_f64());
                        format!("{m:.0} [{lo:.0}–{hi:.0}]")
                    })
                    .collect()
            } else {
                let o = overheads(report, proto, t.name);
                PCTS.iter()
                    .map(|p| {
                        let (m, lo, hi) = o[p];
                        format!("{m:+.0} [{lo:+.0}–{hi:+.0}]")
                    })
                    .collect()
            };
            let rate = m1_median(report, proto, t.name, |r| r["achieved_rps"].as_f64()).1;
            let _ = writeln!(s, "| {} | {} | {rate:.0} |", label(t.name), cells.join(" | "));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "**M2–M4** — M2: closed loop for {} s (median of runs): HTTP/1.1 with wrk (1 thread, 64 connections), HTTP/2 with h2load (1 thread, 16 connections × 10 streams); rps per proxy core = rps ÷ proxy CPU cores used. M3: proxy CPU-seconds per 1000 requests over all M1 HTTP/1.1 runs (= vCPU at 1000 rps). M4: RSS, summed over the path's proxy processes; peak = VmHWM.\n",
        set["m2_seconds"]
    );
    let _ = writeln!(
        s,
        "| target | M2 h1 rps | h1 proxy cores | h1 rps per proxy core | M2 h2 rps | h2 rps per proxy core | M3 vCPU per 1000 rps | M4 RSS idle (MiB) | peak RSS after M1 / after M2 (MiB) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let m4 = &report["m4"];
    for t in targets {
        let (rps, cores) = m2_of(report, "http1", t.name);
        let (rps2, cores2) = m2_of(report, "http2", t.name);
        if t.pids.is_empty() {
            let _ = writeln!(s, "| {} | {rps:.0} | – | – | {rps2:.0} | – | – | – | – |", label(t.name));
            continue;
        }
        let kib = |k: &str| m4[k][t.name].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {} | {rps:.0} | {cores:.2} | {:.0} | {rps2:.0} | {:.0} | {:.3} | {:.1} | {:.1} / {:.1} |",
            label(t.name),
            rps / cores,
            rps2 / cores2,
            cpu_per_1000(report, t.name),
            mib(kib("idle_rss_kib")),
            mib(kib("hwm_after_m1_kib")),
            mib(kib("hwm_after_m2_kib")),
        );
    }
    let _ = writeln!(
        s,
        "\nmTLS tunnels Weft's inbound accepted over M1 and M2: {} with an HTTP/1.1 tunnel per request in flight, {} with HTTP/2 between the proxies.",
        report["tunnels_after_m2"]["weft-mtls-chain"], report["tunnels_after_m2"]["weft-mtls-h2-chain"]
    );
    let _ = writeln!(
        s,
        "\n**M4 per idle keep-alive connection** (one request answered on each, then held open and idle for {} s before RSS is read):\n",
        M4_HOLD.as_secs()
    );
    let _ = writeln!(s, "| target | connections | RSS before → after (MiB) | bytes per connection |");
    let _ = writeln!(s, "|---|---|---|---|");
    for c in m4["idle_connections"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} → {:.1} | {:.0} |",
            label(c["target"].as_str().unwrap_or("?")),
            c["connections"],
            mib(c["rss_before_kib"].as_f64().unwrap_or(f64::NAN)),
            mib(c["rss_after_kib"].as_f64().unwrap_or(f64::NAN)),
            c["bytes_per_connection"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(
        s,
        "\n**M5 mTLS handshakes** — full TLS 1.3 handshakes (ECDSA P-256 certificates on both sides, client certificate required, no resumption) against each pair's inbound proxy, {} rustls client threads on CPU 0, {} run(s) of {} s per server; each connection is closed right after the handshake. Per proxy CPU-second: all handshakes ÷ all the server's CPU-seconds; wall rate: median of runs.\n",
        set["m5_workers"], set["m5_rounds"], set["m5_seconds"]
    );
    let _ = writeln!(
        s,
        "| server | handshakes | wall rate (per s) | proxy cores used | handshakes per proxy CPU-second | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for server in ["weft", "haproxy"] {
        let m = m5_of(report, server);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {:.0} | {} |",
            if server == "weft" { "Weft (inbound)" } else { "HAProxy (inbound)" },
            m.handshakes,
            m.wall_rate,
            m.cores,
            m.per_cpu_second,
            m.errors
        );
    }
    let _ = writeln!(s, "\n{}", targets_verdict(report));
    let _ = writeln!(
        s,
        "load average before / after: {} / {}; elapsed {:.0} s",
        report["loadavg_before"].as_str().unwrap_or("?"),
        report["loadavg_after"].as_str().unwrap_or("?"),
        report["elapsed_seconds"].as_f64().unwrap_or(0.0)
    );
    s
}

fn label(name: &str) -> &'static str {
    match name {
        "direct" => "direct (absolute)",
        "haproxy" => "HAProxy 1 hop",
        "nginx" => "nginx 1 hop",
        "weft" => "Weft 1 hop",
        "weft-mtls-chain" => "Weft 2 hops, mTLS",
        "weft-mtls-h2-chain" => "Weft 2 hops, mTLS, HTTP/2 between",
        "haproxy-mtls-chain" => "HAProxy 2 hops, mTLS",
        _ => "?",
    }
}

/// M5 over all runs against one server.
struct M5 {
    handshakes: u64,
    errors: u64,
    wall_rate: f64,
    cores: f64,
    per_cpu_second: f64,
}

fn m5_of(report: &Value, server: &str) -> M5 {
    let runs = report["m5"].as_array().cloned().unwrap_or_default();
    let runs: Vec<&Value> = runs.iter().filter(|r| r["server"] == server).collect();
    let sum = |k: &str| runs.iter().filter_map(|r| r[k].as_f64()).sum::<f64>();
    M5 {
        handshakes: runs.iter().filter_map(|r| r["handshakes"].as_u64()).sum(),
        errors: runs.iter().filter_map(|r| r["errors"].as_u64()).sum(),
        wall_rate: median_min_max(runs.iter().filter_map(|r| r["handshakes_per_second"].as_f64()).collect())
            .0,
        cores: sum("proxy_cpu_seconds") / sum("seconds"),
        // One sum, as for M3, so the 10 ms CPU tick weighs less.
        per_cpu_second: sum("handshakes") / sum("proxy_cpu_seconds"),
    }
}

/// The targets (issue 15, and issue 7's that still stand), judged from this run. The Weft
/// pair judged is the one with the proxy's default tunnel between the proxies.
fn targets_verdict(report: &Value) -> String {
    let mut s = String::from(
        "**Targets** (issue 15; the RSS and M5 rows from issue 7):\n\n| target | this run | verdict |\n|---|---|---|\n",
    );
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let pair =
        if weft_proxy::upstream::DEFAULT_HTTP1_OVER_H2 { "weft-mtls-h2-chain" } else { "weft-mtls-chain" };
    let other = if pair == "weft-mtls-chain" { "weft-mtls-h2-chain" } else { "weft-mtls-chain" };
    for (proto, factor) in [("http1", 1.2), ("http2", 1.0)] {
        let (wr, wc) = m2_of(report, proto, "weft");
        let (hr, hc) = m2_of(report, proto, "haproxy");
        let ratio = (wr / wc) / (hr / hc);
        let _ = writeln!(
            s,
            "| {proto} rps per proxy core ≥ {factor:.1} × HAProxy's (M2) | Weft {:.0} vs HAProxy {:.0} rps/core ({ratio:.2}×) | {} |",
            wr / wc,
            hr / hc,
            verdict(ratio >= factor)
        );
    }
    let m4 = &report["m4"];
    for c in m4["idle_connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["target"] == "weft")
    {
        let b = c["bytes_per_connection"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| ≤ 4 KB per idle keep-alive connection (M4, {}) | {:.1} KB | {} |",
            c["connections"],
            b / 1024.0,
            verdict(b <= 4.0 * 1024.0)
        );
    }
    // An absolute latency target means something only on a quiet floor (performance.md §7).
    let floor = report["m0"]["rtt_us"]["p99"].as_f64().unwrap_or(f64::NAN);
    let quiet = if floor < 100.0 {
        String::new()
    } else {
        format!(" (floor not quiet: M0 p99 {floor:.0} µs, not < 100 µs)")
    };
    let added = |proto: &str, target: &str, p: &str| overheads(report, proto, target)[p].0;
    let (w, h) = (added("http1", pair, "p99"), added("http1", "haproxy-mtls-chain", "p99"));
    let _ = writeln!(
        s,
        "| mTLS pair at 1000 rps, HTTP/1.1 p99 added ≤ 200 µs and below HAProxy's pair (M1) | {} {w:+.0} µs vs HAProxy pair {h:+.0} µs ({} {:+.0} µs) | {}{quiet} |",
        label(pair),
        label(other),
        added("http1", other, "p99"),
        verdict(w <= 200.0 && w < h)
    );
    let cpu = cpu_per_1000(report, pair);
    let _ = writeln!(
        s,
        "| mTLS pair ≤ 0.10 vCPU per 1000 rps (M3) | {} {cpu:.3} vs HAProxy pair {:.3} ({} {:.3}) | {} |",
        label(pair),
        cpu_per_1000(report, "haproxy-mtls-chain"),
        label(other),
        cpu_per_1000(report, other),
        verdict(cpu <= 0.10)
    );
    for p in ["p50", "p99"] {
        let (w, h) = (added("http1", "weft", p), added("http1", "haproxy", p));
        let _ = writeln!(
            s,
            "| one hop, HTTP/1.1 {p} added below HAProxy's (M1) | Weft {w:+.0} µs vs HAProxy {h:+.0} µs | {} |",
            verdict(w < h)
        );
    }
    let idle = m4["idle_rss_kib"]["weft"].as_f64().unwrap_or(f64::NAN) / 1024.0;
    let load = m4["hwm_after_m1_kib"]["weft"].as_f64().unwrap_or(f64::NAN) / 1024.0;
    let _ = writeln!(s, "| RSS ≤ 10 MB idle | {idle:.1} MiB | {} |", verdict(idle <= 10.0));
    let _ =
        writeln!(s, "| RSS ≤ 20 MB at 1000 rps | peak {load:.1} MiB over M1 | {} |", verdict(load <= 20.0));
    let (w, h) = (m5_of(report, "weft").per_cpu_second, m5_of(report, "haproxy").per_cpu_second);
    let _ = writeln!(
        s,
        "| mTLS handshakes per proxy CPU-second ≥ HAProxy's (M5, ECDSA P-256) | Weft {w:.0} vs HAProxy {h:.0} ({:.2}×) | {} |",
        w / h,
        verdict(w >= h)
    );
    s
}

// ---------------------------------------------------------------- provenance

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).trim().to_owned()
        })
        .unwrap_or_default()
}

fn date() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    json!({
        // --all: this process is pinned to one CPU by now.
        "nproc": command_line("nproc", &["--all"]),
        "cpu_model": model,
        "mem_total": mem.lines().next().unwrap_or_default().trim_start_matches("MemTotal:").trim(),
        "kernel": command_line("uname", &["-r"]),
    })
}

fn tools(oha: &Path) -> Value {
    let first = |s: String| s.lines().next().unwrap_or_default().to_owned();
    json!({
        "haproxy": first(command_line("haproxy", &["-v"])),
        "nginx": command_line("nginx", &["-v"]),
        "wrk": first(command_line("wrk", &["-v"])),
        "h2load": command_line("h2load", &["--version"]),
        "oha": command_line(oha.to_str().unwrap_or("oha"), &["--version"]),
        "weft-proxy": command_line("git", &["rev-parse", "--short", "HEAD"]),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{PCTS, cpu_per_1000, m5_of, median_min_max, overheads};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_min_max(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_min_max(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(median_min_max(vec![]).0.is_nan());
    }

    #[test]
    fn overhead_is_taken_against_direct_in_the_same_round() {
        let run = |target: &str, round: u64, p50: f64| {
            let lat: serde_json::Map<String, serde_json::Value> =
                PCTS.iter().map(|p| (p.to_string(), json!(p50))).collect();
            json!({"target": target, "protocol": "http1", "round": round, "latency_us": lat,
                   "requests": 1000.0, "achieved_rps": 1000.0, "proxy_cpu_seconds": 0.1})
        };
        // Direct drifts between rounds; the proxy adds 50, 60, 70 on top of its own round.
        let report = json!({"m1": [
            run("direct", 1, 100.0), run("weft", 1, 150.0),
            run("direct", 2, 300.0), run("weft", 2, 360.0),
            run("direct", 3, 200.0), run("weft", 3, 270.0),
        ]});
        assert_eq!(overheads(&report, "http1", "weft")["p50"], (60.0, 50.0, 70.0));
        // 0.3 CPU-seconds over 3000 requests: 0.1 vCPU at 1000 rps.
        assert!((cpu_per_1000(&report, "weft") - 0.1).abs() < 1e-9);
    }

    #[test]
    fn handshakes_per_cpu_second_sum_all_runs_of_a_server() {
        let run = |server: &str, handshakes: u64, cpu: f64| {
            json!({"server": server, "handshakes": handshakes, "errors": 0, "seconds": 10.0,
                   "handshakes_per_second": handshakes as f64 / 10.0, "proxy_cpu_seconds": cpu})
        };
        let report = json!({"m5": [
            run("weft", 6000, 2.0), run("haproxy", 5000, 8.0), run("weft", 3000, 4.0),
        ]});
        let m = m5_of(&report, "weft");
        // 9000 handshakes over 6 CPU-seconds in 20 s: not the mean of 3000 and 750 per second.
        assert_eq!((m.handshakes, m.errors), (9000, 0));
        assert!((m.per_cpu_second - 1500.0).abs() < 1e-9);
        assert!((m.cores - 0.3).abs() < 1e-9);
        assert!((m.wall_rate - 450.0).abs() < 1e-9);
    }
}
