//! ember's default guest kernel command line, kept with the guest kernel in guest/kernel/cmdline.

const DEFAULT_CMDLINE_FILE: &str = include_str!("../../../guest/kernel/cmdline");

/// The default command line: guest/kernel/cmdline without its comments, joined with spaces.
pub fn default_cmdline() -> String {
    DEFAULT_CMDLINE_FILE
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cmdline_has_the_console_and_the_workarounds() {
        let c = default_cmdline();
        assert!(c.starts_with("console=ttyS0 "), "{c}");
        assert!(c.contains(" noxsave "), "{c}");
        assert!(c.contains("io_delay=none"), "{c}");
        assert!(!c.contains('#'), "{c}");
        assert!(!c.contains("  "), "{c}");
    }
}
