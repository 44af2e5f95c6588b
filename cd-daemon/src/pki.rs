//! Cluster identity: the cluster CA, certificates, join tokens and TLS configurations.
//!
//! - `cdctl ca init` creates the cluster CA and the master's certificate ([`ca_init`]).
//! - A node generates its own ECDSA P-256 key; with a one-time, expiring join token it
//!   asks the master to certify the public key ([`CaSigner::sign_node`]). The private
//!   key never leaves the node.
//! - The token carries the SHA-256 fingerprint of the CA certificate, so a joining node
//!   authenticates the master before it sends the token ([`join_client_config`]), as
//!   kubeadm's discovery hash does.
//! - Every other connection is mutual TLS 1.3 with certificates chained to the cluster
//!   CA; the name a peer claims in its `Hello` must be a SAN of its certificate
//!   ([`cert_matches_name`]).
//!
//! The CA key stays in the master's PKI directory. rcgen cannot re-read a certificate
//! without an X.509 parser, so the issuer is rebuilt from the fixed CA parameters
//! ([`ca_params`]) and the stored key: the issuer name and key identifier are derived
//! deterministically from those, and `ca_init` signs the CA certificate from the very
//! same parameters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// Files `cdctl ca init` writes into the master's PKI directory.
pub const MASTER_FILES: [&str; 4] = ["ca.pem", "ca.key", "master.pem", "master.key"];
/// Files a node keeps in its state directory once it has joined.
pub const NODE_FILES: [&str; 3] = ["node.key", "node.pem", "ca.pem"];

const CA_COMMON_NAME: &str = "cdsync cluster CA";
const TOKEN_PREFIX: &str = "cdj1";
/// Validity of issued certificates.
const LEAF_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite cluster keys", .0.display())]
    Exists(PathBuf),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: no PEM {what} found", path.display())]
    Pem { what: &'static str, path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
    #[error("join token is malformed (expected {TOKEN_PREFIX}.<id>.<secret>.<ca-sha256>)")]
    TokenMalformed,
    #[error("join token is unknown, already used or expired")]
    TokenRejected,
    #[error("public key is not an ECDSA P-256 SubjectPublicKeyInfo")]
    BadPublicKey,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The CA's certificate parameters; fixed so the issuer can be rebuilt from its key.
pub fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    p
}

fn leaf_params(name: &str, extra_sans: &[String]) -> Result<CertificateParams, PkiError> {
    let mut sans = vec![name.to_owned()];
    sans.extend(extra_sans.iter().cloned());
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    for s in sans {
        let san = match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.try_into()?),
        };
        if !p.subject_alt_names.contains(&san) {
            p.subject_alt_names.push(san);
        }
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time_now();
    p.not_before = now - time_days(1);
    p.not_after = now + time_days(LEAF_DAYS);
    let mut serial = [0u8; 16];
    rand::fill(&mut serial);
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn time_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                PkiError::Io {
                    op: "create",
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents.as_bytes())
        .map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Creates the cluster CA and the master's certificate in `dir` (`MASTER_FILES`).
/// Refuses to overwrite any existing file.
pub fn ca_init(dir: &Path, master_name: &str, extra_sans: &[String]) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    for f in MASTER_FILES {
        let p = dir.join(f);
        if p.exists() {
            return Err(PkiError::Exists(p));
        }
    }
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca_params().self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params(), &ca_key);
    let master_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let master_cert = leaf_params(master_name, extra_sans)?.signed_by(&master_key, &issuer)?;
    write_new(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    write_new(&dir.join("master.key"), &master_key.serialize_pem(), 0o600)?;
    write_new(&dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    write_new(&dir.join("master.pem"), &master_cert.pem(), 0o644)?;
    Ok(())
}

/// Signs node certificates; held by the master.
pub struct CaSigner {
    key: KeyPair,
    ca_pem: String,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner").finish_non_exhaustive()
    }
}

/// A peer's public key received over the wire (ECDSA P-256 only).
struct RemotePublicKey(Vec<u8>);

impl PublicKeyData for RemotePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// DER prefix of an ECDSA P-256 SubjectPublicKeyInfo with an uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl CaSigner {
    pub fn load(pki_dir: &Path) -> Result<Self, PkiError> {
        let key_path = pki_dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let ca_path = pki_dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io("read", &ca_path))?;
        Ok(Self { key, ca_pem })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Certifies `spki_der` (the node's public key) for `name`; returns the PEM cert.
    pub fn sign_node(&self, name: &str, spki_der: &[u8]) -> Result<String, PkiError> {
        let point = spki_der
            .strip_prefix(&P256_SPKI_PREFIX[..])
            .ok_or(PkiError::BadPublicKey)?;
        if point.len() != 65 || point[0] != 4 {
            return Err(PkiError::BadPublicKey);
        }
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = leaf_params(name, &[])?.signed_by(&RemotePublicKey(point.to_vec()), &issuer)?;
        Ok(cert.pem())
    }
}

/// Generates a node key, returning (private key PEM, public key SPKI DER).
pub fn generate_node_key() -> Result<(String, Vec<u8>), PkiError> {
    let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok((k.serialize_pem(), k.subject_public_key_info()))
}

/// A loaded certificate chain and key, plus the cluster CA.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl Identity {
    pub fn load(name: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Self, PkiError> {
        let leaf = CertificateDer::from_pem_file(cert).map_err(|_| PkiError::Pem {
            what: "certificate",
            path: cert.to_owned(),
        })?;
        let ca_der = CertificateDer::from_pem_file(ca).map_err(|_| PkiError::Pem {
            what: "certificate",
            path: ca.to_owned(),
        })?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|_| PkiError::Pem {
            what: "private key",
            path: key.to_owned(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            chain: vec![leaf, ca_der.clone()],
            key,
            ca: ca_der,
        })
    }

    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca)
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        // A CA we created ourselves; adding it can fail only on a corrupt file,
        // which Identity::load would have refused.
        let _ = r.add(self.ca.clone());
        r
    }
}

pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a peer must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// The master's listener: a node without a certificate may only ask to join.
    OptionalForJoin,
}

pub fn server_config(id: &Identity, auth: ClientAuth) -> Result<Arc<ServerConfig>, PkiError> {
    let b = WebPkiClientVerifier::builder_with_provider(Arc::new(id.roots()), provider());
    let b = match auth {
        ClientAuth::Required => b,
        ClientAuth::OptionalForJoin => b.allow_unauthenticated(),
    };
    let verifier = b.build().map_err(|e| PkiError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    // No session tickets: they break plain reads on kernel-TLS receivers later on, and
    // they would arrive after the handshake at a moment the client cannot predict,
    // which the hand-off to kernel TLS relies on not happening (see crate::link).
    cfg.send_tls13_tickets = 0;
    // Transfer links hand their traffic secrets to kernel TLS (crate::link).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, PkiError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    // Transfer links hand their traffic secrets to kernel TLS (crate::link).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// True if `cert` is valid for DNS name `name` (its chain was verified by the handshake).
pub fn cert_matches_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(sn) = ServerName::try_from(name) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &sn).is_ok()
}

/// Verifies the master during a join: the chain it presents must contain a CA whose
/// SHA-256 equals the token's pin, and the leaf must chain to that CA and carry the
/// expected name. The CA found is kept for the node to store.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: [u8; 32],
    found: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn ca(&self) -> Option<CertificateDer<'static>> {
        self.found.lock().unwrap().clone()
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the master's CA does not match the join token's fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        *self.found.lock().unwrap() = Some(ca.clone().into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration for joining: no client certificate, master pinned by the token.
pub fn join_client_config(
    pin: [u8; 32],
) -> Result<(Arc<ClientConfig>, Arc<PinnedCaVerifier>), PkiError> {
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        found: Mutex::new(None),
        provider: provider(),
    });
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((Arc::new(cfg), verifier))
}

/// A parsed join token: `cdj1.<id>.<secret>.<ca-sha256>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_pin: [u8; 32],
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let mut it = s.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(id), Some(secret), Some(pin), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(PkiError::TokenMalformed);
        };
        let pin: [u8; 32] = unhex(pin)
            .and_then(|v| v.try_into().ok())
            .ok_or(PkiError::TokenMalformed)?;
        if id.len() != 16 || secret.len() != 32 || unhex(id).is_none() || unhex(secret).is_none() {
            return Err(PkiError::TokenMalformed);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_pin: pin,
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id,
            self.secret,
            hex(&self.ca_pin)
        )
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredToken {
    secret_sha256: String,
    expires_unix: i64,
}

/// The master's one-time join tokens, persisted so a restart keeps them valid.
/// Only a hash of each secret is stored.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    tokens: BTreeMap<String, StoredToken>,
}

impl TokenStore {
    pub fn load(path: PathBuf) -> Self {
        let tokens = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { path, tokens }
    }

    fn save(&self) -> Result<(), PkiError> {
        let tmp = self.path.with_extension("tmp");
        let body = serde_json::to_vec(&self.tokens).expect("tokens serialise");
        std::fs::write(&tmp, body).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("rename", &self.path))
    }

    /// Creates a token valid for `ttl_seconds` from `now_unix`.
    pub fn create(
        &mut self,
        ca_pin: [u8; 32],
        now_unix: i64,
        ttl_seconds: u64,
    ) -> Result<(JoinToken, i64), PkiError> {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        rand::fill(&mut id);
        rand::fill(&mut secret);
        let t = JoinToken {
            id: hex(&id),
            secret: hex(&secret),
            ca_pin,
        };
        let expires = now_unix + ttl_seconds as i64;
        self.tokens.retain(|_, v| v.expires_unix > now_unix);
        self.tokens.insert(
            t.id.clone(),
            StoredToken {
                secret_sha256: hex(&Sha256::digest(t.secret.as_bytes())),
                expires_unix: expires,
            },
        );
        self.save()?;
        Ok((t, expires))
    }

    /// Consumes a token: succeeds once, before expiry.
    pub fn redeem(&mut self, token: &JoinToken, now_unix: i64) -> Result<(), PkiError> {
        let ok = match self.tokens.get(&token.id) {
            Some(st) => {
                st.expires_unix > now_unix
                    && constant_time_eq(
                        st.secret_sha256.as_bytes(),
                        hex(&Sha256::digest(token.secret.as_bytes())).as_bytes(),
                    )
            }
            None => false,
        };
        if !ok {
            return Err(PkiError::TokenRejected);
        }
        self.tokens.remove(&token.id);
        self.save()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_chains_to_ca_and_names_node() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "master", &["127.0.0.1".into()]).unwrap();
        assert!(matches!(
            ca_init(dir.path(), "master", &[]),
            Err(PkiError::Exists(_))
        ));
        let signer = CaSigner::load(dir.path()).unwrap();
        let (key_pem, spki) = generate_node_key().unwrap();
        let cert_pem = signer.sign_node("node7", &spki).unwrap();
        std::fs::write(dir.path().join("n.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("n.key"), &key_pem).unwrap();
        let id = Identity::load(
            "node7",
            &dir.path().join("n.pem"),
            &dir.path().join("n.key"),
            &dir.path().join("ca.pem"),
        )
        .unwrap();
        assert!(cert_matches_name(&id.chain[0], "node7"));
        assert!(!cert_matches_name(&id.chain[0], "node8"));
        // The chain verifies against the CA as a client certificate would.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(id.roots()), provider())
                .build()
                .unwrap();
        verifier
            .verify_client_cert(&id.chain[0], &[], UnixTime::now())
            .unwrap();
        assert!(matches!(
            signer.sign_node("x", &spki[1..]),
            Err(PkiError::BadPublicKey)
        ));
    }

    #[test]
    fn tokens_are_one_time_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TokenStore::load(dir.path().join("tokens.json"));
        let (t, _) = s.create([7; 32], 1000, 60).unwrap();
        let parsed = JoinToken::parse(&t.to_string()).unwrap();
        assert_eq!(parsed, t);
        let mut reloaded = TokenStore::load(dir.path().join("tokens.json"));
        reloaded.redeem(&parsed, 1010).unwrap();
        assert!(
            reloaded.redeem(&parsed, 1011).is_err(),
            "second use refused"
        );
        let (t2, _) = reloaded.create([7; 32], 1000, 60).unwrap();
        assert!(reloaded.redeem(&t2, 1061).is_err(), "expired token refused");
        let mut forged = t2.clone();
        forged.secret = "0".repeat(32);
        assert!(reloaded.redeem(&forged, 1001).is_err());
        assert!(JoinToken::parse("cdj1.zz").is_err());
    }
}
