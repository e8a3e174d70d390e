//! Data keys from AWS KMS, as aws-kms-ee gets them, for envelope encryption
//! ([`floodway::encryption`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use base64::Engine as _;
use floodway::encryption::{DataKey, Eem, KeyProvider};
use floodway::hub::HubFuture;
use floodway::Error;
use serde_json::Value;

use crate::classify::classify;

/// Data keys from AWS KMS under a master key alias, wire-compatible with aws-kms-ee: a data
/// key is made by `GenerateDataKey` (AES-256) in this region and, for each other region
/// given, wrapped by `Encrypt` there too, so that a reader in any of them can `Decrypt` it.
/// A data key is reused for `max_age` (aws-kms-ee keeps one for the life of the process);
/// decrypted data keys are remembered by their ciphertext.
#[derive(Debug)]
pub struct KmsKeys {
    region: String,
    clients: HashMap<String, aws_sdk_kms::Client>,
    alias: String,
    max_age: Option<Duration>,
    current: Mutex<Option<(DataKey, Instant)>>,
    decrypted: Mutex<HashMap<String, Arc<[u8]>>>,
}

impl KmsKeys {
    /// Keys under `master_key_alias` (`alias/...`, a key id or ARN) in `config`'s region,
    /// wrapped for `other_regions` too (aws-kms-ee's `KMS_REGIONS`).
    pub fn new(
        config: &aws_config::SdkConfig,
        master_key_alias: impl Into<String>,
        other_regions: &[String],
    ) -> KmsKeys {
        let region = config
            .region()
            .map_or_else(|| "us-east-1".to_owned(), |r| r.as_ref().to_owned());
        let mut clients = HashMap::new();
        for r in other_regions.iter().chain(std::iter::once(&region)) {
            let conf = aws_sdk_kms::config::Builder::from(config)
                .region(aws_config::Region::new(r.clone()))
                .build();
            clients.insert(r.clone(), aws_sdk_kms::Client::from_conf(conf));
        }
        KmsKeys {
            region,
            clients,
            alias: master_key_alias.into(),
            max_age: None,
            current: Mutex::new(None),
            decrypted: Mutex::new(HashMap::new()),
        }
    }

    /// Makes a new data key after `max_age` (default: one for the life of the process).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> KmsKeys {
        self.max_age = Some(max_age);
        self
    }

    async fn generate(&self) -> Result<DataKey, Error> {
        let client = &self.clients[&self.region];
        let made = client
            .generate_data_key()
            .key_id(&self.alias)
            .key_spec(DataKeySpec::Aes256)
            .send()
            .await
            .map_err(classify)?;
        let plaintext = made
            .plaintext()
            .map(|p| Arc::<[u8]>::from(p.as_ref()))
            .ok_or_else(|| Error::fatal_msg("KmsAnswer", "GenerateDataKey gave no plaintext"))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut data_keys = serde_json::Map::new();
        for (region, other) in self.clients.iter().filter(|(r, _)| **r != self.region) {
            // As aws-kms-ee: a region that cannot wrap the key is left out, not an error.
            match other
                .encrypt()
                .key_id(&self.alias)
                .plaintext(Blob::new(plaintext.to_vec()))
                .send()
                .await
            {
                Ok(wrapped) => {
                    if let Some(blob) = wrapped.ciphertext_blob() {
                        data_keys.insert(region.clone(), Value::String(b64.encode(blob)));
                    }
                }
                Err(e) => tracing::warn!(region, error = %classify(e), "cannot wrap the data key"),
            }
        }
        let own = made
            .ciphertext_blob()
            .ok_or_else(|| Error::fatal_msg("KmsAnswer", "GenerateDataKey gave no ciphertext"))?;
        data_keys.insert(self.region.clone(), Value::String(b64.encode(own)));
        Ok(DataKey {
            plaintext,
            data_keys,
            master_key_alias: self.alias.clone(),
        })
    }

    async fn unwrap(
        &self,
        client: &aws_sdk_kms::Client,
        wrapped: &str,
    ) -> Result<Arc<[u8]>, Error> {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(wrapped)
            .map_err(|_| Error::poison_msg("DecryptionError", "a data key is not base64"))?;
        let clear = client
            .decrypt()
            .ciphertext_blob(Blob::new(blob))
            .send()
            .await
            .map_err(classify)?;
        clear
            .plaintext()
            .map(|p| Arc::<[u8]>::from(p.as_ref()))
            .ok_or_else(|| Error::fatal_msg("KmsAnswer", "Decrypt gave no plaintext"))
    }
}

impl KeyProvider for KmsKeys {
    fn data_key(&self) -> HubFuture<'_, DataKey> {
        Box::pin(async move {
            let fresh = |made: &Instant| self.max_age.is_none_or(|age| made.elapsed() < age);
            if let Some((key, made)) = self.current.lock().unwrap().as_ref() {
                if fresh(made) {
                    return Ok(key.clone());
                }
            }
            let key = self.generate().await?;
            *self.current.lock().unwrap() = Some((key.clone(), Instant::now()));
            Ok(key)
        })
    }

    fn decrypt_key<'a>(&'a self, eem: &'a Eem) -> HubFuture<'a, Arc<[u8]>> {
        Box::pin(async move {
            // This region's key first, then the others' (as aws-kms-ee tries them).
            let mut tries: Vec<(&String, &str)> = eem
                .data_keys
                .iter()
                .filter_map(|(r, v)| Some((r, v.as_str()?)))
                .collect();
            tries.sort_by_key(|(r, _)| **r != self.region);
            let mut last = None;
            for (region, wrapped) in tries {
                if let Some(key) = self.decrypted.lock().unwrap().get(wrapped) {
                    return Ok(key.clone());
                }
                let Some(client) = self.clients.get(region) else {
                    continue;
                };
                match self.unwrap(client, wrapped).await {
                    Ok(key) => {
                        self.decrypted
                            .lock()
                            .unwrap()
                            .insert(wrapped.to_owned(), key.clone());
                        return Ok(key);
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| {
                    Error::poison_msg(
                        "DecryptionError",
                        format!(
                            "no data key of {} is for a region this reader knows ({})",
                            eem.master_key_alias, self.region
                        ),
                    )
                })
                .into())
        })
    }
}
