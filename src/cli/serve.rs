//! `ember serve`: the pool supervisor and its Unix-socket API. Its settings come from the command
//! line and, with `--config FILE`, from a TOML file whose keys are the flags' long names (with
//! `_` for `-`); a flag given on the command line wins over the file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Settings from a TOML file: a key per flag below, named as the flag with `_` for `-`
    /// (`socket = "/run/ember.sock"`, `images = ["/srv/images"]`, ...). Flags given here win; an
    /// unknown key is an error.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective settings (the file's, the flags', the defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// The Unix socket to serve on (required, here or in the file).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where registrations, templates and clones' channels live (default: $XDG_STATE_HOME/ember or
    /// ~/.local/state/ember).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A directory registrations may take their kernel and initramfs from (repeatable): a
    /// registration names a file in one by absolute path or relative to it; nothing outside, and
    /// no symlink, is ever opened. Without one, every registration is refused. ember's own
    /// runtime layers are provided from the trees setup built in one (`layers/python3`).
    #[arg(long = "images", value_name = "DIR")]
    images: Vec<PathBuf>,
    /// Where clones run: `jail` (a worker process per function, jailed: namespaces, its own root
    /// and uid, no capabilities, a cgroup; needs root), `process` (a worker process per function,
    /// not jailed, under the daemon's own uid), `none` (in the daemon itself). Default: `jail` as
    /// root, else `process`.
    #[arg(long, value_name = "MODE")]
    isolation: Option<Isolation>,
    /// The first of the 65536 uids (and gids) jailed workers run as, each its own: none may be an
    /// account's, a group's or inside a subordinate id range of /etc/subuid or /etc/subgid
    /// (checked at start). Default: 7143424 (0x6d0000).
    #[arg(long, value_name = "UID")]
    worker_uid_base: Option<u32>,
    /// How networked clones' public egress leaves this host: `masquerade` (with the host's own
    /// address, the default), or `routed` (with each clone's own transit address in
    /// 10.199.0.0/16, which the network beyond this host routes back here). A function's
    /// `egress_ip` applies either way.
    #[arg(long, value_name = "MODE")]
    egress_nat: Option<EgressNat>,
    /// Threads that serve the HTTP API, 1 to 64 (default 1: what may take long goes to a blocking
    /// pool; lean-protocol connections have threads of their own; with more, each request also
    /// wakes another to look for work).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    api_threads: Option<usize>,
    /// The log's format on stderr: `text` (the default) or `json` (one object per line, with the
    /// fields of the line, e.g. function, version, clone, request_id, at the top level). Workers
    /// log in the same format.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EgressNat {
    Masquerade,
    Routed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Isolation {
    Jail,
    Process,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl Isolation {
    pub(crate) fn resolve(mode: Option<Self>) -> Result<ember::isolation::worker::Isolation, String> {
        use ember::isolation::worker::Isolation as I;
        Ok(match mode {
            None => I::default_for_this_user(),
            Some(Self::Jail) if I::default_for_this_user() != I::Jail => {
                return Err("--isolation jail needs root (to create namespaces, mount and change uids)".into())
            }
            Some(Self::Jail) => I::Jail,
            Some(Self::Process) => I::Process,
            Some(Self::None) => I::None,
        })
    }

    fn of(i: ember::isolation::worker::Isolation) -> Self {
        use ember::isolation::worker::Isolation as I;
        match i {
            I::Jail => Self::Jail,
            I::Process => Self::Process,
            I::None => Self::None,
        }
    }
}

/// The settings, as a file has them (every key optional; `--print-config` writes them whole).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    images: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<Isolation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_uid_base: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egress_nat: Option<EgressNat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

impl Settings {
    /// Reads a settings file; an unknown key, a bad value or bad TOML is an error naming it.
    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| format!("--config {}: {}", path.display(), e.to_string().trim().replace('\n', " ")))
    }

    /// These settings with `over`'s on top (what `over` sets wins; its `images`, when it has
    /// any, replace these).
    fn overridden(self, over: Settings) -> Self {
        Self {
            socket: over.socket.or(self.socket),
            state_dir: over.state_dir.or(self.state_dir),
            images: if over.images.is_empty() { self.images } else { over.images },
            isolation: over.isolation.or(self.isolation),
            worker_uid_base: over.worker_uid_base.or(self.worker_uid_base),
            egress_nat: over.egress_nat.or(self.egress_nat),
            api_threads: over.api_threads.or(self.api_threads),
            log_format: over.log_format.or(self.log_format),
        }
    }

    /// Every setting given a value (the defaults for those left out) and checked.
    fn effective(self) -> Result<Self, String> {
        let socket = self.socket.ok_or("no socket: give --socket PATH (or `socket` in the --config file)")?;
        let threads = self.api_threads.unwrap_or(ember::serve::DEFAULT_API_THREADS);
        if !(1..=64).contains(&threads) {
            return Err(format!("api_threads {threads} is not in 1..=64"));
        }
        Ok(Self {
            socket: Some(socket),
            state_dir: Some(self.state_dir.map(Ok).unwrap_or_else(default_state_dir)?),
            images: self.images,
            isolation: Some(Isolation::of(Isolation::resolve(self.isolation)?)),
            worker_uid_base: Some(self.worker_uid_base.unwrap_or(ember::isolation::worker::DEFAULT_UID_BASE)),
            egress_nat: Some(self.egress_nat.unwrap_or(EgressNat::Masquerade)),
            api_threads: Some(threads),
            log_format: Some(self.log_format.unwrap_or(LogFormat::Text)),
        })
    }
}

fn default_state_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("ember"));
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set; give --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/ember"))
}

impl ServeArgs {
    /// The effective settings: the file's (if any) under the command line's, then the defaults.
    pub(crate) fn settings(&self) -> Result<Settings, String> {
        let file = match &self.config {
            Some(p) => Settings::read(p)?,
            None => Settings::default(),
        };
        let flags = Settings {
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            images: self.images.clone(),
            isolation: self.isolation,
            worker_uid_base: self.worker_uid_base,
            egress_nat: self.egress_nat,
            api_threads: self.api_threads,
            log_format: self.log_format,
        };
        file.overridden(flags).effective()
    }

    /// Whether the log should be JSON (known before the rest is checked: errors are printed
    /// either way).
    pub(crate) fn json_log(&self) -> bool {
        self.settings().is_ok_and(|s| s.log_format == Some(LogFormat::Json))
    }
}

pub(crate) fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    let s = args.settings()?;
    if args.print_config {
        print!("{}", toml::to_string(&s).map_err(|e| e.to_string())?);
        return Ok(ExitCode::SUCCESS);
    }
    // Checked by `effective`: every field is set.
    let (Some(socket), Some(dir), Some(isolation), Some(uid_base), Some(nat), Some(threads)) =
        (s.socket, s.state_dir, s.isolation, s.worker_uid_base, s.egress_nat, s.api_threads)
    else {
        return Err("incomplete settings".into());
    };
    let isolation = Isolation::resolve(Some(isolation))?;
    let cfg = ember::serve::DaemonConfig {
        images: s.images,
        isolation,
        worker_uid_base: uid_base,
        network: Some(nat == EgressNat::Masquerade),
        api_threads: threads,
        ..ember::serve::DaemonConfig::new(&socket, &dir)
    };
    ember::serve::run(&cfg)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settings_file_is_read_whole_and_the_flags_win() {
        let file: Settings = toml::from_str(
            "socket = \"/run/a.sock\"\nimages = [\"/srv/images\"]\napi_threads = 2\nisolation = \"process\"\n\
             egress_nat = \"routed\"\nlog_format = \"json\"\nworker_uid_base = 8000000\nstate_dir = \"/var/lib/ember\"\n",
        )
        .unwrap();
        let flags = Settings { socket: Some("/tmp/b.sock".into()), api_threads: Some(3), ..Default::default() };
        let s = file.overridden(flags).effective().unwrap();
        assert_eq!(s.socket.as_deref(), Some(Path::new("/tmp/b.sock")));
        assert_eq!((s.api_threads, s.worker_uid_base), (Some(3), Some(8_000_000)));
        assert_eq!(s.images, [PathBuf::from("/srv/images")]);
        assert_eq!(
            (s.egress_nat, s.log_format, s.isolation),
            (Some(EgressNat::Routed), Some(LogFormat::Json), Some(Isolation::Process))
        );
        // What --print-config writes reads back as the same settings.
        let again: Settings = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        for (text, needle) in [
            ("sockt = \"/a\"", "sockt"),
            ("api_threads = \"many\"", "api_threads"),
            ("isolation = \"vm\"", "isolation"),
            ("socket = ", "--config"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("ember.toml");
            std::fs::write(&p, text).unwrap();
            let e = Settings::read(&p).unwrap_err();
            assert!(e.contains(needle) && !e.contains('\n'), "{text}: {e}");
        }
        let e = Settings { api_threads: Some(0), socket: Some("/a".into()), ..Default::default() }.effective();
        assert!(e.unwrap_err().contains("api_threads"));
        assert!(Settings::default().effective().unwrap_err().contains("--socket"));
    }
}
