//! The guest's network interface, configured before the snapshot point from the command line's
//! `ember_net=ADDR/PREFIX[,GATEWAY]` (an environment variable of init): `lo` and `eth0` up, the
//! address on `eth0`, a default route through the gateway. Every clone of the snapshot wakes up
//! with this configuration; the host gives each one a network of its own behind it.

use std::io;
use std::net::Ipv4Addr;

const IFNAMSIZ: usize = 16;

/// `struct ifreq` with the parts used here (an address or the flags), padded to its size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

/// `struct rtentry` (x86-64 layout).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr_in,
    rt_gateway: libc::sockaddr_in,
    rt_genmask: libc::sockaddr_in,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// What `ember_net` asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// Parses `ADDR/PREFIX[,GATEWAY]`.
pub fn parse(s: &str) -> Option<Config> {
    let (cidr, gw) = match s.split_once(',') {
        Some((c, g)) => (c, Some(g.parse().ok()?)),
        None => (s, None),
    };
    let (addr, prefix) = cidr.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some(Config { addr: addr.parse().ok()?, prefix, gateway: gw })
}

/// Configures the interfaces when the command line asks; what was done, for the console.
pub fn configure() -> io::Result<Option<String>> {
    let Ok(spec) = std::env::var("ember_net") else { return Ok(None) };
    let c = parse(&spec).ok_or_else(|| io::Error::other(format!("bad ember_net={spec:?}")))?;
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = apply(fd, &c);
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    r?;
    warm_up();
    let gw = c.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    Ok(Some(format!("eth0 {}/{}{gw}", c.addr, c.prefix)))
}

/// A guest kernel's first TCP connection and first UDP datagram set up state it keeps (one-time
/// random keys behind static branches, whose code patching an emulated guest kernel takes seconds
/// over): done here, before the snapshot point, every clone starts with them ready. To the
/// loopback's discard port, refused at once.
fn warm_up() {
    let _ = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
        std::time::Duration::from_secs(30),
    );
    if let Ok(u) = std::net::UdpSocket::bind("127.0.0.1:0") {
        let _ = u.send_to(b"", "127.0.0.1:9");
    }
}

fn apply(fd: libc::c_int, c: &Config) -> io::Result<()> {
    up(fd, "lo")?;
    let mask = if c.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(c.prefix)) };
    set_addr(fd, "eth0", libc::SIOCSIFADDR, c.addr)?;
    set_addr(fd, "eth0", libc::SIOCSIFNETMASK, Ipv4Addr::from(mask))?;
    up(fd, "eth0")?;
    if let Some(gw) = c.gateway {
        let any = sockaddr(Ipv4Addr::UNSPECIFIED);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: any,
            rt_gateway: sockaddr(gw),
            rt_genmask: any,
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_tos: 0,
            rt_class: 0,
            rt_pad4: [0; 3],
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`, which `rt` is.
        if unsafe { libc::ioctl(fd, libc::SIOCADDRT, &mut rt) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::other(format!("default route via {gw}: {e}")));
            }
        }
    }
    Ok(())
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(a).to_be() },
        sin_zero: [0; 8],
    }
}

fn req(name: &str) -> IfReq {
    let mut r = IfReq { name: [0; IFNAMSIZ], data: [0; 24] };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn set_addr(fd: libc::c_int, name: &str, op: libc::c_ulong, a: Ipv4Addr) -> io::Result<()> {
    let mut r = req(name);
    let sa = sockaddr(a);
    // SAFETY: sockaddr_in is 16 plain bytes, within the request's 24-byte union.
    let bytes = unsafe {
        std::slice::from_raw_parts((&sa as *const libc::sockaddr_in).cast::<u8>(), size_of::<libc::sockaddr_in>())
    };
    r.data[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: the ioctl reads one `struct ifreq`, which `r` is.
    if unsafe { libc::ioctl(fd, op, &mut r) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("{name}: address {a}: {e}")));
    }
    Ok(())
}

fn up(fd: libc::c_int, name: &str) -> io::Result<()> {
    let mut r = req(name);
    // SAFETY: SIOCGIFFLAGS writes the flags into the request.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut r) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("{name}: {e} (does the VM have a network interface?)")));
    }
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads the flags from the request.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut r) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("{name} up: {e}")));
    }
    Ok(())
}

/// The built-in `http-get`: `ADDR:PORT[/PATH] [TIMEOUT_MS]` -> the server's whole response (at
/// most 64 KiB of it), over HTTP/1.0. A connection that fails says why.
pub fn http_get(payload: &[u8]) -> io::Result<String> {
    use std::io::{Read, Write};
    let text = std::str::from_utf8(payload).map_err(|_| io::Error::other("not UTF-8"))?;
    let mut words = text.split_whitespace();
    let target = words.next().ok_or_else(|| io::Error::other("expected ADDR:PORT[/PATH] [TIMEOUT_MS]"))?;
    let timeout_ms: u64 = words.next().map(|t| t.parse().unwrap_or(0)).unwrap_or(10_000).clamp(1, 120_000);
    let (host, path) = match target.find('/') {
        Some(i) => target.split_at(i),
        None => (target, "/"),
    };
    let addr: std::net::SocketAddr = host.parse().map_err(|e| io::Error::other(format!("{host}: {e}")))?;
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    s.set_read_timeout(Some(timeout))?;
    // One write: a server may answer (and close) as soon as it has the whole request.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut body = Vec::new();
    s.take(64 << 10).read_to_end(&mut body).map_err(|e| io::Error::new(e.kind(), format!("read {addr}: {e}")))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The built-ins `tcp-read ADDR:PORT` (reads until the peer closes) and `tcp-write ADDR:PORT
/// BYTES` (writes that many bytes, then closes): how many bytes moved, for throughput benchmarks.
pub fn tcp_transfer(payload: &[u8], write: bool) -> io::Result<String> {
    use std::io::{Read, Write};
    let text = std::str::from_utf8(payload).map_err(|_| io::Error::other("not UTF-8"))?;
    let mut words = text.split_whitespace();
    let addr: std::net::SocketAddr = words
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other("expected ADDR:PORT (and BYTES to write)"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut moved: u64 = 0;
    if write {
        let total: u64 = words.next().and_then(|b| b.parse().ok()).ok_or_else(|| io::Error::other("BYTES?"))?;
        while moved < total {
            let n = (total - moved).min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            moved += n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let _ = s.read(&mut buf);
    } else {
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => moved += n as u64,
            }
        }
    }
    Ok(format!("{moved} bytes"))
}

/// The built-in `udp-flood ADDR:PORT MS`: sends 1,400-byte datagrams as fast as it can for MS
/// milliseconds (at most 60 s): a guest flooding its network card, for tests.
pub fn udp_flood(payload: &[u8]) -> io::Result<String> {
    let text = std::str::from_utf8(payload).map_err(|_| io::Error::other("not UTF-8"))?;
    let mut words = text.split_whitespace();
    let (Some(addr), Some(ms)) = (words.next(), words.next().and_then(|m| m.parse::<u64>().ok())) else {
        return Err(io::Error::other("expected ADDR:PORT MS"));
    };
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| io::Error::other(format!("{addr}: {e}")))?;
    let u = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let end = std::time::Instant::now() + std::time::Duration::from_millis(ms.min(60_000));
    let datagram = [0x55u8; 1400];
    let mut sent = 0u64;
    while std::time::Instant::now() < end {
        if u.send_to(&datagram, addr).is_ok() {
            sent += 1;
        }
    }
    Ok(format!("{sent} datagrams"))
}

/// The built-in `udp-from SRC ADDR:PORT TEXT`: one UDP datagram carrying TEXT, sent through a
/// raw socket with the IPv4 source SRC, whatever the guest's own address is: a guest forging its
/// source, for tests (the host must never let it out).
pub fn udp_from(payload: &[u8]) -> io::Result<String> {
    let text = std::str::from_utf8(payload).map_err(|_| io::Error::other("not UTF-8"))?;
    let mut words = text.splitn(3, ' ');
    let (Some(src), Some(dst), Some(data)) = (words.next(), words.next(), words.next()) else {
        return Err(io::Error::other("expected SRC ADDR:PORT TEXT"));
    };
    let src: Ipv4Addr = src.parse().map_err(|e| io::Error::other(format!("{src}: {e}")))?;
    let dst: std::net::SocketAddrV4 = dst.parse().map_err(|e| io::Error::other(format!("{dst}: {e}")))?;
    let packet = udp_packet(src, dst, 40000, data.as_bytes());
    // SAFETY: socket() takes scalars; the fd is owned by the OwnedFd made from it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(*dst.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sends `packet` (a live buffer of its length) to the address in `to`, of its size.
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(format!("sent {n} bytes from {src}"))
}

/// An IPv4 + UDP packet (no UDP checksum; the kernel fills in the IP header's checksum and id).
fn udp_packet(src: Ipv4Addr, dst: std::net::SocketAddrV4, sport: u16, data: &[u8]) -> Vec<u8> {
    let udp_len = 8 + data.len() as u16;
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total as usize);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_datagram_is_laid_out_as_ipv4_and_udp() {
        let p = udp_packet(Ipv4Addr::new(10, 0, 0, 9), "192.0.2.2:9999".parse().unwrap(), 40000, b"hi");
        assert_eq!(p.len(), 30);
        assert_eq!((p[0], u16::from_be_bytes([p[2], p[3]]), p[9]), (0x45, 30, 17));
        assert_eq!((&p[12..16], &p[16..20]), (&[10, 0, 0, 9][..], &[192, 0, 2, 2][..]));
        assert_eq!((u16::from_be_bytes([p[22], p[23]]), u16::from_be_bytes([p[24], p[25]])), (9999, 10));
        assert_eq!(&p[28..], b"hi");
    }

    #[test]
    fn the_command_line_form() {
        let c = parse("172.16.0.2/30,172.16.0.1").unwrap();
        assert_eq!(
            c,
            Config { addr: Ipv4Addr::new(172, 16, 0, 2), prefix: 30, gateway: Some(Ipv4Addr::new(172, 16, 0, 1)) }
        );
        assert_eq!(parse("10.0.0.2/24").unwrap().gateway, None);
        for bad in ["", "10.0.0.2", "10.0.0.2/33", "10.0.0.2/24,x", "x/24"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(size_of::<RtEntry>(), 120);
        assert_eq!(size_of::<IfReq>(), 40);
    }
}
