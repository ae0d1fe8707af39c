//! Validated domain types shared by the daemon and the clients.
//!
//! A value of one of these types has passed validation: a [`BlockKey`] has
//! 1..=32 bytes, a [`Layout`] has sane dimensions and a block size that fits
//! in `u32`. Code that receives them does not check again.

use std::fmt;

/// Longest block key, in bytes (SHA-256 page hashes are 32 bytes).
pub const MAX_KEY_BYTES: usize = 32;
/// Largest block any layout may describe (1 GiB): larger is certainly a
/// mistake in the layout, and block offsets and lengths stay within `u32`.
pub const MAX_BLOCK_BYTES: u64 = 1 << 30;
/// Upper bounds on a layout's dimensions. Real models are far below them
/// (405B-class models: 126 layers, 8-16 KV heads, head dim 128; MLA latent
/// 576); anything above is a unit mix-up, refused with the field's name.
pub const MAX_LAYERS: u32 = 1024;
pub const MAX_KV_HEADS: u32 = 1024;
pub const MAX_HEAD_DIM: u32 = 8192;
pub const MAX_TOKENS_PER_BLOCK: u32 = 1 << 16;
pub const MAX_TP_SIZE: u32 = 1024;
pub const MAX_MODEL_ID_BYTES: usize = 256;
pub const MAX_TENANT_SALT_BYTES: usize = 64;
/// Longest tenant name (the daemon's `[[tenants]] name`).
pub const MAX_TENANT_NAME_BYTES: usize = 32;
/// Longest salt of a stored layout: a tenant's name, a NUL and a client's
/// salt ([`Layout::for_tenant`]).
pub const MAX_STORED_SALT_BYTES: usize = MAX_TENANT_NAME_BYTES + 1 + MAX_TENANT_SALT_BYTES;
/// The tenant that owns namespaces whose salt names no tenant, and every
/// namespace when the daemon runs without authentication.
pub const DEFAULT_TENANT: &str = "default";

/// Whether `name` is a valid tenant name: 1 to [`MAX_TENANT_NAME_BYTES`]
/// ASCII letters, digits, `.`, `_` or `-` (so it never holds the NUL that
/// ends it inside a salt).
pub fn is_tenant_name(name: &str) -> bool {
    (1..=MAX_TENANT_NAME_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Identifies a layout (and so a family of compatible blocks). Derived from
/// the layout by [`Layout::namespace_id`]; blocks of different namespaces never mix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub u64);

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ns:{self}")
    }
}

impl std::str::FromStr for NamespaceId {
    type Err = String;
    /// Accepts the 16-hex-digit form printed by `Display` (an optional `0x` prefix).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.strip_prefix("0x").unwrap_or(s);
        if t.is_empty() || t.len() > 16 {
            return Err(format!("namespace id {s:?} is not 1-16 hex digits"));
        }
        u64::from_str_radix(t, 16)
            .map(NamespaceId)
            .map_err(|_| format!("namespace id {s:?} is not hexadecimal"))
    }
}

/// An opaque block key of 1..=32 bytes chosen by the engine (a chained
/// block hash). Stored inline: no heap allocation per key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    len: u8,
    bytes: [u8; MAX_KEY_BYTES],
}

impl BlockKey {
    /// Validates length: 1..=32 bytes.
    pub fn new(b: &[u8]) -> Result<Self, KeyError> {
        if b.is_empty() {
            return Err(KeyError::Empty);
        }
        if b.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(b.len()));
        }
        let mut bytes = [0u8; MAX_KEY_BYTES];
        bytes[..b.len()].copy_from_slice(b);
        Ok(BlockKey {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Never true for a constructed key; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn to_hex(&self) -> String {
        hex(self.as_bytes())
    }

    /// Parses a key written in hexadecimal (as the CLI prints it).
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("0x").unwrap_or(s);
        if !s.len().is_multiple_of(2) {
            return Err(format!("key {s:?} has an odd number of hex digits"));
        }
        let mut out = Vec::with_capacity(s.len() / 2);
        for i in (0..s.len()).step_by(2) {
            let byte = s
                .get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("key {s:?} is not hexadecimal"))?;
            out.push(byte);
        }
        BlockKey::new(&out).map_err(|e| format!("key {s:?}: {e}"))
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key:{}", self.to_hex())
    }
}
impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty (keys are 1 to {MAX_KEY_BYTES} bytes)")]
    Empty,
    #[error("key has {0} bytes; the limit is {MAX_KEY_BYTES}")]
    TooLong(usize),
}

pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Fp8E4m3,
}

impl Dtype {
    pub const fn bytes(self) -> u32 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::Fp8E4m3 => 1,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8E4m3 => "fp8",
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Dtype::F32),
            "f16" | "float16" | "half" => Some(Dtype::F16),
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "fp8" | "fp8_e4m3" | "fp8-e4m3" | "e4m3" => Some(Dtype::Fp8E4m3),
            _ => None,
        }
    }
    const fn code(self) -> u8 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 2,
            Dtype::Bf16 => 3,
            Dtype::Fp8E4m3 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvKind {
    /// Separate K and V tensors per layer.
    Separate,
    /// One latent tensor per layer (multi-head latent attention).
    Mla,
}

impl KvKind {
    /// Tensors stored per layer.
    pub const fn tensors(self) -> u32 {
        match self {
            KvKind::Separate => 2,
            KvKind::Mla => 1,
        }
    }
    const fn code(self) -> u8 {
        match self {
            KvKind::Separate => 1,
            KvKind::Mla => 2,
        }
    }
}

/// Where a block lives. Ordered fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    Gpu,
    Dram,
    Cxl,
    Nvme,
    Remote,
}

impl TierKind {
    pub const ALL: [TierKind; 5] = [
        TierKind::Gpu,
        TierKind::Dram,
        TierKind::Cxl,
        TierKind::Nvme,
        TierKind::Remote,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            TierKind::Gpu => "gpu",
            TierKind::Dram => "dram",
            TierKind::Cxl => "cxl",
            TierKind::Nvme => "nvme",
            TierKind::Remote => "remote",
        }
    }
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The shape of a client's KV cache. Validated on construction
/// ([`Layout::new`]); its namespace id is a pure function of its fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    pub model_id: String,
    pub dtype: Dtype,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub tokens_per_block: u32,
    pub kv_kind: KvKind,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub tenant_salt: Vec<u8>,
}

/// A layout field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}
impl std::error::Error for LayoutError {}

impl Layout {
    /// Checks every dimension; the first bad field is reported. The salt
    /// is held to the wire limit ([`MAX_TENANT_SALT_BYTES`]).
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.validate_with_salt(MAX_TENANT_SALT_BYTES)
    }

    /// The tenant a stored layout belongs to: the bytes of its salt before
    /// the first NUL ([`Layout::for_tenant`]), or `None` when the salt has
    /// no NUL (the layout belongs to [`DEFAULT_TENANT`]).
    pub fn salt_tenant(&self) -> Option<&[u8]> {
        let nul = self.tenant_salt.iter().position(|&b| b == 0)?;
        Some(&self.tenant_salt[..nul])
    }

    /// The layout as tenant `tenant` owns it: its salt becomes `tenant`, a
    /// NUL, then the client's salt. The namespace id hashes the result, so
    /// two tenants registering the same model never share a namespace, and
    /// the owner of a namespace is read back from its layout
    /// ([`salt_tenant`](Layout::salt_tenant)), also after a restart.
    /// [`DEFAULT_TENANT`] is not folded: its namespaces keep the ids they
    /// had before authentication existed. `tenant` must be a valid name
    /// ([`is_tenant_name`]).
    pub fn for_tenant(&self, tenant: &str) -> Layout {
        debug_assert!(is_tenant_name(tenant), "tenant name {tenant:?}");
        if tenant == DEFAULT_TENANT {
            return self.clone();
        }
        let mut salt = Vec::with_capacity(tenant.len() + 1 + self.tenant_salt.len());
        salt.extend_from_slice(tenant.as_bytes());
        salt.push(0);
        salt.extend_from_slice(&self.tenant_salt);
        Layout {
            tenant_salt: salt,
            ..self.clone()
        }
    }

    fn validate_with_salt(&self, max_salt: usize) -> Result<(), LayoutError> {
        let err = |field: &'static str, reason: String| Err(LayoutError { field, reason });
        if self.model_id.is_empty() {
            return err("layout.model_id", "must not be empty".into());
        }
        if self.model_id.len() > MAX_MODEL_ID_BYTES {
            return err(
                "layout.model_id",
                format!(
                    "has {} bytes; the limit is {MAX_MODEL_ID_BYTES}",
                    self.model_id.len()
                ),
            );
        }
        let dims: [(&'static str, u32, u32); 4] = [
            ("layout.num_layers", self.num_layers, MAX_LAYERS),
            ("layout.num_kv_heads", self.num_kv_heads, MAX_KV_HEADS),
            ("layout.head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "layout.tokens_per_block",
                self.tokens_per_block,
                MAX_TOKENS_PER_BLOCK,
            ),
        ];
        for (field, value, max) in dims {
            if value == 0 {
                return err(field, "must be at least 1".into());
            }
            if value > max {
                return err(field, format!("{value} is above the limit of {max}"));
            }
        }
        if self.kv_kind == KvKind::Mla && self.num_kv_heads != 1 {
            return err(
                "layout.num_kv_heads",
                format!(
                    "an MLA layout has one latent head, not {}",
                    self.num_kv_heads
                ),
            );
        }
        if self.tp_size == 0 {
            return err("layout.tp_size", "must be at least 1".into());
        }
        if self.tp_size > MAX_TP_SIZE {
            return err(
                "layout.tp_size",
                format!("{} is above the limit of {MAX_TP_SIZE}", self.tp_size),
            );
        }
        if self.tp_rank >= self.tp_size {
            return err(
                "layout.tp_rank",
                format!("{} must be below tp_size {}", self.tp_rank, self.tp_size),
            );
        }
        if self.tenant_salt.len() > max_salt {
            return err(
                "layout.tenant_salt",
                format!(
                    "has {} bytes; the limit is {max_salt}",
                    self.tenant_salt.len()
                ),
            );
        }
        let block = self.block_bytes_u128();
        if block > MAX_BLOCK_BYTES as u128 {
            return err(
                "layout",
                format!(
                    "one block would be {block} bytes (layers x kv tensors x tokens x heads x head_dim x dtype); the limit is {MAX_BLOCK_BYTES}"
                ),
            );
        }
        Ok(())
    }

    fn block_bytes_u128(&self) -> u128 {
        self.token_bytes_u128() * self.tokens_per_block as u128
    }

    fn token_bytes_u128(&self) -> u128 {
        self.num_layers as u128
            * self.kv_kind.tensors() as u128
            * self.num_kv_heads as u128
            * self.head_dim as u128
            * self.dtype.bytes() as u128
    }

    /// Bytes of one token across all layers (K and V). A block's length is
    /// a positive multiple of this, at most [`Layout::block_bytes`].
    pub fn token_bytes(&self) -> u64 {
        self.token_bytes_u128() as u64
    }

    /// Bytes of one full block.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes_u128() as u64
    }

    /// The canonical, versioned encoding of every field (little-endian
    /// integers, length-prefixed strings): what [`namespace_id`] hashes,
    /// and what the daemon persists so that a restart knows the layouts of
    /// the blocks it recovers ([`Layout::from_canonical`] reads it back).
    ///
    /// [`namespace_id`]: Layout::namespace_id
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64 + self.model_id.len() + self.tenant_salt.len());
        buf.extend_from_slice(CANONICAL_TAG);
        buf.extend_from_slice(&(self.model_id.len() as u32).to_le_bytes());
        buf.extend_from_slice(self.model_id.as_bytes());
        buf.push(self.dtype.code());
        buf.push(self.kv_kind.code());
        for v in [
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.tokens_per_block,
            self.tp_rank,
            self.tp_size,
        ] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&(self.tenant_salt.len() as u32).to_le_bytes());
        buf.extend_from_slice(&self.tenant_salt);
        buf
    }

    /// Decodes [`canonical_bytes`](Layout::canonical_bytes) and validates
    /// the result; any other input is an error (never a misread layout).
    pub fn from_canonical(b: &[u8]) -> Result<Layout, String> {
        let mut r = Reader(b);
        if r.take(CANONICAL_TAG.len())? != CANONICAL_TAG {
            return Err("not a strata.layout.v1 encoding".into());
        }
        let n = r.u32()? as usize;
        if n > MAX_MODEL_ID_BYTES {
            return Err(format!("model id of {n} bytes"));
        }
        let model_id = std::str::from_utf8(r.take(n)?)
            .map_err(|_| "model id is not UTF-8".to_string())?
            .to_string();
        let dtype = match r.take(1)?[0] {
            1 => Dtype::F32,
            2 => Dtype::F16,
            3 => Dtype::Bf16,
            4 => Dtype::Fp8E4m3,
            c => return Err(format!("unknown dtype code {c}")),
        };
        let kv_kind = match r.take(1)?[0] {
            1 => KvKind::Separate,
            2 => KvKind::Mla,
            c => return Err(format!("unknown kv kind code {c}")),
        };
        let mut dims = [0u32; 6];
        for d in &mut dims {
            *d = r.u32()?;
        }
        let n = r.u32()? as usize;
        if n > MAX_STORED_SALT_BYTES {
            return Err(format!("tenant salt of {n} bytes"));
        }
        let tenant_salt = r.take(n)?.to_vec();
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the layout", r.0.len()));
        }
        let [
            num_layers,
            num_kv_heads,
            head_dim,
            tokens_per_block,
            tp_rank,
            tp_size,
        ] = dims;
        let layout = Layout {
            model_id,
            dtype,
            num_layers,
            num_kv_heads,
            head_dim,
            tokens_per_block,
            kv_kind,
            tp_rank,
            tp_size,
            tenant_salt,
        };
        // Stored layouts carry their tenant's name in the salt.
        layout
            .validate_with_salt(MAX_STORED_SALT_BYTES)
            .map_err(|e| e.to_string())?;
        Ok(layout)
    }

    /// The namespace id: XXH3-64 of [`canonical_bytes`](Layout::canonical_bytes).
    /// Stable across processes, machines and releases; changing it is a
    /// format break.
    pub fn namespace_id(&self) -> NamespaceId {
        NamespaceId(xxhash_rust::xxh3::xxh3_64(&self.canonical_bytes()))
    }

    /// Validates a block length against this layout.
    pub fn check_block_len(&self, len: u64) -> Result<(), String> {
        let token = self.token_bytes();
        let block = self.block_bytes();
        if len == 0 || !len.is_multiple_of(token) || len > block {
            return Err(format!(
                "{len} is not a whole number of tokens of this layout: expected a positive multiple of {token} bytes (one token) up to {block} bytes (one block of {} tokens)",
                self.tokens_per_block
            ));
        }
        Ok(())
    }
}

const CANONICAL_TAG: &[u8] = b"strata.layout.v1\0";

/// A cursor over bytes being decoded.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated layout encoding".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Identifies a lease taken by Lookup. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

/// Identifies a zero-copy reservation. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            model_id: "m".into(),
            dtype: Dtype::F16,
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            tokens_per_block: 16,
            kv_kind: KvKind::Separate,
            tp_rank: 0,
            tp_size: 1,
            tenant_salt: vec![],
        }
    }

    #[test]
    fn namespace_id_is_stable_and_field_sensitive() {
        let a = layout();
        // Pinned value: changing the encoding breaks every stored namespace.
        assert_eq!(a.namespace_id(), layout().namespace_id());
        assert_eq!(a.namespace_id(), NamespaceId(0x0f83_4c26_b924_c7bf));
        let mut b = layout();
        b.tp_rank = 0;
        b.tp_size = 2;
        assert_ne!(a.namespace_id(), b.namespace_id());
        let mut c = layout();
        c.tenant_salt = b"x".to_vec();
        assert_ne!(a.namespace_id(), c.namespace_id());
        assert_eq!(a.block_bytes(), 30 * 2 * 3 * 64 * 2 * 16);
        assert_eq!(a.token_bytes() * 16, a.block_bytes());
    }

    #[test]
    fn canonical_encoding_round_trips_and_refuses_garbage() {
        let mut l = layout();
        l.tenant_salt = b"salt".to_vec();
        l.dtype = Dtype::Bf16;
        let b = l.canonical_bytes();
        assert_eq!(Layout::from_canonical(&b).unwrap(), l);
        assert_eq!(
            NamespaceId(xxhash_rust::xxh3::xxh3_64(&b)),
            l.namespace_id()
        );
        for cut in 0..b.len() {
            assert!(Layout::from_canonical(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(Layout::from_canonical(&extra).is_err());
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(Layout::from_canonical(&bad).is_err());
    }

    #[test]
    fn tenant_folding_separates_tenants_and_survives_the_canonical_form() {
        let mut l = layout();
        l.tenant_salt = b"cache-salt".to_vec();
        // The default tenant's namespaces keep their ids.
        assert_eq!(l.for_tenant(DEFAULT_TENANT), l);
        assert_eq!(l.salt_tenant(), None);
        let a = l.for_tenant("alice");
        let b = l.for_tenant("bob");
        assert_eq!(a.tenant_salt, b"alice\0cache-salt");
        assert_eq!(a.salt_tenant(), Some(&b"alice"[..]));
        assert_eq!(b.salt_tenant(), Some(&b"bob"[..]));
        assert_ne!(a.namespace_id(), b.namespace_id());
        assert_ne!(a.namespace_id(), l.namespace_id());
        // Pinned: a tenant's namespace id is part of the on-disk format.
        assert_eq!(
            layout().for_tenant("alice").namespace_id(),
            NamespaceId(0x42a9_b884_7945_54ac)
        );
        // A full client salt under the longest name is still stored and
        // read back, though it is above the wire limit.
        let mut full = layout();
        full.tenant_salt = vec![7; MAX_TENANT_SALT_BYTES];
        let name = "n".repeat(MAX_TENANT_NAME_BYTES);
        let f = full.for_tenant(&name);
        assert_eq!(f.tenant_salt.len(), MAX_STORED_SALT_BYTES);
        assert!(f.validate().is_err(), "the wire limit holds for clients");
        assert_eq!(Layout::from_canonical(&f.canonical_bytes()).unwrap(), f);
        let mut over = f.clone();
        over.tenant_salt.push(1);
        assert!(Layout::from_canonical(&over.canonical_bytes()).is_err());
        assert!(is_tenant_name("team-a.prod_1"));
        for bad in ["", "a b", "a\0b", "é", &"x".repeat(33)] {
            assert!(!is_tenant_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn layout_validation_names_the_field() {
        let mut l = layout();
        l.num_layers = 0;
        assert_eq!(l.validate().unwrap_err().field, "layout.num_layers");
        let mut l = layout();
        l.head_dim = 1 << 20;
        assert_eq!(l.validate().unwrap_err().field, "layout.head_dim");
        let mut l = layout();
        l.tp_rank = 1;
        assert_eq!(l.validate().unwrap_err().field, "layout.tp_rank");
        let mut l = layout();
        l.num_layers = 1000;
        l.num_kv_heads = 1000;
        l.head_dim = 1000;
        assert_eq!(l.validate().unwrap_err().field, "layout");
        assert!(layout().validate().is_ok());
    }

    #[test]
    fn key_hex_round_trip_and_limits() {
        let k = BlockKey::new(&[0xab, 0x01]).unwrap();
        assert_eq!(k.to_hex(), "ab01");
        assert_eq!(BlockKey::from_hex("ab01").unwrap(), k);
        assert_eq!(BlockKey::new(&[]), Err(KeyError::Empty));
        assert_eq!(BlockKey::new(&[0; 33]), Err(KeyError::TooLong(33)));
        assert!(BlockKey::from_hex("abc").is_err());
        assert!(BlockKey::from_hex("zz").is_err());
        // Keys differing only in length are different keys.
        assert_ne!(
            BlockKey::new(&[1, 0]).unwrap(),
            BlockKey::new(&[1]).unwrap()
        );
    }

    #[test]
    fn block_len_check() {
        let l = layout();
        assert!(l.check_block_len(l.block_bytes()).is_ok());
        assert!(l.check_block_len(l.token_bytes()).is_ok());
        assert!(l.check_block_len(0).is_err());
        assert!(
            l.check_block_len(l.block_bytes() + l.token_bytes())
                .is_err()
        );
        assert!(l.check_block_len(l.token_bytes() + 1).is_err());
    }
}
