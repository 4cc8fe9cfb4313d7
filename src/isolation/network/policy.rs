//! A function's network policy (`network` in a registration) and the checks that need nothing
//! but the policy itself. Checks against the host (does it have the egress address?) and against
//! other functions (overlapping subnets, tunnel ids) are the network thread's, at registration.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{GUEST_LINK, TRANSIT};

/// What a function's clones may reach. Without a `network` a clone has no network card at all;
/// with one, each clone gets a card whose traffic leaves through a network namespace of its own
/// (the guest's address is the same in every clone), and only what the policy names is reachable:
/// never another clone, nor the host's own addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Public egress: everything beyond the host, NATed to the host's address on the way out.
    #[serde(default)]
    pub egress: bool,
    /// Egress with this source address (one of the host's addresses) for every clone of the
    /// function, so that a peer can allow-list it. Implies `egress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<Ipv4Addr>,
    /// A private network (the tenant's) reached through a tunnel to its proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<PrivateNetwork>,
    /// With egress: networks beyond the host that are not public (see [`NOT_PUBLIC`]: private,
    /// link-local such as cloud instance metadata, shared, loopback, multicast) which clones may
    /// reach all the same, `ADDR/PREFIX` each. Egress reaches public addresses only otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
}

/// Destinations that egress does not reach unless a function's `egress_allow` names them: what is
/// not the public internet (RFC 1918 private networks, link-local with cloud instance metadata at
/// 169.254.169.254, shared address space, loopback, "this network", multicast and reserved).
pub const NOT_PUBLIC: [Net; 9] = [
    Net::new(Ipv4Addr::new(0, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(10, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(100, 64, 0, 0), 10),
    Net::new(Ipv4Addr::new(127, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(169, 254, 0, 0), 16),
    Net::new(Ipv4Addr::new(172, 16, 0, 0), 12),
    Net::new(Ipv4Addr::new(192, 168, 0, 0), 16),
    Net::new(Ipv4Addr::new(224, 0, 0, 0), 4),
    Net::new(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// A private network behind a VXLAN tunnel: traffic to `subnet` goes through the function's
/// tunnel to `proxy`, leaving with `address` (the function's address in that network).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateNetwork {
    /// The tenant's subnet, `ADDR/PREFIX` (prefix 8 to 30).
    pub subnet: String,
    /// The tunnel's far end: the proxy's address, reachable from the host.
    pub proxy: Ipv4Addr,
    /// The VXLAN network identifier (1 to 16777215; distinct per function on one host).
    #[serde(default = "default_vni")]
    pub vni: u32,
    /// The function's address inside `subnet` (default: the subnet's last usable address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
}

fn default_vni() -> u32 {
    1
}

/// An IPv4 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Net {
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        Self { addr, prefix }
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.base())
    }

    pub fn overlaps(&self, other: &Net) -> bool {
        self.contains(other.base()) || other.contains(self.base())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base()) | !self.mask())
    }

    /// The last address before the broadcast address.
    pub fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.broadcast()) - 1)
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base(), self.prefix)
    }
}

impl PrivateNetwork {
    /// The subnet, parsed (checked by [`NetworkPolicy::validate`]).
    pub fn net(&self) -> Result<Net, String> {
        let (addr, prefix) = crate::config::parse_cidr(&self.subnet)?;
        Ok(Net::new(addr, prefix))
    }

    /// The function's address in the subnet.
    pub fn own_address(&self) -> Result<Ipv4Addr, String> {
        Ok(self.address.unwrap_or(self.net()?.last_host()))
    }
}

impl NetworkPolicy {
    /// Whether clones leave for the public side.
    pub fn has_egress(&self) -> bool {
        self.egress || self.egress_ip.is_some()
    }

    /// `egress_allow`, parsed (checked by [`NetworkPolicy::validate`]).
    pub fn allowed(&self) -> Result<Vec<Net>, String> {
        self.egress_allow
            .iter()
            .map(|a| {
                let (addr, prefix) =
                    crate::config::parse_cidr(a).map_err(|e| format!("network.egress_allow {a:?}: {e}"))?;
                Ok(Net::new(addr, prefix))
            })
            .collect()
    }

    /// Checks what needs nothing but the policy.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(ip) = self.egress_ip {
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
                return Err(format!("network.egress_ip: {ip} cannot be a source address"));
            }
        }
        if !self.egress_allow.is_empty() && !self.has_egress() {
            return Err("network.egress_allow needs egress".into());
        }
        if self.egress_allow.len() > 64 {
            return Err("network.egress_allow: at most 64 networks".into());
        }
        for net in self.allowed()? {
            for (what, ours) in [("clones' transit range", TRANSIT), ("guests' own link", GUEST_LINK)] {
                if net.overlaps(&ours) {
                    return Err(format!("network.egress_allow {net} overlaps ember's {what} {ours}"));
                }
            }
        }
        if let Some(p) = &self.private {
            let net = p.net().map_err(|e| format!("network.private.subnet {:?}: {e}", p.subnet))?;
            if !(8..=30).contains(&net.prefix) {
                return Err(format!("network.private.subnet {:?}: the prefix must be 8 to 30", p.subnet));
            }
            for (what, ours) in [("clones' transit range", TRANSIT), ("guests' own link", GUEST_LINK)] {
                if net.overlaps(&ours) {
                    return Err(format!("network.private.subnet {net} overlaps ember's {what} {ours}"));
                }
            }
            if !(1..1 << 24).contains(&p.vni) {
                return Err(format!("network.private.vni: {}, expected 1 to 16777215", p.vni));
            }
            let own = p.own_address()?;
            if !net.contains(own) || own == net.base() || own == net.broadcast() {
                return Err(format!("network.private.address {own} is not a host address of {net}"));
            }
            if net.contains(p.proxy) {
                return Err(format!(
                    "network.private.proxy {} is inside the private subnet {net}: the proxy is the tunnel's \
                     far end, reachable from the host",
                    p.proxy
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(subnet: &str) -> NetworkPolicy {
        NetworkPolicy {
            private: Some(PrivateNetwork {
                subnet: subnet.into(),
                proxy: Ipv4Addr::new(198, 51, 100, 2),
                vni: 7,
                address: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn networks_overlap_and_contain() {
        let a = Net::new(Ipv4Addr::new(10, 50, 0, 9), 24);
        assert_eq!(a.to_string(), "10.50.0.0/24");
        assert_eq!(a.last_host(), Ipv4Addr::new(10, 50, 0, 254));
        assert!(a.overlaps(&Net::new(Ipv4Addr::new(10, 0, 0, 0), 8)));
        assert!(!a.overlaps(&Net::new(Ipv4Addr::new(10, 51, 0, 0), 24)));
    }

    #[test]
    fn policies_are_checked() {
        assert!(NetworkPolicy::default().validate().is_ok());
        assert!(private("10.50.0.0/24").validate().is_ok());
        assert_eq!(private("10.50.0.0/24").private.unwrap().own_address().unwrap(), Ipv4Addr::new(10, 50, 0, 254));
        for (bad, why) in [
            ("10.50.0.0", "ADDR/PREFIX"),
            ("10.50.0.0/31", "8 to 30"),
            ("10.0.0.0/8", "transit"),
            ("172.16.0.0/24", "guests' own link"),
        ] {
            let e = private(bad).validate().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let mut p = private("10.50.0.0/24");
        p.private.as_mut().unwrap().address = Some(Ipv4Addr::new(10, 50, 0, 255));
        assert!(p.validate().unwrap_err().contains("not a host address"));
        p.private.as_mut().unwrap().address = Some(Ipv4Addr::new(10, 60, 0, 1));
        assert!(p.validate().is_err());
        let mut p = private("10.50.0.0/24");
        p.private.as_mut().unwrap().proxy = Ipv4Addr::new(10, 50, 0, 3);
        assert!(p.validate().unwrap_err().contains("inside the private subnet"));
        let mut p = private("10.50.0.0/24");
        p.private.as_mut().unwrap().vni = 1 << 24;
        assert!(p.validate().unwrap_err().contains("vni"));
        let e = NetworkPolicy { egress_ip: Some(Ipv4Addr::UNSPECIFIED), ..Default::default() }.validate();
        assert!(e.unwrap_err().contains("egress_ip"));
        let allow = |nets: &[&str], egress| NetworkPolicy {
            egress,
            egress_allow: nets.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(allow(&["10.60.0.0/24"], true).allowed().unwrap(), [Net::new(Ipv4Addr::new(10, 60, 0, 0), 24)]);
        assert!(allow(&["10.60.0.0/24"], false).validate().unwrap_err().contains("needs egress"));
        assert!(allow(&["10.60.0.0"], true).validate().unwrap_err().contains("egress_allow"));
        assert!(allow(&["10.0.0.0/8"], true).validate().unwrap_err().contains("transit"));
        assert!(allow(&["169.254.169.254/32"], true).validate().is_ok());
        let json: NetworkPolicy = serde_json::from_str(r#"{"egress": true}"#).unwrap();
        assert!(json.has_egress());
        assert!(serde_json::from_str::<NetworkPolicy>(r#"{"egres": true}"#).is_err());
    }
}
