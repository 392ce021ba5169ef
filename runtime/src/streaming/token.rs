//! Single-use, short-lived tokens for prepared sessions, as containerd's
//! request cache: the CRI call stores what to run and answers a URL with a
//! token; the first request for it takes it. Unknown, expired and used
//! tokens are all "not found".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a token is valid (containerd: one minute).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens pending at once (containerd: 1000).
pub const MAX_TOKENS: usize = 1000;

/// The store is full of unexpired tokens.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_TOKENS} streaming requests are pending already")]
pub struct TooManyTokens;

/// Pending sessions by token.
#[derive(Debug)]
pub struct TokenStore<T> {
    inner: Mutex<HashMap<String, (Instant, T)>>,
    ttl: Duration,
}

impl<T> TokenStore<T> {
    pub fn new(ttl: Duration) -> Self {
        TokenStore {
            inner: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, T)>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `value` under a fresh random token.
    pub fn insert(&self, value: T) -> Result<String, TooManyTokens> {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        if map.len() >= MAX_TOKENS {
            return Err(TooManyTokens);
        }
        let token = loop {
            let t = random_token();
            if !map.contains_key(&t) {
                break t;
            }
        };
        map.insert(token.clone(), (now, value));
        Ok(token)
    }

    /// Takes the value of an unexpired token; the token is gone after.
    pub fn take(&self, token: &str) -> Option<T> {
        let (at, value) = self.lock().remove(token)?;
        (at.elapsed() < self.ttl).then_some(value)
    }

    /// Tokens pending (expired ones included until the next insert).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// 128 random bits, URL-safe (hex).
fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // Never a guessable token: fall back to the OS's hashing keys,
        // which std seeds from the kernel's randomness too.
        use std::hash::{BuildHasher, RandomState};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let v = RandomState::new().hash_one(i);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_are_single_use_and_expire() {
        let store = TokenStore::new(TOKEN_TTL);
        let a = store.insert(1).unwrap();
        let b = store.insert(2).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(store.take(&a), Some(1));
        assert_eq!(store.take(&a), None, "used");
        assert_eq!(store.take("nope"), None, "unknown");
        tokio::time::advance(TOKEN_TTL + Duration::from_secs(1)).await;
        assert_eq!(store.take(&b), None, "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_tokens_are_bounded_and_expired_ones_make_room() {
        let store = TokenStore::new(TOKEN_TTL);
        for i in 0..MAX_TOKENS {
            store.insert(i).unwrap();
        }
        assert!(store.insert(0).is_err());
        tokio::time::advance(TOKEN_TTL).await;
        store.insert(0).expect("expired tokens were dropped");
        assert_eq!(store.len(), 1);
    }
}
