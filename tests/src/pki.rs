//! Certificates for TLS tests: a CA and certificates it signs for 127.0.0.1 and localhost,
//! written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A certificate authority that issues certificates into a folder.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

/// PEM files of one certificate and its key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate at `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).expect("ca certificate");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write ca");
        Self {
            issuer: Issuer::new(params, key),
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The CA certificate's file.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for 127.0.0.1 and localhost, good for servers and clients alike.
    pub fn issue(&self, who: &str) -> Identity {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, who);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let identity = Identity {
            cert: self.dir.join(format!("{}-{who}.pem", self.name)),
            key: self.dir.join(format!("{}-{who}.key", self.name)),
        };
        std::fs::write(&identity.cert, cert.pem()).expect("write certificate");
        std::fs::write(&identity.key, key.serialize_pem()).expect("write key");
        identity
    }
}
