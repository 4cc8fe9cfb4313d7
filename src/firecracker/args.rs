//! Firecracker's command line, parsed as Firecracker parses it: `--name value` or `--name` alone,
//! each at most once, a value never starting with `--`; anything else is refused with
//! Firecracker's message (and its exit status, 153).

use std::collections::BTreeMap;

/// Firecracker's flags: name, whether it takes a value.
const FLAGS: &[(&str, bool)] = &[
    ("api-sock", true),
    ("id", true),
    ("seccomp-filter", true),
    ("no-seccomp", false),
    ("start-time-us", true),
    ("start-time-cpu-us", true),
    ("parent-cpu-time-us", true),
    ("config-file", true),
    ("metadata", true),
    ("no-api", false),
    ("log-path", true),
    ("level", true),
    ("module", true),
    ("show-level", false),
    ("show-log-origin", false),
    ("metrics-path", true),
    ("boot-timer", false),
    ("version", false),
    ("snapshot-version", false),
    ("describe-snapshot", true),
    ("http-api-max-payload-size", true),
    ("mmds-size-limit", true),
    ("enable-pci", false),
    ("help", false),
];

/// Where Firecracker listens when `--api-sock` is not given.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default `--id`.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// The flags given: name -> value (`None` for a flag without one).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args(BTreeMap<String, Option<String>>);

impl Args {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let unexpected =
            |a: &str| format!("Found argument '{a}' which wasn't expected, or isn't valid in this context.");
        let mut out = BTreeMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg.strip_prefix("--").ok_or_else(|| unexpected(arg))?;
            let &(_, takes_value) = FLAGS.iter().find(|(n, _)| *n == name).ok_or_else(|| unexpected(name))?;
            if out.contains_key(name) {
                return Err(format!("The argument '{name}' was provided more than once."));
            }
            let value = match takes_value {
                true => Some(
                    it.next()
                        .filter(|v| !v.starts_with("--"))
                        .ok_or_else(|| format!("Argument '{name}' did not receive a value."))?
                        .clone(),
                ),
                false => None,
            };
            out.insert(name.to_string(), value);
        }
        let a = Self(out);
        for (x, y) in [("no-seccomp", "seccomp-filter")] {
            if a.flag(x) && a.flag(y) {
                return Err(format!("Argument '{x}' cannot be used together with argument '{y}'."));
            }
        }
        if a.flag("no-api") && !a.flag("config-file") {
            return Err("Argument 'config-file' is required when using 'no-api'.".into());
        }
        Ok(a)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.as_deref())
    }

    /// A numeric value, or the error Firecracker would give.
    pub fn number(&self, name: &str) -> Result<Option<usize>, String> {
        self.value(name)
            .map(|v| v.parse().map_err(|_| format!("'{name}' parameter expected to be of 'usize' type.")))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Args, String> {
        Args::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn firecrackers_command_line_is_read_and_refused_as_firecracker_does() {
        let a = parse(&["--api-sock", "/tmp/fc.sock", "--id", "vm1", "--no-seccomp", "--boot-timer"]).unwrap();
        assert_eq!(
            (a.value("api-sock"), a.value("id"), a.flag("no-seccomp")),
            (Some("/tmp/fc.sock"), Some("vm1"), true)
        );
        assert_eq!(
            parse(&["--colour", "red"]).unwrap_err(),
            "Found argument 'colour' which wasn't expected, or isn't valid in this context."
        );
        assert!(parse(&["api-sock"]).unwrap_err().contains("'api-sock'"));
        assert!(parse(&["--id"]).unwrap_err().contains("did not receive a value"));
        assert!(parse(&["--id", "--no-api"]).unwrap_err().contains("did not receive a value"));
        assert!(parse(&["--id", "a", "--id", "b"]).unwrap_err().contains("more than once"));
        assert!(parse(&["--no-api"]).unwrap_err().contains("config-file"));
        assert!(parse(&["--no-seccomp", "--seccomp-filter", "f"]).unwrap_err().contains("cannot be used together"));
        assert_eq!(
            parse(&["--mmds-size-limit", "x"]).unwrap().number("mmds-size-limit").unwrap_err(),
            "'mmds-size-limit' parameter expected to be of 'usize' type."
        );
    }
}
