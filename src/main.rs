//! The `redcloak` command line: `serve`, `check-config`, `hash-password`,
//! `keys` and `reencrypt`.
//!
//! Everything here is start-up and signal plumbing; the proxy itself lives in
//! the library. Errors end the process with one line on standard error and
//! a non-zero exit code.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use redcloak::audit::Audit;
use redcloak::auth::{self, Authenticator};
use redcloak::config::{self, Settings, UpstreamMode};
use redcloak::detection::Monitor;
use redcloak::keyring::{self, KeyringFile, Sealer};
use redcloak::keys_cli::{self, KeysCommand};
use redcloak::leakage::Leakage;
use redcloak::lockout::Lockout;
use redcloak::metrics::{self, Metrics};
use redcloak::reencrypt;
use redcloak::session::{self, Encryption, SessionLimits, Shared};
use redcloak::tls::{ServerTls, UpstreamTls};
use redcloak::upstream::{Cluster, Connector};
use redcloak::workers::{LinkSettings, Workers};
use redcloak::{listener, shutdown};

#[derive(Parser)]
#[command(
    name = "redcloak",
    version,
    about = "A Redis proxy that isolates projects and seals values"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Log line format on standard error (levels by RUST_LOG).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration, print its security level and warnings.
    CheckConfig {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Read a password (one line) from standard input and print its hash.
    HashPassword {
        /// PBKDF2 iterations; lower only for tests.
        #[arg(long, default_value_t = auth::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
    /// Create, rotate, list and prune keyring files.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Rewrite values sealed under old keys with the current key, online.
    Reencrypt {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Only this project (old keys are then never marked retired).
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve { config, log_format } => serve(&config, log_format),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashPassword { iterations } => hash_password(iterations),
        Command::Keys { command } => keys_cli::run(command),
        Command::Reencrypt { config, project } => reencrypt(&config, project.as_deref()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redcloak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn environment() -> HashMap<String, String> {
    config::process_env()
}

fn load(path: &Path) -> anyhow::Result<Settings> {
    Ok(config::load(path, &environment())?)
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let settings = load(path)?;
    Authenticator::new(&settings.users, 1)?;
    if let Some(tls) = &settings.server.tls {
        ServerTls::new(tls).context("server.tls")?;
    }
    UpstreamTls::from_settings(&settings.upstream).context("upstream.tls")?;
    println!("configuration ok: {}", path.display());
    println!("security level: {}", settings.security_level());
    for warning in settings.warnings() {
        println!("warning: {warning}");
    }
    Ok(())
}

fn hash_password(iterations: u32) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    println!("{}", auth::hash_password_line(&line, iterations)?);
    Ok(())
}

fn reencrypt(path: &Path, project: Option<&str>) -> anyhow::Result<()> {
    let settings = load(path)?;
    let progress = std::io::stderr().is_terminal();
    let summary = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(reencrypt::run(&settings, project, progress))?;
    println!("{summary}");
    if summary.failures > 0 {
        anyhow::bail!(
            "{} values could not be re-encrypted; old keys stay in use",
            summary.failures
        );
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(path: &Path, log_format: LogFormat) -> anyhow::Result<()> {
    init_logging(log_format);
    let settings = load(path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(path.to_path_buf(), settings))
}

async fn run(path: PathBuf, settings: Settings) -> anyhow::Result<()> {
    info!(
        listen = %settings.server.listen,
        upstream = %settings.upstream.address,
        users = settings.users.len(),
        security_level = %settings.security_level(),
        "starting redcloak"
    );
    let warnings = settings.warnings();
    for warning in &warnings {
        warn!("{warning}");
    }

    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(&settings.audit, Arc::clone(&metrics)).context("audit.path")?;
    if audit.is_enabled() {
        info!(
            path = %settings.audit.path,
            access_logging = settings.audit.access_logging,
            "audit log open"
        );
    }

    let auth = Authenticator::new(&settings.users, auth::default_verification_concurrency())?;
    let limits = SessionLimits {
        max_request_bytes: settings.server.max_request_bytes,
        idle_timeout: (settings.server.idle_timeout_secs > 0)
            .then(|| Duration::from_secs(settings.server.idle_timeout_secs)),
        request_timeout: (settings.server.request_timeout_secs > 0)
            .then(|| Duration::from_secs(settings.server.request_timeout_secs)),
        upstream_timeout: (settings.upstream.request_timeout_ms > 0)
            .then(|| Duration::from_millis(settings.upstream.request_timeout_ms)),
        project_isolation: settings.server.project_isolation,
    };
    let encryption = encryption(&settings, &metrics)?;
    if let Some(e) = &encryption {
        info!(
            current_key = e.sealer.keyring().current_id(),
            "encryption on"
        );
    }
    let server_tls = match &settings.server.tls {
        Some(tls) => {
            info!(
                client_certificates = tls.client_ca.is_some(),
                "tls listener"
            );
            Some(Arc::new(ServerTls::new(tls).context("server.tls")?))
        }
        None => None,
    };
    let mut connector = Connector::new(&settings.upstream);
    if let Some(tls) = UpstreamTls::from_settings(&settings.upstream).context("upstream.tls")? {
        info!(server_name = %tls.server_name(), "tls to the upstream");
        connector = connector.with_tls(Arc::new(tls));
    }
    let cluster = match settings.upstream.mode {
        UpstreamMode::Single => None,
        UpstreamMode::Cluster => {
            let cluster = Cluster::new(connector.clone(), settings.upstream.nodes.clone());
            // Serving starts either way: requests wait for the map (and
            // get CLUSTERDOWN if it never comes), as they would in Redis.
            if cluster.refresh().await {
                info!(
                    masters = cluster.map().masters().len(),
                    "cluster slot map learned"
                );
            } else {
                let why = cluster.unavailable_reason().unwrap_or_default();
                warn!(error = %why, "no seed node answered CLUSTER SLOTS; retrying in the background");
            }
            tokio::spawn(Arc::clone(&cluster).keep_fresh());
            Some(cluster)
        }
    };
    let lockout = lockout(&settings, connector.tls(), cluster.as_ref());
    let monitor = Monitor::new(audit, metrics, lockout, &settings.detection);
    monitor.config_warnings(&warnings);
    let leakage = Leakage::new(&settings);
    let mut shared = Shared::new(auth, connector, limits, encryption, monitor, leakage);
    if let Some(cluster) = &cluster {
        shared = shared.with_cluster(Arc::clone(cluster));
    }
    let shared = Arc::new(shared);
    shared.set_script_projects(script_projects(&settings));

    let signals = Signals::install()?;
    let socket = TcpListener::bind(&settings.server.listen)
        .await
        .with_context(|| format!("listening on {}", settings.server.listen))?;
    info!(addr = %socket.local_addr()?, "listening");

    let (trigger, shutdown) = shutdown::channel();
    if let Some(listen) = &settings.metrics.listen {
        let socket = TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics.listen: listening on {listen}"))?;
        info!(metrics.addr = %socket.local_addr()?, "metrics endpoint ready");
        let metrics = Arc::clone(shared.monitor.metrics());
        tokio::spawn(metrics::serve(socket, metrics, shutdown.clone()));
    }
    let rotation = (settings.encryption.enabled && settings.encryption.rotation_interval_secs > 0)
        .then(|| {
            tokio::spawn(rotate_periodically(
                path.clone(),
                Arc::clone(&shared),
                Duration::from_secs(settings.encryption.rotation_interval_secs),
            ))
        });
    let signals = tokio::spawn(watch_signals(
        signals,
        path,
        Arc::clone(&shared),
        server_tls.clone(),
        trigger,
    ));
    let workers = Workers::start(
        settings.server.workers,
        &LinkSettings {
            connector: &shared.upstream,
            cluster: cluster.as_ref(),
            count: settings.upstream.shared_links,
            reply_limits: session::reply_limits(&shared.limits),
            reply_timeout: shared.limits.upstream_timeout,
        },
    )
    .context("starting the worker threads")?;
    info!(
        workers = workers.len(),
        shared_links = settings.upstream.shared_links,
        "workers started"
    );
    listener::serve(
        socket,
        workers,
        Arc::clone(&shared),
        server_tls,
        settings.server.max_connections,
        shutdown,
        Duration::from_secs(settings.server.shutdown_timeout_secs),
    )
    .await;
    signals.abort();
    if let Some(rotation) = rotation {
        rotation.abort();
    }
    shared.monitor.audit().close().await;
    info!("shutdown finished");
    Ok(())
}

/// The signals the proxy acts on. They are registered before the proxy
/// reports that it is listening: until then SIGHUP keeps its default action,
/// which ends the process, so a reload sent right after start-up would kill
/// it.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// SIGTERM and SIGINT announce shutdown; SIGHUP reloads the users, the
/// keyring, the leakage policies and the certificates, and reopens the audit
/// log (for log rotation).
async fn watch_signals(
    mut signals: Signals,
    path: PathBuf,
    shared: Arc<Shared>,
    server_tls: Option<Arc<ServerTls>>,
    trigger: shutdown::Trigger,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => {
                // Reopened first, so that after a rotation the reload's
                // own events land in the fresh file.
                shared.monitor.audit().reopen().await;
                reload(&path, &shared);
                reload_certificates(&path, server_tls.as_deref(), &shared);
            }
        }
    }
    info!("shutdown signal received");
    trigger.fire();
}

/// Failed-login lockout, with counters in the upstream when
/// `audit.lockout_shared` is set (over its own links, with the same TLS).
fn lockout(
    settings: &Settings,
    tls: Option<&Arc<UpstreamTls>>,
    cluster: Option<&Arc<Cluster>>,
) -> Lockout {
    let lockout = Lockout::new(&settings.audit);
    if !settings.audit.lockout_shared {
        return lockout;
    }
    info!("lockout counters are shared through the upstream");
    if let Some(cluster) = cluster {
        return lockout.shared_through_cluster(Arc::clone(cluster));
    }
    let mut connector = Connector::new(&settings.upstream);
    if let Some(tls) = tls {
        connector = connector.with_tls(Arc::clone(tls));
    }
    lockout.shared_through(connector)
}

/// The sealing settings, or `None` when encryption is off.
fn encryption(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Option<Encryption>> {
    let enc = &settings.encryption;
    if !enc.enabled {
        return Ok(None);
    }
    let keyring = keyring::load_configured(enc).context("loading the keyring")?;
    let strict_projects = settings
        .projects
        .iter()
        .filter_map(|(name, project)| project.strict.map(|strict| (name.clone(), strict)))
        .collect();
    Ok(Some(Encryption {
        sealer: Arc::new(
            Sealer::new(keyring, enc.compression_threshold, false)
                .with_counters(metrics.seal_counters()),
        ),
        strict: enc.strict,
        strict_projects,
    }))
}

/// The projects whose configuration allows scripts.
fn script_projects(settings: &Settings) -> HashSet<String> {
    settings
        .projects
        .iter()
        .filter(|(_, project)| project.allow_scripts)
        .map(|(name, _)| name.clone())
        .collect()
}

/// Every `interval`, adds a fresh key to the keyring file, makes it current
/// and reloads, so new writes use it at once.
async fn rotate_periodically(path: PathBuf, shared: Arc<Shared>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        ticks.tick().await;
        let rotated = load(&path).and_then(|settings| match &settings.encryption.keyring {
            Some(file) => {
                let passphrase = keyring::passphrase_from_env();
                let file = KeyringFile::new(file);
                let file = match passphrase.as_deref() {
                    Some(passphrase) => file.with_passphrase(passphrase),
                    None => file,
                };
                Ok(file.rotate()?)
            }
            None => {
                anyhow::bail!("rotation needs a keyring file; CACHE_ENCRYPTION_KEY can't rotate")
            }
        });
        match rotated {
            Ok(keyring) => {
                info!(current_key = keyring.current_id(), "keyring rotated");
                reload(&path, &shared);
            }
            Err(e) => warn!(error = %format!("{e:#}"), "keyring rotation failed"),
        }
    }
}

/// Re-reads the configuration and swaps in its users, keyring and leakage
/// policies; a new current key is audited as `key_rotated`. A broken file
/// leaves the running settings untouched. Audit, lockout, detection and
/// metrics settings need a restart.
fn reload(path: &Path, shared: &Shared) {
    let current_key = |encryption: Option<&Encryption>| {
        encryption.map(|e| e.sealer.keyring().current_id().to_owned())
    };
    let previous = current_key(shared.encryption().as_deref());
    let outcome = load(path).and_then(|settings| {
        let encryption = encryption(&settings, shared.monitor.metrics())?;
        shared.auth.reload(&settings.users)?;
        let current = current_key(encryption.as_ref());
        shared.replace_encryption(encryption);
        shared.set_script_projects(script_projects(&settings));
        shared.leakage.reload(&settings);
        if let (Some(previous), Some(current)) = (previous, current)
            && previous != current
        {
            shared.monitor.key_rotated(&previous, &current);
        }
        Ok(())
    });
    match outcome {
        Ok(()) => info!("configuration reloaded"),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "reload failed; keeping the running configuration")
        }
    }
}

/// Loads the TLS certificates and keys again, for handshakes from now on;
/// open connections keep theirs. Each side keeps its running files if its
/// new ones are unusable. Adding or removing a TLS section needs a restart.
fn reload_certificates(path: &Path, server_tls: Option<&ServerTls>, shared: &Shared) {
    let settings = match load(path) {
        Ok(settings) => settings,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "certificate reload failed; keeping the running ones");
            return;
        }
    };

    match (server_tls, &settings.server.tls) {
        (Some(tls), Some(files)) => match tls.reload(files) {
            Ok(()) => info!("server certificates reloaded"),
            Err(e) => {
                warn!(error = %e, "server certificate reload failed; keeping the running ones")
            }
        },
        (None, None) => {}
        _ => warn!("server.tls was added or removed: restart the proxy to apply it"),
    }

    let upstream_tls = settings.upstream.tls.as_ref().is_some_and(|t| t.enabled);
    match shared.upstream.tls() {
        Some(tls) if upstream_tls => match tls.reload_from(&settings.upstream) {
            Ok(()) => info!("upstream certificates reloaded"),
            Err(e) => {
                warn!(error = %e, "upstream certificate reload failed; keeping the running ones")
            }
        },
        None if !upstream_tls => {}
        _ => warn!("upstream.tls was turned on or off: restart the proxy to apply it"),
    }
}
