//! A synchronous netlink socket to the kernel, the part the rtnetlink
//! client (`netlink`) and the sock_diag one (`sock_diag`) share: open for
//! one protocol, frame and send a request, read the replies until the dump
//! ends or the request is acknowledged. The socket is opened per request,
//! so it speaks to the network namespace of the thread that opens it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;

pub(crate) struct Socket(OwnedFd);

impl Socket {
    /// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`).
    pub(crate) fn open(protocol: libc::c_int) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        let sock = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // The kernel answers synchronously; a bound on the wait only guards
        // the caller against a kernel bug turning into a hung thread.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Sends one complete message (see [`header`] and [`finish`]).
    pub(crate) fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sending an initialised buffer on our socket (to the kernel).
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until NLMSG_DONE (dumps) or the ack (other requests),
    /// handing every other message's payload to `each`.
    pub(crate) fn receive(&self, dump: bool, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into our own buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let mut data = &buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                let msg_type = u16::from_ne_bytes(data[4..6].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                match msg_type as i32 {
                    libc::NLMSG_DONE => {
                        // A dump that failed part-way reports its error here.
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        if code < 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(());
                    }
                    libc::NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .ok_or_else(|| {
                                io::Error::new(io::ErrorKind::InvalidData, "short netlink error")
                            })?;
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    _ => each(payload),
                }
                data = &data[align4(len).min(data.len())..];
            }
        }
    }
}

/// Netlink messages and attributes are padded to 4 bytes.
pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Starts a request in `buf`: the `nlmsghdr`, its length left for [`finish`].
pub(crate) fn header(buf: &mut Vec<u8>, msg_type: u16, flags: u16) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
}

/// Writes the length of the whole message into its header.
pub(crate) fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
}
