//! The kernel's TLS interface (`linux/tls.h`): the `tls` upper-layer protocol on a TCP socket,
//! each direction's crypto state in the kernel's layout, records of types other than application
//! data (control records, marked by a cmsg).

use std::{io, mem::MaybeUninit, os::fd::AsRawFd};

use rustls::{CipherSuite, ConnectionTrafficSecrets};

/// Record content types (RFC 8446 B.1).
pub(crate) const RECORD_ALERT: u8 = 21;
pub(crate) const RECORD_HANDSHAKE: u8 = 22;
pub(crate) const RECORD_APPLICATION_DATA: u8 = 23;

/// The AEADs the kernel takes for TLS 1.3, in pullproxy's order of preference: AES-128-GCM does
/// 10 AES rounds where AES-256 does 14 (about 30 % less work per byte on both ends), and both
/// are faster than ChaCha20-Poly1305 wherever AES has hardware support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub(crate) const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes128gcm",
            Cipher::Aes256Gcm => "aes256gcm",
            Cipher::Chacha20Poly1305 => "chacha20poly1305",
        }
    }

    /// The TLS 1.3 cipher suite built on this AEAD.
    pub(crate) fn tls13_suite(self) -> CipherSuite {
        match self {
            Cipher::Aes128Gcm => CipherSuite::TLS13_AES_128_GCM_SHA256,
            Cipher::Aes256Gcm => CipherSuite::TLS13_AES_256_GCM_SHA384,
            Cipher::Chacha20Poly1305 => CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        }
    }

    #[cfg(test)]
    /// The AEAD of a TLS 1.3 cipher suite (by its IANA number), if the kernel could take it.
    pub(crate) fn of_tls13_suite(suite: u16) -> Option<Self> {
        Cipher::ALL
            .into_iter()
            .find(|c| u16::from(c.tls13_suite()) == suite)
    }

    /// Key length in bytes.
    pub(crate) fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }

    fn kernel_type(self) -> u16 {
        match self {
            Cipher::Aes128Gcm => libc::TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => libc::TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20Poly1305 => libc::TLS_CIPHER_CHACHA20_POLY1305,
        }
    }
}

/// One direction's crypto state as `setsockopt(SOL_TLS, TLS_TX | TLS_RX)` takes it.
#[derive(Clone, Copy)]
pub(crate) enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl std::fmt::Debug for CryptoInfo {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoInfo")
            .field("cipher", &self.cipher())
            .finish_non_exhaustive()
    }
}

/// Copies `src` into the start of `dst` (the caller checked the lengths).
fn fill(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(&src[..dst.len()]);
}

impl CryptoInfo {
    /// TLS 1.3 state for traffic `secrets` whose next record has sequence number `seq`.
    pub(crate) fn tls13(secrets: &ConnectionTrafficSecrets, seq: u64) -> Option<Self> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => return None,
        };
        Self::from_parts(cipher, key.as_ref(), iv.as_ref(), seq)
    }

    /// The kernel's layout of a key, the 12-byte TLS 1.3 IV and a sequence number. The kernel
    /// forms each nonce as `salt || iv` XOR the sequence number, as RFC 8446 5.3 does with the
    /// whole IV: the AES-GCM layouts split the IV into a 4-byte salt and an 8-byte rest,
    /// ChaCha20's keeps it whole.
    pub(crate) fn from_parts(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Option<Self> {
        const IV_LEN: usize = 12;
        if iv.len() != IV_LEN {
            return None;
        }
        let info = libc::tls_crypto_info {
            version: libc::TLS_1_3_VERSION,
            cipher_type: cipher.kernel_type(),
        };
        let rec_seq = seq.to_be_bytes();
        Some(match cipher {
            Cipher::Aes128Gcm => {
                let mut c = libc::tls12_crypto_info_aes_gcm_128 {
                    info,
                    iv: [0; 8],
                    key: [0; 16],
                    salt: [0; 4],
                    rec_seq,
                };
                if key.len() != c.key.len() {
                    return None;
                }
                fill(&mut c.key, key);
                fill(&mut c.salt, &iv[..4]);
                fill(&mut c.iv, &iv[4..]);
                CryptoInfo::Aes128Gcm(c)
            }
            Cipher::Aes256Gcm => {
                let mut c = libc::tls12_crypto_info_aes_gcm_256 {
                    info,
                    iv: [0; 8],
                    key: [0; 32],
                    salt: [0; 4],
                    rec_seq,
                };
                if key.len() != c.key.len() {
                    return None;
                }
                fill(&mut c.key, key);
                fill(&mut c.salt, &iv[..4]);
                fill(&mut c.iv, &iv[4..]);
                CryptoInfo::Aes256Gcm(c)
            }
            Cipher::Chacha20Poly1305 => {
                let mut c = libc::tls12_crypto_info_chacha20_poly1305 {
                    info,
                    iv: [0; 12],
                    key: [0; 32],
                    salt: [],
                    rec_seq,
                };
                if key.len() != c.key.len() {
                    return None;
                }
                fill(&mut c.key, key);
                fill(&mut c.iv, iv);
                CryptoInfo::Chacha20Poly1305(c)
            }
        })
    }

    pub(crate) fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::Aes128Gcm(_) => Cipher::Aes128Gcm,
            CryptoInfo::Aes256Gcm(_) => Cipher::Aes256Gcm,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The structure's bytes, as the kernel reads them.
    fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(v: &T) -> &[u8] {
            // SAFETY: the libc crypto_info structures are plain `repr(C)` byte arrays after two
            // u16s, without padding; reading them as bytes for their whole size is sound.
            unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
        }
        match self {
            CryptoInfo::Aes128Gcm(c) => bytes(c),
            CryptoInfo::Aes256Gcm(c) => bytes(c),
            CryptoInfo::Chacha20Poly1305(c) => bytes(c),
        }
    }

    /// What the kernel will use: (key, salt || iv, first sequence number).
    #[cfg(test)]
    pub(crate) fn parts(&self) -> (Vec<u8>, [u8; 12], u64) {
        let (key, salt, iv, seq): (&[u8], &[u8], &[u8], [u8; 8]) = match self {
            CryptoInfo::Aes128Gcm(c) => (&c.key, &c.salt, &c.iv, c.rec_seq),
            CryptoInfo::Aes256Gcm(c) => (&c.key, &c.salt, &c.iv, c.rec_seq),
            CryptoInfo::Chacha20Poly1305(c) => (&c.key, &c.salt, &c.iv, c.rec_seq),
        };
        let mut nonce = [0u8; 12];
        nonce[..salt.len()].copy_from_slice(salt);
        nonce[salt.len()..].copy_from_slice(iv);
        (key.to_vec(), nonce, u64::from_be_bytes(seq))
    }
}

/// Which direction a crypto state is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Transmit,
    Receive,
}

fn setsockopt(fd: &impl AsRawFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of its length for the duration of the call, and the
    // kernel copies it; the descriptor is open (it is borrowed).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the `tls` upper-layer protocol on a connected TCP socket (loading the module when the
/// kernel has it and may). `ENOENT`: the kernel has no `tls`.
pub(crate) fn set_ulp(fd: &impl AsRawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls")
}

/// Hands one direction's crypto state to the kernel: from then on it encrypts what is written
/// (or decrypts what is read). Setting a direction again (a TLS 1.3 key update) needs Linux 6.14;
/// older kernels refuse it with `EBUSY`.
pub(crate) fn set_crypto(
    fd: &impl AsRawFd,
    direction: Direction,
    info: &CryptoInfo,
) -> io::Result<()> {
    let name = match direction {
        Direction::Transmit => libc::TLS_TX,
        Direction::Receive => libc::TLS_RX,
    };
    setsockopt(fd, libc::SOL_TLS, name, info.as_bytes())
}

/// Room for one `cmsghdr` carrying one byte, aligned for `cmsghdr`.
#[repr(C)]
struct RecordTypeCmsg {
    _align: [libc::cmsghdr; 0],
    buf: [u8; 32],
}

const _: () = assert!(size_of::<libc::cmsghdr>() + 8 <= 32, "CMSG_SPACE(1) fits");

/// What one `recvmsg` on a kernel TLS socket returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) len: usize,
    /// The record's content type; `None` when the kernel attached none (end of stream).
    pub(crate) record_type: Option<u8>,
    /// The end of the record was reached (`MSG_EOR`): a control record is complete.
    pub(crate) end_of_record: bool,
}

/// Reads decrypted bytes of one record type into `buf`. The kernel never mixes record types in
/// one read, and marks each read with the type of its record.
pub(crate) fn recv_record(fd: &impl AsRawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<Received> {
    let mut cmsg = RecordTypeCmsg {
        _align: [],
        buf: [0; 32],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one; the fields set below point at `iov` and
    // `cmsg`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.buf.len() as _;
    // SAFETY: `msg` describes writable memory (`buf`'s capacity, the cmsg buffer) valid for the
    // whole call; the descriptor is open.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within msg_control and
    // msg_controllen, and CMSG_DATA of a SOL_TLS/TLS_GET_RECORD_TYPE header holds one byte.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS && (*c).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(c));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        len: n as usize,
        record_type,
        end_of_record: msg.msg_flags & libc::MSG_EOR != 0,
    })
}

/// Sends `data` as one record of `record_type` (an alert, a handshake message) on a socket whose
/// transmit side the kernel encrypts.
pub(crate) fn send_record(fd: &impl AsRawFd, record_type: u8, data: &[u8]) -> io::Result<usize> {
    let mut cmsg = RecordTypeCmsg {
        _align: [],
        buf: [0; 32],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: as in `recv_record`; `iov` points at `data`, which sendmsg only reads.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.buf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the header written fits the 32-byte buffer
    // (checked at compile time above) and CMSG_DATA points inside it.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = record_type;
    }
    // SAFETY: `msg` describes readable memory valid for the call; the descriptor is open.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    /// Secrets as rustls hands them out. rustls makes 16-byte AES-128 keys itself (the public
    /// constructor makes 32-byte ones): the real handshakes in `super::super::tests` cover those.
    fn secrets(cipher: Cipher) -> ConnectionTrafficSecrets {
        let key = AeadKey::from(std::array::from_fn::<u8, 32, _>(|i| i as u8));
        let iv = Iv::from(std::array::from_fn::<u8, 12, _>(|i| 0xa0 + i as u8));
        match cipher {
            Cipher::Aes256Gcm => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
            Cipher::Chacha20Poly1305 => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
            Cipher::Aes128Gcm => unreachable!("see above"),
        }
    }

    #[test]
    fn crypto_info_has_the_kernels_layout() {
        // Sizes from linux/tls.h: info (4) + iv + key + salt + rec_seq.
        assert_eq!(
            size_of::<libc::tls12_crypto_info_aes_gcm_128>(),
            4 + 8 + 16 + 4 + 8
        );
        assert_eq!(
            size_of::<libc::tls12_crypto_info_aes_gcm_256>(),
            4 + 8 + 32 + 4 + 8
        );
        assert_eq!(
            size_of::<libc::tls12_crypto_info_chacha20_poly1305>(),
            4 + 12 + 32 + 8
        );

        let seq = 0x0102_0304_0506_0708;
        let info = CryptoInfo::from_parts(
            Cipher::Aes128Gcm,
            &[7; 16],
            &std::array::from_fn::<u8, 12, _>(|i| i as u8),
            seq,
        )
        .unwrap();
        let bytes = info.as_bytes();
        // version 0x0304 and cipher 51, in host (little-endian) order.
        assert_eq!(&bytes[..4], &[0x04, 0x03, 51, 0]);
        assert_eq!(
            &bytes[4..12],
            &[4, 5, 6, 7, 8, 9, 10, 11],
            "iv: the IV after the salt"
        );
        assert_eq!(&bytes[12..28], &[7; 16], "key");
        assert_eq!(
            &bytes[28..32],
            &[0, 1, 2, 3],
            "salt: the IV's first four bytes"
        );
        assert_eq!(
            &bytes[32..40],
            &seq.to_be_bytes(),
            "record sequence, big-endian"
        );
    }

    #[test]
    fn every_cipher_keeps_key_nonce_and_sequence() {
        for cipher in [Cipher::Aes256Gcm, Cipher::Chacha20Poly1305] {
            let info = CryptoInfo::tls13(&secrets(cipher), 3).unwrap();
            assert_eq!(info.cipher(), cipher);
            let (key, nonce, seq) = info.parts();
            assert_eq!(key, (0..32).collect::<Vec<u8>>(), "{cipher:?}");
            assert_eq!(nonce, std::array::from_fn(|i| 0xa0 + i as u8), "{cipher:?}");
            assert_eq!(seq, 3);
        }
        let iv: [u8; 12] = std::array::from_fn(|i| 0xa0 + i as u8);
        let info = CryptoInfo::from_parts(Cipher::Aes128Gcm, &[9; 16], &iv, 0).unwrap();
        assert_eq!(info.parts(), (vec![9; 16], iv, 0));
    }

    #[test]
    fn wrong_lengths_are_refused_not_truncated() {
        assert!(CryptoInfo::from_parts(Cipher::Aes256Gcm, &[0; 16], &[0; 12], 0).is_none());
        assert!(CryptoInfo::from_parts(Cipher::Aes128Gcm, &[0; 16], &[0; 8], 0).is_none());
    }

    #[test]
    fn tls13_suites_map_to_kernel_ciphers() {
        assert_eq!(Cipher::of_tls13_suite(0x1301), Some(Cipher::Aes128Gcm));
        assert_eq!(Cipher::of_tls13_suite(0x1302), Some(Cipher::Aes256Gcm));
        assert_eq!(
            Cipher::of_tls13_suite(0x1303),
            Some(Cipher::Chacha20Poly1305)
        );
        // TLS_AES_128_CCM_SHA256: the kernel has CCM, rustls does not offer it.
        assert_eq!(Cipher::of_tls13_suite(0x1304), None);
        assert_eq!(Cipher::of_tls13_suite(0xc02f), None);
    }
}
