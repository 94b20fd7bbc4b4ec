//! Static chunk URLs: where a static host (nginx, S3, a CDN) that serves a chunk
//! store directory as plain files has each of them.
//!
//! A server started with `--chunk-base-url URL` hands `URL` to devices with each
//! deployment; a device then fetches
//!
//! ```text
//! URL/chunks/<first 2 hex digits>/<64 hex digits>   a chunk's stored form (zstd or raw)
//! URL/dictionaries/<8 hex digits>                   a zstd dictionary, by its zstd id
//! ```
//!
//! with plain `GET`s, exactly the layout of [`shoal_artifact::ChunkStore`] (the
//! server's `DIR/store`), so the static host serves that directory as it is. The
//! paths are stable: a chunk's id is the BLAKE3 of its bytes, so a file never
//! changes under its name (cache it forever). The device verifies every chunk
//! against its signed manifest, as with every other source; the static host is
//! not trusted.

use shoal_artifact::ChunkId;

/// Why a chunk base URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    /// Not a URL at all.
    #[error("{url:?} is not a URL: {reason}")]
    Invalid {
        /// The text given.
        url: String,
        /// What the URL parser said.
        reason: String,
    },
    /// A scheme other than `http` or `https`.
    #[error("{url:?}: the scheme must be http or https, not {scheme}")]
    Scheme {
        /// The text given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A query string or a fragment, which chunk paths cannot be appended to.
    #[error("{url:?} has a query or a fragment; give the base of the chunk store only")]
    QueryOrFragment {
        /// The text given.
        url: String,
    },
    /// A user name or password in the URL (it would be logged and handed to every
    /// device).
    #[error("{url:?} carries credentials; a static chunk host must serve without them")]
    Credentials {
        /// The text given, credentials removed.
        url: String,
    },
}

/// A validated static chunk base URL (`http(s)://host[:port][/path]`, no trailing
/// slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBase(String);

impl StaticBase {
    /// Parses and normalises a base URL.
    pub fn parse(text: &str) -> Result<StaticBase, BaseUrlError> {
        let url = reqwest::Url::parse(text.trim()).map_err(|e| BaseUrlError::Invalid {
            url: text.to_owned(),
            reason: e.to_string(),
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(BaseUrlError::Scheme {
                url: text.to_owned(),
                scheme: url.scheme().to_owned(),
            });
        }
        if !url.username().is_empty() || url.password().is_some() {
            let mut clean = url.clone();
            let _ = clean.set_username("");
            let _ = clean.set_password(None);
            return Err(BaseUrlError::Credentials {
                url: clean.to_string(),
            });
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(BaseUrlError::QueryOrFragment {
                url: text.to_owned(),
            });
        }
        Ok(StaticBase(url.as_str().trim_end_matches('/').to_owned()))
    }

    /// The base, normalised.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL of a chunk's stored form.
    pub fn chunk(&self, id: &ChunkId) -> String {
        format!("{}/{}", self.0, shoal_artifact::read::chunk_path(id))
    }

    /// The URL of chunk `id`'s per-base delta record against base release `base`
    /// (the chunk store's `deltas/<base>/<2 hex>/<64 hex>`).
    pub fn delta(&self, base: &[u8; 32], id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!(
            "{}/deltas/{}/{}/{hex}",
            self.0,
            hex::encode(base),
            &hex[..2]
        )
    }

    /// The URL of the index of release `release`'s per-base encodings against
    /// `base`: which chunks have a record, and each record's length.
    pub fn delta_index(&self, base: &[u8; 32], release: &[u8; 32]) -> String {
        format!(
            "{}/deltas/{}/index/{}",
            self.0,
            hex::encode(base),
            hex::encode(release)
        )
    }

    /// The URL of a zstd dictionary.
    pub fn dictionary(&self, zstd_id: u32) -> String {
        format!("{}/dictionaries/{zstd_id:08x}", self.0)
    }
}

impl std::fmt::Display for StaticBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_store_layout() {
        let b = StaticBase::parse("http://cdn.example:8080/fleet/store/").expect("valid");
        assert_eq!(b.as_str(), "http://cdn.example:8080/fleet/store");
        let id = ChunkId([0xab; 32]);
        assert_eq!(
            b.chunk(&id),
            format!(
                "http://cdn.example:8080/fleet/store/chunks/ab/{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            b.dictionary(0x0012_abcd),
            "http://cdn.example:8080/fleet/store/dictionaries/0012abcd"
        );
        assert_eq!(
            b.delta(&[0x01; 32], &id),
            format!(
                "http://cdn.example:8080/fleet/store/deltas/{}/ab/{}",
                "01".repeat(32),
                "ab".repeat(32)
            )
        );
        assert_eq!(
            b.delta_index(&[0x01; 32], &[0x02; 32]),
            format!(
                "http://cdn.example:8080/fleet/store/deltas/{}/index/{}",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
        let root = StaticBase::parse("https://cdn.example").expect("valid");
        assert_eq!(root.as_str(), "https://cdn.example");
        assert!(
            root.chunk(&id)
                .starts_with("https://cdn.example/chunks/ab/")
        );
    }

    #[test]
    fn bad_base_urls_are_refused_precisely() {
        assert!(matches!(
            StaticBase::parse("cdn.example/store"),
            Err(BaseUrlError::Invalid { .. })
        ));
        assert!(matches!(
            StaticBase::parse(""),
            Err(BaseUrlError::Invalid { .. })
        ));
        assert_eq!(
            StaticBase::parse("ftp://cdn.example/store"),
            Err(BaseUrlError::Scheme {
                url: "ftp://cdn.example/store".into(),
                scheme: "ftp".into()
            })
        );
        assert_eq!(
            StaticBase::parse("file:///srv/store"),
            Err(BaseUrlError::Scheme {
                url: "file:///srv/store".into(),
                scheme: "file".into()
            })
        );
        assert_eq!(
            StaticBase::parse("http://cdn.example/store?sig=1"),
            Err(BaseUrlError::QueryOrFragment {
                url: "http://cdn.example/store?sig=1".into()
            })
        );
        assert_eq!(
            StaticBase::parse("http://cdn.example/store#x"),
            Err(BaseUrlError::QueryOrFragment {
                url: "http://cdn.example/store#x".into()
            })
        );
        let e = StaticBase::parse("https://bob:secret@cdn.example/store").expect_err("creds");
        assert_eq!(
            e,
            BaseUrlError::Credentials {
                url: "https://cdn.example/store".into()
            }
        );
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
