//! The names of an X.509 certificate that identify a client: the subject's
//! common names and the subject alternative names of type DNS and URI.
//!
//! The certificate has already been verified by rustls (chain to the
//! configured CA, validity) before its names are read here, so this only
//! walks DER far enough to find them. It is a small reader, not a validator:
//! any structure it does not expect ends the walk with what it found so far
//! (never a panic, never an out-of-bounds read: the property test feeds it
//! arbitrary bytes).

/// A DER element: its tag and its contents.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
}

/// Reads the element at the start of `b`; returns it and what follows.
fn tlv(b: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &x in &rest[..n] {
            len = (len << 8) | x as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let (body, after) = rest.split_at(len);
    Some((Tlv { tag, body }, after))
}

/// The elements of a constructed element's contents, in order.
fn children(mut b: &[u8]) -> impl Iterator<Item = Tlv<'_>> {
    std::iter::from_fn(move || {
        let (t, rest) = tlv(b)?;
        b = rest;
        Some(t)
    })
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// id-at-commonName, 2.5.4.3.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// GeneralName choices: `[2] dNSName`, `[6] uniformResourceIdentifier`.
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;

/// The subject CNs, then the DNS and URI SANs, of a DER certificate.
pub fn client_names(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Some((cert, _)) = tlv(der).filter(|(t, _)| t.tag == SEQUENCE) else {
        return out;
    };
    let Some(tbs) = children(cert.body).next().filter(|t| t.tag == SEQUENCE) else {
        return out;
    };
    let mut fields = children(tbs.body).peekable();
    // version [0] is optional.
    if fields.peek().is_some_and(|t| t.tag == 0xa0) {
        fields.next();
    }
    // serialNumber, signature, issuer, validity, subject.
    let Some(subject) = fields.nth(4).filter(|t| t.tag == SEQUENCE) else {
        return out;
    };
    for rdn in children(subject.body).filter(|t| t.tag == SET) {
        for atv in children(rdn.body).filter(|t| t.tag == SEQUENCE) {
            let mut parts = children(atv.body);
            if let (Some(oid), Some(value)) = (parts.next(), parts.next())
                && oid.tag == OID
                && oid.body == OID_CN
                && let Ok(s) = std::str::from_utf8(value.body)
            {
                out.push(s.to_string());
            }
        }
    }
    // subjectPublicKeyInfo, then optional [1], [2], [3].
    for f in fields.skip(1) {
        if f.tag != EXTENSIONS {
            continue;
        }
        let Some(exts) = children(f.body).next().filter(|t| t.tag == SEQUENCE) else {
            continue;
        };
        for ext in children(exts.body).filter(|t| t.tag == SEQUENCE) {
            let mut parts = children(ext.body);
            let Some(oid) = parts.next() else { continue };
            if oid.tag != OID || oid.body != OID_SAN {
                continue;
            }
            // critical BOOLEAN is optional; the value is an OCTET STRING.
            let Some(value) = parts.find(|t| t.tag == OCTET_STRING) else {
                continue;
            };
            let Some((names, _)) = tlv(value.body).filter(|(t, _)| t.tag == SEQUENCE) else {
                continue;
            };
            for n in children(names.body) {
                if (n.tag == SAN_DNS || n.tag == SAN_URI)
                    && let Ok(s) = std::str::from_utf8(n.body)
                {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_cn_and_sans_of_a_real_certificate() {
        let mut p = rcgen::CertificateParams::new(vec![
            "alice.example".to_string(),
            "spiffe://cluster/ns/a/sa/engine".to_string(),
        ])
        .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Org");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice-engine");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            client_names(cert.der()),
            [
                "alice-engine",
                "alice.example",
                "spiffe://cluster/ns/a/sa/engine"
            ]
        );
    }

    proptest! {
        /// Arbitrary bytes, and every truncation of a real certificate,
        /// give some names or none, never a panic.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..2000) {
            let _ = client_names(&bytes);
            let p = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let der = p.self_signed(&key).unwrap().der().to_vec();
            let _ = client_names(&der[..cut.min(der.len())]);
        }
    }
}
