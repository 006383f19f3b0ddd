//! Real image content built in Rust (no docker): a runnable busybox image, multi-layer images of
//! incompressible data, multi-platform indexes, and big layers for benchmarks. Content is
//! deterministic (fixed timestamps and owners, seeded random data), so the same call gives the
//! same digests in every run. Nothing here talks to a registry: [`crate::registry_client`]
//! pushes it.

use std::{
    fmt,
    fs::File,
    io::{self, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use flate2::{Compression, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The busybox binary put into the runnable images (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked next to busybox in `/bin`, enough for shell scripts in a test container.
const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "cat",
    "echo",
    "env",
    "false",
    "hostname",
    "id",
    "ls",
    "mkdir",
    "printf",
    "ps",
    "rm",
    "sha256sum",
    "sleep",
    "test",
    "touch",
    "true",
    "uname",
    "wget",
];

/// Timestamp of every tar entry and config (2023-11-14T22:13:20Z): fixed, so digests are stable.
const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";

/// A content digest, `sha256:<64 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The sha256 digest of a file's content.
    pub fn of_file(path: &Path) -> io::Result<Self> {
        let mut hasher = HashingWriter::new(io::sink());
        io::copy(&mut File::open(path)?, &mut hasher)?;
        Ok(hasher.finish().0)
    }

    fn from_hasher(hasher: Sha256) -> Self {
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self(format!("sha256:{hex}"))
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part (the file name under `blobs/sha256/` and in skopeo's `dir:` layout).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Where a blob's bytes are: small ones in memory, big ones in a file.
#[derive(Debug, Clone)]
pub enum Content {
    Bytes(Arc<[u8]>),
    File(PathBuf),
}

/// A piece of content-addressed data with its media type, as a descriptor names it.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub content: Content,
}

impl Blob {
    /// A blob held in memory.
    pub fn from_bytes(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: Digest::of(&bytes),
            size: bytes.len() as u64,
            content: Content::Bytes(bytes.into()),
        }
    }

    /// All bytes (read from the file for file-backed blobs).
    pub fn bytes(&self) -> Vec<u8> {
        match &self.content {
            Content::Bytes(b) => b.to_vec(),
            Content::File(p) => {
                std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
            }
        }
    }

    /// A reader over the bytes.
    pub fn reader(&self) -> Box<dyn Read + Send> {
        match &self.content {
            Content::Bytes(b) => Box::new(io::Cursor::new(b.clone())),
            Content::File(p) => {
                Box::new(File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())))
            }
        }
    }

    /// The OCI descriptor (`mediaType`, `digest`, `size`).
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest.as_str(), "size": self.size })
    }
}

/// Docker schema 2 or OCI: decides every media type of an image or index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/vnd.docker.distribution.manifest.v2+json` and the Docker manifest list.
    Docker,
    /// `application/vnd.oci.image.manifest.v1+json` and the OCI index.
    Oci,
}

/// Every media type the harness produces, for `Accept` headers.
pub const MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Self::Docker => "application/vnd.docker.distribution.manifest.v2+json",
            Self::Oci => "application/vnd.oci.image.manifest.v1+json",
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Self::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
            Self::Oci => "application/vnd.oci.image.index.v1+json",
        }
    }

    pub fn config_type(self) -> &'static str {
        match self {
            Self::Docker => "application/vnd.docker.container.image.v1+json",
            Self::Oci => "application/vnd.oci.image.config.v1+json",
        }
    }

    pub fn layer_type(self, compression: LayerCompression) -> &'static str {
        match (self, compression) {
            (Self::Docker, LayerCompression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (Self::Docker, LayerCompression::None) => {
                "application/vnd.docker.image.rootfs.diff.tar"
            }
            (Self::Oci, LayerCompression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Self::Oci, LayerCompression::None) => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    Gzip,
    None,
}

/// A filesystem layer before it is given a media type by an image.
#[derive(Debug, Clone)]
pub struct Layer {
    pub compression: LayerCompression,
    /// The digest of the compressed bytes (what the registry stores).
    pub digest: Digest,
    pub size: u64,
    /// The digest of the uncompressed tar (what the config's `rootfs.diff_ids` lists).
    pub diff_id: Digest,
    pub content: Content,
}

impl Layer {
    /// A gzip layer from an uncompressed tar.
    pub fn gzip(tar: &[u8], level: Compression) -> Self {
        let mut gz = GzEncoder::new(Vec::new(), level);
        gz.write_all(tar).expect("gzip in memory");
        let bytes = gz.finish().expect("gzip in memory");
        Self {
            compression: LayerCompression::Gzip,
            digest: Digest::of(&bytes),
            size: bytes.len() as u64,
            diff_id: Digest::of(tar),
            content: Content::Bytes(bytes.into()),
        }
    }

    fn blob(&self, format: Format) -> Blob {
        Blob {
            media_type: format.layer_type(self.compression).to_owned(),
            digest: self.digest.clone(),
            size: self.size,
            content: self.content.clone(),
        }
    }
}

/// An image's platform, as a config and an index entry state it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn linux_amd64() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    pub fn linux_arm64() -> Self {
        Self {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

/// A single-platform image: manifest, config and layers, with their digests.
#[derive(Debug, Clone)]
pub struct Image {
    pub format: Format,
    pub platform: Platform,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub diff_ids: Vec<Digest>,
}

impl Image {
    /// Assembles config and manifest for `layers`. `cmd` is the config's `Cmd` (`None` for an
    /// image that is only pulled, never run).
    pub fn build(
        format: Format,
        platform: Platform,
        cmd: Option<&[&str]>,
        layers: &[Layer],
    ) -> Self {
        let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let mut config = platform.json();
        config["created"] = json!(CREATED);
        config["config"] = json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        });
        if let Some(cmd) = cmd {
            config["config"]["Cmd"] = json!(cmd);
        }
        config["rootfs"] = json!({
            "type": "layers",
            "diff_ids": diff_ids.iter().map(Digest::as_str).collect::<Vec<_>>(),
        });
        config["history"] = layers
            .iter()
            .map(|l| json!({ "created": CREATED, "created_by": format!("pullproxy test harness: {}", l.diff_id) }))
            .collect();
        let config = Blob::from_bytes(
            format.config_type(),
            serde_json::to_vec(&config).expect("config JSON"),
        );
        let layers: Vec<Blob> = layers.iter().map(|l| l.blob(format)).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_type(),
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::from_bytes(
            format.manifest_type(),
            serde_json::to_vec(&manifest).expect("manifest JSON"),
        );
        Self {
            format,
            platform,
            manifest,
            config,
            layers,
            diff_ids,
        }
    }

    /// The manifest digest: what `image@sha256:...` pins.
    pub fn digest(&self) -> &Digest {
        &self.manifest.digest
    }

    /// Config, then layers: every blob the manifest references.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    /// Bytes of config and layers together (what a pull transfers besides the manifest).
    pub fn blob_bytes(&self) -> u64 {
        self.blobs().map(|b| b.size).sum()
    }
}

/// A multi-platform image: an OCI index or a Docker manifest list and its images.
#[derive(Debug, Clone)]
pub struct Index {
    pub format: Format,
    pub manifest: Blob,
    pub images: Vec<Image>,
}

impl Index {
    /// An index over `images` (all of `format`), in the given order.
    pub fn build(format: Format, images: Vec<Image>) -> Self {
        let entries: Vec<Value> = images
            .iter()
            .map(|i| {
                assert_eq!(i.format, format, "an index and its images share a format");
                let mut d = i.manifest.descriptor();
                d["platform"] = i.platform.json();
                d
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": format.index_type(),
            "manifests": entries,
        });
        let manifest = Blob::from_bytes(
            format.index_type(),
            serde_json::to_vec(&manifest).expect("index JSON"),
        );
        Self {
            format,
            manifest,
            images,
        }
    }

    /// The index digest.
    pub fn digest(&self) -> &Digest {
        &self.manifest.digest
    }

    /// The image for `architecture` (`amd64`, `arm64`).
    pub fn image_for(&self, architecture: &str) -> &Image {
        self.images
            .iter()
            .find(|i| i.platform.architecture == architecture)
            .unwrap_or_else(|| panic!("no {architecture} image in the index"))
    }
}

/// The root filesystem of the runnable images: `/bin/busybox`, applet links, a few directories
/// and `/etc/passwd`, gzip-compressed. Built once per test process.
pub fn busybox_layer() -> Layer {
    static LAYER: OnceLock<Layer> = OnceLock::new();
    LAYER
        .get_or_init(|| {
            let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
                panic!("{BUSYBOX}: {e} (install busybox-static: `cargo xtask setup`)")
            });
            if let Err(why) = check_static_x86_64(&busybox) {
                panic!("{BUSYBOX} {why}: the image runs it as linux/amd64 without a libc; install busybox-static, not busybox");
            }
            let mut tar = TarWriter::new();
            for (dir, mode) in [
                ("bin", 0o755),
                ("dev", 0o755),
                ("etc", 0o755),
                ("proc", 0o555),
                ("root", 0o700),
                ("sys", 0o555),
                ("tmp", 0o1777),
                ("usr", 0o755),
                ("var", 0o755),
            ] {
                tar.dir(dir, mode);
            }
            tar.file("bin/busybox", 0o755, &busybox);
            for applet in APPLETS {
                tar.symlink(&format!("bin/{applet}"), "busybox");
            }
            tar.file(
                "etc/passwd",
                0o644,
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            );
            tar.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
            Layer::gzip(&tar.finish(), Compression::default())
        })
        .clone()
}

/// Whether `elf` is an x86-64 executable without a program interpreter (statically linked):
/// Debian's dynamic `busybox` package installs the same path as `busybox-static`.
fn check_static_x86_64(elf: &[u8]) -> Result<(), &'static str> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELF64, little endian, e_machine 62 (EM_X86_64).
    if !elf.starts_with(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(62) {
        return Err("is not an x86-64 ELF executable");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("has a truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let at = phoff as usize + i * usize::from(phentsize);
        // PT_INTERP (3): the binary needs a dynamic loader.
        if u32_at(at) == Some(3) {
            return Err("is dynamically linked");
        }
    }
    Ok(())
}

/// A runnable linux/amd64 busybox image (`Cmd: ["sh"]`, like `docker.io/library/busybox`).
pub fn busybox(format: Format) -> Image {
    Image::build(
        format,
        Platform::linux_amd64(),
        Some(&["sh"]),
        &[busybox_layer()],
    )
}

/// A gzip layer holding one file of `size` random (incompressible) bytes derived from `seed`.
/// Stored without compression effort: random data would not shrink anyway.
pub fn random_layer(size: usize, seed: u64) -> Layer {
    let mut data = vec![0u8; size];
    Rng::new(seed).fill(&mut data);
    let mut tar = TarWriter::new();
    tar.dir("data", 0o755);
    tar.file(&format!("data/random-{seed}.bin"), 0o644, &data);
    Layer::gzip(&tar.finish(), Compression::none())
}

/// A runnable image with the busybox layer and `count` random layers of `size` bytes each (for
/// pull timing). Seeds `seed..seed+count` make the layers.
pub fn multi_layer(format: Format, count: usize, size: usize, seed: u64) -> Image {
    let mut layers = vec![busybox_layer()];
    layers.extend((0..count as u64).map(|i| random_layer(size, seed + i)));
    Image::build(format, Platform::linux_amd64(), Some(&["sh"]), &layers)
}

/// A two-platform index: the runnable busybox image for linux/amd64 and a small random image
/// for linux/arm64 (never run here, so its content does not matter).
pub fn multi_platform(format: Format) -> Index {
    let arm = Image::build(
        format,
        Platform::linux_arm64(),
        Some(&["sh"]),
        &[random_layer(64 * 1024, 0xa464)],
    );
    Index::build(format, vec![busybox(format), arm])
}

/// An uncompressed tar layer of one `size`-byte random file, streamed to a file in `dir`
/// (`big-<seed>-<size>.tar`) while hashed: cheap enough for 256 MiB (about a second), and still
/// a real layer that containerd can unpack. Its digest is its diff_id.
pub fn big_layer(dir: &Path, size: u64, seed: u64) -> Layer {
    let path = dir.join(format!("big-{seed}-{size}.tar"));
    let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let mut header = tar::Header::new_gnu();
    header
        .set_path(format!("big-{seed}.bin"))
        .expect("tar path");
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(MTIME);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let write = |out: &mut HashingWriter<_>, bytes: &[u8]| {
        out.write_all(bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()))
    };
    write(&mut out, header.as_bytes());
    let mut rng = Rng::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill(&mut chunk[..n]);
        write(&mut out, &chunk[..n]);
        left -= n as u64;
    }
    // Pad the entry to a 512-byte block, then the two zero blocks that end an archive.
    let pad = (512 - size % 512) % 512;
    write(&mut out, &vec![0u8; pad as usize + 1024]);
    let (digest, written, inner) = out.finish();
    inner
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("flush {}: {e}", path.display()));
    Layer {
        compression: LayerCompression::None,
        digest: digest.clone(),
        size: written,
        diff_id: digest,
        content: Content::File(path),
    }
}

/// A linux/amd64 image of one [`big_layer`] per entry of `sizes`, seeded `seed`, `seed + 1`, ...
/// (for benchmarks and the cluster's pulls; not runnable). The layers are written on one thread
/// each: hashing is the cost, and it parallelises.
pub fn big_image(format: Format, dir: &Path, sizes: &[u64], seed: u64) -> Image {
    let layers: Vec<Layer> = std::thread::scope(|s| {
        let writers: Vec<_> = sizes
            .iter()
            .zip(seed..)
            .map(|(&size, seed)| s.spawn(move || big_layer(dir, size, seed)))
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().expect("layer writer panicked"))
            .collect()
    });
    Image::build(format, Platform::linux_amd64(), None, &layers)
}

/// A deterministic tar builder: root-owned entries with a fixed mtime.
struct TarWriter {
    builder: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        Self { builder }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn dir(&mut self, path: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut h, format!("{path}/"), io::empty())
            .expect("tar dir");
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.builder
            .append_data(&mut h, path, data)
            .expect("tar file");
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut h, path, target)
            .expect("tar symlink");
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("tar in memory")
    }
}

/// A writer that hashes and counts what passes through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The digest and length of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hasher(self.hasher), self.written, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// splitmix64: fast, seedable, and good enough that gzip cannot shrink its output. Not for
/// anything secret.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x5eed_0f90_119b_0c00)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let (words, rest) = buf.as_chunks_mut::<8>();
        for w in words {
            *w = self.next().to_le_bytes();
        }
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untar(layer: &Layer) -> Vec<(String, tar::EntryType)> {
        let bytes = match &layer.content {
            Content::Bytes(b) => b.to_vec(),
            Content::File(p) => std::fs::read(p).unwrap(),
        };
        let mut tar_bytes = Vec::new();
        match layer.compression {
            LayerCompression::Gzip => {
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_end(&mut tar_bytes)
                    .unwrap();
            }
            LayerCompression::None => tar_bytes = bytes,
        }
        assert_eq!(Digest::of(&tar_bytes), layer.diff_id, "diff_id");
        tar::Archive::new(&tar_bytes[..])
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn digests_are_sha256_of_the_bytes() {
        let d = Digest::of(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(d.as_str()), Some(d.clone()));
        assert_eq!(Digest::parse("sha256:E3B0"), None);
        assert_eq!(d.hex().len(), 64);
    }

    #[test]
    fn random_layers_are_deterministic_and_incompressible() {
        let a = random_layer(256 * 1024, 7);
        let b = random_layer(256 * 1024, 7);
        let c = random_layer(256 * 1024, 8);
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert!(a.size > 256 * 1024, "{}", a.size);
        let entries = untar(&a);
        assert!(entries.iter().any(|(p, _)| p == "data/random-7.bin"));
    }

    #[test]
    fn image_config_lists_diff_ids_and_manifest_references_every_blob() {
        let layers = [random_layer(1000, 1), random_layer(1000, 2)];
        for format in [Format::Docker, Format::Oci] {
            let image = Image::build(format, Platform::linux_amd64(), Some(&["sh"]), &layers);
            let config: Value = serde_json::from_slice(&image.config.bytes()).unwrap();
            assert_eq!(config["architecture"], "amd64");
            assert_eq!(config["config"]["Cmd"], json!(["sh"]));
            assert_eq!(
                config["rootfs"]["diff_ids"],
                json!([layers[0].diff_id.as_str(), layers[1].diff_id.as_str()])
            );
            let manifest: Value = serde_json::from_slice(&image.manifest.bytes()).unwrap();
            assert_eq!(manifest["mediaType"], format.manifest_type());
            assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
            assert_eq!(manifest["layers"][1]["digest"], layers[1].digest.as_str());
            assert_eq!(
                manifest["layers"][0]["mediaType"],
                format.layer_type(LayerCompression::Gzip)
            );
            assert_eq!(image.digest(), &Digest::of(&image.manifest.bytes()));
        }
    }

    #[test]
    fn index_names_each_platform() {
        let arm = Image::build(
            Format::Oci,
            Platform::linux_arm64(),
            None,
            &[random_layer(10, 3)],
        );
        let amd = Image::build(
            Format::Oci,
            Platform::linux_amd64(),
            None,
            &[random_layer(10, 4)],
        );
        let index = Index::build(Format::Oci, vec![amd, arm]);
        let v: Value = serde_json::from_slice(&index.manifest.bytes()).unwrap();
        assert_eq!(v["manifests"][1]["platform"]["architecture"], "arm64");
        assert_eq!(v["manifests"][1]["platform"]["variant"], "v8");
        assert_eq!(
            v["manifests"][0]["digest"],
            index.images[0].digest().as_str()
        );
        assert_eq!(index.image_for("arm64").platform, Platform::linux_arm64());
    }

    #[test]
    fn big_layer_is_a_valid_tar_whose_digest_is_its_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let layer = big_layer(dir.path(), 3 * 1024 * 1024 + 5, 9);
        assert_eq!(layer.digest, layer.diff_id);
        let Content::File(path) = &layer.content else {
            panic!("file-backed")
        };
        assert_eq!(Digest::of_file(path).unwrap(), layer.digest);
        assert_eq!(std::fs::metadata(path).unwrap().len(), layer.size);
        let entries = untar(&layer);
        assert_eq!(
            entries,
            vec![("big-9.bin".to_owned(), tar::EntryType::Regular)]
        );
    }

    #[test]
    fn big_image_has_one_distinct_layer_per_size() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [64 * 1024, 64 * 1024, 3 * 1024];
        let image = big_image(Format::Oci, dir.path(), &sizes, 20);
        assert_eq!(image.layers.len(), 3);
        let digests: std::collections::BTreeSet<_> =
            image.layers.iter().map(|l| &l.digest).collect();
        assert_eq!(digests.len(), 3, "same-size layers differ by seed");
        for (layer, size) in image.layers.iter().zip(sizes) {
            // Header, content padded to a block, two zero blocks.
            assert_eq!(layer.size, 512 + size.div_ceil(512) * 512 + 1024);
            assert_eq!(
                layer.media_type,
                Format::Oci.layer_type(LayerCompression::None)
            );
        }
        let again = big_image(Format::Oci, dir.path(), &sizes, 20);
        assert_eq!(again.digest(), image.digest(), "deterministic");
    }

    #[test]
    fn busybox_layer_has_the_binary_and_a_shell_link() {
        if !Path::new(BUSYBOX).exists() {
            eprintln!("SKIPPED: {BUSYBOX} missing (busybox-static)");
            return;
        }
        let entries = untar(&busybox_layer());
        assert!(entries.contains(&("bin/busybox".to_owned(), tar::EntryType::Regular)));
        assert!(entries.contains(&("bin/sh".to_owned(), tar::EntryType::Symlink)));
        assert!(entries.contains(&("tmp/".to_owned(), tar::EntryType::Directory)));
    }

    #[test]
    fn only_static_x86_64_binaries_are_accepted() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        // The test binary itself is dynamically linked.
        assert_eq!(check_static_x86_64(&me), Err("is dynamically linked"));
        assert!(check_static_x86_64(b"#!/bin/sh\n").is_err());
    }
}
