//! Packet captures, so tests can assert on the wire itself: that TLS and
//! never the plaintext crosses a pod's link, or that plaintext does cross
//! it when it should.
//!
//! tcpdump runs inside the pod. [`Pcap::contains`] searches both the raw
//! file and the reassembled TCP byte streams, so a needle split across two
//! segments is still found; that matters most for "never appears" checks,
//! which would otherwise pass by accident.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::pod::Pod;
use crate::process::{contains, Process};
use crate::sys::TCPDUMP;

/// How long tcpdump gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running capture; see [`Pod::capture`].
#[derive(Debug)]
pub struct Capture {
    tcpdump: Process,
    path: PathBuf,
    dir: TempDir,
}

impl Capture {
    pub(crate) fn start(pod: &Pod, interface: &str) -> Result<Capture> {
        let tcpdump = TCPDUMP.path()?;
        let dir = tempfile::Builder::new()
            .prefix("legate-capture")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for a capture", e))?;
        let path = dir.path().join(format!("{}-{interface}.pcap", pod.name()));
        let mut process = pod
            .command(tcpdump)
            .args(["-i", interface, "-n", "-s", "0"])
            // -U and --immediate-mode: each packet reaches the file as it
            // arrives, not in buffered blocks, so stopping loses nothing.
            // -Z root: otherwise tcpdump switches to its own user before
            // opening the file, which it may not be allowed to write.
            .args(["-U", "--immediate-mode", "-Z", "root", "-w"])
            .arg(&path)
            .spawn()?;
        // Packets sent before tcpdump is listening are not captured, so a
        // test must not start sending before this returns.
        process.wait_for_output("listening on", START_TIMEOUT)?;
        Ok(Capture {
            tcpdump: process,
            path,
            dir,
        })
    }

    /// Stops the capture and returns what it saw.
    pub fn stop(mut self) -> Result<Pcap> {
        // The last packets may still be on their way from the kernel to
        // tcpdump; wait until the file stops growing before interrupting it.
        let mut size = file_size(&self.path);
        let give_up = Instant::now() + Duration::from_secs(2);
        while Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(100));
            let now = file_size(&self.path);
            if now == size {
                break;
            }
            size = now;
        }
        self.tcpdump.signal(Signal::SIGINT)?;
        let status = self.tcpdump.wait_timeout(Duration::from_secs(5))?;
        if !status.success() {
            return Err(Error::CommandFailed {
                command: "tcpdump".into(),
                status: status.to_string(),
                stderr: self.tcpdump.stderr(),
            });
        }
        let bytes = std::fs::read(&self.path)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        Ok(Pcap {
            bytes,
            path: self.path,
            _dir: self.dir,
        })
    }
}

fn file_size(path: &Path) -> u64 {
    path.metadata().map(|m| m.len()).unwrap_or(0)
}

/// A finished capture. The pcap file stays on disk, at [`path`](Self::path),
/// until this is dropped; copy it elsewhere to keep it.
#[derive(Debug)]
pub struct Pcap {
    bytes: Vec<u8>,
    path: PathBuf,
    _dir: TempDir,
}

/// The bytes one side of a TCP connection sent, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpFlow {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The payload, reassembled; retransmissions are counted once.
    pub data: Vec<u8>,
}

impl Pcap {
    /// The pcap file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the pcap file is, for Wireshark while debugging.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `needle` crossed the link: in any packet, or in any TCP
    /// stream once reassembled.
    pub fn contains(&self, needle: impl AsRef<[u8]>) -> bool {
        let needle = needle.as_ref();
        contains(&self.bytes, needle)
            || self
                .tcp_flows()
                .map(|flows| flows.iter().any(|f| contains(&f.data, needle)))
                .unwrap_or(false)
    }

    /// Number of packets captured.
    pub fn packet_count(&self) -> Result<usize> {
        Ok(packets(&self.bytes)?.1.len())
    }

    /// The TCP byte streams seen, one per direction of each connection.
    /// Understands Ethernet (what `eth0` and `lo` give) carrying IPv4 or
    /// IPv6 without extension headers, which is all a bed produces.
    pub fn tcp_flows(&self) -> Result<Vec<TcpFlow>> {
        let (linktype, packets) = packets(&self.bytes)?;
        if linktype != LINKTYPE_ETHERNET {
            return Err(Error::Pcap(format!("link type {linktype} is not Ethernet")));
        }
        let mut directions: Vec<Direction<'_>> = Vec::new();
        for packet in packets {
            let Some(segment) = tcp_segment(packet) else {
                continue;
            };
            let index = match directions
                .iter()
                .position(|d| d.src == segment.src && d.dst == segment.dst)
            {
                Some(index) => index,
                None => {
                    directions.push(Direction {
                        src: segment.src,
                        dst: segment.dst,
                        first_seq: segment.seq,
                        segments: BTreeMap::new(),
                    });
                    directions.len() - 1
                }
            };
            directions[index].add(segment.seq, segment.payload);
        }
        Ok(directions.into_iter().map(Direction::reassemble).collect())
    }
}

/// One direction of a TCP connection while it is being reassembled.
struct Direction<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    first_seq: u32,
    /// Payloads by sequence number relative to the first one seen, which
    /// orders them even across a wrap-around. The longest payload wins when
    /// a retransmission starts at the same place.
    segments: BTreeMap<i64, &'a [u8]>,
}

impl<'a> Direction<'a> {
    fn add(&mut self, seq: u32, payload: &'a [u8]) {
        if payload.is_empty() {
            return;
        }
        let offset = i64::from(seq.wrapping_sub(self.first_seq) as i32);
        let longest = self.segments.entry(offset).or_default();
        if payload.len() > longest.len() {
            *longest = payload;
        }
    }

    fn reassemble(self) -> TcpFlow {
        let mut data = Vec::new();
        let mut next: Option<i64> = None;
        for (offset, payload) in self.segments {
            let start = next.unwrap_or(offset);
            // Skip what an earlier segment already covered.
            let skip = usize::try_from(start - offset).unwrap_or(0);
            if let Some(rest) = payload.get(skip..) {
                data.extend_from_slice(rest);
            }
            next = Some(start.max(offset + payload.len() as i64));
        }
        TcpFlow {
            src: self.src,
            dst: self.dst,
            data,
        }
    }
}

const LINKTYPE_ETHERNET: u32 = 1;

/// Splits a pcap file into its link type and packets.
fn packets(bytes: &[u8]) -> Result<(u32, Vec<&[u8]>)> {
    let magic = bytes
        .get(..4)
        .ok_or_else(|| Error::Pcap("shorter than its header".into()))?;
    // Microsecond and nanosecond timestamps, either byte order.
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(Error::Pcap("not a pcap file (pcapng is not read)".into())),
    };
    let u32_at = |at: usize| -> Result<u32> {
        let b: [u8; 4] = bytes
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Pcap(format!("truncated at byte {at}")))?;
        Ok(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let linktype = u32_at(20)?;
    let mut packets = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let captured = u32_at(at + 8)? as usize;
        let start = at + 16;
        let packet = bytes
            .get(start..start + captured)
            .ok_or_else(|| Error::Pcap(format!("packet at byte {at} is truncated")))?;
        packets.push(packet);
        at = start + captured;
    }
    Ok((linktype, packets))
}

struct Segment<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    payload: &'a [u8],
}

/// The TCP segment in an Ethernet frame, if there is one.
fn tcp_segment(frame: &[u8]) -> Option<Segment<'_>> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
            if *ip.get(9)? != 6 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            // Trim Ethernet padding after the IP packet.
            let tcp = ip.get(header_len..total_len.min(ip.len()))?;
            (
                IpAddr::from(Ipv4Addr::from(src)),
                IpAddr::from(Ipv4Addr::from(dst)),
                tcp,
            )
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let payload_len = usize::from(u16::from_be_bytes(ip.get(4..6)?.try_into().ok()?));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let tcp = ip.get(40..(40 + payload_len).min(ip.len()))?;
            (
                IpAddr::from(Ipv6Addr::from(src)),
                IpAddr::from(Ipv6Addr::from(dst)),
                tcp,
            )
        }
        _ => return None,
    };
    let src_port = u16::from_be_bytes(tcp.get(0..2)?.try_into().ok()?);
    let dst_port = u16::from_be_bytes(tcp.get(2..4)?.try_into().ok()?);
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let syn = tcp.get(13)? & 0x02 != 0;
    Some(Segment {
        src: SocketAddr::new(src, src_port),
        dst: SocketAddr::new(dst, dst_port),
        // The SYN takes up one sequence number before the first data byte.
        seq: if syn { seq.wrapping_add(1) } else { seq },
        payload: tcp.get(data_offset..)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an Ethernet/IPv4/TCP frame.
    fn frame(seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&[10, 200, 0, 2, 10, 200, 0, 3]);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = if syn { 0x02 } else { 0x18 };
        f.extend(ip);
        f.extend(tcp);
        f.extend_from_slice(payload);
        // Ethernet pads short frames; the parser must ignore it.
        f.resize(f.len().max(60), 0);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        out.extend_from_slice(&[2, 0, 4, 0]);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn reassembles_split_and_retransmitted_segments_across_wraparound() {
        let isn = u32::MAX - 3;
        let data = pcap(&[
            frame(isn, true, b""),
            frame(isn.wrapping_add(1), false, b"sec"),
            // Out of order, over the wrap, and overlapping a retransmission.
            frame(isn.wrapping_add(8), false, b"payload"),
            frame(isn.wrapping_add(1), false, b"secret "),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let capture = Pcap {
            bytes: data,
            path: PathBuf::new(),
            _dir: dir,
        };
        assert_eq!(capture.packet_count().expect("parses"), 4);
        let flows = capture.tcp_flows().expect("parses");
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].data, b"secret payload");
        assert_eq!(flows[0].src, "10.200.0.2:40000".parse().expect("addr"));
        assert!(capture.contains("secret payload"));
        assert!(!capture.contains("secret payload!"));
    }

    #[test]
    fn rejects_what_is_not_pcap() {
        assert!(packets(b"").is_err());
        assert!(packets(b"\x0a\x0d\x0d\x0a pcapng").is_err());
    }
}
