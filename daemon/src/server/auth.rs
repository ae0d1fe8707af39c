//! Who is calling, and what they may touch.
//!
//! [`Auth::identify`] maps a call's transport credentials to a [`Tenant`]:
//! on TCP a bearer token (`auth.tcp = "token"`) or the names of a verified
//! client certificate (`"mtls"`); on the Unix socket the peer's uid, else its
//! gid, from the kernel (`SO_PEERCRED`, `"peercred"`). Never from anything
//! the request body says. A transport whose mode is `"none"` makes every
//! client the tenant "default". Without any authentication "default" is an
//! admin and owns every namespace: the single-node setup of earlier
//! releases.
//!
//! # Invariants
//!
//! 1. A call either carries an identity that maps to exactly one tenant, or
//!    is refused before it touches the store: `UNAUTHENTICATED` when the
//!    credential is missing or wrong (the message says which credential is
//!    expected), `PERMISSION_DENIED` when a valid identity maps to no
//!    tenant (or to several).
//! 2. A tenant uses only the namespaces it owns (`store/tenants.rs`: the
//!    owner is read off the layout's salt); an admin tenant uses every
//!    namespace and makes the admin calls. Every other access is
//!    `PERMISSION_DENIED`, names the namespace and the caller's tenant (not
//!    the owner), changes nothing, and counts in
//!    `strata_auth_denied_total{reason}`.
//! 3. Tokens are compared by their XXH3-128 digests, every configured token
//!    each time and without an early exit, so the time taken says nothing
//!    about how much of a token was right.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use metrics::Counter;
use strata_proto::{DEFAULT_TENANT, Layout, NamespaceId};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::config::{AuthConfig, TcpAuth, UdsAuth};
use crate::metrics::Registry;
use crate::store::tenants::TenantId;

/// A tenant as the server sees it.
#[derive(Debug)]
pub struct Tenant {
    /// The store's ordinal.
    pub id: TenantId,
    pub name: Arc<str>,
    /// May make admin calls (Drain, EvictNamespace, ExportNamespace) and use
    /// every namespace.
    pub admin: bool,
    /// May map the shared DRAM arena and use the zero-copy calls.
    pub zero_copy: bool,
}

/// Why a call was refused (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No credential where one is required.
    NoCredential,
    /// A token that is not known.
    BadCredential,
    /// A valid identity (uid, certificate) mapped to no tenant.
    UnknownIdentity,
    /// Another tenant's namespace (or reservation).
    ForeignNamespace,
    /// An admin call by a tenant that is not an admin.
    NotAdmin,
    /// The zero-copy path by a tenant without `zero_copy`, or the arena
    /// asked for by such a tenant or an unmapped local user.
    ZeroCopy,
}

impl Denied {
    const ALL: [Denied; 6] = [
        Denied::NoCredential,
        Denied::BadCredential,
        Denied::UnknownIdentity,
        Denied::ForeignNamespace,
        Denied::NotAdmin,
        Denied::ZeroCopy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Denied::NoCredential => "no_credential",
            Denied::BadCredential => "bad_credential",
            Denied::UnknownIdentity => "unknown_identity",
            Denied::ForeignNamespace => "foreign_namespace",
            Denied::NotAdmin => "not_admin",
            Denied::ZeroCopy => "zero_copy",
        }
    }
}

/// A configured token: its tenant and its digest.
#[derive(Debug, Clone)]
struct Token {
    digest: u128,
    tenant: TenantId,
}

/// Why the tokens file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("auth.tokens_file {path}: {reason}")]
pub struct TokensError {
    pub path: PathBuf,
    pub reason: String,
}

/// Shortest token accepted: 128 bits of a hex or base64 secret.
pub const MIN_TOKEN_BYTES: usize = 16;

pub struct Auth {
    tcp: TcpAuth,
    uds: UdsAuth,
    multi: bool,
    /// By ordinal ("default" first).
    tenants: Vec<Arc<Tenant>>,
    by_uid: HashMap<u32, TenantId>,
    by_gid: HashMap<u32, TenantId>,
    by_tls_name: HashMap<String, TenantId>,
    tokens: RwLock<Vec<Token>>,
    tokens_file: Option<PathBuf>,
    denied: [Counter; Denied::ALL.len()],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tcp", &self.tcp)
            .field("uds", &self.uds)
            .field("tenants", &self.tenants.len())
            .finish()
    }
}

impl Auth {
    /// Builds the identity tables and reads the tokens file (if any).
    /// `ids` gives each configured tenant's store ordinal.
    pub fn new(
        cfg: &AuthConfig,
        ids: impl Fn(&str) -> Option<TenantId>,
        registry: &Registry,
    ) -> Result<Auth, TokensError> {
        let mut tenants = Vec::new();
        let (mut by_uid, mut by_gid, mut by_tls_name) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for t in &cfg.tenants {
            let id = ids(&t.name).expect("the store knows every configured tenant");
            tenants.push(Arc::new(Tenant {
                id,
                name: t.name.as_str().into(),
                admin: t.admin,
                zero_copy: t.zero_copy,
            }));
            by_uid.extend(t.uids.iter().map(|&u| (u, id)));
            by_gid.extend(t.gids.iter().map(|&g| (g, id)));
            by_tls_name.extend(t.tls_names.iter().map(|n| (n.clone(), id)));
        }
        let denied = Denied::ALL.map(|d| {
            registry.counter(
                "strata_auth_denied_total",
                "Calls refused by authentication or authorisation, by reason",
                &[("reason", d.label())],
            )
        });
        let auth = Auth {
            tcp: cfg.tcp,
            uds: cfg.uds,
            multi: cfg.multi,
            tenants,
            by_uid,
            by_gid,
            by_tls_name,
            tokens: RwLock::new(Vec::new()),
            tokens_file: cfg.tokens_file.clone(),
            denied,
        };
        auth.reload_tokens()?;
        Ok(auth)
    }

    /// (Re-)reads the tokens file: one `tenant token` per line, `#`
    /// comments and blank lines ignored. On error the tokens in use stay.
    /// Returns how many tokens are configured.
    pub fn reload_tokens(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.tokens_file else {
            return Ok(0);
        };
        let tokens = self.parse_tokens(path)?;
        let n = tokens.len();
        *self.tokens.write().expect("tokens lock poisoned") = tokens;
        Ok(n)
    }

    fn parse_tokens(&self, path: &Path) -> Result<Vec<Token>, TokensError> {
        let err = |reason: String| TokensError {
            path: path.into(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut out: Vec<Token> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(err(format!(
                    "line {}: expected `tenant token` (two words)",
                    i + 1
                )));
            };
            let Some(t) = self.tenants.iter().find(|t| &*t.name == name) else {
                return Err(err(format!(
                    "line {}: tenant {name:?} is not configured in [[tenants]]",
                    i + 1
                )));
            };
            if token.len() < MIN_TOKEN_BYTES {
                return Err(err(format!(
                    "line {}: the token of {name:?} has {} bytes; at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
                    i + 1,
                    token.len()
                )));
            }
            let digest = xxhash_rust::xxh3::xxh3_128(token.as_bytes());
            if out.iter().any(|o| o.digest == digest) {
                return Err(err(format!("line {}: a token appears twice", i + 1)));
            }
            out.push(Token {
                digest,
                tenant: t.id,
            });
        }
        Ok(out)
    }

    /// Whether tenants are separated (some transport authenticates).
    pub fn is_multi(&self) -> bool {
        self.multi
    }

    /// Whether Unix-socket peers are identified by their credentials.
    pub fn local_peers_authenticated(&self) -> bool {
        self.uds == UdsAuth::PeerCred
    }

    /// The tenant "default".
    pub fn default_tenant(&self) -> &Arc<Tenant> {
        &self.tenants[0]
    }

    /// Whether the tenant with ordinal `id` is an admin.
    pub fn tenant_is_admin(&self, id: TenantId) -> bool {
        self.tenants.iter().any(|t| t.id == id && t.admin)
    }

    /// Counts a refusal and builds its status.
    pub fn deny(&self, why: Denied, status: Status) -> Status {
        self.denied[why as usize].increment(1);
        tracing::debug!(
            reason = why.label(),
            message = status.message(),
            "call refused"
        );
        status
    }

    /// The tenant a call comes from (invariant 1).
    pub fn identify<T>(&self, req: &Request<T>) -> Result<Arc<Tenant>, Status> {
        if !self.multi {
            return Ok(self.tenants[0].clone());
        }
        if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
            return match info.peer_cred {
                Some(c) => self.local_tenant(c.uid(), c.gid()),
                None => Err(self.deny(
                    Denied::NoCredential,
                    Status::unauthenticated(
                        "the Unix socket gave no peer credentials for this connection",
                    ),
                )),
            };
        }
        match self.tcp {
            TcpAuth::None => Ok(self.tenants[0].clone()),
            TcpAuth::Token => self.token_tenant(req.metadata()),
            TcpAuth::Mtls => self.cert_tenant(req.peer_certs().as_deref().map(|v| &v[..])),
        }
    }

    /// The tenant of a local peer (Unix socket, arena hand-off).
    pub fn local_tenant(&self, uid: u32, gid: u32) -> Result<Arc<Tenant>, Status> {
        if self.uds == UdsAuth::None {
            return Ok(self.tenants[0].clone());
        }
        match self.by_uid.get(&uid).or_else(|| self.by_gid.get(&gid)) {
            Some(&id) => Ok(self.tenant(id)),
            None => Err(self.deny(
                Denied::UnknownIdentity,
                Status::permission_denied(format!(
                    "uid {uid} (gid {gid}) is not mapped to a tenant: add it to `uids` (or its group to `gids`) of a [[tenants]] entry of this daemon"
                )),
            )),
        }
    }

    fn tenant(&self, id: TenantId) -> Arc<Tenant> {
        self.tenants
            .iter()
            .find(|t| t.id == id)
            .expect("identity tables hold configured tenants")
            .clone()
    }

    fn token_tenant(&self, md: &tonic::metadata::MetadataMap) -> Result<Arc<Tenant>, Status> {
        let presented = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(token) = presented else {
            return Err(self.deny(
                Denied::NoCredential,
                Status::unauthenticated(
                    "this daemon requires a bearer token on TCP (auth.tcp = \"token\"): send the metadata `authorization: Bearer <token>` with your tenant's token",
                ),
            ));
        };
        let digest = xxhash_rust::xxh3::xxh3_128(token.as_bytes());
        let tokens = self.tokens.read().expect("tokens lock poisoned");
        // Every token, no early exit (invariant 3).
        let mut found: Option<TenantId> = None;
        for t in tokens.iter() {
            if ct_eq(t.digest, digest) {
                found = Some(t.tenant);
            }
        }
        drop(tokens);
        match found {
            Some(id) => Ok(self.tenant(id)),
            None => Err(self.deny(
                Denied::BadCredential,
                Status::unauthenticated(
                    "the bearer token is not one this daemon knows (auth.tokens_file); check the token, or ask the operator whether it was rotated",
                ),
            )),
        }
    }

    fn cert_tenant(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<Arc<Tenant>, Status> {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Err(self.deny(
                Denied::NoCredential,
                Status::unauthenticated(
                    "this daemon requires a client certificate on TCP (auth.tcp = \"mtls\"), signed by the CA in its auth.tls_client_ca",
                ),
            ));
        };
        let names = super::x509::client_names(leaf);
        let mut ids: Vec<TenantId> = names
            .iter()
            .filter_map(|n| self.by_tls_name.get(n).copied())
            .collect();
        ids.dedup();
        match ids[..] {
            [id] => Ok(self.tenant(id)),
            [] => Err(self.deny(
                Denied::UnknownIdentity,
                Status::permission_denied(format!(
                    "client certificate names {names:?} are not mapped to a tenant: add one to `tls_names` of a [[tenants]] entry of this daemon"
                )),
            )),
            _ => Err(self.deny(
                Denied::UnknownIdentity,
                Status::permission_denied(format!(
                    "client certificate names {names:?} map to more than one tenant; give the client a certificate for one"
                )),
            )),
        }
    }

    /// The layout as `who` registers it (see `Layout::for_tenant`): its
    /// salt prefixed with the tenant's name. An admin may register a salt
    /// that already names a tenant (`strata import` of another tenant's
    /// export); nobody else may send a salt holding a NUL.
    pub fn layout_for(&self, who: &Tenant, layout: Layout) -> Result<Layout, Status> {
        if !self.multi {
            return Ok(layout);
        }
        if layout.salt_tenant().is_some() {
            if who.admin {
                return Ok(layout);
            }
            return Err(Status::invalid_argument(
                "layout.tenant_salt: holds a NUL byte; the daemon puts the tenant's name before a NUL itself, so a client's salt may not contain one",
            ));
        }
        Ok(layout.for_tenant(&who.name))
    }

    /// May `who` use namespace `ns`, owned by `owner` (None: not
    /// registered; the store answers that)? Invariant 2.
    pub fn check_namespace(
        &self,
        who: &Tenant,
        ns: NamespaceId,
        owner: Option<TenantId>,
    ) -> Result<(), Status> {
        match owner {
            Some(o) if o != who.id && !who.admin => Err(self.deny(
                Denied::ForeignNamespace,
                Status::permission_denied(format!(
                    "namespace_id: namespace {ns} does not belong to tenant {}; a tenant reads and writes only the namespaces it registered",
                    who.name
                )),
            )),
            _ => Ok(()),
        }
    }

    /// An admin call by `who`.
    pub fn check_admin(&self, who: &Tenant, call: &str) -> Result<(), Status> {
        if who.admin {
            return Ok(());
        }
        Err(self.deny(
            Denied::NotAdmin,
            Status::permission_denied(format!(
                "{call} is an admin call and tenant {} is not an admin (admin = true in its [[tenants]] entry)",
                who.name
            )),
        ))
    }

    /// The zero-copy path (arena, slots) by `who`.
    pub fn check_zero_copy(&self, who: &Tenant) -> Result<(), Status> {
        if who.zero_copy {
            return Ok(());
        }
        Err(self.deny(
            Denied::ZeroCopy,
            Status::permission_denied(format!(
                "tenant {} may not use the zero-copy path (zero_copy = false in its [[tenants]] entry); use Put and Get",
                who.name
            )),
        ))
    }

    /// One line per transport for the start-up log.
    pub fn describe(&self, tcp: Option<std::net::SocketAddr>, insecure_tcp: bool) -> Vec<String> {
        let mut out = Vec::new();
        if !self.multi {
            out.push(format!(
                "authentication is off: every client is tenant \"{DEFAULT_TENANT}\", an admin that owns every namespace. {}",
                match tcp {
                    Some(a) if a.ip().is_loopback() => format!(
                        "This is safe only because TCP listens on loopback ({a}) and the Unix sockets are reachable only by local users allowed to open them: other machines cannot connect. Turn on [auth] (see README, Authentication) before exposing TCP or sharing the node with untrusted users."
                    ),
                    Some(a) => format!(
                        "TCP listens on {a}, beyond loopback, WITHOUT authentication (auth.allow_insecure_tcp = true): anyone who reaches it may read and write every namespace."
                    ),
                    None => "TCP is off; the Unix sockets are reachable only by local users allowed to open them.".into(),
                }
            ));
            return out;
        }
        out.push(format!(
            "authentication is on: {} tenants; TCP: {}; Unix socket: {}",
            self.tenants.len(),
            match self.tcp {
                TcpAuth::None => "none (every TCP client is tenant \"default\")",
                TcpAuth::Token => "bearer tokens",
                TcpAuth::Mtls => "client certificates (mTLS)",
            },
            match self.uds {
                UdsAuth::None => "none (every local client is tenant \"default\")",
                UdsAuth::PeerCred => "peer credentials (uid/gid)",
            }
        ));
        if insecure_tcp {
            out.push(format!(
                "TCP listens beyond loopback on {} with auth.allow_insecure_tcp = true: credentials and blocks cross the network unencrypted",
                tcp.map(|a| a.to_string()).unwrap_or_default()
            ));
        }
        out
    }
}

/// Equality of two digests without a data-dependent branch.
fn ct_eq(a: u128, b: u128) -> bool {
    std::hint::black_box(a ^ b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn auth(toml: &str, tokens: &str) -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, tokens).unwrap();
        let toml = toml.replace("TOKENS", &path.display().to_string());
        let cfg = Config::from_toml(&toml).unwrap().resolve().unwrap();
        let names: Vec<String> = cfg.auth.tenants.iter().map(|t| t.name.clone()).collect();
        let a = Auth::new(
            &cfg.auth,
            |n| names.iter().position(|x| x == n).map(|i| i as TenantId),
            &Registry::new(),
        );
        (a.unwrap(), dir)
    }

    const TOKEN_CFG: &str = "[auth]\ntcp = \"token\"\ntokens_file = \"TOKENS\"\n\
        [[tenants]]\nname = \"alice\"\n[[tenants]]\nname = \"bob\"\nadmin = true\n";

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_map_to_tenants_and_bad_ones_are_refused() {
        let (a, _d) = auth(
            TOKEN_CFG,
            "# comment\nalice aaaaaaaaaaaaaaaaaaaa\n\nbob  bbbbbbbbbbbbbbbbbbbb\nalice cccccccccccccccccccc\n",
        );
        assert_eq!(
            &*a.identify(&req(Some("Bearer aaaaaaaaaaaaaaaaaaaa")))
                .unwrap()
                .name,
            "alice"
        );
        assert_eq!(
            &*a.identify(&req(Some("bearer cccccccccccccccccccc")))
                .unwrap()
                .name,
            "alice"
        );
        let bob = a
            .identify(&req(Some("Bearer bbbbbbbbbbbbbbbbbbbb")))
            .unwrap();
        assert!(bob.admin);
        let e = a.identify(&req(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("authorization: Bearer"),
            "{}",
            e.message()
        );
        for bad in [
            "Bearer aaaaaaaaaaaaaaaaaaab",
            "Bearer aaaaaaaaaaaaaaaaaaaa2",
            "Basic aaaaaaaaaaaaaaaaaaaa",
            "aaaaaaaaaaaaaaaaaaaa",
        ] {
            let e = a.identify(&req(Some(bad))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
    }

    #[test]
    fn a_bad_tokens_file_is_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let cfg = Config::from_toml(&TOKEN_CFG.replace("TOKENS", &path.display().to_string()))
            .unwrap()
            .resolve()
            .unwrap();
        let names = ["default", "alice", "bob"];
        let make = || {
            Auth::new(
                &cfg.auth,
                |n| names.iter().position(|x| *x == n).map(|i| i as TenantId),
                &Registry::new(),
            )
        };
        for (text, want) in [
            (
                "alice short\n",
                "line 1: the token of \"alice\" has 5 bytes",
            ),
            (
                "\ncarol aaaaaaaaaaaaaaaaaaaa\n",
                "line 2: tenant \"carol\" is not configured",
            ),
            (
                "alice aaaaaaaaaaaaaaaaaaaa extra\n",
                "line 1: expected `tenant token`",
            ),
            (
                "alice aaaaaaaaaaaaaaaaaaaa\nbob aaaaaaaaaaaaaaaaaaaa\n",
                "line 2: a token appears twice",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = make().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Re-reading keeps the old tokens when the new file is bad.
        std::fs::write(&path, "alice aaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let a = make().unwrap();
        std::fs::write(&path, "alice short\n").unwrap();
        assert!(a.reload_tokens().is_err());
        assert!(
            a.identify(&req(Some("Bearer aaaaaaaaaaaaaaaaaaaa")))
                .is_ok()
        );
        std::fs::write(&path, "alice dddddddddddddddddddd\n").unwrap();
        assert_eq!(a.reload_tokens().unwrap(), 1);
        assert!(
            a.identify(&req(Some("Bearer aaaaaaaaaaaaaaaaaaaa")))
                .is_err()
        );
        assert!(
            a.identify(&req(Some("Bearer dddddddddddddddddddd")))
                .is_ok()
        );
    }

    #[test]
    fn salts_are_folded_and_nul_is_reserved() {
        let (a, _d) = auth(TOKEN_CFG, "alice aaaaaaaaaaaaaaaaaaaa\n");
        let alice = a.tenants[1].clone();
        let bob = a.tenants[2].clone();
        let l = Layout {
            model_id: "m".into(),
            dtype: strata_proto::Dtype::F16,
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            tokens_per_block: 4,
            kv_kind: strata_proto::KvKind::Separate,
            tp_rank: 0,
            tp_size: 1,
            tenant_salt: b"s".to_vec(),
        };
        assert_eq!(
            a.layout_for(&alice, l.clone()).unwrap().tenant_salt,
            b"alice\0s"
        );
        let mut nul = l.clone();
        nul.tenant_salt = b"bob\0s".to_vec();
        let e = a.layout_for(&alice, nul.clone()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("layout.tenant_salt"));
        // An admin registers on behalf of the tenant its salt names.
        assert_eq!(a.layout_for(&bob, nul.clone()).unwrap(), nul);
    }
}
