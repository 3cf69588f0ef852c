//! [`Attempts`], what a response to a covered request carries.

use std::fmt;

use http::{HeaderValue, Response};

/// Put in the extensions of every response to a covered request: how many
/// attempts it took, and the key they carried.
///
/// A caller that must give up (the attempts ran out on a `503`) can keep
/// the key and try again later with the same one.
#[derive(Clone, PartialEq, Eq)]
pub struct Attempts {
    count: u32,
    key: HeaderValue,
}

impl Attempts {
    /// How many attempts were sent; 1 means no retry.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The key header's value, as every attempt sent it (the sf-string form,
    /// quotes included, for a key the layer made).
    pub fn key(&self) -> &HeaderValue {
        &self.key
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys can be guessable secrets: never print them whole.
        f.debug_struct("Attempts")
            .field("count", &self.count)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

/// `res` with its [`Attempts`] in its extensions.
pub(super) fn with_attempts<T>(mut res: Response<T>, count: u32, key: HeaderValue) -> Response<T> {
    res.extensions_mut().insert(Attempts { count, key });
    res
}
