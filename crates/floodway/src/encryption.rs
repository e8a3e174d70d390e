//! Envelope encryption of event fields, wire-compatible with aws-kms-ee (what
//! aws-lambda-stream's `encryptEvent` and `decryptEvent` use).
//!
//! A data key (32 random bytes) encrypts the fields; the event carries the data key encrypted
//! by a master key in its `eem` member (`{"dataKeys": {region: base64}, "masterKeyAlias",
//! "fields"}`), and readers ask a [`KeyProvider`] (AWS KMS in `floodway-aws`, a [`KeyFile`] for
//! the embedded hub and NATS) for its plaintext. Byte for byte as aws-kms-ee 1.0.3 does it:
//!
//! - a field is any member, at any depth, whose *name* is listed in `fields`; its whole value
//!   is encrypted as its JSON text (a string keeps its quotes); `null` stays `null`;
//! - the passphrase is the data key's bytes read as UTF-8, invalid sequences replaced (Node's
//!   `Buffer.toString()`), and the cipher is CryptoJS's passphrase mode: OpenSSL's
//!   `EVP_BytesToKey` with MD5 and a random 8-byte salt gives an AES-256-CBC key and IV
//!   (PKCS#7 padding), and the value is base64 of `Salted__`, the salt, and the ciphertext;
//! - on decryption the text is JSON-parsed, except aws-kms-ee's legacy rule: a text with one
//!   `E` that is not quoted, an object or an array is kept as a string.
//!
//! [`Pipeline::decrypt`](crate::pipeline::PipelineBuilder::decrypt) and
//! [`Pipeline::encrypt`](crate::pipeline::PipelineBuilder::encrypt) are the steps. Decrypted
//! values never reach a fault: a fault shows the event as it was before decryption, and its
//! error message has the decrypted values scrubbed.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine as _;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::event::Event;
use crate::hub::HubFuture;

/// The member that carries the encryption metadata.
pub const EEM_FIELD: &str = "eem";

const SALTED: &[u8] = b"Salted__";

/// The encryption metadata of an event (its `eem` member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eem {
    /// The data key, encrypted by the master key, base64, per region (or per key file).
    #[serde(rename = "dataKeys")]
    pub data_keys: serde_json::Map<String, Value>,
    /// The master key.
    #[serde(rename = "masterKeyAlias")]
    pub master_key_alias: String,
    /// The names of the encrypted members.
    pub fields: Vec<String>,
}

/// A data key: its plaintext, and the metadata that lets readers recover it.
#[derive(Clone)]
pub struct DataKey {
    /// The 32 bytes that encrypt fields.
    pub plaintext: Arc<[u8]>,
    /// The data key encrypted by the master key, base64, per region.
    pub data_keys: serde_json::Map<String, Value>,
    /// The master key.
    pub master_key_alias: String,
}

impl Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("master_key_alias", &self.master_key_alias)
            .finish_non_exhaustive()
    }
}

/// Where data keys come from: AWS KMS (`floodway_aws::KmsKeys`), a [`KeyFile`], or a test's.
pub trait KeyProvider: Send + Sync + Debug + 'static {
    /// A data key to encrypt with (a provider may reuse one for a while, as aws-kms-ee
    /// does).
    fn data_key(&self) -> HubFuture<'_, DataKey>;

    /// The plaintext of the data key `eem` carries.
    fn decrypt_key<'a>(&'a self, eem: &'a Eem) -> HubFuture<'a, Arc<[u8]>>;
}

/// The data key's bytes as CryptoJS receives them from aws-kms-ee: decoded as UTF-8 with
/// invalid sequences replaced, then encoded again.
fn passphrase(key: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(key).into_owned().into_bytes()
}

/// OpenSSL's `EVP_BytesToKey` with MD5, one round: a 32-byte key and a 16-byte IV.
fn key_and_iv(passphrase: &[u8], salt: &[u8]) -> ([u8; 32], [u8; 16]) {
    let mut out = Vec::with_capacity(48);
    let mut last: Vec<u8> = Vec::new();
    while out.len() < 48 {
        let mut md5 = Md5::new();
        md5.update(&last);
        md5.update(passphrase);
        md5.update(salt);
        last = md5.finalize().to_vec();
        out.extend_from_slice(&last);
    }
    let mut key = [0; 32];
    let mut iv = [0; 16];
    key.copy_from_slice(&out[..32]);
    iv.copy_from_slice(&out[32..48]);
    (key, iv)
}

/// Encrypts `value` (its JSON text) with a data key and a given salt.
fn encrypt_with_salt(key: &[u8], value: &Value, salt: [u8; 8]) -> String {
    let (k, iv) = key_and_iv(&passphrase(key), &salt);
    let plain = value.to_string();
    let cipher = cbc::Encryptor::<aes::Aes256>::new(&k.into(), &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes());
    let mut out = Vec::with_capacity(16 + cipher.len());
    out.extend_from_slice(SALTED);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&cipher);
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Encrypts `value` with the data key `key`, as aws-kms-ee encrypts a field.
///
/// # Errors
/// When the system has no randomness for the salt.
pub fn encrypt_value(key: &[u8], value: &Value) -> Result<String, Error> {
    let mut salt = [0; 8];
    getrandom::fill(&mut salt).map_err(|e| Error::fatal_msg("NoRandomness", e.to_string()))?;
    Ok(encrypt_with_salt(key, value, salt))
}

/// Decrypts a field aws-kms-ee (or [`encrypt_value`]) encrypted with the data key `key`.
///
/// # Errors
/// A poison error named `DecryptionError` saying what is wrong (not base64, not in
/// OpenSSL's format, the wrong key), never quoting the ciphertext.
pub fn decrypt_value(key: &[u8], text: &str) -> Result<Value, Error> {
    let bad = |why: &str| Error::poison_msg("DecryptionError", why.to_owned());
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| bad("the value is not base64"))?;
    if bytes.len() < 32 || !bytes.starts_with(SALTED) || (bytes.len() - 16) % 16 != 0 {
        return Err(bad(
            "the value is not an encrypted value (Salted__, salt, AES blocks)",
        ));
    }
    let (k, iv) = key_and_iv(&passphrase(key), &bytes[8..16]);
    let plain = cbc::Decryptor::<aes::Aes256>::new(&k.into(), &iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(&bytes[16..])
        .map_err(|_| bad("the value does not decrypt with this data key"))?;
    let plain = String::from_utf8(plain)
        .map_err(|_| bad("the value does not decrypt with this data key"))?;
    Ok(parse(plain))
}

/// aws-kms-ee's reading of a decrypted text (see the [module docs](self)).
fn parse(text: String) -> Value {
    let wrapped = |open: char, close: char| text.starts_with(open) && text.ends_with(close);
    let legacy = !text.is_empty()
        && !wrapped('{', '}')
        && !wrapped('[', ']')
        && !wrapped('"', '"')
        && text.matches('E').count() == 1;
    if legacy {
        return Value::String(text);
    }
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// The names a field list names: `customer.email` names every member `email`, since the
/// metadata names members, not paths.
fn names(fields: &[String]) -> Vec<String> {
    fields
        .iter()
        .map(|f| f.rsplit('.').next().unwrap_or(f).to_owned())
        .collect()
}

/// Applies `f` to every member of `value`, at any depth, whose name is in `names` (not
/// descending into those).
fn each_named(
    value: &mut Value,
    names: &[String],
    f: &mut dyn FnMut(&mut Value) -> Result<(), Error>,
) -> Result<(), Error> {
    match value {
        Value::Object(map) => {
            for (name, member) in map.iter_mut() {
                if names.iter().any(|n| n == name) {
                    if !member.is_null() {
                        f(member)?;
                    }
                } else {
                    each_named(member, names, f)?;
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                each_named(item, names, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The event with the members named by `fields` encrypted by a data key of `keys`, and its
/// `eem` set.
///
/// # Errors
/// When `keys` gives no data key.
pub async fn encrypt_event(
    keys: &dyn KeyProvider,
    event: &Event,
    fields: &[String],
) -> Result<Event, Error> {
    // A payload that does not read would be published as an envelope alone.
    event.check_payload()?;
    let key = keys.data_key().await.map_err(provider_error)?;
    let names = names(fields);
    let mut value = event.to_value();
    if let Value::Object(map) = &mut value {
        map.remove(EEM_FIELD);
    }
    let mut encrypt = |v: &mut Value| {
        *v = Value::String(encrypt_value(&key.plaintext, v)?);
        Ok(())
    };
    each_named(&mut value, &names, &mut encrypt)?;
    if let Value::Object(map) = &mut value {
        let eem = Eem {
            data_keys: key.data_keys.clone(),
            master_key_alias: key.master_key_alias.clone(),
            fields: names,
        };
        map.insert(
            EEM_FIELD.into(),
            serde_json::to_value(eem).unwrap_or(Value::Null),
        );
    }
    Event::from_value(value).map_err(|e| Error::poison_msg("EncryptionError", e.to_string()))
}

/// An event decrypted: the event without its `eem`, its fields in the clear, and the texts of
/// the decrypted values (to scrub from messages).
#[derive(Debug, Clone)]
pub struct Decrypted {
    /// The event in the clear.
    pub event: Event,
    /// The decrypted values' texts.
    pub secrets: Vec<String>,
}

/// Decrypts an event's encrypted fields with the data key its `eem` carries; an event without
/// `eem` is returned as it is.
///
/// # Errors
/// A poison error when the metadata or a value is malformed or does not decrypt, or the
/// provider's error when it cannot give the data key.
pub async fn decrypt_event(keys: &dyn KeyProvider, event: &Event) -> Result<Decrypted, Error> {
    // A payload that does not read would show no `eem`, and pass on encrypted.
    event.check_payload()?;
    let Some(eem) = event.field(EEM_FIELD) else {
        return Ok(Decrypted {
            event: event.clone(),
            secrets: Vec::new(),
        });
    };
    let eem: Eem = serde_json::from_value(eem.clone()).map_err(|e| {
        Error::poison_msg(
            "DecryptionError",
            format!("the `eem` member is malformed: {e}"),
        )
    })?;
    let key = keys.decrypt_key(&eem).await.map_err(provider_error)?;
    let mut value = event.to_value();
    if let Value::Object(map) = &mut value {
        map.remove(EEM_FIELD);
    }
    let mut secrets = Vec::new();
    let mut decrypt = |v: &mut Value| {
        let Value::String(text) = v else {
            return Err(Error::poison_msg(
                "DecryptionError",
                "an encrypted member is not a string",
            ));
        };
        let clear = decrypt_value(&key, text)?;
        crate::fault::collect_scalars(Some(&clear), &mut secrets);
        *v = clear;
        Ok(())
    };
    each_named(&mut value, &eem.fields, &mut decrypt)?;
    // Worth scrubbing from messages: not `true` or `false`, which would mangle every message
    // (nor empty texts: the scrub skips those).
    secrets.retain(|t| !matches!(t.as_str(), "true" | "false"));
    let event = Event::from_value(value)
        .map_err(|e| Error::poison_msg("DecryptionError", e.to_string()))?;
    Ok(Decrypted { event, secrets })
}

fn provider_error(e: crate::BoxError) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => *e,
        Err(e) => Error::transient_msg("KeyProviderError", e.to_string()),
    }
}

/// The event a unit of work had before a step decrypted it, kept for its faults.
#[derive(Debug, Clone)]
pub(crate) struct Undecrypted {
    /// Shared with the unit of work it came from: keeping it copies nothing.
    pub(crate) event: std::sync::Arc<Event>,
    pub(crate) secrets: Vec<String>,
}

/// Data keys wrapped by a local master key: for the embedded hub and NATS, where there is no
/// KMS. The master key is 32 bytes (a file of 32 raw bytes, or of their base64); a data key
/// is wrapped with it as a field is encrypted with a data key, under the name `file:<name>`.
/// Only services holding the same file read such events (Node services read KMS-wrapped ones).
pub struct KeyFile {
    name: String,
    master: Arc<[u8]>,
    /// The data key in use, and how many events it has encrypted.
    current: Mutex<Option<(DataKey, u32)>>,
    unwrapped: Mutex<HashMap<String, Arc<[u8]>>>,
}

/// Events a key file's data key encrypts before another is made: each value's key and IV
/// come from the data key and a random 8-byte salt, and two values of one data key drawing
/// the same salt would share them (by the birthday bound, about a billion values of one key
/// make that a few per cent likely; a million events, with a few fields each, one in a
/// million).
const KEY_FILE_USES: u32 = 1 << 20;

/// Data keys a key file keeps unwrapped for reading, at most (a long reader sees a new one
/// every [`KEY_FILE_USES`] events of each writer).
const KEY_FILE_UNWRAPPED: usize = 1_024;

impl Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KeyFile {
    /// A master key named `name` (how the metadata refers to it).
    ///
    /// # Errors
    /// A key that is not 32 bytes.
    pub fn new(name: impl Into<String>, master: &[u8]) -> Result<KeyFile, Error> {
        if master.len() != 32 {
            return Err(Error::fatal_msg(
                "InvalidKey",
                format!("a master key is 32 bytes, not {}", master.len()),
            ));
        }
        Ok(KeyFile {
            name: name.into(),
            master: Arc::from(master),
            current: Mutex::new(None),
            unwrapped: Mutex::new(HashMap::new()),
        })
    }

    /// Reads a master key file: 32 raw bytes, or their base64 on one line. The file's name is
    /// the key's.
    ///
    /// # Errors
    /// A file that cannot be read or holds no 32-byte key.
    pub fn open(path: &std::path::Path) -> Result<KeyFile, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::fatal_msg("InvalidKey", format!("cannot read {}: {e}", path.display()))
        })?;
        let key = if bytes.len() == 32 {
            bytes
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(String::from_utf8_lossy(&bytes).trim())
                .map_err(|_| {
                    Error::fatal_msg(
                        "InvalidKey",
                        format!("{} holds neither 32 bytes nor their base64", path.display()),
                    )
                })?
        };
        let name = path
            .file_name()
            .map_or_else(|| "key".into(), |n| n.to_string_lossy().into_owned());
        KeyFile::new(name, &key)
    }

    fn alias(&self) -> String {
        format!("file:{}", self.name)
    }
}

impl KeyProvider for KeyFile {
    fn data_key(&self) -> HubFuture<'_, DataKey> {
        Box::pin(async move {
            if let Some((key, uses)) = self.current.lock().unwrap().as_mut() {
                if *uses < KEY_FILE_USES {
                    *uses += 1;
                    return Ok(key.clone());
                }
            }
            let mut plain = [0u8; 32];
            getrandom::fill(&mut plain)
                .map_err(|e| Error::fatal_msg("NoRandomness", e.to_string()))?;
            let b64 = base64::engine::general_purpose::STANDARD;
            let wrapped = encrypt_value(&self.master, &Value::String(b64.encode(plain)))?;
            let mut data_keys = serde_json::Map::new();
            data_keys.insert(self.alias(), Value::String(wrapped));
            let key = DataKey {
                plaintext: Arc::from(&plain[..]),
                data_keys,
                master_key_alias: self.alias(),
            };
            *self.current.lock().unwrap() = Some((key.clone(), 1));
            Ok(key)
        })
    }

    fn decrypt_key<'a>(&'a self, eem: &'a Eem) -> HubFuture<'a, Arc<[u8]>> {
        Box::pin(async move {
            let wrapped = eem
                .data_keys
                .get(&self.alias())
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::poison_msg(
                        "DecryptionError",
                        format!(
                            "the data key is not wrapped by {} (it is by {})",
                            self.alias(),
                            eem.master_key_alias
                        ),
                    )
                })?;
            if let Some(key) = self.unwrapped.lock().unwrap().get(wrapped) {
                return Ok(key.clone());
            }
            let text = decrypt_value(&self.master, wrapped)?;
            let key: Arc<[u8]> = text
                .as_str()
                .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
                .map(Arc::from)
                .ok_or_else(|| Error::poison_msg("DecryptionError", "the data key is malformed"))?;
            let mut unwrapped = self.unwrapped.lock().unwrap();
            if unwrapped.len() >= KEY_FILE_UNWRAPPED {
                // Unwrapped again when met again: cheap, and memory stays bounded.
                unwrapped.clear();
            }
            unwrapped.insert(wrapped.to_owned(), key.clone());
            Ok(key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SALT: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn vector_a_key() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode("3ZR5O7vX1dlpOYuiM74fX0f//GDh2ekLZ5ReJIMAMvE=")
            .unwrap()
    }

    #[test]
    fn values_encrypt_byte_for_byte_as_aws_kms_ee_encrypts_them() {
        // Vectors made by aws-kms-ee 1.0.3 (CryptoJS 4.2.0) with the salt fixed.
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(
            encrypt_with_salt(&ascending, &json!("Alice"), SALT),
            "U2FsdGVkX18BAgMEBQYHCAnhWx2X384RYSNVSWpisyk="
        );
        assert_eq!(
            encrypt_with_salt(&ascending, &json!({ "city": "X" }), SALT),
            "U2FsdGVkX18BAgMEBQYHCF9wqYufmggkdddiCLJtWSs="
        );
        // A key that is not valid UTF-8: the passphrase is its lossy decoding.
        let key = vector_a_key();
        assert_eq!(passphrase(&key).len(), 62);
        for (value, expected) in [
            (
                json!("Alice"),
                "U2FsdGVkX18BAgMEBQYHCPtowBsuBoVgzF+UZERtI+M=",
            ),
            (json!(42), "U2FsdGVkX18BAgMEBQYHCNxQhu5bBRTop1HN9OJMs08="),
            (
                json!(["a", 1]),
                "U2FsdGVkX18BAgMEBQYHCPO6KHx19q5vL1G79X5ZKpA=",
            ),
            (json!(true), "U2FsdGVkX18BAgMEBQYHCBtrUVh0fMH9jfXMiibY5AY="),
            (json!(987), "U2FsdGVkX18BAgMEBQYHCGcSG/qv0F+YvcYuhK+yPnA="),
        ] {
            assert_eq!(encrypt_with_salt(&key, &value, SALT), expected, "{value}");
            assert_eq!(decrypt_value(&key, expected).unwrap(), value);
        }
        // With a random salt, as aws-kms-ee wrote it.
        assert_eq!(
            decrypt_value(&key, "U2FsdGVkX1+QhgfXCuthCCCFPGz5CdCW49/mTNq5Ilg=").unwrap(),
            json!("Alice")
        );
    }

    #[test]
    fn decryption_reads_as_aws_kms_ee_reads() {
        let key: Vec<u8> = (0..32).collect();
        let raw = |text: &str| {
            let (k, iv) = key_and_iv(&passphrase(&key), &SALT);
            let c = cbc::Encryptor::<aes::Aes256>::new(&k.into(), &iv.into())
                .encrypt_padded_vec_mut::<Pkcs7>(text.as_bytes());
            let mut out = SALTED.to_vec();
            out.extend_from_slice(&SALT);
            out.extend_from_slice(&c);
            base64::engine::general_purpose::STANDARD.encode(out)
        };
        assert_eq!(decrypt_value(&key, &raw("1E5")).unwrap(), json!("1E5"));
        assert_eq!(decrypt_value(&key, &raw("\"1E5\"")).unwrap(), json!("1E5"));
        assert_eq!(decrypt_value(&key, &raw("hello")).unwrap(), json!("hello"));
        assert_eq!(decrypt_value(&key, &raw("123")).unwrap(), json!(123));
        assert_eq!(
            decrypt_value(&key, &raw(r#"{"a":1}"#)).unwrap(),
            json!({"a": 1})
        );
        let wrong: Vec<u8> = (1..33).collect();
        let err = decrypt_value(&wrong, &raw("\"x\"")).unwrap_err();
        assert_eq!(err.name(), "DecryptionError");
        assert!(decrypt_value(&key, "not base64!").is_err());
        assert!(decrypt_value(&key, "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8=").is_err());
    }

    /// A key file's data key is replaced after its uses, and what the old one encrypted
    /// still reads.
    #[tokio::test]
    async fn a_key_files_data_key_is_replaced_after_its_uses() {
        let keys = KeyFile::new("k", &[7; 32]).unwrap();
        let first = keys.data_key().await.unwrap();
        for _ in 1..KEY_FILE_USES {
            let again = keys.data_key().await.unwrap();
            assert_eq!(again.plaintext, first.plaintext);
        }
        let next = keys.data_key().await.unwrap();
        assert_ne!(next.plaintext, first.plaintext, "a new data key");
        let eem = |key: &DataKey| Eem {
            data_keys: key.data_keys.clone(),
            master_key_alias: key.master_key_alias.clone(),
            fields: Vec::new(),
        };
        assert_eq!(
            keys.decrypt_key(&eem(&first)).await.unwrap(),
            first.plaintext
        );
        assert_eq!(keys.decrypt_key(&eem(&next)).await.unwrap(), next.plaintext);
    }

    #[tokio::test]
    async fn an_event_round_trips_through_a_key_file_and_keeps_its_envelope() {
        let keys = KeyFile::new("test.key", &[7; 32]).unwrap();
        let event = Event::from_value(json!({
            "id": "e1", "type": "customer-created", "timestamp": 1, "partitionKey": "c-1",
            "customer": { "name": "Ann", "email": "ann@example.com", "address": { "city": "X" }, "phone": null },
            "others": [{ "email": "bob@example.com" }],
        }))
        .unwrap();
        let fields = [
            "customer.email".to_owned(),
            "address".to_owned(),
            "phone".to_owned(),
        ];
        let sealed = encrypt_event(&keys, &event, &fields).await.unwrap();
        let wire = sealed.to_json();
        assert!(!wire.contains("ann@example.com") && !wire.contains("bob@example.com"));
        assert!(!wire.contains("\"city\""));
        assert_eq!(sealed.field("customer").unwrap()["name"], "Ann");
        assert_eq!(sealed.field("customer").unwrap()["phone"], Value::Null);
        let eem: Eem = serde_json::from_value(sealed.field(EEM_FIELD).unwrap().clone()).unwrap();
        assert_eq!(eem.fields, ["email", "address", "phone"]);
        assert_eq!(eem.master_key_alias, "file:test.key");
        let opened = decrypt_event(&keys, &sealed).await.unwrap();
        assert_eq!(opened.event.to_value(), event.to_value());
        assert!(opened.secrets.contains(&"ann@example.com".to_owned()));
        // Another key file cannot read it.
        let other = KeyFile::new("other.key", &[8; 32]).unwrap();
        let err = decrypt_event(&other, &sealed).await.unwrap_err();
        assert!(
            err.to_string().contains("not wrapped by file:other.key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_fault_after_decryption_shows_neither_the_decrypted_event_nor_its_values() {
        let keys: Arc<dyn KeyProvider> = Arc::new(KeyFile::new("k", &[9; 32]).unwrap());
        let event = Event::from_value(json!({
            "id": "e1", "type": "customer-created", "timestamp": 1, "partitionKey": "c-1",
            "customer": { "name": "Ann", "email": "ann@example.com" },
        }))
        .unwrap();
        let sealed = encrypt_event(&*keys, &event, &["email".to_owned()])
            .await
            .unwrap();
        let (sink, faults) = (
            crate::memory::MemorySink::new(),
            crate::memory::MemoryFaultSink::new(),
        );
        let processor = crate::Processor::builder("p")
            .fault_sink(faults.clone())
            .pipeline(
                crate::Pipeline::builder("reads-email")
                    .decrypt(keys.clone())
                    .map(|uow| {
                        let email = uow.event().field("customer").unwrap()["email"].clone();
                        Err(crate::Error::poison_msg(
                            "Undeliverable",
                            format!("{email} bounced"),
                        ))
                    })
                    .sink(sink.clone())
                    .unwrap(),
            )
            .pipeline(
                crate::Pipeline::builder("passes")
                    .decrypt(keys.clone())
                    .sink(sink.clone())
                    .unwrap(),
            )
            .pipeline(
                // A batch's key function failing: faulted outside any step, shown the same.
                crate::Pipeline::builder("groups")
                    .decrypt(keys.clone())
                    .batch(crate::BatchConfig::count(2))
                    .group_by(|uow| {
                        let email = &uow.event().field("customer").unwrap()["email"];
                        panic!("no group for {email}")
                    })
                    .sink(sink.clone())
                    .unwrap(),
            )
            .build()
            .unwrap();
        let record = crate::Record::new("memory", "0", 1, sealed.to_json());
        processor.process_batch(vec![record], None).await;
        // The pipeline that only decrypts delivers the event in the clear.
        assert_eq!(sink.events().len(), 1);
        assert_eq!(
            sink.events()[0].field("customer").unwrap()["email"],
            "ann@example.com"
        );
        // The faults carry the event as it came, and no decrypted value.
        let mut faults = faults.faults();
        assert_eq!(faults.len(), 2);
        faults.sort_by_key(|f| {
            f.payload::<crate::fault::FaultDetails>()
                .unwrap()
                .err
                .message
        });
        let messages = ["\"[REDACTED]\" bounced", "no group for \"[REDACTED]\""];
        for (fault, message) in faults.iter().zip(messages) {
            let text = fault.to_json();
            assert!(!text.contains("ann@example.com"), "{text}");
            let details: crate::fault::FaultDetails = fault.payload().unwrap();
            assert_eq!(details.err.message, message);
            assert!(details.uow.event.unwrap().get(EEM_FIELD).is_some());
        }
    }
}
