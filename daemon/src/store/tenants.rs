//! Tenants in the store: who owns each namespace, what each tenant holds in
//! each tier, its quotas, and its share of DRAM under pressure.
//!
//! The store knows tenants only as ordinals with a name and limits; who a
//! client *is* (certificate, token, peer credentials) is the server's
//! business (`server/auth.rs`).
//!
//! # Ownership
//!
//! A namespace belongs to the tenant named in its layout's salt
//! (`Layout::salt_tenant`: the bytes before the first NUL, which the server
//! put there with `Layout::for_tenant`), to "default" when the salt has no
//! NUL, and to [`UNOWNED`] when the salt names no configured tenant or the
//! layout is not known yet (a namespace found on disk whose layout was not
//! persisted: it is re-homed when its owner registers the layout). Without
//! authentication ([`TenantConfig::multi`] false) everything belongs to
//! "default".
//!
//! # Accounting (checked by `Store::check_invariants`)
//!
//! 1. A tenant's DRAM `used` is the sum of `rounded(len)` over its blocks'
//!    DRAM copies plus its open reservations (stream puts and zero-copy);
//!    `reserved` is the part that is reservations.
//! 2. Its NVMe `used` is the sum of `len` over its blocks' NVMe copies;
//!    `writing` the sum of `len` over its NVMe writes in flight.
//! 3. `pinned` mirrors the DRAM book's pinned bytes (every pinned block,
//!    rounded, whatever tier it is in).
//!
//! # Quotas and shares
//!
//! A reservation never takes a tenant's DRAM `used` above its DRAM quota:
//! the store first evicts the tenant's own least recently used blocks, as a
//! full tier does, and refuses (`RESOURCE_EXHAUSTED`) when they cannot make
//! room. An NVMe write never takes `used + writing` above the NVMe quota;
//! a block that would is not written (dropped at write-down, not durable
//! under write-through). The DRAM *share* of a tenant is its DRAM quota,
//! scaled down when the quotas add up to more than the tier's low
//! watermark (tenants without a quota have a share of 0). Eviction to make
//! room takes from tenants above their share first, and otherwise only from
//! the tenant that needs the room: a tenant within its share never loses a
//! block to another tenant's puts.

use std::sync::Arc;

use strata_proto::{DEFAULT_TENANT, Layout, TierKind};

use super::index::LOCAL_TIERS;
use super::{DRAM, NVME};

/// A tenant's ordinal in the store.
pub type TenantId = u32;

/// The tenant "default": always ordinal 0.
pub const DEFAULT_ID: TenantId = 0;

/// Name of the pseudo-tenant that holds namespaces whose owner is unknown.
/// Never a valid tenant name (parentheses).
pub const UNOWNED: &str = "(unowned)";

/// One tenant's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpec {
    pub name: String,
    /// DRAM quota in bytes; 0 = none.
    pub dram_bytes: u64,
    /// NVMe quota in bytes; 0 = none.
    pub nvme_bytes: u64,
}

impl TenantSpec {
    pub fn unlimited(name: &str) -> Self {
        TenantSpec {
            name: name.into(),
            dram_bytes: 0,
            nvme_bytes: 0,
        }
    }
}

/// The tenants the store accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConfig {
    /// Ordinal 0 is "default"; names are unique.
    pub tenants: Vec<TenantSpec>,
    /// Authentication is on: namespaces belong to the tenant their salt
    /// names. Off: every namespace belongs to "default".
    pub multi: bool,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            tenants: vec![TenantSpec::unlimited(DEFAULT_TENANT)],
            multi: false,
        }
    }
}

/// What one tenant holds in one tier (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantTierUsage {
    pub used: u64,
    /// 0 = no quota.
    pub quota: u64,
    pub share: u64,
    pub blocks: u64,
    pub refusals: u64,
    pub evictions: u64,
}

/// One tenant's usage (a snapshot, for Stats and metrics).
#[derive(Debug, Clone)]
pub struct TenantUsage {
    pub id: TenantId,
    pub name: Arc<str>,
    pub namespaces: u64,
    pub dram: TenantTierUsage,
    pub nvme: TenantTierUsage,
}

impl TenantUsage {
    pub fn tier(&self, t: TierKind) -> Option<&TenantTierUsage> {
        match t {
            TierKind::Dram => Some(&self.dram),
            TierKind::Nvme => Some(&self.nvme),
            _ => None,
        }
    }
}

/// One tenant's book, kept under the store's lock.
#[derive(Debug, Clone)]
pub(super) struct Book {
    pub name: Arc<str>,
    /// Per tier; 0 = none.
    pub quota: [u64; LOCAL_TIERS],
    /// DRAM bytes kept under pressure (see the module documentation).
    pub share: u64,
    pub used: [u64; LOCAL_TIERS],
    pub blocks: [u64; LOCAL_TIERS],
    /// DRAM: open reservations (part of `used[DRAM]`).
    pub reserved: u64,
    /// DRAM: bytes of pinned blocks (as the DRAM book counts them).
    pub pinned: u64,
    /// NVMe: bytes of writes in flight.
    pub writing: u64,
    pub refusals: [u64; LOCAL_TIERS],
    pub evictions: [u64; LOCAL_TIERS],
    pub namespaces: u64,
}

impl Book {
    fn new(spec: &TenantSpec) -> Self {
        let mut quota = [0; LOCAL_TIERS];
        quota[DRAM] = spec.dram_bytes;
        quota[NVME] = spec.nvme_bytes;
        Book {
            name: spec.name.as_str().into(),
            quota,
            share: 0,
            used: [0; LOCAL_TIERS],
            blocks: [0; LOCAL_TIERS],
            reserved: 0,
            pinned: 0,
            writing: 0,
            refusals: [0; LOCAL_TIERS],
            evictions: [0; LOCAL_TIERS],
            namespaces: 0,
        }
    }

    /// Above its DRAM share: the first to give up blocks under pressure.
    pub fn over_share(&self) -> bool {
        self.used[DRAM] > self.share
    }

    fn tier_usage(&self, t: usize) -> TenantTierUsage {
        TenantTierUsage {
            used: self.used[t] + if t == NVME { self.writing } else { 0 },
            quota: self.quota[t],
            share: if t == DRAM { self.share } else { 0 },
            blocks: self.blocks[t],
            refusals: self.refusals[t],
            evictions: self.evictions[t],
        }
    }

    pub fn usage(&self, id: TenantId) -> TenantUsage {
        TenantUsage {
            id,
            name: self.name.clone(),
            namespaces: self.namespaces,
            dram: self.tier_usage(DRAM),
            nvme: self.tier_usage(NVME),
        }
    }
}

/// The tenants' books and the ownership rule.
#[derive(Debug, Clone)]
pub(super) struct Tenants {
    pub books: Vec<Book>,
    multi: bool,
    /// The UNOWNED pseudo-tenant (multi only).
    unowned: Option<TenantId>,
}

impl Tenants {
    /// Books for `cfg`, with DRAM shares out of `dram_low` bytes (the
    /// tier's low watermark).
    pub fn new(cfg: &TenantConfig, dram_low: u64) -> Self {
        let mut books: Vec<Book> = cfg.tenants.iter().map(Book::new).collect();
        if books.first().is_none_or(|b| &*b.name != DEFAULT_TENANT) {
            books.insert(0, Book::new(&TenantSpec::unlimited(DEFAULT_TENANT)));
        }
        let unowned = cfg.multi.then(|| {
            books.push(Book::new(&TenantSpec::unlimited(UNOWNED)));
            (books.len() - 1) as TenantId
        });
        // Shares: the DRAM quotas, scaled to fit under the low watermark.
        let total: u128 = books.iter().map(|b| b.quota[DRAM] as u128).sum();
        for b in &mut books {
            b.share = if total <= dram_low as u128 {
                b.quota[DRAM]
            } else {
                (b.quota[DRAM] as u128 * dram_low as u128 / total) as u64
            };
        }
        Tenants {
            books,
            multi: cfg.multi,
            unowned,
        }
    }

    pub fn len(&self) -> usize {
        self.books.len()
    }

    pub fn id_of(&self, name: &str) -> Option<TenantId> {
        self.books
            .iter()
            .position(|b| &*b.name == name)
            .map(|i| i as TenantId)
    }

    /// The owner of a namespace with this layout (None: not known yet).
    pub fn owner_of(&self, layout: Option<&Layout>) -> TenantId {
        let Some(unowned) = self.unowned.filter(|_| self.multi) else {
            return DEFAULT_ID;
        };
        let Some(layout) = layout else {
            return unowned;
        };
        match layout.salt_tenant() {
            None => DEFAULT_ID,
            Some(name) => std::str::from_utf8(name)
                .ok()
                .filter(|n| *n != UNOWNED)
                .and_then(|n| self.id_of(n))
                .unwrap_or(unowned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::{Dtype, KvKind};

    fn layout(salt: &[u8]) -> Layout {
        Layout {
            model_id: "m".into(),
            dtype: Dtype::F16,
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            tokens_per_block: 4,
            kv_kind: KvKind::Separate,
            tp_rank: 0,
            tp_size: 1,
            tenant_salt: salt.to_vec(),
        }
    }

    fn cfg(multi: bool, quotas: &[(&str, u64)]) -> TenantConfig {
        let mut tenants = vec![TenantSpec::unlimited(DEFAULT_TENANT)];
        for &(n, q) in quotas {
            tenants.push(TenantSpec {
                name: n.into(),
                dram_bytes: q,
                nvme_bytes: 0,
            });
        }
        TenantConfig { tenants, multi }
    }

    #[test]
    fn ownership_is_read_off_the_salt() {
        let t = Tenants::new(&cfg(true, &[("alice", 0), ("bob", 0)]), 1 << 20);
        let alice = t.id_of("alice").unwrap();
        let unowned = t.id_of(UNOWNED).unwrap();
        assert_eq!(t.owner_of(Some(&layout(b"").for_tenant("alice"))), alice);
        assert_eq!(t.owner_of(Some(&layout(b"x").for_tenant("bob"))), 2);
        assert_eq!(t.owner_of(Some(&layout(b"plain"))), DEFAULT_ID);
        // A salt naming no configured tenant, or the pseudo-tenant itself.
        assert_eq!(t.owner_of(Some(&layout(b"carol\0x"))), unowned);
        assert_eq!(t.owner_of(Some(&layout(b"(unowned)\0x"))), unowned);
        assert_eq!(t.owner_of(None), unowned);
        assert_eq!(t.unowned, Some(unowned));
        // Without authentication everything is the default tenant's.
        let single = Tenants::new(&cfg(false, &[]), 1 << 20);
        assert_eq!(single.len(), 1);
        assert_eq!(single.owner_of(Some(&layout(b"alice\0x"))), DEFAULT_ID);
        assert_eq!(single.owner_of(None), DEFAULT_ID);
    }

    #[test]
    fn shares_are_quotas_scaled_under_the_low_watermark() {
        let t = Tenants::new(&cfg(true, &[("a", 300), ("b", 100)]), 1000);
        assert_eq!(t.books[1].share, 300);
        assert_eq!(t.books[2].share, 100);
        assert_eq!(t.books[0].share, 0, "no quota, no share");
        let t = Tenants::new(&cfg(true, &[("a", 3000), ("b", 1000)]), 1000);
        assert_eq!(t.books[1].share, 750);
        assert_eq!(t.books[2].share, 250);
    }
}
